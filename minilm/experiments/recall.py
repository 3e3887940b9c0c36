"""Claims 4 and 6: fixed-state models pay in recall; a few attention layers buy it back.

What is measured
----------------
Small language models of every family are trained on multi-query associative recall (MQAR) and on
a passkey task (generators: minilm.experiments.tasks) and scored on held-out examples by the
accuracy of their argmax predictions at the answer positions. Accuracy is reported against the
number of key-value pairs to remember, the sequence length, the model width and the size of the
decoding state (bytes for one sequence at the end of the sequence: the fixed state of L, G, M, R
layers, the KV cache of A layers).

The models (the same recipe for every family)
---------------------------------------------
- Two layers, one letter each: "AA" (Transformer), "LL", "GG", "MM", "RR", and the hybrids "MA",
  "LA" (one attention layer on top of one fixed-state layer, as Jamba puts attention among Mamba
  layers). Quick runs train a subset (QUICK_SCHEDULES).
- Every A, L and G layer gets a short depthwise causal convolution of SHORT_CONV = 4 taps on its
  mixer input (LMConfig.short_conv): Mamba has its own conv1d and RWKV its token shift. This is the
  "Based recipe" that Zoology gives every mixer for fairness. Measured here (seed 0, D = 64, lr
  1e-2): AA with the convolution reached 0.99 MQAR accuracy in 275 steps, AA without it was at
  0.19 / 0.11 / 0.06 (4 / 8 / 16 pairs) after 600 steps: the convolution lets one layer see the
  previous token, so the lookup forms without first growing an induction head.
- Matched parameter count: every schedule uses the same d_model and two layers, with MLP width
  MLP_RATIO = 2 x d_model in A/L/G blocks. An A/L/G block then holds 8 D^2 + O(D) parameters and a
  Mamba block (expand 2, d_state 16) 6 D^2 + about 126 D, equal near D = 64, the width of the main
  sweep: there AA, LL, GG, MM, MA and LA are within 1 % of each other (74.6K parameters, embedding
  included) and RR is 12 % larger (its channel mix is wider). At D = 32 MM is 15 % larger than AA,
  at D = 128 11 % smaller; `params` in every row gives the exact count. Schedules of another length
  (e.g. "MMA") get the d_model whose total parameter count is closest to "AA" at the requested
  width (`matched_d_model`).
- Vocabulary VOCAB_SIZE = 128 (keys [1, 64), values [64, 128)); n_heads = 4 for A, L and G.
- Optimizer: AdamW (betas 0.9, 0.98, weight decay 0.1 on projection matrices), gradient clipping at
  1.0, a linear warmup over the first 10 % of the steps then a cosine decay to lr / 10.
- Data: a fresh batch of BATCH_SIZE sequences each step, drawn from a Generator seeded with
  `seed`; each batch mixes the pair counts of the training set equally (as Zoology trains on a
  mixture). Held-out sets are drawn from other seeds.
- Early stop, as Zoology: training ends once the accuracy on a small held-out set reaches 0.99
  (checked every `eval_every` steps), otherwise at the planned number of steps.
- Learning rates: every model is trained with each learning rate of the same grid (LR_GRID, or
  QUICK_LR_GRID in quick runs) and the row reports the best one, by mean held-out accuracy over the
  evaluation sets of that task — "the maximum performance for each model over the learning rates",
  as Zoology reports. The accuracy of every rate is kept in the row ("lr_sweep"). The grid matters:
  in the default tour's run (D = 64, up to 600 steps) AA reached 0.99 at 1e-2 and stayed at 0.15
  and 0.19 at 1e-3 and 3e-3, while MA learned at all three; with the earlier grid (1e-3, 3e-3)
  attention had no working baseline at all.
- Seeds: model initialization and training data use `seed` (SEED = 0 by default); held-out sets use
  seed + 1000 + their index. One seed per configuration (no averaging over seeds).

Budget
------
The number of steps comes from measured step times: `run_recall` first times a few training steps
of every model, then gives each training run steps = min(max_steps, its share of the budget /
step time) (never fewer than MIN_STEPS). A run still going when its share of time is spent three
times over stops there; the row says how it stopped ("stopped": "target" | "steps" | "time").
Runs go two at a time, each in a single-threaded worker process (minilm.experiments.parallel): at
this model size a second thread barely speeds up one run, so two runs at once nearly double the
steps a budget buys. Step times are measured in the same setting.

Entry points: run_recall (the tour and bench/recall.py), train_recall_model (one model).
Shapes legend: B batch, T sequence length, V vocabulary size, D d_model.
"""
import math
import os
import time

