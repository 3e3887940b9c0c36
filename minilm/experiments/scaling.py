"""How the cost of each token mixer grows with the sequence length L (claims 1, 2 and 3).

For L = 256, 512, ... (powers of two; up to 32K in the full run) every series below runs a
forward and a backward pass on random float32 inputs, batch 1, and records

    fwd_ms      wall time of the forward
    fwdbwd_ms   wall time of forward + backward (the two are timed in the same run)
                both the fastest of three repeats (two for points slower than a second): on a
                shared machine an interruption only ever adds time, and the first run at a new L
                also pays for fresh memory pages (the NumPy references at L = 8192 ran up to 1.6x
                slower the first time), so the fastest repeat is the best estimate of the work
                itself (the advice of Python's timeit)
    peak_bytes  the most memory the forward + backward allocated above what was allocated before
                (tracemalloc: every NumPy array, also those a Numba kernel's wrapper creates; not
                what compiled code allocates on its own, which here is a few small tile buffers)

Series (op, mode, backend), with the function each one calls:

    attention          naive      numpy  minilm.ops.attention.forward: the full (L, L) score matrix
    attention          tiled      numba  minilm.kernels.cpu.attention: tiles + online softmax, O(L) memory
    linear_attention   parallel   numpy  minilm.ops.linear_attention, mode="parallel": ((φ(Q)φ(K)ᵀ) ⊙ M) V
    linear_attention   recurrent  numpy  mode="recurrent": S_t = S_{t-1} + φ(k_t)ᵀ v_t, one token at a time
    linear_attention   chunked    numpy  mode="chunked": the parallel form inside chunks of 64, the state between
    linear_attention   chunked    numba  minilm.kernels.cpu.linear_attention
    selective_scan     parallel   numpy  minilm.ops.selective_scan, mode="parallel": log-depth associative scan
    selective_scan     recurrent  numpy  mode="recurrent": h_t = a_t h_{t-1} + b_t, one step at a time
    selective_scan     chunked    numpy  mode="chunked": the parallel scan inside chunks, the state between
    selective_scan     fused      numba  minilm.kernels.cpu.selective_scan: sequential over time in compiled
                                         code, one stored state per 256 steps
    selective_scan     chunked    cuda   minilm.kernels.cuda.selective_scan (only where a GPU is usable)

The Numba and CUDA series go through the op with backend="numba" / "cuda" when the op has the kernel
wired in, else through the kernel module directly; before anything is timed, each series' output is
compared with the NumPy reference at the smallest L, and a series that disagrees is not timed.

Each series stops early ("capped") when one of its points took longer than the per-point time cap,
when the next point is predicted (from the growth between the last two points) to take more than
twice the cap or more than the time left in the section's budget, or to need more than a fraction
of the free memory. The quadratic series stop first: that early stop is itself the O(L²) result.

Summaries per series (`summarize`): the log-log slope p of time ~ L^p fitted over the (up to) three
largest points, i.e. the average growth over the last two doublings (small L is dominated by fixed
overheads, and one doubling alone is at the mercy of one noisy point), and the doubling ratio
time(L_max) / time(L_max / 2). O(L) gives p ≈ 1 and ratio ≈ 2; O(L²) gives p ≈ 2 and ratio ≈ 4.

Shapes legend: B batch, H heads, T = L time, D channels, N state size.
"""
import gc
import importlib
import json
import math
import os
import platform
import sys
import time
import tracemalloc
from dataclasses import dataclass, field

import numpy as np

# ----------------------------------------------------------------------------------------------
# Problem sizes (a small model's layer: d_model 128 = 4 heads of 32; Mamba's inner width 256, N 16)

HEADS, HEAD_DIM = 4, 32
SCAN_CHANNELS, SCAN_STATE = 256, 16
CHUNK = 64
DTYPE = np.float32
SEED = 0

LENGTHS = {"quick": [2 ** p for p in range(8, 14)],      # 256 .. 8192 (the budget stops the slow series)
           "full": [2 ** p for p in range(8, 16)]}       # 256 .. 32768
