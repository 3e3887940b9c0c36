"""Time and peak memory of each token mixer vs the sequence length L (claims 1, 2 and 3).

    python bench/scaling.py [--quick] [--out DIR] [--budget SECONDS] [--cap SECONDS]
                            [--lengths L ...] [--backends numpy numba cuda]

A thin entry point over minilm.experiments.scaling (read its docstring for what is measured and
how): prints the machine, a summary table (fitted slope and doubling ratio per series, and why each
series stopped) and writes DIR/scaling.json and DIR/scaling_loglog.png.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # run from a checkout

from minilm.experiments import scaling  # noqa: E402  (after the path set-up)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="L up to 8192 and a 1 s cap per point (default: "
                                                             "up to 32768, 10 s)")
    parser.add_argument("--out", default="bench-results", metavar="DIR", help="output folder (default %(default)s)")
    parser.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                        help="time budget of the whole sweep (default 75 with --quick, else 600)")
    parser.add_argument("--cap", type=float, default=None, metavar="SECONDS",
                        help="stop a series after a point slower than this (default 1 with --quick, else 10)")
    parser.add_argument("--lengths", type=int, nargs="+", default=None, metavar="L", help="sequence lengths")
    parser.add_argument("--backends", nargs="+", default=None, choices=["numpy", "numba", "cuda"],
                        help="backends to time (default: all that can run here)")
    args = parser.parse_args(argv)

    for key, value in scaling.machine_info().items():
        print(f"{key:>14} : {value}")
    scaling.run_scaling(quick=args.quick, out_dir=args.out, progress=print, budget_s=args.budget,
                        lengths=args.lengths, point_cap_s=args.cap, backends=args.backends)
    result = scaling.run_scaling.last_result
    print()
    print(scaling.format_summary(result.series))
    for note in result.notes:
        print(f"not run: {note}")
    print(f"wrote {os.path.join(args.out, 'scaling.json')} and {os.path.join(args.out, 'scaling_loglog.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