import numpy as np

from minilm.experiments import parallel, tasks
from minilm.experiments.scaling import notify
from minilm.model import LM, LMConfig, state_bytes
from minilm.ops import cross_entropy
from minilm.optim import AdamW, clip_grad_norm, lr_at

VOCAB_SIZE = 128
N_HEADS = 4
SHORT_CONV = 4
MLP_RATIO = 2
BATCH_SIZE = 32
SEED = 0
TARGET_ACCURACY = 0.99       # Zoology's early-stopping threshold
MIN_STEPS = 40

SCHEDULES = ("AA", "LL", "GG", "MM", "RR", "MA", "LA")
QUICK_SCHEDULES = ("AA", "LL", "MM", "MA")
LR_GRID = (1e-3, 3e-3, 1e-2)
QUICK_LR_GRID = (3e-3, 1e-2)
PASSKEY_LR_GRID = (3e-3,)

# MQAR: models train on a mixture of pair counts at T = 64 and are scored per pair count at
# T = 64 and (full runs) at T = 128, a length they never saw in training
MQAR_TRAIN_LEN = 64
MQAR_PAIRS = (4, 8, 16)
EVAL_LENS = (64, 128)
QUICK_EVAL_LENS = (64,)
WIDTHS = (32, 64)             # d_model of the width / state-size sweep
MAIN_WIDTH = 64
PASSKEY_LENGTHS = (64,)
PASSKEY_DIGITS = 5
PASSKEY_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


# ----------------------------------------------------------------------------------------------
# models

def model_config(schedule, d_model, vocab_size=VOCAB_SIZE, backend="auto"):
    """The LMConfig of a recall model (see the module docstring for the recipe)."""
    return LMConfig(vocab_size=vocab_size, d_model=d_model, schedule=schedule, n_heads=N_HEADS,
                    short_conv=SHORT_CONV, mlp_ratio=MLP_RATIO, backend=backend)


def count_params(schedule, d_model, vocab_size=VOCAB_SIZE):
    return LM(model_config(schedule, d_model, vocab_size, backend="numpy")).num_params()