POINT_CAP_S = {"quick": 1.0, "full": 10.0}               # stop a series after a point slower than this
BUDGET_S = {"quick": 75.0, "full": 600.0}                # the whole section, JIT compilation included
MEMORY_FRACTION = 0.4                                    # of MemAvailable, for one point's prediction
CHECK_TOLERANCE = 1e-4                                   # max|a-r| / max|r| against the reference, float32
SLOPE_POINTS = 3                                         # largest points used for the fitted slope

OPS = ("attention", "linear_attention", "selective_scan")


# ----------------------------------------------------------------------------------------------
# Small measurement helpers (also used by minilm.experiments.decode and .tour)

def fit_slope(xs, ys):
    """Least-squares slope of log y on log x (the p of y ~ x^p); None with fewer than 2 points."""
    points = [(x, y) for x, y in zip(xs, ys) if x and y and x > 0 and y > 0]
    if len(points) < 2:
        return None
    lx = np.log([p[0] for p in points])
    ly = np.log([p[1] for p in points])
    return float(np.polyfit(lx, ly, 1)[0])


def relative_error(actual, reference):
    """max|a - r| / max|r| (0 when both are zero, inf for a shape mismatch)."""
    a = np.asarray(actual, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    if a.shape != r.shape:
        return math.inf
    scale = float(np.max(np.abs(r))) if r.size else 0.0
    diff = float(np.max(np.abs(a - r))) if r.size else 0.0
    if scale == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / scale


def available_memory_bytes():
    """MemAvailable from /proc/meminfo, or None where that file does not exist."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(name):
    try:
        return getattr(importlib.import_module(name), "__version__", "unknown")
    except Exception:                  # not installed: say so instead of failing
        return None


def machine_info():
    """Where the numbers were measured: CPU, cores, load, versions."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpu": cpu_model(),
        "cores": f"{os.cpu_count()} logical, {usable} usable by this process",
        "os": platform.platform(),
        "python": platform.python_version(),
        "numpy": _version("numpy"),
        "numba": _version("numba"),
        "matplotlib": _version("matplotlib"),
        "minilm": _version("minilm"),
    }
    try:
        info["load average"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        pass
    try:
        import numba
        info["numba threads"] = numba.get_num_threads()
    except Exception:                  # numba missing: its version line already says so
        pass
    return info


def jsonable(x):
    """Convert NumPy scalars and arrays (and non-finite floats, to None) for json.dump."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    return x


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(jsonable(obj), f, indent=2)
        f.write("\n")


def notify(progress, message):
    """Tell a progress display what just happened; progress is None or a callable(message)."""
    if progress is not None:
        progress(message)


def pyplot():
    """matplotlib.pyplot with the file-only Agg backend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


# ----------------------------------------------------------------------------------------------
# Inputs

def attention_inputs(L, seed=SEED):
    """q, k, v (1, H, L, Dh) standard normal, and dout (1, H, L, Dh)."""
    rng = np.random.default_rng(seed)
    shape = (1, HEADS, L, HEAD_DIM)
    q, k, v, dout = (rng.standard_normal(shape).astype(DTYPE) for _ in range(4))
    return {"q": q, "k": k, "v": v}, dout


def scan_inputs(L, seed=SEED):
    """Mamba-like scan inputs for (B, T, D, N) = (1, L, SCAN_CHANNELS, SCAN_STATE) and dout (1, L, D).

    A = -(1..N) per channel (the S4D-real init), Δ = softplus(delta + delta_bias) with the bias
    giving steps log-uniform in [1e-3, 1e-1], D skip ones, a SiLU gate z: the options Mamba uses.
    """
    rng = np.random.default_rng(seed)
    D, N = SCAN_CHANNELS, SCAN_STATE
    dt = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), D))
    inputs = {
        "u": rng.standard_normal((1, L, D)).astype(DTYPE),
        "delta": (0.1 * rng.standard_normal((1, L, D))).astype(DTYPE),
        "A": -np.tile(np.arange(1, N + 1, dtype=DTYPE), (D, 1)),
        "Bm": rng.standard_normal((1, L, N)).astype(DTYPE),
        "Cm": rng.standard_normal((1, L, N)).astype(DTYPE),
        "D": np.ones(D, dtype=DTYPE),
        "z": rng.standard_normal((1, L, D)).astype(DTYPE),
        "delta_bias": (dt + np.log(-np.expm1(-dt))).astype(DTYPE),   # inverse softplus of dt
    }
    return inputs, rng.standard_normal((1, L, D)).astype(DTYPE)


