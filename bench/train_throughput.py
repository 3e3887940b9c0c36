"""Training throughput per family, and generation cost per token as the context grows (A vs M).

Part 1, training: for each family letter, a model of about 1M parameters (d_model fixed, the number
of layers chosen to come closest to the target) takes full training steps (batch sampling, forward,
cross-entropy, backward, clipping, AdamW) on the built-in corpus; the figure is tokens per second,
the median over the timed steps after warm-up steps (the first call of a Numba kernel compiles it).

Part 2, generation: for softmax attention (A) and Mamba (M), a prompt of `context` tokens is
prefilled, then each further token costs one `model.step`. The figure is the median milliseconds
per step. An A layer reads its whole KV cache at every step, so its cost grows with the context; an
M layer only updates a fixed-size state, so its cost should not.

    python bench/train_throughput.py                    # full run (several minutes on 2 cores)
    python bench/train_throughput.py --quick            # small smoke run
    python bench/train_throughput.py --families AM --contexts 256,4096 --out results

Writes a table to stdout and results/train_throughput.{csv,json} (rows plus a machine header).
"""
import argparse
import csv
import datetime
import json
import os
import pathlib
import platform
import statistics
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:                      # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from minilm import LM, LMConfig, data  # noqa: E402
from minilm.nn.block import FAMILIES  # noqa: E402
from minilm.train import TrainConfig, Trainer  # noqa: E402


def machine_header():
    """Where and with what the numbers were measured."""
    import numba
    import scipy
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": platform.machine(),
        "processor": platform.processor() or "unknown",
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "scipy": scipy.__version__,
        "numba_threads": numba.config.NUMBA_NUM_THREADS,
    }


def config_near(letter, d_model, target_params, max_layers=16, **options):
    """The LMConfig of `letter` * n layers whose parameter count is closest to target_params."""
    best = None
    for n in range(1, max_layers + 1):
        cfg = LMConfig(schedule=letter * n, d_model=d_model, **options)
        count = LM(cfg).num_params()
        if best is None or abs(count - target_params) < abs(best[1] - target_params):
            best = (cfg, count)
    return best


def bench_training(letter, args, corpus):
    cfg, n_params = config_near(letter, args.d_model, args.target_params, backend=args.backend)
    train_cfg = TrainConfig(steps=args.warmup + args.repeats, batch_size=args.batch_size, seq_len=args.seq_len,
                            warmup_steps=1, eval_interval=0, save_interval=0)
    trainer = Trainer.new(cfg, train_cfg, corpus)
    times = []
    for i in range(args.warmup + args.repeats):
        start = time.perf_counter()
        trainer.train_step()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {"part": "train", "family": letter, "schedule": cfg.schedule, "params": n_params,
            "batch_size": args.batch_size, "seq_len": args.seq_len, "median_step_s": seconds,
            "tokens_per_s": args.batch_size * args.seq_len / seconds, "repeats": len(times)}


def bench_generation(letter, context, args):
    cfg, n_params = config_near(letter, args.d_model, args.target_params, backend=args.backend)
    model = LM(cfg, seed=0)
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, cfg.vocab_size, size=(1, context))
    logits, state = model.prefill(prompt)
    token = np.argmax(logits[:, -1], axis=-1)
    times = []
    for i in range(args.warmup + args.gen_repeats):
        start = time.perf_counter()
        logits_t, state = model.step(token, state)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
        token = np.argmax(logits_t, axis=-1)
    state_bytes = sum(model.state_bytes(state))
    return {"part": "generate", "family": letter, "schedule": cfg.schedule, "params": n_params,
            "context": context, "median_ms_per_token": 1000 * statistics.median(times),
            "state_bytes": state_bytes, "repeats": len(times)}


def print_tables(header, train_rows, gen_rows):
    print("# " + ", ".join(f"{k}={v}" for k, v in header.items()))
    if train_rows:
        print()
        print(f"{'family':<26} {'schedule':<18} {'params':>10} {'B x T':>9} {'step (s)':>9} {'tokens/s':>10}")
        for r in train_rows:
            name = f"{r['family']} {FAMILIES[r['family']]}"
            print(f"{name:<26} {r['schedule']:<18} {r['params']:>10,} {r['batch_size']:>4}x{r['seq_len']:<4} "
                  f"{r['median_step_s']:>9.3f} {r['tokens_per_s']:>10,.0f}")
    if gen_rows:
        print()
        print(f"{'family':<26} {'schedule':<18} {'context':>8} {'ms/token':>9} {'state':>12}")
        for r in gen_rows:
            name = f"{r['family']} {FAMILIES[r['family']]}"
            print(f"{name:<26} {r['schedule']:<18} {r['context']:>8} {r['median_ms_per_token']:>9.2f} "
                  f"{r['state_bytes']:>10,} B")


def write_results(out_dir, header, rows):
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "train_throughput.json", "w") as f:
        json.dump({"machine": header, "rows": rows}, f, indent=2)
    fields = sorted({key for row in rows for key in row})
    with open(out_dir / "train_throughput.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return out_dir


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--families", default="ALGMRS", help="family letters to train (default ALGMRS)")
    p.add_argument("--gen-families", default="AM", help="family letters for the generation part (default AM)")
    p.add_argument("--contexts", default="256,4096", help="comma-separated prompt lengths (default 256,4096)")
    p.add_argument("--d-model", type=int, default=128, help="model width (default 128)")
    p.add_argument("--target-params", type=int, default=1_000_000, help="parameters to aim for (default 1M)")
    p.add_argument("--batch-size", type=int, default=8, help="training batch (default 8)")
    p.add_argument("--seq-len", type=int, default=256, help="training sequence length (default 256)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--repeats", type=int, default=5, help="timed training steps (default 5)")
    p.add_argument("--gen-repeats", type=int, default=30, help="timed generation steps (default 30)")
    p.add_argument("--backend", default="auto", help="op backend: auto, numpy, numba (default auto)")
    p.add_argument("--out", default="results", help="results folder (default results)")
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.d_model, args.target_params, args.batch_size, args.seq_len = 32, 50_000, 2, 32
        args.warmup, args.repeats, args.gen_repeats, args.contexts = 1, 2, 3, "16,64"
    args.contexts = [int(c) for c in args.contexts.split(",") if c]
    return args


def main(argv=None):
    args = parse_args(argv)
    header = machine_header()
    corpus = data.load_corpus()
    train_rows, gen_rows = [], []
    for letter in args.families:
        train_rows.append(bench_training(letter, args, corpus))
        print(f"train {letter}: {train_rows[-1]['tokens_per_s']:,.0f} tokens/s", file=sys.stderr, flush=True)
    for letter in args.gen_families:
        for context in args.contexts:
            gen_rows.append(bench_generation(letter, context, args))
            print(f"generate {letter} at {context}: {gen_rows[-1]['median_ms_per_token']:.2f} ms/token",
                  file=sys.stderr, flush=True)
    print_tables(header, train_rows, gen_rows)
    out_dir = write_results(args.out, header, train_rows + gen_rows)
    print(f"\nwrote {out_dir / 'train_throughput.csv'} and {out_dir / 'train_throughput.json'}")


if __name__ == "__main__":
    main()
