"""Claim 5: linear attention without normalization is hard to train; normalization fixes much of it.

What is compared (model variants, everything else equal)
--------------------------------------------------------
    "linear_none"         L layers whose output is the raw phi(q_t) S_t: a sum of t outer products,
                          so its scale grows with the position t (LMConfig.linear_norm = "none")
    "linear_denominator"  divided by phi(q_t) . z_t, Katharopoulos et al.'s normalizer ("denominator")
    "linear_rmsnorm"      a per-head RMSNorm on the output, TransNormer's NormAttention and the
                          default of minilm's L layer ("rmsnorm")
    "linear_both"         the denominator, then the RMSNorm (full runs only); the same function as
                          "linear_rmsnorm" up to the norm's epsilon, since the denominator is one
                          positive number per head and token, which the RMSNorm divides out:
                          RMSNorm(o / s) = o / sqrt(mean(o^2) + eps s^2)
    "softmax"             A layers (softmax attention), the reference point

Each variant is a two-layer byte-level language model ("LL" or "AA"; d_model D_MODEL = 64, 4 heads,
MLP width 2 D, no short convolution) trained on windows of SEQ_LEN = 256 bytes of the built-in
corpus (minilm.data), BATCH_SIZE = 4 windows per step (long windows, so that the unnormalized
output's growth with the position has room to matter), with AdamW (betas 0.9, 0.95) at
every learning rate of the grid (the same grid for every variant), a linear warmup over the first
10 % of the steps and a cosine decay to lr / 10, and NO gradient clipping, so that the gradient
norms show what the optimizer actually receives. Initialization and batches use `seed` (SEED = 0),
identical for every variant and rate.

Recorded per run: the training loss and the global gradient norm at every step (the curves of
stability_curves.png), the largest gradient norm, whether the run diverged (a NaN or Inf in the
loss, the gradients or any activation: the ops refuse non-finite inputs, so an overflow anywhere
ends the run), and the final loss: the mean validation loss on fixed windows of the held-out text
(None when the run diverged).

Budget: the number of steps comes from measured step times (`run_stability` times a few steps of
each variant first), steps = min(max_steps, budget share / step time), at least MIN_STEPS. Runs go
two at a time, each in a single-threaded worker process (minilm.experiments.parallel); the step
times are measured the same way.

Shapes legend: B batch, T sequence length, D d_model.
"""
import math
import os
import time

import numpy as np

from minilm import data
from minilm.experiments import parallel
from minilm.experiments.scaling import notify
from minilm.model import LM, LMConfig
from minilm.ops import cross_entropy
from minilm.optim import AdamW, global_norm, lr_at

VARIANTS = {
    # name: (schedule, linear_norm)
    "linear_none": ("LL", "none"),
    "linear_denominator": ("LL", "denominator"),
    "linear_rmsnorm": ("LL", "rmsnorm"),
    "linear_both": ("LL", "both"),
    "softmax": ("AA", "rmsnorm"),
}
QUICK_VARIANTS = ("linear_none", "linear_denominator", "linear_rmsnorm", "softmax")
LR_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
QUICK_LR_GRID = (3e-3, 3e-2, 1e-1)
D_MODEL = 64
SEQ_LEN = 256                # long enough for the unnormalized output's growth with t to matter
BATCH_SIZE = 4               # 1024 tokens per step
SEED = 0
MIN_STEPS = 20
EVAL_BATCHES = 4


def model_config(variant, d_model=None, backend="auto"):
    """The LMConfig of a variant (see VARIANTS); d_model None: D_MODEL."""
    schedule, linear_norm = VARIANTS[variant]
    d_model = D_MODEL if d_model is None else d_model
    return LMConfig(vocab_size=data.VOCAB_SIZE, d_model=d_model, schedule=schedule, n_heads=4,
                    mlp_ratio=2, linear_norm=linear_norm, backend=backend)


class Diverged(Exception):
    """A NaN or Inf appeared in the loss, the gradients or an activation."""


def _loss_and_grads(model, x, y):
    """Forward + backward; raises Diverged when anything becomes non-finite."""
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            logits, cache = model.forward(x)
            loss, loss_cache = cross_entropy.forward(logits, y)
            dlogits, _ = cross_entropy.backward(1.0, loss_cache)
            model.backward(dlogits, cache)
    except ValueError as err:
        # the ops refuse NaN / Inf inputs: an activation overflowed somewhere in the model
        if "NaN or Inf" in str(err):
            raise Diverged(str(err)) from None
        raise
    loss = float(loss)
    if not math.isfinite(loss):
        raise Diverged("the loss is not finite")
    return loss


