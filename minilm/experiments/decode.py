"""What one generated token costs after a context of t tokens, per family (claims 1 and 3).

For each schedule (4 layers of one family, and the hybrid MMMA) a model is built at the same
parameter budget (d_model chosen per family so that the parameter count is as close as possible to
that of AAAA at d_model 128), brought to a context of t tokens, and then generates tokens one
`LM.step` at a time. Recorded per (schedule, context):

    ms_per_token   wall time of one LM.step (embedding, every layer's step, head), batch 1: the
                   fastest of the timed steps (see measure_decode)
    state_bytes    bytes of the decoding state at that context (minilm.model.state_bytes, summed):
                   the KV cache of A layers, the fixed-size state of L, G, M, R, S layers

How the state at context t is built, cheaply: a prompt of PREFILL_TOKENS random bytes (fewer if the
shortest context is shorter) runs through the parallel form (LM.prefill), once per model. The
fixed-size states (L G M R S) have their final shape after that: their size, and the arithmetic of a
step, do not depend on t. The KV cache of an A layer is then extended to t tokens by repeating the
prefilled keys and values (and the position set to t): a step's cost depends on the cache length
only, not on its values, so this measures the same work as a real prefill of t tokens without
spending minutes on it. The measured steps then append to the cache as real generation does.

Expected: A's time and state grow linearly with t (each step reads the whole cache); the others
stay flat. The hybrid's cache grows at the rate of its A layers only.

Shapes legend: B batch (1 here), T time, D d_model.
"""
import os
import sys
import time

import numpy as np

from minilm.experiments.scaling import fit_slope, notify, pyplot, write_json

SCHEDULES = ("AAAA", "LLLL", "GGGG", "MMMM", "RRRR", "SSSS", "MMMA")
REFERENCE = ("AAAA", 128)             # the parameter budget: AAAA at d_model 128
N_HEADS = 4
WIDTHS = range(64, 257, 8)            # d_model candidates (multiples of 8: even head dims for RoPE)
PREFILL_TOKENS = 256
CONTEXTS = {"quick": [256, 1024, 4096, 16384],
            "full": [256, 512, 1024, 2048, 4096, 8192, 16384]}
STEPS = {"quick": 8, "full": 8}       # timed steps per point and round (after WARMUP_STEPS)
ROUNDS = {"quick": 3, "full": 3}      # rounds over all points; a point's value is its best round
WARMUP_STEPS = 2
SEED = 0
BACKEND = "auto"                      # the models' backend: what `minilm generate` uses


def _config(schedule, d_model, backend):
    from minilm.model import LMConfig
    return LMConfig(schedule=schedule, d_model=d_model, n_heads=N_HEADS, vocab_size=256, backend=backend)


def param_count(schedule, d_model):
    from minilm.model import LM
    return LM(_config(schedule, d_model, "numpy")).num_params()


def matched_width(schedule, target):
    """The d_model in WIDTHS whose model has the parameter count closest to target.

    The count grows about as d_model², so only the widths near w·sqrt(target / count(w)), w the
    reference width, are tried (building a model to count its parameters is not free)."""
    base = REFERENCE[1]
    guess = base * (target / param_count(schedule, base)) ** 0.5
    near = [d for d in WIDTHS if abs(d - guess) <= 16] or [min(WIDTHS, key=lambda d: abs(d - guess))]
    return min(near, key=lambda d: (abs(param_count(schedule, d) - target), d))


def prefill_state(model, tokens=PREFILL_TOKENS, seed=SEED):
    """The state after a prompt of `tokens` random tokens, through the parallel form."""
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, model.cfg.vocab_size, size=(1, tokens))
    _, state = model.prefill(prompt)
    return state


