"""`minilm tour`: measure every claim of the O(N²)-vs-O(N) debate and write a report.

    minilm tour [--quick] [--out DIR]          (default DIR: minilm-tour)

Four sections run in turn, each inside its share of a time budget (--quick: 5 minutes in all on
2 CPU cores; default: 30 minutes), with a progress bar:

    scaling    minilm.experiments.scaling    time and memory of each token mixer vs L      claims 1, 2, 3
    decode     minilm.experiments.decode     ms per generated token and state vs context   claims 1, 3, 6
    recall     minilm.experiments.recall     MQAR / passkey accuracy of small models        claims 4, 6
    stability  minilm.experiments.stability  linear attention with and without norms        claim 5

and write into DIR

    report.md            each claim, the figure that tests it, a one-line verdict computed from the
                         numbers, the command that reproduces it, the machine and versions
    results.json         {"scaling": rows, "decode": rows, "recall": rows, "stability": rows, "meta": {...}}
    scaling_loglog.png, decode_per_token.png, recall_vs_pairs.png, stability_curves.png
    scaling.json, decode.json (and whatever the recall and stability sections write)
    tour.log             every progress message of every section, with its time

A section that is not installed or fails is reported as "not measured" with the reason; the other
sections still run. Verdicts are computed by the `verdict_*` functions below from the rows alone,
with the thresholds named in VERDICT_THRESHOLDS; a result that contradicts a claim is reported as
such.
"""
import contextlib
import importlib
import inspect
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

from minilm.experiments import decode as decode_experiment
from minilm.experiments import scaling as scaling_experiment
from minilm.experiments.scaling import machine_info, write_json

DEFAULT_OUT = "minilm-tour"
TOTAL_BUDGET_S = {"quick": 300.0, "full": 1800.0}
# fixed shares for the two benchmark sections; recall and stability share what is left
SECTIONS = ("scaling", "decode", "recall", "stability")
# planned seconds per section (scaled with the total budget); time a section leaves unused goes to
# recall, and recall never takes what stability is planned to get
SECTION_BUDGET_S = {"quick": {"scaling": 60.0, "decode": 25.0, "recall": 170.0, "stability": 30.0},
                    "full": {"scaling": 540.0, "decode": 150.0, "recall": 780.0, "stability": 300.0}}
REPORT_RESERVE_S = {"quick": 15.0, "full": 30.0}   # kept for plots and the report
# A training section still running at HARD_LIMIT[0] x its budget + HARD_LIMIT[1] seconds is
# interrupted (its rows are lost and the report says so), so that one section cannot take the whole
# tour's time. The benchmark sections stop their own sweeps at their budget; the only time they
# cannot bound is the one-off JIT compilation of the Numba kernels, which must not cost their rows.
HARD_LIMIT = (1.5, 15.0)
HARD_LIMITED = ("recall", "stability")

FIGURES = {"scaling": "scaling_loglog.png", "decode": "decode_per_token.png",
           "recall": "recall_vs_pairs.png", "stability": "stability_curves.png"}

# Every threshold a verdict uses, in one place (the report prints them).
VERDICT_THRESHOLDS = {
    "quadratic_doubling": 3.0,     # time x this or more per doubling of L counts as "about quadruples"
    "linear_doubling": 2.6,        # time x this or less per doubling counts as linear
    "score_memory_share": 0.9,     # share of the naive form's memory that the tiled form does not need
    "flat_decode_ratio": 1.5,      # ms/token at the longest context / the shortest, for "constant"
    "growing_decode_ratio": 2.0,   # the same ratio for "grows"
    "recall_good": 0.9,            # accuracy that counts as near-perfect recall
    "recall_gap": 0.1,             # accuracy below attention's that counts as degraded
    "hybrid_recovery": 0.9,        # hybrid accuracy / attention accuracy for "recovers most"
}

CLAIMS = [
    (1, "Softmax attention costs O(N²): doubling the window roughly quadruples the work, and the N×N "
        "score matrix dominates memory in the naive form."),
    (2, "Reordering the product (associativity) makes linear attention O(N) with a d×d state."),
    (3, "Mamba/RNN-style models compress history into a fixed state: constant memory and constant time per "
        "generated token, O(N) total; Mamba still trains in parallel (scan), unlike an LSTM."),
    (4, "The price is recall: in needle-in-a-haystack style retrieval, attention stays near-perfect while "
        "fixed-state models degrade as the amount to remember grows relative to the state."),
    (5, "Linear attention without softmax is harder to train stably; normalization fixes much of it."),
    (6, "Hybrids (a few attention layers among Mamba layers, as in Jamba) recover most of the recall at a "
        "fraction of the attention cost."),
]

CLAIM_TITLES = {1: "softmax attention is O(N²) in time, and in memory when naive",
                2: "linear attention is O(N) with a d×d state",
                3: "fixed-state models: constant cost per token, O(N) total, parallel training",
                4: "the price is recall",
                5: "normalization makes linear attention train stably",
                6: "hybrids recover most of the recall at a fraction of the cost"}


# ----------------------------------------------------------------------------------------------
# Progress display

