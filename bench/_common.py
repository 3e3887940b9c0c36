"""Helpers shared by the benchmark scripts: timing, the machine header, tables, CSV/JSON and plots.

Nothing here knows about a particular op. A benchmark script
    1. prints ``format_header(machine_info())``,
    2. times callables with ``measure`` (median of repeats after a warm-up, with an optional check
       of the first timed result, so that nothing wrong is ever timed),
    3. prints tables with ``format_table``,
    4. writes ``write_csv``, ``write_json`` and ``plot_loglog`` into its results folder.
"""
import csv
import gc
import importlib
import importlib.metadata
import math
import os
import statistics
import sys
import time
import tracemalloc
from dataclasses import dataclass, field

import numpy as np

from minilm.experiments.scaling import fit_slope, relative_error, write_json  # noqa: F401  (re-exported)
from minilm.experiments.scaling import machine_info as experiments_machine_info


# ----------------------------------------------------------------------------------------------
# Timing

@dataclass
class Timing:
    """The result of ``measure``.

    seconds    median wall time of the timed repeats (None when the check failed or the call raised)
    times      every timed repeat, in seconds
    first      what the first timed repeat returned (the value that was checked)
    ok         False when the check or the call failed; ``note`` then says why
    """
    seconds: float | None
    times: list = field(default_factory=list)
    first: object = None
    ok: bool = True
    note: str = ""

    @property
    def ms(self):
        return None if self.seconds is None else 1e3 * self.seconds


def measure(fn, repeats, warmup=1, check=None, budget_s=None):
    """Time ``fn()``: ``warmup`` untimed calls (JIT compilation, caches), then up to ``repeats``
    timed calls; the reported time is their median.

    check:    optional callable(result) -> (ok, message), applied to the result of the first timed
              call. When it fails the remaining repeats are not run and the Timing carries ok=False
              and the message: a wrong result is never reported as a time. When it passes, its message is
              kept in Timing.note.
    budget_s: optional soft limit on the time spent in the timed repeats; slow calls get fewer
              repeats (at least one). len(Timing.times) says how many ran.
    """
    try:
        for _ in range(warmup):
            fn()
        times = []
        first = None
        note = ""
        for i in range(max(1, int(repeats))):
            gc.collect()
            start = time.perf_counter()
            result = fn()
            times.append(time.perf_counter() - start)
            if i == 0:
                first = result
                if check is not None:
                    ok, note = check(result)
                    if not ok:
                        return Timing(None, times, first, False, note)
            del result
            if budget_s is not None and sum(times) + times[-1] > budget_s:
                break
    except Exception as error:       # a failing implementation is reported, not fatal
        return Timing(None, [], None, False, f"{type(error).__name__}: {error}")
    return Timing(statistics.median(times), times, first, True, note)


def peak_traced_bytes(fn):
    """Run ``fn()`` under tracemalloc; return (result, peak bytes allocated above the level at the
    start). NumPy reports its array buffers to tracemalloc, so this sees every array that the call
    allocates through NumPy (including those made in a Numba kernel's Python wrapper), but not
    memory that compiled code allocates on its own (Numba's runtime inside an njit function, BLAS
    scratch, PyTorch's allocator)."""
    gc.collect()
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        result = fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        if not was_tracing:
            tracemalloc.stop()
    return result, peak - base


def compare_outputs(actual, reference, tolerance):
    """Compare two dicts name -> array on the names they share.

    Returns (ok, message): ok when every shared entry has relative_error <= tolerance. The message
    lists the worst error per name (or says that nothing could be compared)."""
    names = [name for name in reference if name in actual
             and actual[name] is not None and reference[name] is not None]
    if not names:
        return False, "nothing to compare"
    errors = {name: relative_error(actual[name], reference[name]) for name in names}
    bad = {name: err for name, err in errors.items() if not err <= tolerance}
    summary = ", ".join(f"{name} {err:.1e}" for name, err in errors.items())
    if bad:
        return False, f"disagrees with the reference (tolerance {tolerance:.0e}): {summary}"
    return True, f"max rel. error {max(errors.values()):.1e} ({summary})"


# ----------------------------------------------------------------------------------------------
# The machine header

