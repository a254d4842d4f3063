"""The `larq-prox` command.

```bash
larq-prox quantizers            # the PC++ aliases and where each pair is admissible
larq-prox memory --model zoo:QuickNet --batch-size 32 --scheme standard --scheme proposed
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


_BUILDERS = ("mlp", "cnv", "binarynet")


def _int_tuple(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(
            f"{what} must be positive integers separated by commas, got {text!r}."
        )
    return values


def _load_model(spec: str, input_shape: tuple[int, ...] | None):
    """A built Keras model from a builder name, `zoo:<Name>` or a saved model path."""
    import tensorflow as tf

    if spec in _BUILDERS:
        from larq_prox import models

        kwargs = {"input_shape": input_shape} if input_shape else {}
        return getattr(models, spec)(**kwargs)
    if spec.startswith("zoo:"):
        import larq_zoo

        name = spec[4:]
        for module in (larq_zoo.sota, larq_zoo.literature):
            if hasattr(module, name):
                return getattr(module, name)(weights=None, input_shape=input_shape)
        known = sorted(
            n for m in (larq_zoo.sota, larq_zoo.literature) for n in dir(m) if n[0].isupper()
        )
        raise SystemExit(f"error: --model zoo:{name}: no such larq-zoo model; known: {known}")
    if os.path.exists(spec):
        if input_shape:
            raise SystemExit("error: --input-shape applies to builders and zoo models only.")
        try:  # registers larq-prox's layers for deserialization, once they exist
            import larq_prox.layers  # noqa: F401
        except ImportError:
            pass
        return tf.keras.models.load_model(spec, compile=False)
    raise SystemExit(
        f"error: --model {spec!r} is neither one of {list(_BUILDERS)}, 'zoo:<Name>' "
        "(e.g. zoo:QuickNet), nor an existing saved model path."
    )


def _parse_scheme(text: str):
    import json

    if text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise SystemExit(f"error: --scheme is not valid JSON ({error}): {text}") from error
    return text


def _memory(args: argparse.Namespace) -> int:
    import json

    from larq_prox import memory

    model = _load_model(args.model, args.input_shape)
    try:
        given = [_parse_scheme(s) for s in args.scheme or []]
        if not given:
            given = ["standard", "proposed"]
            if memory.declares_kept(model):
                given.append(memory.FROM_MODEL)
        schemes = memory.name_schemes(given)
        reports = memory.sweep(model, [args.batch_size], args.optimizer, schemes, args.on_unknown)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from error
    reports = {name: rs[0] for name, rs in reports.items()}
    for report in reports.values():
        print(report.table(), end="\n\n")
    names = list(reports)
    for other in names[1:]:
        ratio = reports[names[0]].compare(reports[other])["total"]
        print(f"{names[0]} / {other}: {ratio:.2f}x")
    if args.json:
        with open(args.json, "w") as file:
            json.dump({n: r.to_dict() for n, r in reports.items()}, file, indent=2)
        print(f"wrote {args.json}")
    if args.plot:
        memory.plot_bars(reports, args.plot)
        print(f"wrote {args.plot}")
    if args.sweep:
        totals = {
            n: [r.total_mib for r in rs]
            for n, rs in memory.sweep(
                model, args.sweep, args.optimizer, schemes, args.on_unknown
            ).items()
        }
        print(f"\n{'batch':>8}" + "".join(f" {n[:20]:>20}" for n in totals))
        for i, batch in enumerate(args.sweep):
            print(f"{batch:>8}" + "".join(f" {v[i]:>20.2f}" for v in totals.values()))
        path = args.sweep_plot
        if path is None and args.plot:
            root, ext = os.path.splitext(args.plot)
            path = f"{root}_sweep{ext or '.png'}"
        if path:
            memory.plot_sweep(model, args.sweep, path, args.optimizer, schemes, args.on_unknown)
            print(f"wrote {path}")
    return 0


def _add_memory(subparsers) -> None:
    parser = subparsers.add_parser(
        "memory",
        help="model the training memory of a BNN per variable (larq_prox.memory)",
        description="Print the modeled training memory per variable for each scheme.",
    )
    parser.add_argument(
        "--model", required=True,
        help="mlp, cnv, binarynet, zoo:<Name> (larq-zoo, weights=None) or a saved model path",
    )  # fmt: skip
    parser.add_argument(
        "--batch-size", type=lambda t: _int_tuple(t, "--batch-size")[0], required=True
    )
    parser.add_argument(
        "--optimizer", default="adam",
        help="adam, sgd, sgd_momentum, rmsprop or bop (default: adam)",
    )  # fmt: skip
    parser.add_argument(
        "--scheme", action="append",
        help="standard, proposed, proposed_strict, from_model (what the layers keep, in "
        "their real dtypes) or a JSON dict such as '{\"default\": \"float16\", "
        "\"dW\": \"bool\"}'; repeat for several (default: standard and proposed, and "
        "from_model for a model whose layers declare what they keep)",
    )  # fmt: skip
    parser.add_argument(
        "--input-shape", type=lambda t: _int_tuple(t, "--input-shape"),
        help="H,W,C for builders and zoo models",
    )  # fmt: skip
    parser.add_argument("--json", help="write the reports as JSON to this file")
    parser.add_argument("--plot", help="write a stacked bar PNG (per variable, per scheme)")
    parser.add_argument(
        "--sweep", type=lambda t: _int_tuple(t, "--sweep"),
        help="batch sizes, e.g. 25,50,100,200,400: print the totals per scheme and plot "
        "them (to --sweep-plot, or next to --plot as <name>_sweep.png)",
    )  # fmt: skip
    parser.add_argument("--sweep-plot", help="PNG path of the batch-size sweep plot")
    parser.add_argument(
        "--on-unknown", choices=("raise", "warn"), default="raise",
        help="what to do with a layer the model cannot account for",
    )  # fmt: skip
    parser.set_defaults(func=_memory)
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
    for add in (_add_quantizers, _add_memory, _add_export):
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import larq_prox  # noqa: F401  (selects legacy Keras before TensorFlow loads)

    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
