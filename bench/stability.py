"""Stability experiment (claim 5): linear attention without / with normalization vs softmax, across
learning rates: loss curves, gradient norms, divergences.

The experiment itself is minilm.experiments.stability (its docstring gives the recipe).

    python bench/stability.py --quick --out results    # the reduced grid of `minilm tour --quick` (~45 s)
    python bench/stability.py --out results            # every variant x the full grid (~5 minutes)

Writes results/stability.json (machine header + rows, with the curves), results/stability.csv
(without the curves) and results/stability_curves.png; prints one row per run.
"""
import argparse
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:                  # run from a checkout without installing
        sys.path.insert(0, str(path))

from _common import format_header, format_table, machine_info, write_csv, write_json  # noqa: E402
from minilm.experiments.stability import run_stability  # noqa: E402

CURVES = ("curve_steps", "loss_curve", "grad_norm_curve")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the reduced grid of `minilm tour --quick`")
    parser.add_argument("--out", default="results", help="folder for the JSON, CSV and PNG files")
    parser.add_argument("--budget", type=float, default=None, help="wall-time budget in seconds")
    args = parser.parse_args(argv)

    info = machine_info({"command": " ".join([os.path.basename(sys.executable)] + sys.argv)})
    print(format_header(info, "stability of linear attention"), flush=True)
    rows = run_stability(quick=args.quick, out_dir=args.out, budget_s=args.budget,
                         progress=lambda message: print(message, flush=True))
    print()
    print(format_table("stability (no gradient clipping)",
                       ["variant", "lr", "final loss", "diverged", "max grad norm", "steps"],
                       [[r["variant"], r["lr"], r["final_loss"], "yes" if r["diverged"] else "no",
                         r["max_grad_norm"], r["steps"]] for r in rows]))
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "stability.json"), {"machine": info, "stability": rows})
    write_csv(os.path.join(args.out, "stability.csv"),
              [{k: v for k, v in r.items() if k not in CURVES} for r in rows])
    print(f"\nwrote {args.out}/stability.json, stability.csv, stability_curves.png")


if __name__ == "__main__":
    main()
