"""The `minilm` command."""
import argparse
import sys


def cmd_check(args):
    from minilm.identities import run_all
    rows = run_all(seed=args.seed)
    width = max(len(name) for name, _, _ in rows)
    failed = 0
    for name, diff, tol in rows:
        ok = diff <= tol
        failed += not ok
        print(f"{name:<{width}}  max|diff| = {diff:.2e}  (tol {tol:.0e})  {'ok' if ok else 'FAILED'}")
    print(f"{len(rows) - failed} of {len(rows)} identities hold (float64, seed {args.seed})")
    return 1 if failed else 0


def build_parser():
    parser = argparse.ArgumentParser(prog="minilm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="verify the identities behind O(N) attention on random inputs")
    check.add_argument("--seed", type=int, default=0, help="random seed for the inputs (default 0)")
    check.set_defaults(func=cmd_check)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError) as err:
        print(f"minilm {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