INPUTS = {"attention": attention_inputs, "linear_attention": attention_inputs, "selective_scan": scan_inputs}


# ----------------------------------------------------------------------------------------------
# The series: how each (op, mode, backend) is called

# options of each op, identical for every series of that op
LINEAR_OPTIONS = dict(causal=True, chunk_size=CHUNK, feature_map="elu1", scale=1.0, normalize=False)
SCAN_OPTIONS = dict(delta_softplus=True, chunk_size=CHUNK)
NUMPY_MODES = {"attention": ["naive"], "linear_attention": ["parallel", "recurrent", "chunked"],
               "selective_scan": ["parallel", "recurrent", "chunked"]}
FAST_MODES = {"numba": {"attention": "tiled", "linear_attention": "chunked", "selective_scan": "fused"},
              "cuda": {"selective_scan": "chunked"}}
REFERENCE_MODE = {"attention": "naive", "linear_attention": "chunked", "selective_scan": "chunked"}
KERNEL_MODULES = {"numba": "minilm.kernels.cpu.{op}", "cuda": "minilm.kernels.cuda.{op}"}
DEFAULT_BACKENDS = ("numpy", "numba", "cuda")


def _op_module(op):
    return importlib.import_module(f"minilm.ops.{op}")


def _op_call(op, inputs, mode, backend):
    """Run the op's forward; returns (out, cache)."""
    module = _op_module(op)
    if op == "attention":
        return module.forward(inputs["q"], inputs["k"], inputs["v"], causal=True, backend=backend)
    if op == "linear_attention":
        return module.forward(inputs["q"], inputs["k"], inputs["v"], mode=mode, backend=backend, **LINEAR_OPTIONS)
    return module.forward(inputs["u"], inputs["delta"], inputs["A"], inputs["Bm"], inputs["Cm"], D=inputs["D"],
                          z=inputs["z"], delta_bias=inputs["delta_bias"], mode=mode, backend=backend, **SCAN_OPTIONS)


def _kernel_call(kernel, op, inputs):
    """Run a kernel module's forward directly (same arguments as the op, minus mode and backend)."""
    if op == "attention":
        return kernel.forward(inputs["q"], inputs["k"], inputs["v"], causal=True)
    if op == "linear_attention":
        return kernel.forward(inputs["q"], inputs["k"], inputs["v"], **LINEAR_OPTIONS)
    return kernel.forward(inputs["u"], inputs["delta"], inputs["A"], inputs["Bm"], inputs["Cm"], D=inputs["D"],
                          z=inputs["z"], delta_bias=inputs["delta_bias"], **SCAN_OPTIONS)


@dataclass
class Series:
    """One curve of the scaling plot. forward(inputs) -> (out, cache); backward(dout, cache)."""
    op: str
    mode: str
    backend: str
    forward: object
    backward: object
    via: str = "op"                       # "op" (backend= of minilm.ops) or "kernel" (the module directly)
    to_device: object = None              # moves the inputs (CUDA) before timing
    sync: object = None                   # waits for queued device work before a clock is read
    active: bool = True
    stop: str = ""                        # why the series ended (filled in as it runs)
    check: str = ""                       # the agreement with the reference at the smallest L
    first_call_s: float = None            # the untimed first fwd+bwd (includes JIT compilation)
    points: list = field(default_factory=list)
    label: str = ""

    def __post_init__(self):
        self.label = f"{self.op}/{self.mode}/{self.backend}"