def validation_loss(model, corpus):
    """Mean cross-entropy (nats per token) on EVAL_BATCHES fixed validation batches, or None if not finite."""
    losses = []
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            for x, y in data.eval_windows(corpus.val, BATCH_SIZE, SEQ_LEN, EVAL_BATCHES):
                logits, _ = model.forward(x)
                losses.append(float(cross_entropy.forward(logits, y)[0]))
    except ValueError as err:
        if "NaN or Inf" in str(err):
            return None
        raise
    value = float(np.mean(losses))
    return value if math.isfinite(value) else None


def train_variant(variant, lr, steps, corpus, seed=SEED, d_model=None, time_limit_s=None, backend="auto"):
    """Train one variant at one learning rate without gradient clipping.

    Returns {"losses": [...], "grad_norms": [...], "diverged": bool, "diverged_at": step or None,
             "final_loss": validation loss or None, "steps": steps run, "seconds": ...}.
    """
    model = LM(model_config(variant, d_model, backend), seed=seed)
    optimizer = AdamW(model.params, lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    rng = np.random.default_rng(seed)
    warmup = max(1, steps // 10)
    losses, grad_norms = [], []
    diverged_at = None
    start = time.perf_counter()
    step = 0
    while step < steps:
        x, y = data.sample_batch(corpus.train, BATCH_SIZE, SEQ_LEN, rng)
        try:
            loss = _loss_and_grads(model, x, y)
        except Diverged:
            diverged_at = step
            break
        grad_norm = global_norm(model.grads)
        losses.append(loss)
        grad_norms.append(grad_norm)
        if not math.isfinite(grad_norm):
            diverged_at = step
            break
        with np.errstate(over="ignore", invalid="ignore"):
            optimizer.step(model.params, model.grads, lr=lr_at(step, lr, warmup, steps, min_lr=lr / 10))
        step += 1
        if time_limit_s is not None and time.perf_counter() - start > time_limit_s:
            break
    final_loss = None
    if diverged_at is None:
        if all(np.all(np.isfinite(p)) for p in model.params.values()):
            final_loss = validation_loss(model, corpus)
        if final_loss is None:
            diverged_at = step
    return {"losses": losses, "grad_norms": grad_norms, "diverged": diverged_at is not None,
            "diverged_at": diverged_at, "final_loss": final_loss, "steps": step,
            "seconds": time.perf_counter() - start}


def measure_step_time(variant, corpus, repeats=2, d_model=None, backend="auto"):
    """Median wall time of one training step of a variant (after a warm-up step)."""
    model = LM(model_config(variant, d_model, backend), seed=SEED)
    optimizer = AdamW(model.params, lr=1e-3)
    rng = np.random.default_rng(SEED)
    x, y = data.sample_batch(corpus.train, BATCH_SIZE, SEQ_LEN, rng)
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        _loss_and_grads(model, x, y)
        optimizer.step(model.params, model.grads)
        if i:
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


# ----------------------------------------------------------------------------------------------
# the experiment

QUICK_BUDGET_S = 45
FULL_BUDGET_S = 300
QUICK_MAX_STEPS = 80
FULL_MAX_STEPS = 300
CURVE_POINTS = 100           # loss / gradient-norm curves are stored with at most this many points


def _subsample(values, points=CURVE_POINTS):
    """(steps, values) with at most `points` entries, always keeping the last one."""
    if len(values) <= points:
        return list(range(len(values))), [float(v) for v in values]
    index = np.unique(np.linspace(0, len(values) - 1, points).round().astype(int))
    return index.tolist(), [float(values[i]) for i in index]


def _measure_job(variant):
    """measure_step_time of one variant (a worker's job)."""
    return measure_step_time(variant, data.load_corpus(min_tokens=SEQ_LEN + 1))


def _train_job(job):
    """One training run (a worker's job): (variant, lr, steps, time_limit_s) -> train_variant's result."""
    variant, lr, steps, time_limit_s = job
    corpus = data.load_corpus(min_tokens=SEQ_LEN + 1)
    return train_variant(variant, lr, steps, corpus, time_limit_s=time_limit_s)


def run_stability(quick=True, out_dir=None, progress=None, budget_s=None, workers=None):
    """Train every variant at every learning rate of the grid; write stability_curves.png.

    quick: the reduced grid (QUICK_VARIANTS x QUICK_LR_GRID, at most QUICK_MAX_STEPS steps) that fits
        in about QUICK_BUDGET_S seconds on 2 cores; otherwise every variant x LR_GRID within FULL_BUDGET_S.
    out_dir: where the plot goes (None: no plot).
    progress: optional callable(message: str), called once per run with a one-line summary.
    budget_s: wall-time budget (default QUICK_BUDGET_S or FULL_BUDGET_S); the steps per run are
        sized from measured step times to fit it.
    workers: training runs at once, one single-threaded process each (minilm.experiments.parallel;
        default: one per core, at most 2).
    Returns one row per (variant, lr): {"variant", "lr", "final_loss", "diverged", "max_grad_norm",
        "steps", "diverged_at", "seed", "d_model", "seq_len", "batch_size", "step_ms", "curve_steps",
        "loss_curve", "grad_norm_curve"}.
    """
    started = time.perf_counter()
    budget_s = float(budget_s if budget_s is not None else (QUICK_BUDGET_S if quick else FULL_BUDGET_S))
    variants = QUICK_VARIANTS if quick else tuple(VARIANTS)
    lrs = QUICK_LR_GRID if quick else LR_GRID
    max_steps = QUICK_MAX_STEPS if quick else FULL_MAX_STEPS
    workers = parallel.default_workers() if workers is None else workers

    # step times measured in the workers (single-threaded, beside each other), as the runs will go
    step_times = dict(zip(variants, parallel.run_jobs(_measure_job, variants, workers)))
    remaining = 0.9 * budget_s - (time.perf_counter() - started)
    one_step_of_every_run = sum(step_times.values()) * len(lrs) / workers
    evaluation = EVAL_BATCHES * 0.5                    # a validation batch costs about half a step
    steps = int(min(max_steps, max(MIN_STEPS, remaining / one_step_of_every_run - evaluation)))
    notify(progress, f"stability: {len(variants)} variants x {len(lrs)} learning rates, {steps} steps each, "
                     f"{workers} at a time (step ms: " + ", ".join(f"{v} {1e3 * t:.0f}" for v, t in step_times.items()) + ")")

    runs = [(variant, lr) for variant in variants for lr in lrs]
    jobs = [(variant, lr, steps, 3.0 * steps * step_times[variant]) for variant, lr in runs]
    rows = [None] * len(runs)

    def collect(index, result):
        variant, lr = runs[index]
        finite_norms = [g for g in result["grad_norms"] if math.isfinite(g)]
        curve_steps, loss_curve = _subsample(result["losses"])
        _, grad_curve = _subsample(result["grad_norms"])
        row = {"variant": variant, "lr": lr, "final_loss": result["final_loss"],
               "diverged": result["diverged"],
               "max_grad_norm": max(finite_norms) if finite_norms else None,
               "steps": result["steps"], "diverged_at": result["diverged_at"], "seed": SEED,
               "d_model": D_MODEL, "seq_len": SEQ_LEN, "batch_size": BATCH_SIZE,
               "step_ms": 1e3 * step_times[variant], "curve_steps": curve_steps,
               "loss_curve": loss_curve, "grad_norm_curve": grad_curve}
        rows[index] = row
        status = (f"DIVERGED at step {result['diverged_at']}" if result["diverged"]
                  else f"final loss {result['final_loss']:.3f}")
        notify(progress, f"stability {variant} lr={lr:g}: {status}, max grad norm "
                         f"{row['max_grad_norm'] if row['max_grad_norm'] is None else round(row['max_grad_norm'], 2)}"
                         f" ({result['steps']} steps, {result['seconds']:.1f} s)")
    parallel.run_jobs(_train_job, jobs, workers, on_result=collect)
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        plot_stability(rows, os.path.join(out_dir, "stability_curves.png"))
    return rows


def summarize(rows):
    """{variant: (runs, diverged runs, best final loss or None)}."""
    summary = {}
    for row in rows:
        runs, bad, best = summary.get(row["variant"], (0, 0, None))
        loss = row["final_loss"]
        if loss is not None and (best is None or loss < best):
            best = loss
        summary[row["variant"]] = (runs + 1, bad + int(row["diverged"]), best)
    return summary


def plot_stability(rows, path):
    """Loss curves (top) and gradient norms (bottom, log scale), one column per variant, one line per
    learning rate; a cross marks the step where a run diverged."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(row["variant"] for row in rows))
    lrs = sorted({row["lr"] for row in rows})
    colors = {lr: plt.cm.viridis(i / max(1, len(lrs) - 1)) for i, lr in enumerate(lrs)}
    fig, axes = plt.subplots(2, len(variants), figsize=(3.2 * len(variants), 5.5), squeeze=False,
                             sharey="row")
    for j, variant in enumerate(variants):
        for row in (r for r in rows if r["variant"] == variant):
            color = colors[row["lr"]]
            label = f"lr {row['lr']:g}" + (" (diverged)" if row["diverged"] else "")
            axes[0, j].plot(row["curve_steps"], row["loss_curve"], color=color, label=label)
            axes[1, j].plot(row["curve_steps"], row["grad_norm_curve"], color=color)
            if row["diverged"] and row["curve_steps"]:
                axes[0, j].plot(row["curve_steps"][-1], row["loss_curve"][-1], "x", color="red", markersize=9)
        axes[0, j].set_title(variant)
        axes[1, j].set_yscale("log")
        axes[1, j].set_xlabel("step")
        axes[0, j].legend(fontsize=7)
    axes[0, 0].set_ylabel("training loss (nats/byte)")
    axes[1, 0].set_ylabel("gradient norm (no clipping)")
    fig.suptitle("Linear attention with and without normalization vs softmax, across learning rates")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
