"""The `minilora` command line. Library modules never print; this one does."""

import argparse
import json
import sys


def cmd_gradcheck(args):
    from .gradcheck import format_table, run_gradchecks

    results = run_gradchecks(device=args.device, seed=args.seed)
    passed = all(r.passed for r in results)
    if args.json:
        print(json.dumps({"passed": passed, "checks": [r.to_dict() for r in results]}, indent=2))
    else:
        print(format_table(results))
        print(f"\n{sum(r.passed for r in results)}/{len(results)} checks passed"
              f" (float64, central differences, h=1e-5)")
    return 0 if passed else 1


def build_parser():
    parser = argparse.ArgumentParser(
        prog="minilora",
        description="GPT-2 with LoRA fine-tuning in NumPy/CuPy, every backward pass by hand.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("gradcheck", help="check every backward pass against finite differences (offline)",
                       description="Check every layer's backward and the whole model (with and without "
                                   "LoRA) in float64 against central finite differences.")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument("--device", default=None, help="cpu or cuda (default: $MINILORA_DEVICE or cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    p.set_defaults(func=cmd_gradcheck)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
