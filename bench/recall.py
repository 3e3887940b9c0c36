"""Recall experiment (claims 4 and 6): MQAR and passkey accuracy of every family and of hybrids.

The experiment itself is minilm.experiments.recall (its docstring gives the recipe: matched
parameter counts, the short convolution on A/L/G layers, the learning-rate grid, seeds, budget).

    python bench/recall.py --quick --out results       # the reduced sweep of `minilm tour --quick` (~100 s)
    python bench/recall.py --out results               # the full sweep (~12 minutes on 2 cores)
    python bench/recall.py --budget 300 --out results  # the full sweep, sized to 300 s

Writes results/recall.json (machine header + rows), results/recall.csv and results/recall_vs_pairs.png
(and results/recall_vs_width.png for the full sweep); prints an accuracy table per study.
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
from minilm.experiments.recall import run_recall  # noqa: E402


def tables(rows):
    """One text table per (task, seq_len, d_model): schedule x kv_pairs (or depth) accuracy."""
    out = []
    for key in dict.fromkeys((r["task"], r["seq_len"], r["study"]) for r in rows):
        task, seq_len, study = key
        selected = [r for r in rows if (r["task"], r["seq_len"], r["study"]) == key]
        column = "depth" if task == "passkey" else "kv_pairs"
        values = list(dict.fromkeys(r[column] for r in selected))
        table_rows = []
        for schedule in dict.fromkeys(r["schedule"] for r in selected):
            mine = {r[column]: r for r in selected if r["schedule"] == schedule}
            first = next(iter(mine.values()))
            table_rows.append([schedule, first["d_model"], first["params"], first["state_bytes"],
                               first["lr"], first["steps"]] + [mine[v]["accuracy"] if v in mine else None
                                                               for v in values])
        title = f"{task} accuracy, T = {seq_len} (best learning rate per model)"
        out.append(format_table(title, ["schedule", "D", "params", "state B", "lr", "steps"]
                                + [f"{column}={v}" for v in values], table_rows))
    return "\n\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the reduced sweep of `minilm tour --quick`")
    parser.add_argument("--out", default="results", help="folder for the JSON, CSV and PNG files")
    parser.add_argument("--budget", type=float, default=None, help="wall-time budget in seconds")
    args = parser.parse_args(argv)

    info = machine_info({"command": " ".join([os.path.basename(sys.executable)] + sys.argv)})
    print(format_header(info, "recall (MQAR, passkey)"), flush=True)
    rows = run_recall(quick=args.quick, out_dir=args.out, budget_s=args.budget,
                      progress=lambda message: print(message, flush=True))
    print()
    print(tables(rows))
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "recall.json"), {"machine": info, "recall": rows})
    write_csv(os.path.join(args.out, "recall.csv"), rows)
    print(f"\nwrote {args.out}/recall.json, recall.csv, recall_vs_pairs.png")


if __name__ == "__main__":
    main()