def matched_d_model(schedule, width, vocab_size=VOCAB_SIZE, reference="AA"):
    """d_model for `schedule` whose parameter count is closest to `reference` at d_model = width.

    Two-letter schedules keep the width itself (their counts are within a few percent by design);
    the search covers multiples of 2 * N_HEADS (even head dim, for RoPE) from width/2 to 2 width."""
    if len(schedule) == len(reference):
        return width
    target = count_params(reference, width, vocab_size)
    step = 2 * N_HEADS
    candidates = range(max(step, (width // 2) // step * step), 2 * width + 1, step)
    return min(candidates, key=lambda d: abs(count_params(schedule, d, vocab_size) - target))


def decoding_state_bytes(model, seq_len):
    """Bytes of the decoding state of ONE sequence after seq_len tokens (KV cache for A layers)."""
    tokens = np.zeros((1, seq_len), dtype=np.int64)
    _, state = model.prefill(tokens)
    return int(sum(state_bytes(state)))


# ----------------------------------------------------------------------------------------------
# data

def mqar_batch(rng, batch_size, seq_len, pair_counts, vocab_size=VOCAB_SIZE):
    """One training batch mixing the pair counts equally: (inputs (B, T), targets (B, T))."""
    sizes = [batch_size // len(pair_counts) + (i < batch_size % len(pair_counts))
             for i in range(len(pair_counts))]
    parts = [tasks.mqar(n, seq_len, d, vocab_size, seed=rng) for n, d in zip(sizes, pair_counts) if n]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def passkey_batch(rng, batch_size, seq_len):
    """One training batch of passkey examples (PASSKEY_DIGITS digits, random depths)."""
    return tasks.passkey(batch_size, seq_len, PASSKEY_DIGITS, seed=rng)


def evaluate(model, inputs, targets, batch_size=128):
    """(accuracy, exact match) of argmax predictions over the answer positions of a held-out set."""
    correct = answers = exact = 0
    for start in range(0, inputs.shape[0], batch_size):
        logits, _ = model.forward(inputs[start:start + batch_size])
        y = targets[start:start + batch_size]
        keep = y != tasks.IGNORE_INDEX
        hit = (np.argmax(logits, axis=-1) == y)
        correct += int(np.sum(hit & keep))
        answers += int(np.sum(keep))
        exact += int(np.sum(np.all(hit | ~keep, axis=1)))
    return correct / max(1, answers), exact / inputs.shape[0]


# ----------------------------------------------------------------------------------------------
# training one model

def train_step(model, optimizer, inputs, targets, lr, grad_clip=1.0):
    """Forward, loss on the answer positions, backward, clipping, AdamW. Returns (loss, grad norm)."""
    logits, cache = model.forward(inputs)
    loss, loss_cache = cross_entropy.forward(logits, targets, ignore_index=tasks.IGNORE_INDEX)
    dlogits, _ = cross_entropy.backward(1.0, loss_cache)
    model.backward(dlogits, cache)
    grad_norm = clip_grad_norm(model.grads, grad_clip)
    if math.isfinite(grad_norm):
        optimizer.step(model.params, model.grads, lr=lr)
    return float(loss), grad_norm


def make_optimizer(model, lr):
    return AdamW(model.params, lr=lr, betas=(0.9, 0.98), weight_decay=0.1)


def train_recall_model(schedule, d_model, lr, steps, sample_batch, eval_sets, seed=SEED,
                       eval_every=25, early_stop_set=None, time_limit_s=None, backend="auto",
                       vocab_size=VOCAB_SIZE):
    """Train one model and score it on held-out sets.

    sample_batch(rng) -> (inputs, targets): a training batch.
    eval_sets: {name: (inputs, targets)} scored at the end.
    early_stop_set: (inputs, targets) checked every eval_every steps; training stops once its
        accuracy reaches TARGET_ACCURACY. None: no early stop.
    time_limit_s: stop after this many seconds of training (None: no limit).
    Returns {"accuracy": {name: acc}, "exact": {name: exact match}, "steps": steps run,
             "stopped": "target"|"steps"|"time"|"diverged", "losses": [...], "seconds": ...,
             "params": n, "model": the trained LM}.
    """
    model = LM(model_config(schedule, d_model, vocab_size, backend), seed=seed)
    optimizer = make_optimizer(model, lr)
    rng = np.random.default_rng(seed)
    warmup = max(1, steps // 10)
    losses = []
    stopped = "steps"
    start = time.perf_counter()
    step = 0
    while step < steps:
        inputs, targets = sample_batch(rng)
        loss, grad_norm = train_step(model, optimizer, inputs, targets,
                                     lr_at(step, lr, warmup, steps, min_lr=lr / 10))
        losses.append(loss)
        step += 1
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            stopped = "diverged"
            break
        if early_stop_set is not None and step % eval_every == 0 and step < steps:
            if evaluate(model, *early_stop_set)[0] >= TARGET_ACCURACY:
                stopped = "target"
                break
        if time_limit_s is not None and time.perf_counter() - start > time_limit_s:
            stopped = "time"
            break
    seconds = time.perf_counter() - start
    accuracy, exact = {}, {}
    for name, (inputs, targets) in eval_sets.items():
        if stopped == "diverged":
            accuracy[name], exact[name] = 0.0, 0.0
        else:
            accuracy[name], exact[name] = evaluate(model, inputs, targets)
    return {"accuracy": accuracy, "exact": exact, "steps": step, "stopped": stopped, "losses": losses,
            "seconds": seconds, "params": model.num_params(), "model": model}


def measure_step_time(schedule, d_model, seq_len, repeats=4, backend="auto", vocab_size=VOCAB_SIZE):
    """Median wall time of one training step (after one warm-up step, which compiles kernels)."""
    model = LM(model_config(schedule, d_model, vocab_size, backend), seed=SEED)
    optimizer = make_optimizer(model, 1e-3)
    rng = np.random.default_rng(SEED)
    pairs = max(1, seq_len // 16)
    inputs, targets = mqar_batch(rng, BATCH_SIZE, seq_len, (pairs,), vocab_size)
    train_step(model, optimizer, inputs, targets, 1e-3)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        train_step(model, optimizer, inputs, targets, 1e-3)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


# ----------------------------------------------------------------------------------------------
# the experiment: which models are trained on what

QUICK_BUDGET_S = 100
FULL_BUDGET_S = 720
QUICK_MAX_STEPS = 400
FULL_MAX_STEPS = 600
EVAL_EXAMPLES = 256           # held-out examples per evaluation set (early stop: 64 per pair count)


def studies(quick):
    """The training runs of the experiment, as a list of study dicts:
    {"task", "seq_len" (training length), "eval_lens" (MQAR: lengths scored), "kv_pairs" (MQAR: the
     mixture trained on, scored per count), "width", "schedules", "lrs"}.
    Each (schedule, lr) of a study is one training run.

    quick: MQAR only, QUICK_SCHEDULES at MAIN_WIDTH, QUICK_LR_GRID.
    full:  MQAR with every schedule at MAIN_WIDTH (LR_GRID, scored at T = 64 and 128); the width
           sweep with QUICK_SCHEDULES at the other WIDTHS (LR_GRID); the passkey task with
           QUICK_SCHEDULES (PASSKEY_LR_GRID). Within a study every family gets the same grid.
    """
    def mqar_study(width, schedules, lrs, eval_lens):
        return {"task": "mqar", "seq_len": MQAR_TRAIN_LEN, "eval_lens": eval_lens, "kv_pairs": MQAR_PAIRS,
                "width": width, "schedules": schedules, "lrs": lrs}
    if quick:
        return [mqar_study(MAIN_WIDTH, QUICK_SCHEDULES, QUICK_LR_GRID, QUICK_EVAL_LENS)]
    plan = [mqar_study(MAIN_WIDTH, SCHEDULES, LR_GRID, EVAL_LENS)]
    plan += [mqar_study(width, QUICK_SCHEDULES, LR_GRID, QUICK_EVAL_LENS) for width in WIDTHS if width != MAIN_WIDTH]
    plan += [{"task": "passkey", "seq_len": seq_len, "eval_lens": (seq_len,), "kv_pairs": (1,), "width": MAIN_WIDTH,
              "schedules": QUICK_SCHEDULES, "lrs": PASSKEY_LR_GRID} for seq_len in PASSKEY_LENGTHS]
    return plan


def task_data(study, seed=SEED):
    """(sample_batch(rng), eval_sets {name: (inputs, targets)}, early-stop set, {name: row fields}).

    The row fields of an evaluation set: {"kv_pairs", "seq_len"} (and "depth" for the passkey)."""
    T = study["seq_len"]
    if study["task"] == "mqar":
        pairs = tuple(study["kv_pairs"])

        def sample(rng):
            return mqar_batch(rng, BATCH_SIZE, T, pairs)
        eval_sets, fields = {}, {}
        for j, length in enumerate(study.get("eval_lens", (T,))):
            for i, d in enumerate(pairs):
                eval_sets[(length, d)] = tasks.mqar(EVAL_EXAMPLES, length, d, VOCAB_SIZE,
                                                    seed=seed + 1000 + 100 * j + i)
                fields[(length, d)] = {"kv_pairs": d, "seq_len": length}
        early = mqar_batch(np.random.default_rng(seed + 2000), 64 * len(pairs), T, pairs)
        return sample, eval_sets, early, fields

    def sample(rng):
        return passkey_batch(rng, BATCH_SIZE, T)
    eval_sets = {depth: tasks.passkey(EVAL_EXAMPLES // 4, T, PASSKEY_DIGITS, seed=seed + 1000 + i, depth=depth)
                 for i, depth in enumerate(PASSKEY_DEPTHS)}
    early = tasks.passkey(64, T, PASSKEY_DIGITS, seed=seed + 2000)
    return sample, eval_sets, early, {depth: {"kv_pairs": 1, "seq_len": T, "depth": depth}
                                      for depth in PASSKEY_DEPTHS}


def _measure_job(key):
    """measure_step_time(schedule, d_model, seq_len) (a worker's job)."""
    return measure_step_time(*key)


def _train_job(job):
    """One training run (a worker's job): train, score, and return the result without the model."""
    study, schedule, d_model, lr, steps, time_limit_s = job
    sample, eval_sets, early, _ = task_data(study)
    result = train_recall_model(schedule, d_model, lr, steps, sample, eval_sets, early_stop_set=early,
                                time_limit_s=time_limit_s)
    result.pop("model")
    return result


def run_recall(quick=True, out_dir=None, progress=None, budget_s=None, workers=None):
    """Train the recall models and score them; write recall_vs_pairs.png (and recall_vs_width.png
    when a width sweep ran) into out_dir.

    quick: the reduced sweep (QUICK_SCHEDULES on MQAR at T = 64, QUICK_LR_GRID, no passkey, at most
        QUICK_MAX_STEPS steps) that fits in about QUICK_BUDGET_S seconds on 2 cores;
        otherwise `studies(False)` within FULL_BUDGET_S.
    progress: optional callable(message: str), called with a one-line summary per training run.
    budget_s: wall-time budget; steps per run = min(max steps, share of the budget / measured step time).
    workers: training runs at once, one single-threaded process each (minilm.experiments.parallel;
        default: one per core, at most 2). Workers read this module's constants as imported.
    Returns rows {"task", "schedule", "kv_pairs", "seq_len", "d_model", "accuracy", "lr", "lr_sweep",
        "steps", "stopped", "seed", "params", "state_bytes", "step_ms", "train_seconds", "exact_match",
        "batch_size", "short_conv"}; passkey rows also have "depth" (kv_pairs = 1: one needle).
        One row per (study, schedule, evaluation set), for the best learning rate of that schedule.
    """
    started = time.perf_counter()
    budget_s = float(budget_s if budget_s is not None else (QUICK_BUDGET_S if quick else FULL_BUDGET_S))
    max_steps = QUICK_MAX_STEPS if quick else FULL_MAX_STEPS
    workers = parallel.default_workers() if workers is None else workers
    plan = studies(quick)

    # 1. measure the step time of every (schedule, width, seq_len) that will be trained, in the
    # workers, since a single-threaded step running beside another is what the budget pays for
    keys = list(dict.fromkeys((schedule, matched_d_model(schedule, study["width"]), study["seq_len"])
                              for study in plan for schedule in study["schedules"]))
    step_times = dict(zip(keys, parallel.run_jobs(_measure_job, keys, workers)))
    runs = [(index, schedule, lr) for index, study in enumerate(plan)
            for schedule in study["schedules"] for lr in study["lrs"]]

    def run_time(study, schedule):
        return step_times[(schedule, matched_d_model(schedule, study["width"]), study["seq_len"])]

    # 2. one step count for every run, from what the budget has left (evaluation ~ 10 % on top);
    # `workers` runs share the time
    remaining = 0.9 * budget_s - (time.perf_counter() - started)
    per_step_of_all_runs = 1.1 * sum(run_time(plan[index], schedule) for index, schedule, _ in runs) / workers
    steps = int(min(max_steps, max(MIN_STEPS, remaining / per_step_of_all_runs)))
    notify(progress, f"recall: {len(runs)} training runs of up to {steps} steps (batch {BATCH_SIZE}, {workers} at "
           "a time); step ms: " + ", ".join(f"{s} D={d} T={t}: {1e3 * v:.0f}" for (s, d, t), v in step_times.items()))

    # 3. train and score every (study, schedule, lr)
    fields = [task_data(study)[3] for study in plan]         # {evaluation set: row fields} per study

    def report(job_index, result):
        index, schedule, lr = runs[job_index]
        study = plan[index]
        mean = _mean_accuracy(result, fields[index], study["seq_len"])
        notify(progress, f"recall {study['task']} T={study['seq_len']} D={matched_d_model(schedule, study['width'])} "
                         f"{schedule} lr={lr:g}: mean accuracy {mean:.3f} "
                         f"({result['steps']} steps, {result['stopped']}, {result['seconds']:.1f} s)")
    jobs = [(plan[index], schedule, matched_d_model(schedule, plan[index]["width"]), lr, steps,
             3.0 * steps * run_time(plan[index], schedule)) for index, schedule, lr in runs]
    results = dict(zip(runs, parallel.run_jobs(_train_job, jobs, workers, on_result=report)))

    # 4. keep the best learning rate per (study, schedule)
    rows = []
    for study_index, study in enumerate(plan):
        for schedule in study["schedules"]:
            d_model = matched_d_model(schedule, study["width"])
            means = {lr: _mean_accuracy(results[(study_index, schedule, lr)], fields[study_index], study["seq_len"])
                     for lr in study["lrs"]}
            best_lr = max(study["lrs"], key=lambda lr: (means[lr], -lr))
            best = results[(study_index, schedule, best_lr)]
            model = LM(model_config(schedule, d_model, backend="numpy"))
            state = decoding_state_bytes(model, study["seq_len"])     # at the training length
            sweep = ";".join(f"{lr:g}:{means[lr]:.3f}" for lr in study["lrs"])
            for name, acc in best["accuracy"].items():
                field = fields[study_index][name]
                row = {"task": study["task"], "schedule": schedule, "kv_pairs": field["kv_pairs"],
                       "seq_len": field["seq_len"], "d_model": d_model, "accuracy": acc,
                       "exact_match": best["exact"][name], "lr": best_lr, "lr_sweep": sweep,
                       "steps": best["steps"], "stopped": best["stopped"], "seed": SEED,
                       "params": best["params"], "state_bytes": state,
                       "step_ms": 1e3 * run_time(study, schedule), "train_seconds": best["seconds"],
                       "batch_size": BATCH_SIZE, "short_conv": SHORT_CONV if set(schedule) & set("ALG") else 0,
                       "train_kv_pairs": list(study["kv_pairs"]), "train_seq_len": study["seq_len"],
                       "study": study_index}
                if "depth" in field:
                    row["depth"] = field["depth"]
                rows.append(row)
    notify(progress, f"recall: done in {time.perf_counter() - started:.0f} s")
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        plot_recall(rows, os.path.join(out_dir, "recall_vs_pairs.png"))
        if len({row["d_model"] for row in rows if row["task"] == "mqar"}) > 1:
            plot_recall_vs_width(rows, os.path.join(out_dir, "recall_vs_width.png"))
    return rows


def _mean_accuracy(result, fields, seq_len):
    """Mean held-out accuracy over the evaluation sets of the training length (the score that picks
    the best learning rate)."""
    return float(np.mean([acc for name, acc in result["accuracy"].items() if fields[name]["seq_len"] == seq_len]))


def accuracy_table(rows, task="mqar", seq_len=None, d_model=None):
    """{schedule: {kv_pairs: accuracy}} for one task, sequence length and width (the first found)."""
    selected = [r for r in rows if r["task"] == task]
    if selected and seq_len is None:
        seq_len = selected[0]["seq_len"]
    if selected and d_model is None:
        d_model = MAIN_WIDTH if any(r["d_model"] == MAIN_WIDTH for r in selected) else selected[0]["d_model"]
    table = {}
    for r in selected:
        if r["seq_len"] == seq_len and (r["d_model"] == d_model or len(r["schedule"]) != 2):
            table.setdefault(r["schedule"], {})[r["kv_pairs"]] = r["accuracy"]
    return table


def plot_recall(rows, path):
    """MQAR accuracy vs number of key-value pairs, one line per schedule, one panel per sequence
    length (main width); a last panel with passkey accuracy vs depth when present."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mqar_rows = [r for r in rows if r["task"] == "mqar" and r["study"] == min(
        (x["study"] for x in rows if x["task"] == "mqar" and x["seq_len"] == r["seq_len"]), default=0)]
    lengths = sorted({r["seq_len"] for r in mqar_rows})
    passkey_rows = [r for r in rows if r["task"] == "passkey"]
    panels = len(lengths) + (1 if passkey_rows else 0)
    fig, axes = plt.subplots(1, max(1, panels), figsize=(4.6 * max(1, panels), 3.8), squeeze=False)
    for j, T in enumerate(lengths):
        ax = axes[0, j]
        selected = [r for r in mqar_rows if r["seq_len"] == T]
        for schedule in dict.fromkeys(r["schedule"] for r in selected):
            points = sorted((r["kv_pairs"], r["accuracy"]) for r in selected if r["schedule"] == schedule)
            d_model = next(r["d_model"] for r in selected if r["schedule"] == schedule)
            style = "-" if "A" in schedule and set(schedule) != {"A"} else ("--" if schedule == "AA" else ":")
            ax.plot([p[0] for p in points], [p[1] for p in points], style, marker="o",
                    label=f"{schedule} (D={d_model})")
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("key-value pairs")
        ax.set_ylabel("accuracy")
        trained = selected[0].get("train_seq_len", T)
        ax.set_title(f"MQAR, T = {T}" + ("" if trained == T else f" (trained at T = {trained})"))
        ax.legend(fontsize=7)
    if passkey_rows:
        ax = axes[0, -1]
        for T in sorted({r["seq_len"] for r in passkey_rows}):
            for schedule in dict.fromkeys(r["schedule"] for r in passkey_rows):
                points = sorted((r["depth"], r["accuracy"]) for r in passkey_rows
                                if r["schedule"] == schedule and r["seq_len"] == T)
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{schedule} T={T}")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("needle depth")
        ax.set_ylabel("digit accuracy")
        ax.set_title("passkey")
        ax.legend(fontsize=6)
    fig.suptitle("Recall accuracy (best learning rate per model)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_recall_vs_width(rows, path):
    """MQAR accuracy at the largest pair count of T = 64 vs decoding-state bytes, one line per schedule
    (each point a width)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    selected = [r for r in rows if r["task"] == "mqar" and r["seq_len"] == 64]
    if not selected:
        return None
    most = max(r["kv_pairs"] for r in selected)
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    for schedule in dict.fromkeys(r["schedule"] for r in selected):
        points = sorted((r["state_bytes"], r["accuracy"], r["d_model"]) for r in selected
                        if r["schedule"] == schedule and r["kv_pairs"] == most)
        if len(points) < 2:
            continue
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=schedule)
        for x, y, d in points:
            ax.annotate(f"D={d}", (x, y), fontsize=6)
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("decoding state bytes per sequence (at T = 64)")
    ax.set_ylabel(f"accuracy, {most} pairs")
    ax.set_title("MQAR accuracy vs state size (width sweep)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