def _numpy_series(op):
    module = _op_module(op)
    return [Series(op, mode, "numpy", forward=lambda inputs, op=op, mode=mode: _op_call(op, inputs, mode, "numpy"),
                   backward=module.backward)
            for mode in NUMPY_MODES[op]]


def _fast_series(op, backend, through_op=True):
    """The numba / cuda series of an op, or (None, reason) when it cannot run here.

    through_op: call the op with backend=... when the op has the kernel wired in (else, or when
    False, the kernel module's own forward / backward)."""
    mode = FAST_MODES[backend].get(op)
    if mode is None:
        return None, f"no {backend} kernel for {op}"
    try:
        kernel = importlib.import_module(KERNEL_MODULES[backend].format(op=op))
    except Exception as error:            # missing module or missing numba.cuda: skip, with the reason
        return None, f"{op} {backend} kernel not importable ({type(error).__name__}: {error})"
    ok, reason = kernel.available()
    if not ok:
        return None, f"{op} {backend}: {reason}"
    if backend == "cuda":
        from minilm.kernels.cuda import _device
        if _device.simulator_enabled():
            return None, f"{op} cuda: only the CUDA simulator is available (correct but CPU speed); not timed"

    module = _op_module(op)
    tiny, _ = INPUTS[op](8)
    via = "op" if through_op else "kernel"
    if through_op:
        try:                              # is the kernel wired into the op as backend=...?
            _op_call(op, tiny, REFERENCE_MODE[op], backend)
        except Exception:                 # BackendUnavailable (not wired) or an option it refuses
            via = "kernel"
    if via == "op":
        forward = lambda inputs: _op_call(op, inputs, REFERENCE_MODE[op], backend)   # noqa: E731
        backward = module.backward
    else:
        forward = lambda inputs: _kernel_call(kernel, op, inputs)                    # noqa: E731
        backward = kernel.backward
    series = Series(op, mode, backend, forward=forward, backward=backward, via=via)
    if backend == "cuda":
        from minilm.kernels.cuda import _device
        series.to_device = lambda inputs, dout: ({name: _device.to_device(name, x) for name, x in inputs.items()},
                                                 _device.to_device("dout", dout))
        series.sync = _device.synchronize
    return series, ""


def build_series(backends=DEFAULT_BACKENDS, ops=OPS, through_op=True):
    """Every series that can run here, in plot order, and notes on those that cannot."""
    series, notes = [], []
    for op in ops:
        if "numpy" in backends:
            series += _numpy_series(op)
        for backend in ("numba", "cuda"):
            if backend not in backends:
                continue
            s, reason = _fast_series(op, backend, through_op)
            if s is None:
                if backend == "numba" or "no cuda kernel" not in reason:
                    notes.append(reason)
            else:
                series.append(s)
    return series, notes


# ----------------------------------------------------------------------------------------------
# Measuring one point

def _run_once(series, inputs, dout):
    """One forward + backward: returns (forward seconds, backward seconds)."""
    sync = series.sync or (lambda: None)
    start = time.perf_counter()
    out, cache = series.forward(inputs)
    sync()
    middle = time.perf_counter()
    series.backward(dout, cache)
    sync()
    end = time.perf_counter()
    del out, cache
    return middle - start, end - middle


def _traced_peak(series, inputs, dout):
    """Peak bytes allocated (tracemalloc) during one forward + backward, above the level before it."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        out, cache = series.forward(inputs)
        series.backward(dout, cache)
        _, peak = tracemalloc.get_traced_memory()
        del out, cache
    finally:
        tracemalloc.stop()
    return peak - base


def _host(x):
    return x.copy_to_host() if hasattr(x, "copy_to_host") else np.asarray(x)


def check_against_reference(series, L, reference_cache):
    """(ok, message): the series' forward output vs the NumPy reference mode at length L."""
    if series.backend == "numpy" and series.mode == REFERENCE_MODE[series.op]:
        return True, "the reference"
    if reference_cache.get(series.op) is None:
        inputs, _ = INPUTS[series.op](L)
        reference_cache[series.op] = _op_call(series.op, inputs, REFERENCE_MODE[series.op], "numpy")[0]
    inputs, dout = INPUTS[series.op](L)
    if series.to_device is not None:
        inputs, dout = series.to_device(inputs, dout)
    out, _ = series.forward(inputs)
    if series.sync is not None:
        series.sync()
    error = relative_error(_host(out), reference_cache[series.op])
    ok = error <= CHECK_TOLERANCE
    return ok, f"max rel. error {error:.1e} vs numpy {REFERENCE_MODE[series.op]} at L={L}" + ("" if ok else " (too large)")