def _version(module_name):
    try:
        module = importlib.import_module(module_name)
    except Exception:                  # not installed, or broken: the header says so
        return None
    version = getattr(module, "__version__", None)
    if version is None:
        try:
            version = importlib.metadata.version(module_name)
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
    return version


def _blas_info():
    """A short description of the BLAS NumPy uses: threadpoolctl when importable, else numpy.show_config."""
    try:
        import threadpoolctl
        pools = threadpoolctl.threadpool_info()
        described = [f"{p.get('internal_api')} {p.get('version')} ({p.get('threading_layer', '?')}, "
                     f"{p.get('num_threads')} threads)" for p in pools if p.get("user_api") == "blas"]
        if described:
            return "; ".join(described)
    except Exception:                  # threadpoolctl missing or unable to inspect: fall back
        pass
    try:
        config = np.show_config(mode="dicts")
        blas = config.get("Build Dependencies", {}).get("blas", {})
        if blas:
            return f"{blas.get('name', '?')} {blas.get('version', '')} (from numpy.show_config)".replace("  ", " ")
    except Exception:                  # older NumPy without mode="dicts"
        pass
    return "unknown"


def machine_info(extra=None):
    """A dict describing where the numbers were measured: the tour's machine header (CPU, cores,
    load, versions) plus torch, the BLAS and Numba's threading layer. ``extra`` entries are appended."""
    info = experiments_machine_info()
    info["torch"] = _version("torch") or "not installed"
    info["blas"] = _blas_info()
    try:
        import numba
        info["numba threads"] = f"{numba.get_num_threads()} ({numba.config.THREADING_LAYER} layer)"
    except Exception:                  # numba missing: the version line already says so
        pass
    info.update(extra or {})
    return info


def format_header(info, title="benchmark"):
    width = max(len(key) for key in info)
    lines = [f"# {title}"] + [f"{key:<{width}} : {value}" for key, value in info.items()]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Tables

def format_cell(value, digits=3):
    """Numbers to short fixed strings: None -> '-', floats with ``digits`` significant digits."""
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    value = float(value)
    if not math.isfinite(value):
        return str(value)
    if value == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(value)))
    decimals = max(0, digits - 1 - magnitude)
    return f"{value:.{decimals}f}"


def format_table(title, columns, rows, notes=()):
    """A fixed-width text table. rows: lists of cells (numbers, strings or None)."""
    cells = [[format_cell(c) for c in row] for row in rows]
    widths = [max([len(col)] + [len(row[i]) for row in cells]) for i, col in enumerate(columns)]
    rule = "  ".join("-" * w for w in widths)
    lines = [title, rule, "  ".join(col.rjust(w) for col, w in zip(columns, widths)), rule]
    lines += ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in cells]
    lines.append(rule)
    lines += [f"  {note}" for note in notes]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Files

def write_csv(path, rows):
    """rows: a list of dicts; the columns are the union of their keys, in first-seen order."""
    columns = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def plot_loglog(path, panels, xlabel="L", ylabel="time (ms)"):
    """One log-log panel per entry of ``panels``: a list of (title, {series name: (xs, ys)}).
    The fitted slope of each series is written in its legend entry. Returns False (and writes
    nothing) when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(5.6 * n, 4.6), squeeze=False)
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, series) in zip(axes[0], panels):
        colors = {}                    # "numba fwd" and "numba fwd+bwd" share a colour
        all_x = set()
        for name, (xs, ys) in series.items():
            points = [(x, y) for x, y in zip(xs, ys) if y is not None and y > 0]
            if not points:
                continue
            px, py = zip(*points)
            all_x.update(px)
            slope = fit_slope(px, py)
            label = name if slope is None else f"{name}  (slope {slope:.2f})"
            backward = "fwd+bwd" in name or "f+b" in name
            base = name.replace(" fwd+bwd", "").replace(" f+b", "").replace(" fwd", "")
            color = colors.setdefault(base, palette[len(colors) % len(palette)])
            ax.plot(px, py, "--" if backward else "-", color=color, marker="o", markersize=3.5, label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        if all_x:
            ax.set_xticks(sorted(all_x))
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def python_command():
    """How this script was started, for the header."""
    return " ".join([os.path.basename(sys.executable)] + sys.argv)