class Progress:
    """A tqdm bar over the tour's time budget; sections report what they just did by calling it.

    Callable as progress(message) and also offers update(n) / set_postfix_str(s) / set_description(s)
    / write(s), so a section may treat it as a plain callback or as a tqdm-like bar."""

    def __init__(self, total_s, enabled=True, log_path=None):
        self.start = time.perf_counter()
        self.total = total_s
        self.bar = None
        self.section = ""
        self.log = open(log_path, "w") if log_path else None     # every message, in full, timed
        if enabled:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=int(total_s), unit="s", desc="tour", dynamic_ncols=True,
                            bar_format="{desc}{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} s of the budget "
                                       "[{elapsed}] {postfix}")

    def begin(self, section):
        self.section = section
        self._refresh(f"{section}: starting")

    def _refresh(self, message=None):
        if message and self.log is not None:
            self.log.write(f"{time.perf_counter() - self.start:8.1f} s  [{self.section}] {message}\n")
            self.log.flush()
        if self.bar is None:
            return
        self.bar.n = int(time.perf_counter() - self.start)       # may pass the total: over budget
        self.bar.set_description(f"tour [{self.section}]" if self.section else "tour", refresh=False)
        if message:
            self.bar.set_postfix_str(str(message)[:70], refresh=False)
        self.bar.refresh()

    def __call__(self, *args, **kwargs):
        message = next((a for a in args if isinstance(a, str)), kwargs.get("message"))
        self._refresh(message)

    def update(self, n=1):
        self._refresh()

    def set_postfix_str(self, s="", refresh=True):
        self._refresh(s)

    def set_description(self, desc=None, refresh=True):
        self._refresh(desc)

    def write(self, s, *args, **kwargs):
        if self.bar is not None:
            self.bar.write(str(s))

    def close(self):
        self._refresh("done")
        if self.bar is not None:
            self.bar.close()
        if self.log is not None:
            self.log.close()


# ----------------------------------------------------------------------------------------------
# Sections

@dataclass
class Section:
    name: str
    status: str = "not run"          # "ok", "skipped" (not installed), "failed" or "interrupted" (hard limit)
    note: str = ""
    rows: list = field(default_factory=list)
    elapsed_s: float = 0.0
    budget_s: float = None
    extra: dict = field(default_factory=dict)


def load_runner(name):
    """The run_<name> function of minilm.experiments.<name>, or (None, why) when it is missing."""
    try:
        module = importlib.import_module(f"minilm.experiments.{name}")
    except ModuleNotFoundError as error:
        if error.name in (f"minilm.experiments.{name}",):
            return None, f"minilm.experiments.{name} is not installed"
        raise
    runner = getattr(module, f"run_{name}", None)
    if runner is None:
        return None, f"minilm.experiments.{name} has no run_{name}"
    return runner, ""


class SectionTimeout(BaseException):
    """Raised in a section that ran past its hard limit (a BaseException, so that a section's own
    `except Exception` cannot swallow it)."""