def measure_point(series, L):
    """Time and peak memory of one (series, L). Returns (row, seconds of one fwd+bwd run)."""
    inputs, dout = INPUTS[series.op](L)
    if series.to_device is not None:
        inputs, dout = series.to_device(inputs, dout)
    gc.collect()      # once per point: the arrays of a run are freed by reference counting
    runs = [_run_once(series, inputs, dout)]
    # three repeats, the fastest kept (see the module docstring); points slower than a second get
    # two: a stall is small next to them, and they are what the budget pays for
    repeats = 2 if sum(runs[0]) < 1.0 else 1
    runs += [_run_once(series, inputs, dout) for _ in range(repeats)]
    single = min(f + b for f, b in runs)
    peak = None if series.backend == "cuda" else _traced_peak(series, inputs, dout)   # GPU memory: not traced
    row = {"op": series.op, "mode": series.mode, "backend": series.backend, "L": int(L),
           "fwd_ms": 1e3 * min(f for f, _ in runs),
           "fwdbwd_ms": 1e3 * single,
           "peak_bytes": None if peak is None else int(peak)}
    return row, single


def _growth(values):
    """What the next doubling of L should cost, as a factor: the factor between the last two values,
    kept within [2, 5] (no op here grows faster than L² per step, about ×4; one stall of a shared
    machine must not stop a series)."""
    if len(values) >= 2 and values[-2] and values[-2] > 0:
        return min(5.0, max(2.0, values[-1] / values[-2]))
    return 2.0


# ----------------------------------------------------------------------------------------------
# The sweep

@dataclass
class ScalingResult:
    rows: list
    series: list          # summaries (see summarize), including why each series stopped
    notes: list           # series that could not run here, and why
    config: dict


