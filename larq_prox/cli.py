"""The `larq-prox` command.

```bash
larq-prox quantizers            # the PC++ aliases and where each pair is admissible
```

Each subcommand is a `_add_<name>(subparsers)` function that registers its parser
and sets `func`, the function that runs it.
"""

import argparse
import sys


def _quantizers(args: argparse.Namespace) -> int:
    from larq_prox import pcpp, quantizers

    print(f"{'alias':<20} {'class':<12} {'admissible radius on ' + str(args.interval):>28}")
    for alias, cls in sorted(quantizers.ALIASES.items()):
        check = pcpp.check_pair(cls(), interval=(-args.interval, args.interval))
        radius = "everywhere" if check.admissible else f"|theta| <= {check.radius:.4f}"
        print(f"{alias:<20} {cls.__name__:<12} {radius:>28}")
    return 0


def _add_quantizers(subparsers) -> None:
    parser = subparsers.add_parser("quantizers", help="list the PC++ quantizer aliases")
    parser.add_argument("--interval", type=float, default=4.0, help="check |theta| <= this")
    parser.set_defaults(func=_quantizers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="larq-prox", description="PC++ quantizers and low-memory BNN training for Larq."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in (_add_quantizers,):
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import larq_prox  # noqa: F401  (selects legacy Keras before TensorFlow loads)

    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