@contextlib.contextmanager
def hard_deadline(seconds):
    """Raise SectionTimeout in this thread after `seconds` (SIGALRM; where there is no SIGALRM, or
    off the main thread, nothing is enforced). Python code is interrupted between bytecodes, so a
    long NumPy or Numba call finishes first."""
    usable = (seconds is not None and hasattr(signal, "setitimer")
              and threading.current_thread() is threading.main_thread())
    if not usable:
        yield
        return

    def on_alarm(signum, frame):
        raise SectionTimeout()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(1e-3, seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_section(name, quick, out_dir, progress, budget_s, runner=None):
    """Run one section within its budget (and its hard limit); a failure is recorded in the
    Section, never raised."""
    section = Section(name, budget_s=budget_s)
    start = time.perf_counter()
    limit = None if budget_s is None or name not in HARD_LIMITED else HARD_LIMIT[0] * budget_s + HARD_LIMIT[1]
    try:
        if runner is None:
            runner, why = load_runner(name)
            if runner is None:
                section.status, section.note = "skipped", why
                return section
        with hard_deadline(limit):
            rows = runner(quick, out_dir, progress=progress, budget_s=budget_s)
        section.rows = list(rows or [])
        section.status = "ok"
    except SectionTimeout:
        section.status = "interrupted"
        section.note = (f"still running after {time.perf_counter() - start:.0f} s, more than its hard limit of "
                        f"{limit:.0f} s ({HARD_LIMIT[0]:g} x its {budget_s:.0f} s budget + {HARD_LIMIT[1]:g} s); "
                        f"its rows are lost")
    except KeyboardInterrupt:
        raise
    except Exception as error:           # report it, keep the other sections
        section.status, section.note = "failed", f"{type(error).__name__}: {' '.join(str(error).split())}"
    finally:
        section.elapsed_s = time.perf_counter() - start
    return section


# ----------------------------------------------------------------------------------------------
# Verdicts: (status, one line) from the rows; status is one of
#   "supported", "partly supported", "not supported", "not measured"

def _fmt(x, digits=2):
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def _find(summaries, op, mode, backend=None):
    for s in summaries:
        if s["op"] == op and s["mode"] == mode and (backend is None or s["backend"] == backend) and s["points"]:
            return s
    return None


def doubling_factor(summary, metric="fwdbwd_ms"):
    """2^slope: the average factor per doubling of L over the last two doublings (None if unknown)."""
    slope = summary.get(f"slope_{metric}") if summary else None
    return None if slope is None else 2.0 ** slope


def verdict_claim1(scaling_rows, scaling_summaries, decode_summary):
    t = VERDICT_THRESHOLDS
    naive = _find(scaling_summaries, "attention", "naive", "numpy")
    tiled = _find(scaling_summaries, "attention", "tiled")
    if naive is None and tiled is None:
        return "not measured", "no attention rows were measured"
    factors = {name: doubling_factor(s) for name, s in (("naive", naive), ("tiled", tiled)) if s}
    quadratic_time = all(f is not None and f >= t["quadratic_doubling"] for f in factors.values())
    time_text = ", ".join(f"{name} ×{_fmt(f, 1)}" for name, f in factors.items())

    share, memory_text = None, "memory not compared"
    if naive and tiled:
        naive_rows = {r["L"]: r for r in scaling_experiment.series_rows(scaling_rows, "attention", "naive", "numpy")}
        tiled_rows = {r["L"]: r for r in scaling_experiment.series_rows(scaling_rows, "attention", tiled["mode"],
                                                                        tiled["backend"])}
        common = sorted(L for L in naive_rows if L in tiled_rows
                        and naive_rows[L]["peak_bytes"] and tiled_rows[L]["peak_bytes"] is not None)
        if common:
            L = common[-1]
            naive_peak, tiled_peak = naive_rows[L]["peak_bytes"], tiled_rows[L]["peak_bytes"]
            share = 1.0 - tiled_peak / naive_peak
            scores = scaling_experiment.HEADS * L * L * 4
            memory_text = (f"at L={L} the naive form allocates {naive_peak / 2**20:.0f} MiB "
                           f"({naive_peak / scores:.1f}× the H·L² float32 score matrix), the tiled form "
                           f"{tiled_peak / 2**20:.1f} MiB: {share:.0%} of the naive memory is the L×L arrays")
    memory_slope = naive.get("slope_peak_bytes") if naive else None
    quadratic_memory = share is not None and share >= t["score_memory_share"] and \
        memory_slope is not None and memory_slope >= 1.6
    a = decode_summary.get("AAAA") if decode_summary else None
    decode_text = "" if a is None else (f"; per generated token, AAAA costs ×{_fmt(a['time_ratio'], 1)} more time "
                                        f"at context {a['context_max']} than at {a['context_min']}")
    line = (f"time per doubling of L (average of the last two doublings): {time_text}; naive memory slope "
            f"{_fmt(memory_slope)}; {memory_text}{decode_text}.")
    if quadratic_time and quadratic_memory:
        return "supported", line
    if quadratic_time or quadratic_memory:
        return "partly supported", line
    return "not supported", line


def verdict_claim2(scaling_summaries, decode_summary):
    t = VERDICT_THRESHOLDS
    linear_modes = [s for s in scaling_summaries if s["op"] == "linear_attention" and s["mode"] != "parallel"
                    and s["points"] >= 2]
    parallel = _find(scaling_summaries, "linear_attention", "parallel", "numpy")
    if not linear_modes:
        return "not measured", "no recurrent or chunked linear-attention rows were measured"
    factors = {f"{s['mode']}/{s['backend']}": doubling_factor(s) for s in linear_modes}
    linear = all(f is not None and f <= t["linear_doubling"] for f in factors.values())
    reach = max(s["L_max"] for s in linear_modes)
    parts = [f"time per doubling of L: " + ", ".join(f"{k} ×{_fmt(f, 1)}" for k, f in factors.items())
             + f" (up to L={reach})"]
    if parallel:
        parts.append(f"the same function without the reordering (parallel, L×L masked) ×"
                     f"{_fmt(doubling_factor(parallel), 1)}, stopped at L={parallel['L_max']}")
    states = {s: d for s, d in (decode_summary or {}).items() if set(s) <= set("LG")}
    constant_state = all(d["state_ratio"] == 1.0 for d in states.values()) if states else None
    if states:
        parts.append("decoding state of " + ", ".join(
            f"{s} {d['state_max'] / 1024:.0f} KiB at every context" if d["state_ratio"] == 1.0
            else f"{s} grows ×{_fmt(d['state_ratio'], 1)}" for s, d in states.items()))
    line = "; ".join(parts) + "."
    if linear and constant_state is not False:
        return "supported", line
    if linear or constant_state:
        return "partly supported", line
    return "not supported", line


def _lstm_has_parallel_form():
    """Whether minilm.ops.lstm.forward offers a mode other than its step-by-step loop."""
    from minilm.ops import lstm
    return "mode" in inspect.signature(lstm.forward).parameters


def verdict_claim3(scaling_summaries, decode_summary):
    t = VERDICT_THRESHOLDS
    if not decode_summary:
        return "not measured", "the decode section produced no rows"
    fixed = {s: d for s, d in decode_summary.items() if "A" not in s}
    if not fixed:
        return "not measured", "no fixed-state schedule was decoded"
    flat_time = {s: d["time_ratio"] for s, d in fixed.items()}
    flat = all(r <= t["flat_decode_ratio"] for r in flat_time.values())
    constant = all(d["state_ratio"] == 1.0 for d in fixed.values())
    contexts = next(iter(fixed.values()))
    parts = [f"context {contexts['context_min']} → {contexts['context_max']}: ms/token ×"
             + ", ×".join(f"{_fmt(r, 2)} ({s})" for s, r in flat_time.items())
             + ("; state bytes unchanged" if constant else "; state bytes CHANGE")]
    a = decode_summary.get("AAAA")
    if a:
        parts.append(f"AAAA ×{_fmt(a['time_ratio'], 1)} time and ×{_fmt(a['state_ratio'], 0)} cache")
    scan_linear = [s for s in scaling_summaries if s["op"] == "selective_scan" and s["mode"] != "parallel"
                   and s["points"] >= 2]
    scan_factors = {f"{s['mode']}/{s['backend']}": doubling_factor(s) for s in scan_linear}
    linear_total = all(f is not None and f <= t["linear_doubling"] for f in scan_factors.values()) \
        if scan_factors else None
    if scan_factors:
        parts.append("scan time per doubling of L: " + ", ".join(f"{k} ×{_fmt(f, 1)}" for k, f in scan_factors.items()))
    parallel = _find(scaling_summaries, "selective_scan", "parallel", "numpy")
    recurrent = _find(scaling_summaries, "selective_scan", "recurrent", "numpy")
    if parallel and recurrent:
        L = parallel["L_max"]
        parts.append(f"the parallel scan ({math.ceil(math.log2(L))} vectorized rounds at L={L} instead of {L} "
                     f"sequential steps) computes the same outputs (parallel: {parallel['check'] or 'checked'}; "
                     f"recurrent: {recurrent['check'] or 'checked'}); LSTM parallel form: "
                     f"{'yes' if _lstm_has_parallel_form() else 'none (minilm.ops.lstm steps through time)'}")
    line = "; ".join(parts) + "."
    if flat and constant and linear_total is not False:
        return "supported", line
    if constant and (flat or linear_total):
        return "partly supported", line
    return "not supported", line


def recall_table(recall_rows, task=None):
    """(task, {schedule: {kv_pairs: mean accuracy}}) for one task (by default the first task with
    several pair counts), each schedule at its widest d_model (the largest state it was given: the
    comparison least favourable to the claim), averaged over the other settings (sequence lengths)."""
    rows = [r for r in recall_rows if r.get("accuracy") is not None and r.get("kv_pairs") is not None]
    if task is None:
        tasks = [r["task"] for r in rows]
        task = next((name for name in dict.fromkeys(tasks)
                     if len({r["kv_pairs"] for r in rows if r["task"] == name}) > 1), tasks[0] if tasks else None)
    rows = [r for r in rows if r["task"] == task]
    widest = {}
    for r in rows:
        widest[r["schedule"]] = max(widest.get(r["schedule"], 0), r.get("d_model") or 0)
    table = {}
    for r in rows:
        if (r.get("d_model") or 0) != widest[r["schedule"]]:
            continue
        table.setdefault(r["schedule"], {}).setdefault(r["kv_pairs"], []).append(float(r["accuracy"]))
    return task, {s: {k: sum(v) / len(v) for k, v in sorted(by_pairs.items())} for s, by_pairs in table.items()}


def _kinds(schedules):
    attention = [s for s in schedules if set(s) == {"A"}]
    fixed = [s for s in schedules if "A" not in s]
    hybrid = [s for s in schedules if "A" in s and set(s) != {"A"}]
    return attention, fixed, hybrid


def verdict_claim4(recall_rows):
    t = VERDICT_THRESHOLDS
    task, table = recall_table(recall_rows or [])
    if not table:
        return "not measured", "the recall section produced no rows"
    attention, fixed, _ = _kinds(table)
    if not attention or not fixed:
        return "not measured", f"{task}: needs an attention-only schedule and a fixed-state one, got {sorted(table)}"
    most = max(max(by_pairs) for by_pairs in table.values())
    a_name = attention[0]
    a_acc = table[a_name].get(most)
    parts = [f"{task} with {most} pairs: {a_name} {_fmt(a_acc)}"]
    degraded = []
    for s in fixed:
        accs = table[s]
        hardest = accs.get(most, accs[max(accs)])
        easiest = accs[min(accs)]
        is_degraded = a_acc is not None and hardest <= a_acc - t["recall_gap"] and hardest < easiest
        degraded.append(is_degraded)
        parts.append(f"{s} {_fmt(hardest)} (from {_fmt(easiest)} at {min(accs)} pairs)")
    line = ", ".join(parts) + "."
    near_perfect = a_acc is not None and a_acc >= t["recall_good"]
    if near_perfect and all(degraded):
        return "supported", line
    if near_perfect and any(degraded) or (not near_perfect and all(degraded)):
        return "partly supported", line
    return "not supported", line


UNNORMALIZED_NAMES = ("unnorm", "none", "plain", "no_norm", "no-norm", "nonorm", "raw", "without")


def _stability_groups(stability_rows):
    variants = list(dict.fromkeys(r["variant"] for r in stability_rows))
    softmax = [v for v in variants if "softmax" in v.lower()]
    unnormalized = [v for v in variants if v not in softmax and any(k in v.lower() for k in UNNORMALIZED_NAMES)]
    normalized = [v for v in variants if v not in softmax and v not in unnormalized]
    return softmax, unnormalized, normalized


def verdict_claim5(stability_rows):
    rows = stability_rows or []
    if not rows:
        return "not measured", "the stability section produced no rows"
    softmax, unnormalized, normalized = _stability_groups(rows)
    if not unnormalized or not normalized:
        return "not measured", (f"could not tell the unnormalized variant from the normalized ones among "
                                f"{sorted({r['variant'] for r in rows})}")

    def stats(variant):
        mine = [r for r in rows if r["variant"] == variant]
        diverged = sum(bool(r["diverged"]) for r in mine)
        finite = [r["final_loss"] for r in mine if not r["diverged"] and r["final_loss"] is not None
                  and math.isfinite(r["final_loss"])]
        return diverged, len(mine), (min(finite) if finite else None)

    described = []
    for v in softmax + unnormalized + normalized:
        d, n, best = stats(v)
        described.append(f"{v}: {d}/{n} learning rates diverged, best final loss {_fmt(best, 3)}")
    line = "; ".join(described) + "."
    worst_unnorm = max((stats(v) for v in unnormalized), key=lambda s: (s[0] / max(1, s[1])))
    best_norm = min((stats(v) for v in normalized), key=lambda s: (s[0] / max(1, s[1])))
    unnorm_rate = worst_unnorm[0] / max(1, worst_unnorm[1])
    norm_rate = best_norm[0] / max(1, best_norm[1])
    harder = unnorm_rate > norm_rate or (
        unnorm_rate == norm_rate and worst_unnorm[2] is not None and best_norm[2] is not None
        and worst_unnorm[2] > 1.02 * best_norm[2]) or (worst_unnorm[2] is None and best_norm[2] is not None)
    if harder and norm_rate == 0:
        return "supported", line
    if harder:
        return "partly supported", line
    return "not supported", line


def verdict_claim6(recall_rows, decode_summary):
    t = VERDICT_THRESHOLDS
    task, table = recall_table(recall_rows or [])
    if not table:
        return "not measured", "the recall section produced no rows"
    attention, fixed, hybrid = _kinds(table)
    if not attention or not hybrid:
        return "not measured", f"{task}: needs an attention-only schedule and a hybrid, got {sorted(table)}"
    most = max(max(by_pairs) for by_pairs in table.values())
    a_acc = table[attention[0]].get(most)
    parts, recovered = [], []
    for h in hybrid:
        acc = table[h].get(most)
        share = h.count("A") / len(h)
        ok = acc is not None and a_acc is not None and a_acc > 0 and acc >= t["hybrid_recovery"] * a_acc \
            and share < 1.0
        recovered.append(ok)
        parts.append(f"{h} ({share:.0%} attention layers) {_fmt(acc)} vs {attention[0]} {_fmt(a_acc)}"
                     f" and best fixed-state {_fmt(max((table[f][most] for f in fixed if most in table[f]), default=None))}"
                     f" at {most} pairs")
    hybrid_decode = {s: d for s, d in (decode_summary or {}).items() if "A" in s and set(s) != {"A"}}
    a = (decode_summary or {}).get("AAAA")
    for s, d in hybrid_decode.items():
        if a:
            parts.append(f"decoding {s} at context {d['context_max']}: {d['state_max'] / a['state_max']:.0%} of "
                         f"AAAA's cache, {d['ms_max'] / a['ms_max']:.0%} of its ms/token")
    line = "; ".join(parts) + "."
    if recovered and all(recovered):
        return "supported", line
    if any(recovered):
        return "partly supported", line
    return "not supported", line


def all_verdicts(results, scaling_summaries, decode_summary):
    scaling_rows, recall_rows, stability_rows = results["scaling"], results["recall"], results["stability"]
    verdicts = {}
    for number, compute in ((1, lambda: verdict_claim1(scaling_rows, scaling_summaries, decode_summary)),
                            (2, lambda: verdict_claim2(scaling_summaries, decode_summary)),
                            (3, lambda: verdict_claim3(scaling_summaries, decode_summary)),
                            (4, lambda: verdict_claim4(recall_rows)),
                            (5, lambda: verdict_claim5(stability_rows)),
                            (6, lambda: verdict_claim6(recall_rows, decode_summary))):
        try:
            status, line = compute()
        except Exception as error:         # a verdict that cannot be computed says so
            status, line = "not measured", f"the verdict could not be computed ({type(error).__name__}: {error})"
        verdicts[number] = {"status": status, "line": line}
    return verdicts


# ----------------------------------------------------------------------------------------------
# The report

CLAIM_FIGURES = {1: ["scaling", "decode"], 2: ["scaling", "decode"], 3: ["decode", "scaling"],
                 4: ["recall"], 5: ["stability"], 6: ["recall", "decode"]}
CLAIM_SECTIONS = {1: ["scaling", "decode"], 2: ["scaling", "decode"], 3: ["scaling", "decode"],
                  4: ["recall"], 5: ["stability"], 6: ["recall", "decode"]}
BENCH_COMMAND = {"scaling": "python bench/scaling.py{quick} --out DIR",
                 "decode": "python bench/decode.py{quick} --out DIR",
                 "recall": "python bench/recall.py{quick} --out DIR",
                 "stability": "python bench/stability.py{quick} --out DIR"}


def recall_settings(quick):
    """What the recall module says about its sweep (read from its constants, so the report cannot
    drift from the code); None when the module is not installed."""
    try:
        recall = importlib.import_module("minilm.experiments.recall")
    except ImportError:
        return None
    get = lambda name: getattr(recall, name, None)          # noqa: E731
    grid = get("QUICK_LR_GRID" if quick else "LR_GRID")
    schedules = get("QUICK_SCHEDULES" if quick else "SCHEDULES")
    parts = []
    if schedules:
        parts.append(f"schedules {', '.join(schedules)}")
    if get("SHORT_CONV"):
        parts.append(f"a short causal convolution of {get('SHORT_CONV')} taps on every A, L and G layer "
                     f"(Mamba has its own conv1d, RWKV its token shift)")
    if grid:
        parts.append(f"the same learning-rate grid {list(grid)} for every model, the best rate reported "
                     f"(as Zoology does)")
    if get("SEED") is not None:
        parts.append(f"seed {get('SEED')}")
    return "; ".join(parts) + " (details: minilm/experiments/recall.py)" if parts else None


def stability_settings(quick):
    """What the stability module says about its sweep (read from its constants); None when missing."""
    try:
        stability = importlib.import_module("minilm.experiments.stability")
    except ImportError:
        return None
    variants = getattr(stability, "QUICK_VARIANTS" if quick else "VARIANTS", None)
    grid = getattr(stability, "QUICK_LR_GRID" if quick else "LR_GRID", None)
    parts = []
    if variants:
        parts.append(f"variants {', '.join(variants)}")
    if grid:
        parts.append(f"the same learning rates {list(grid)} for every variant")
    if getattr(stability, "SEED", None) is not None:
        parts.append(f"seed {stability.SEED}")
    return "; ".join(parts) + " (details: minilm/experiments/stability.py)" if parts else None


def tour_command(quick, out_dir):
    return "minilm tour" + (" --quick" if quick else "") + ("" if out_dir == DEFAULT_OUT else f" --out {out_dir}")


def _minutes(seconds):
    return f"{int(seconds // 60)} min {seconds % 60:.0f} s"


def _scaling_table(summaries, op):
    lines = ["| mode / backend | L measured | time ×/doubling (fit) | last doubling | memory slope | why it stopped |",
             "|---|---|---|---|---|---|"]
    for s in summaries:
        if s["op"] != op:
            continue
        lines.append(f"| {s['mode']} / {s['backend']} | {s['points']} points, up to {s['L_max'] or '-'} | "
                     f"{_fmt(doubling_factor(s), 2)} | {_fmt(s['doubling_fwdbwd_ms'], 2)} | "
                     f"{_fmt(s['slope_peak_bytes'], 2)} | {s['stop']} |")
    return "\n".join(lines)


def _decode_table(decode_summary):
    lines = ["| schedule | d_model | params | ms/token (shortest → longest context) | × | state bytes | × |",
             "|---|---|---|---|---|---|---|"]
    for s, d in decode_summary.items():
        lines.append(f"| {s} | {d['d_model']} | {d['params']:,} | {_fmt(d['ms_min'])} → {_fmt(d['ms_max'])} "
                     f"({d['context_min']} → {d['context_max']}) | {_fmt(d['time_ratio'], 1)} | "
                     f"{d['state_min']:,} → {d['state_max']:,} | {_fmt(d['state_ratio'], 1)} |")
    return "\n".join(lines)


def _recall_markdown(recall_rows):
    task, table = recall_table(recall_rows)
    if not table:
        return ""
    pairs = sorted({k for by_pairs in table.values() for k in by_pairs})
    lines = [f"Accuracy on {task} by number of key-value pairs (each schedule at its widest d_model; mean over "
             f"sequence lengths):", "",
             "| schedule | " + " | ".join(str(p) for p in pairs) + " |", "|---|" + "---|" * len(pairs)]
    for s, by_pairs in table.items():
        lines.append(f"| {s} | " + " | ".join(_fmt(by_pairs.get(p)) for p in pairs) + " |")
    others = sorted({r["task"] for r in recall_rows} - {task})
    for other in others:
        rows = [r for r in recall_rows if r["task"] == other]
        by_schedule = {}
        for r in rows:
            by_schedule.setdefault(r["schedule"], []).append(float(r["accuracy"]))
        lines += ["", f"{other}: mean accuracy " + ", ".join(f"{s} {_fmt(sum(v) / len(v))}"
                                                            for s, v in by_schedule.items())]
    return "\n".join(lines)


def _stability_markdown(stability_rows):
    if not stability_rows:
        return ""
    lines = ["| variant | lr | final loss | diverged | max grad norm |", "|---|---|---|---|---|"]
    for r in stability_rows:
        lines.append(f"| {r['variant']} | {r['lr']:g} | {_fmt(r['final_loss'], 3)} | "
                     f"{'yes' if r['diverged'] else 'no'} | {_fmt(r['max_grad_norm'], 2)} |")
    return "\n".join(lines)


def write_report(path, results, meta):
    quick = meta["quick"]
    q = " --quick" if quick else ""
    verdicts = meta["verdicts"]
    sections = meta["sections"]
    scaling_summaries = meta.get("scaling", {}).get("series", [])
    decode_summary = meta.get("decode", {}).get("summary", {})
    out = []
    out.append("# minilm tour: must a language model pay O(N²) for attention?")
    out.append("")
    out.append(f"Produced by `{meta['command']}` in {_minutes(meta['elapsed_s'])} "
               f"(budget {_minutes(meta['budget_s'])}{'' if meta['elapsed_s'] <= meta['budget_s'] else ', EXCEEDED'}) "
               f"on {meta['machine']['date']}. Every number below is in results.json; the verdicts are computed "
               f"from those numbers by minilm/experiments/tour.py (thresholds at the end), never written by hand.")
    out.append("")
    out.append("| claim | verdict | figure |")
    out.append("|---|---|---|")
    for number, _ in CLAIMS:
        figures = ", ".join(FIGURES[f] for f in CLAIM_FIGURES[number])
        out.append(f"| {number}. {CLAIM_TITLES[number]} | **{verdicts[number]['status']}** | {figures} |")
    out.append("")

    for number, text in CLAIMS:
        out.append(f"## Claim {number}")
        out.append("")
        out.append(f"> {text}")
        out.append("")
        for figure in CLAIM_FIGURES[number]:
            if os.path.exists(os.path.join(os.path.dirname(path), FIGURES[figure])):
                out.append(f"![{figure}]({FIGURES[figure]})")
            else:
                out.append(f"*{FIGURES[figure]}: not produced ({sections[figure]['status']}"
                           f"{': ' + sections[figure]['note'] if sections[figure]['note'] else ''}).*")
        out.append("")
        out.append(f"**Verdict: {verdicts[number]['status']}.** {verdicts[number]['line']}")
        out.append("")
        if number == 1 and scaling_summaries:
            out.append(_scaling_table(scaling_summaries, "attention"))
            out.append("")
        if number == 2 and scaling_summaries:
            out.append(_scaling_table(scaling_summaries, "linear_attention"))
            out.append("")
        if number == 3:
            if decode_summary:
                out.append(_decode_table(decode_summary))
                out.append("")
            if scaling_summaries:
                out.append(_scaling_table(scaling_summaries, "selective_scan"))
                out.append("")
        if number == 4 and results["recall"]:
            out.append(_recall_markdown(results["recall"]))
            out.append("")
        if number == 5 and results["stability"]:
            out.append(_stability_markdown(results["stability"]))
            out.append("")
        commands = [f"`{meta['command']}` (all figures)"]
        commands += [f"`{BENCH_COMMAND[s].format(quick=q)}` ({FIGURES[s]} alone)" for s in CLAIM_SECTIONS[number]]
        out.append("Reproduce: " + "; ".join(commands) + ".")
        notes = [f"{s}: {sections[s]['status']} — {sections[s]['note']}" for s in CLAIM_SECTIONS[number]
                 if sections[s]["status"] != "ok"]
        if notes:
            out.append("")
            out.append("Not measured here: " + "; ".join(notes) + ".")
        out.append("")

    out.append("## How the numbers were taken")
    out.append("")
    config = meta.get("scaling", {}).get("config", {})
    if config:
        out.append(f"- Scaling: float32, batch 1; attention and linear attention {config.get('attention_shape')}; "
                   f"linear attention {config.get('linear_attention_options')}; scan {config.get('scan_shape')}. "
                   f"L = {config.get('lengths')}. Times are the fastest of three repeats, two above one second (an interruption "
                   f"of a shared machine, or fresh memory pages, only add time); peak memory is what NumPy allocated during one forward + "
                   f"backward (tracemalloc). Each series stops after a point slower than {config.get('point_cap_s')} s "
                   f"or when the next point would exceed twice that, the section budget or 40% of free memory: "
                   f"the quadratic series stop early because of the cost they measure (see 'why it stopped'). "
                   f"Before timing, every series was checked against the NumPy reference at the smallest L.")
    notes = meta.get("scaling", {}).get("notes", [])
    if notes:
        out.append(f"- Series that could not run here: {'; '.join(notes)}.")
    info = meta.get("decode", {}).get("info", {})
    if info:
        out.append(f"- Decode: every schedule has about {info.get('parameter_budget', 0):,} parameters "
                   f"({info.get('reference')}; d_model chosen per family), backend {info.get('backend')!r}. A prompt "
                   f"of {info.get('prefill_tokens')} random tokens is prefilled in parallel; the KV cache of A layers "
                   f"is then extended to the context by repeating it (a step's cost depends on the cache length, not "
                   f"its values); ms/token is the fastest of {info.get('rounds')}×{info.get('timed_steps_per_round')} "
                   f"timed steps.")
    out.append(f"- Recall: {meta.get('recall_settings') or 'see minilm/experiments/recall.py'}.")
    out.append(f"- Stability: {meta.get('stability_settings') or 'see minilm/experiments/stability.py'}.")
    out.append(f"- Verdict thresholds: {VERDICT_THRESHOLDS}.")
    out.append("")
    out.append("## Sections")
    out.append("")
    out.append("| section | status | time | budget | note |")
    out.append("|---|---|---|---|---|")
    for name, s in sections.items():
        budget = "-" if s["budget_s"] is None else f"{s['budget_s']:.0f} s"
        out.append(f"| {name} | {s['status']} | {s['elapsed_s']:.0f} s | {budget} | {s['note'] or ''} |")
    out.append("")
    out.append("## Machine and versions")
    out.append("")
    for key, value in meta["machine"].items():
        out.append(f"- {key}: {value}")
    threads = meta.get("thread_env", {})
    out.append(f"- thread settings in the environment: {threads if threads else 'none set'}")
    out.append("")
    with open(path, "w") as f:
        f.write("\n".join(out))


# ----------------------------------------------------------------------------------------------
# The tour

@dataclass
class TourResult:
    out_dir: str
    report_path: str
    results_path: str
    verdicts: dict
    elapsed_s: float
    budget_s: float

    @property
    def verdict_lines(self):
        return [f"claim {n}: {v['status']} — {v['line']}" for n, v in self.verdicts.items()]


def run_tour(quick=False, out_dir=DEFAULT_OUT, progress=True, runners=None, budget_s=None):
    """Run the four sections and write the report; returns a TourResult.

    runners: optional {section name: run function} replacing the installed modules (tests).
    budget_s: total budget (default 300 s with quick, 1800 s without).
    """
    preset = "quick" if quick else "full"
    total = TOTAL_BUDGET_S[preset] if budget_s is None else float(budget_s)
    scale = total / TOTAL_BUDGET_S[preset]
    planned = {name: value * scale for name, value in SECTION_BUDGET_S[preset].items()}
    reserve = REPORT_RESERVE_S[preset] * scale
    runners = dict(runners or {})
    os.makedirs(out_dir, exist_ok=True)
    start = time.perf_counter()
    bar = Progress(total, enabled=progress, log_path=os.path.join(out_dir, "tour.log"))
    machine = machine_info()
    sections = {}
    # the benchmark sections leave their summaries here (cleared first: nothing stale is reported)
    scaling_experiment.run_scaling.last_result = None
    decode_experiment.run_decode.last_info = None
    defaults = {"scaling": scaling_experiment.run_scaling, "decode": decode_experiment.run_decode}
    try:
        for name in SECTIONS:
            left = total - reserve - (time.perf_counter() - start)
            if name in ("scaling", "decode"):
                budget = planned[name]
            elif name == "recall":          # whatever is left, except what stability is planned to get
                budget = max(0.5 * planned[name], left - planned["stability"])
            else:                           # what is left, and never less than half its plan
                budget = max(0.5 * planned[name], left)
            bar.begin(name)
            sections[name] = run_section(name, quick, out_dir, bar, budget, runners.get(name, defaults.get(name)))
    finally:
        bar.close()

    results = {name: sections[name].rows for name in ("scaling", "decode", "recall", "stability")}
    scaling_result = getattr(scaling_experiment.run_scaling, "last_result", None)
    scaling_meta = {}
    if sections["scaling"].status == "ok" and scaling_result is not None:
        scaling_meta = {"series": scaling_result.series, "notes": scaling_result.notes,
                        "config": scaling_result.config}
    elif results["scaling"]:
        scaling_meta = {"series": scaling_experiment.summarize(results["scaling"]), "notes": [], "config": {}}
    decode_meta = {}
    if results["decode"]:
        decode_meta = {"summary": decode_experiment.summarize(results["decode"]),
                       "info": getattr(decode_experiment.run_decode, "last_info", None) or {}}
    verdicts = all_verdicts(results, scaling_meta.get("series", []), decode_meta.get("summary", {}))
    elapsed = time.perf_counter() - start
    meta = {
        "command": tour_command(quick, out_dir),
        "argv": sys.argv,
        "quick": bool(quick),
        "budget_s": total,
        "elapsed_s": elapsed,
        "machine": machine,
        "thread_env": {k: os.environ[k] for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                    "NUMBA_NUM_THREADS") if k in os.environ},
        "sections": {name: {"status": s.status, "note": s.note, "elapsed_s": s.elapsed_s, "budget_s": s.budget_s,
                            "rows": len(s.rows)} for name, s in sections.items()},
        "scaling": scaling_meta,
        "decode": decode_meta,
        "verdicts": verdicts,
        "verdict_thresholds": VERDICT_THRESHOLDS,
        "figures": {name: FIGURES[name] for name in FIGURES if os.path.exists(os.path.join(out_dir, FIGURES[name]))},
        "seeds": {"scaling": scaling_experiment.SEED, "decode": decode_experiment.SEED},
        "recall_settings": recall_settings(quick) if sections["recall"].status != "skipped" else None,
        "stability_settings": stability_settings(quick) if sections["stability"].status != "skipped" else None,
    }
    results_path = os.path.join(out_dir, "results.json")
    report_path = os.path.join(out_dir, "report.md")
    write_json(results_path, dict(results, meta=meta))
    write_report(report_path, results, meta)
    return TourResult(out_dir, report_path, results_path, verdicts, elapsed, total)