def measure_scaling(quick=False, progress=None, budget_s=None, lengths=None, point_cap_s=None,
                    backends=None, ops=OPS, through_op=True):
    """Run the sweep; returns a ScalingResult. lengths / point_cap_s / budget_s override the presets;
    backends (default DEFAULT_BACKENDS) and ops select series."""
    preset = "quick" if quick else "full"
    backends = DEFAULT_BACKENDS if backends is None else tuple(backends)
    lengths = sorted(lengths or LENGTHS[preset])
    cap = POINT_CAP_S[preset] if point_cap_s is None else float(point_cap_s)
    budget = BUDGET_S[preset] if budget_s is None else float(budget_s)
    start = time.perf_counter()
    series, notes = build_series(backends, ops, through_op)
    notify(progress, f"scaling: {len(series)} series, L = {lengths[0]} .. {lengths[-1]}")

    # The budget pays for measurements only: loading the kernels (compiling them on a first run
    # after installing, ~45 s for all of them on 2 cores) and each series' first call (compile,
    # check) are not charged to it, so that a cold cache does not cost rows.
    setup_s = time.perf_counter() - start
    reference_cache = {}
    rows = []
    for L in lengths:
        for s in series:
            if not s.active:
                continue
            elapsed = time.perf_counter() - start - setup_s
            if not s.points:
                # first point: compile (JIT) and check against the reference before timing anything
                first = time.perf_counter()
                try:
                    ok, message = check_against_reference(s, L, reference_cache)
                    warm_inputs, warm_dout = INPUTS[s.op](L)
                    if s.to_device is not None:
                        warm_inputs, warm_dout = s.to_device(warm_inputs, warm_dout)
                    s.first_call_s = sum(_run_once(s, warm_inputs, warm_dout))
                except Exception as error:      # a failing implementation is reported, not fatal
                    ok, message = False, f"failed: {type(error).__name__}: {error}"
                setup_s += time.perf_counter() - first
                s.check = message
                if not ok:
                    s.active, s.stop = False, f"not timed: {message}"
                    continue
            else:
                times = [p["seconds"] for p in s.points]
                predicted = times[-1] * _growth(times)
                peaks = [p["row"]["peak_bytes"] for p in s.points]
                free = available_memory_bytes()
                predicted_peak = peaks[-1] * _growth(peaks) if peaks[-1] else None
                if predicted > 2 * cap:
                    s.active, s.stop = False, (f"capped: L={L} would take about {predicted:.0f} s per run "
                                               f"(cap {cap:g} s)")
                    continue
                runs = 4 if predicted < 1.0 else 3          # timed repeats + the traced run (measure_point)
                if elapsed + runs * predicted > budget:
                    s.active, s.stop = False, f"stopped by the section budget ({budget:.0f} s) before L={L}"
                    continue
                if free is not None and predicted_peak is not None and predicted_peak > MEMORY_FRACTION * free:
                    s.active, s.stop = False, (f"capped: L={L} would need about {predicted_peak / 2**30:.1f} GiB "
                                               f"({MEMORY_FRACTION:.0%} of the {free / 2**30:.1f} GiB free)")
                    continue
            try:
                row, seconds = measure_point(s, L)
            except MemoryError:
                s.active, s.stop = False, f"capped: out of memory at L={L}"
                continue
            rows.append(row)
            s.points.append({"row": row, "seconds": seconds})
            notify(progress, f"scaling {s.label} L={L}: fwd+bwd {row['fwdbwd_ms']:.1f} ms")
            if seconds > cap:
                s.active, s.stop = False, f"capped: one fwd+bwd at L={L} took {seconds:.1f} s (cap {cap:g} s)"
    for s in series:
        if s.active:
            s.stop = f"reached the largest L ({lengths[-1]})"
    config = {"lengths": lengths, "point_cap_s": cap, "budget_s": budget, "dtype": np.dtype(DTYPE).name,
              "attention_shape": f"B=1, H={HEADS}, Dh={HEAD_DIM}",
              "linear_attention_options": dict(LINEAR_OPTIONS),
              "scan_shape": f"B=1, D={SCAN_CHANNELS}, N={SCAN_STATE}, delta_softplus, D skip, z gate",
              "elapsed_s": time.perf_counter() - start, "setup_s": setup_s,
              "series": {s.label: {"via": s.via, "check": s.check, "first_call_s": s.first_call_s}
                         for s in series}}
    return ScalingResult(rows, summarize(rows, series), notes, config)


# ----------------------------------------------------------------------------------------------
# Summaries and the plot

def series_rows(rows, op, mode, backend):
    return sorted((r for r in rows if (r["op"], r["mode"], r["backend"]) == (op, mode, backend)),
                  key=lambda r: r["L"])


def summarize(rows, series=None):
    """One dict per series: fitted slopes (time and memory), doubling ratios, L range, stop reason."""
    keys = []
    for r in rows:
        key = (r["op"], r["mode"], r["backend"])
        if key not in keys:
            keys.append(key)
    stops = {(s.op, s.mode, s.backend): s for s in (series or [])}
    for key in stops:
        if key not in keys:
            keys.append(key)
    out = []
    for op, mode, backend in keys:
        points = series_rows(rows, op, mode, backend)
        top = points[-SLOPE_POINTS:]
        summary = {"op": op, "mode": mode, "backend": backend, "points": len(points),
                   "L_max": points[-1]["L"] if points else None}
        for metric in ("fwd_ms", "fwdbwd_ms", "peak_bytes"):
            summary[f"slope_{metric}"] = fit_slope([r["L"] for r in top], [r[metric] for r in top])
            ratio = None
            if len(points) >= 2 and points[-1]["L"] == 2 * points[-2]["L"] and points[-2][metric]:
                ratio = points[-1][metric] / points[-2][metric] if points[-1][metric] is not None else None
            summary[f"doubling_{metric}"] = ratio
        s = stops.get((op, mode, backend))
        summary["stop"] = s.stop if s else ""
        summary["check"] = s.check if s else ""
        summary["via"] = s.via if s else ""
        out.append(summary)
    return out