def state_at_context(model, context, prefilled=None, seed=SEED):
    """A decoding state after `context` tokens (see the module docstring for how it is built).

    prefilled: the state returned by prefill_state(model), reused across contexts (LM.step never
    modifies the state it is given, so one prefill serves every context)."""
    prefilled = prefill_state(model, seed) if prefilled is None else prefilled
    layers = []
    for i, layer_state in enumerate(prefilled["layers"]):
        if model.layers[i].letter == "A":
            layer_state = dict(layer_state, mixer=dict(layer_state["mixer"]))
            for name in ("k", "v"):
                cached = layer_state["mixer"][name]                      # (B, H, t, Dh)
                repeats = -(-context // cached.shape[2])
                layer_state["mixer"][name] = np.ascontiguousarray(
                    np.tile(cached, (1, 1, repeats, 1))[:, :, :context])
        layers.append(layer_state)
    return {"position": context, "layers": layers}


def time_steps(model, state, n_steps, seed=SEED):
    """Run WARMUP_STEPS + n_steps generation steps from `state`; returns (the ms of each timed
    step, the state after them)."""
    rng = np.random.default_rng(seed + 1)
    tokens = rng.integers(0, model.cfg.vocab_size, size=(WARMUP_STEPS + n_steps, 1))
    times = []
    for i, token in enumerate(tokens):
        start = time.perf_counter()
        _, state = model.step(token, state)
        if i >= WARMUP_STEPS:
            times.append(time.perf_counter() - start)
    return [1e3 * t for t in times], state


def measure_decode(quick=False, progress=None, budget_s=None, contexts=None, schedules=None,
                   n_steps=None, rounds=None, backend=None):
    """Returns (rows, info). rows: {"schedule", "context", "ms_per_token", "state_bytes", "d_model",
    "params"}; info: the models' widths, parameter counts and the settings.

    Every (schedule, context) point is timed in `rounds` rounds that visit all points in turn, and
    ms_per_token is its fastest timed step. On a shared machine an interruption only ever adds time,
    so the fastest step is the best estimate of the work itself (the advice of Python's timeit), and
    spreading a point's steps over rounds keeps one long stall from covering all of them."""
    from minilm.model import LM, state_bytes
    preset = "quick" if quick else "full"
    contexts = sorted(contexts or CONTEXTS[preset])
    schedules = SCHEDULES if schedules is None else tuple(schedules)
    backend = BACKEND if backend is None else backend
    n_steps = STEPS[preset] if n_steps is None else int(n_steps)
    rounds = ROUNDS[preset] if rounds is None else int(rounds)
    start = time.perf_counter()
    target = param_count(*REFERENCE)
    prefill_tokens = min(PREFILL_TOKENS, contexts[0])
    models, states = {}, {}
    for schedule in schedules:
        d_model = matched_width(schedule, target)
        model = LM(_config(schedule, d_model, backend), seed=SEED)
        models[schedule] = model
        prefilled = prefill_state(model, prefill_tokens)
        for context in contexts:
            states[schedule, context] = state_at_context(model, context, prefilled)
        notify(progress, f"decode: {schedule} at d_model {d_model}, {model.num_params():,} parameters, prefilled")

    step_ms = {key: [] for key in states}
    sizes = {key: int(sum(state_bytes(state))) for key, state in states.items()}
    skipped = set()
    for round_index in range(rounds):
        for context in contexts:
            for schedule, model in models.items():
                key = (schedule, context)
                # the first round always runs (it is the measurement); later ones only within the budget
                if round_index > 0 and budget_s is not None and time.perf_counter() - start > budget_s:
                    skipped.add(key)
                    continue
                times, states[key] = time_steps(model, states[key], n_steps, seed=SEED + round_index)
                step_ms[key] += times
                notify(progress, f"decode round {round_index + 1}/{rounds}: {schedule} at context {context}: "
                                 f"{min(times):.2f} ms/token")

    rows = [{"schedule": schedule, "context": int(context), "ms_per_token": min(step_ms[schedule, context]),
             "state_bytes": sizes[schedule, context], "d_model": models[schedule].cfg.d_model,
             "params": int(models[schedule].num_params())}
            for context in contexts for schedule in models if step_ms[schedule, context]]
    info = {"parameter_budget": target, "reference": f"{REFERENCE[0]} at d_model {REFERENCE[1]}",
            "models": {s: {"d_model": m.cfg.d_model, "params": int(m.num_params())} for s, m in models.items()},
            "contexts": contexts, "timed_steps_per_round": n_steps, "rounds": rounds,
            "warmup_steps": WARMUP_STEPS, "prefill_tokens": prefill_tokens, "backend": backend,
            "extra_rounds_cut_by_budget": sorted(f"{s}@{c}" for s, c in skipped),
            "elapsed_s": time.perf_counter() - start}
    return rows, info


def summarize(rows):
    """Per schedule: ms/token and state bytes at the smallest and largest context, their ratios,
    and the fitted log-log slope of ms/token against the context."""
    out = {}
    for schedule in dict.fromkeys(r["schedule"] for r in rows):
        points = sorted((r for r in rows if r["schedule"] == schedule), key=lambda r: r["context"])
        first, last = points[0], points[-1]
        out[schedule] = {
            "context_min": first["context"], "context_max": last["context"],
            "ms_min": first["ms_per_token"], "ms_max": last["ms_per_token"],
            "time_ratio": last["ms_per_token"] / first["ms_per_token"],
            "state_min": first["state_bytes"], "state_max": last["state_bytes"],
            "state_ratio": last["state_bytes"] / first["state_bytes"],
            "time_slope": fit_slope([r["context"] for r in points], [r["ms_per_token"] for r in points]),
            "d_model": first.get("d_model"), "params": first.get("params"),
        }
    return out


def plot_decode(rows, path):
    """ms per generated token (left) and decoding-state bytes (right) against the context length."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11.5, 4.4))
    for schedule in dict.fromkeys(r["schedule"] for r in rows):
        points = sorted((r for r in rows if r["schedule"] == schedule), key=lambda r: r["context"])
        xs = [r["context"] for r in points]
        style = "-" if "A" in schedule else "--"
        label = schedule
        if points[0].get("d_model") and points[0].get("params"):
            label += f" (d_model {points[0]['d_model']}, {points[0]['params'] / 1e3:.0f}K params)"
        axes[0].plot(xs, [r["ms_per_token"] for r in points], style, marker="o", markersize=3.5, label=label)
        axes[1].plot(xs, [r["state_bytes"] for r in points], style, marker="o", markersize=3.5, label=label)
    for ax, ylabel, title in ((axes[0], "ms per generated token", "generation time per token"),
                              (axes[1], "decoding state (bytes)", "KV cache / state size")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(title + " (same parameter budget)", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_decode(quick=False, out_dir=".", progress=None, budget_s=None, **overrides):
    """Measure, then write out_dir/decode.json and decode_per_token.png; returns the rows."""
    rows, info = measure_decode(quick=quick, progress=progress, budget_s=budget_s, **overrides)
    os.makedirs(out_dir, exist_ok=True)
    try:
        plot_decode(rows, os.path.join(out_dir, "decode_per_token.png"))
    except ImportError as error:        # matplotlib missing: the numbers still count
        info["plot"] = f"no plot: {error}"
    write_json(os.path.join(out_dir, "decode.json"), {"rows": rows, "summary": summarize(rows), "info": info})
    run_decode.last_info = info
    return rows


run_decode.last_info = None


if __name__ == "__main__":        # python -m minilm.experiments.decode [--quick]
    for row in run_decode(quick="--quick" in sys.argv, out_dir="decode-results", progress=print):
        print(row)
