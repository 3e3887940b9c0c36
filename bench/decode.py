"""Generation cost per token and decoding-state bytes vs the context length, per family (claims 1, 3).

    python bench/decode.py [--quick] [--out DIR] [--contexts T ...] [--schedules AAAA MMMM ...]

A thin entry point over minilm.experiments.decode (read its docstring for how the models are matched
and how the context is built): prints one line per (schedule, context) and a summary, and writes
DIR/decode.json and DIR/decode_per_token.png.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # run from a checkout

from minilm.experiments import decode  # noqa: E402  (after the path set-up)
from minilm.experiments.scaling import machine_info  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="contexts 256, 1K, 4K, 16K and fewer timed steps (default: every power of two "
                             "from 256 to 16K)")
    parser.add_argument("--out", default="bench-results", metavar="DIR", help="output folder (default %(default)s)")
    parser.add_argument("--contexts", type=int, nargs="+", default=None, metavar="T", help="context lengths")
    parser.add_argument("--schedules", nargs="+", default=None, metavar="S",
                        help=f"model schedules (default {' '.join(decode.SCHEDULES)})")
    parser.add_argument("--backend", default=None, choices=["auto", "numpy", "numba", "cuda"],
                        help=f"the models' backend (default {decode.BACKEND})")
    args = parser.parse_args(argv)

    for key, value in machine_info().items():
        print(f"{key:>14} : {value}")
    rows = decode.run_decode(quick=args.quick, out_dir=args.out, progress=print, contexts=args.contexts,
                             schedules=args.schedules, backend=args.backend)
    print()
    print(f"{'schedule':<9} {'d_model':>7} {'params':>9}  {'ms/token':>22}  {'state bytes':>24}")
    for schedule, s in decode.summarize(rows).items():
        print(f"{schedule:<9} {s['d_model']:>7} {s['params']:>9,}  "
              f"{s['ms_min']:>8.2f} -> {s['ms_max']:>8.2f} (x{s['time_ratio']:.1f})  "
              f"{s['state_min']:>9,} -> {s['state_max']:>9,} (x{s['state_ratio']:.0f})")
    print(f"wrote {os.path.join(args.out, 'decode.json')} and {os.path.join(args.out, 'decode_per_token.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