def plot_scaling(rows, path):
    """Log-log panels: fwd+bwd time (top) and peak memory (bottom) vs L, one panel per op."""
    plt = pyplot()
    fig, axes = plt.subplots(2, len(OPS), figsize=(5.4 * len(OPS), 8.4), squeeze=False)
    for column, op in enumerate(OPS):
        keys = []
        for r in rows:
            if r["op"] == op and (r["mode"], r["backend"]) not in keys:
                keys.append((r["mode"], r["backend"]))
        for row_index, (metric, ylabel) in enumerate((("fwdbwd_ms", "forward + backward time (ms)"),
                                                      ("peak_bytes", "peak extra memory (bytes)"))):
            ax = axes[row_index][column]
            all_L = []
            for mode, backend in keys:
                points = [r for r in series_rows(rows, op, mode, backend) if r[metric]]
                if not points:
                    continue
                xs, ys = [r["L"] for r in points], [r[metric] for r in points]
                all_L += xs
                slope = fit_slope(xs[-SLOPE_POINTS:], ys[-SLOPE_POINTS:])
                label = f"{mode} / {backend}" + ("" if slope is None else f"  (slope {slope:.2f})")
                ax.plot(xs, ys, "-" if backend == "numpy" else "--", marker="o", markersize=3.5, label=label)
            if all_L:
                # guide lines through the smallest L: slope 1 (linear) and slope 2 (quadratic)
                lo, hi = min(all_L), max(all_L)
                y0 = min(r[metric] for r in rows if r["op"] == op and r[metric]) or 1
                for power, style in ((1, ":"), (2, "-.")):
                    ax.plot([lo, hi], [y0, y0 * (hi / lo) ** power], style, color="grey", linewidth=0.8,
                            label=f"~L^{power}")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length L")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{op}: {'time' if metric == 'fwdbwd_ms' else 'memory'}", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_summary(summaries):
    """A text table of the summaries."""
    lines = [f"{'op/mode/backend':<34} {'L max':>6} {'slope t':>8} {'x2 t':>6} {'slope mem':>9}  stop"]
    for s in summaries:
        def fmt(x, digits=2):
            return "-" if x is None else f"{x:.{digits}f}"
        lines.append(f"{s['op'] + '/' + s['mode'] + '/' + s['backend']:<34} {s['L_max'] or '-':>6} "
                     f"{fmt(s['slope_fwdbwd_ms']):>8} {fmt(s['doubling_fwdbwd_ms'], 1):>6} "
                     f"{fmt(s['slope_peak_bytes']):>9}  {s['stop']}")
    return "\n".join(lines)


def run_scaling(quick=False, out_dir=".", progress=None, budget_s=None, **overrides):
    """Measure, then write out_dir/scaling.json (rows, summaries, notes) and scaling_loglog.png.

    Returns the rows {"op", "mode", "backend", "L", "fwd_ms", "fwdbwd_ms", "peak_bytes"}.
    """
    result = measure_scaling(quick=quick, progress=progress, budget_s=budget_s, **overrides)
    os.makedirs(out_dir, exist_ok=True)
    try:
        plot_scaling(result.rows, os.path.join(out_dir, "scaling_loglog.png"))
    except ImportError as error:        # matplotlib missing (e.g. on a bare GPU image): the numbers still count
        result.notes.append(f"no plot: {error}")
    write_json(os.path.join(out_dir, "scaling.json"),
               {"rows": result.rows, "series": result.series, "notes": result.notes, "config": result.config})
    run_scaling.last_result = result
    return result.rows


run_scaling.last_result = None


if __name__ == "__main__":        # python -m minilm.experiments.scaling [--quick]
    rows = run_scaling(quick="--quick" in sys.argv, out_dir="scaling-results", progress=print)
    print(format_summary(run_scaling.last_result.series))
