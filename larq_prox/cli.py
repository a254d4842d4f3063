"""The `larq-prox` command.

```bash
larq-prox quantizers            # the PC++ aliases and where each pair is admissible
larq-prox export model.h5 model.tflite   # LCE flatbuffer, op counts, Keras-vs-LCE check
```

Each subcommand is a `_add_<name>(subparsers)` function that registers its parser
and sets `func`, the function that runs it.
"""

import argparse
import os
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


def _export(args: argparse.Namespace) -> int:
    import tensorflow as tf

    from larq_prox import export, layers  # noqa: F401  (layers registers custom layers)

    if not os.path.exists(args.model_path):
        print(f"larq-prox export: MODEL_PATH {args.model_path} does not exist.", file=sys.stderr)
        return 2
    model = tf.keras.models.load_model(args.model_path, compile=False)
    try:
        report = export.to_lce(model, args.out, verify=not args.no_verify)
    except (ValueError, export.ExportError) as error:
        print(f"larq-prox export: {error}", file=sys.stderr)
        return 1
    print(report)
    return 0


def _add_export(subparsers) -> None:
    parser = subparsers.add_parser(
        "export", help="convert a saved Keras model (H5 or SavedModel) to an LCE flatbuffer"
    )
    parser.add_argument(
        "model_path", metavar="MODEL_PATH", help="saved Keras model (.h5 or folder)"
    )
    parser.add_argument("out", metavar="OUT.tflite", help="flatbuffer to write")
    parser.add_argument(
        "--no-verify", action="store_true", help="skip the Keras vs LCE Interpreter check"
    )
    parser.set_defaults(func=_export)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="larq-prox", description="PC++ quantizers and low-memory BNN training for Larq."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in (_add_quantizers, _add_export):
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import larq_prox  # noqa: F401  (selects legacy Keras before TensorFlow loads)

    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
