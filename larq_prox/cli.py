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

    # pcpp.check_pair: a pair (F, B) is admissible where B' >= 0 and F is a
    # non-decreasing function of P(theta) = integral of 1/B' (F o P^-1 is then a
    # proximal map); it is checked numerically on |theta| <= --interval.
    print(f"Where each PC++ pair (F, B) is admissible (F o P^-1 a proximal map, "
          f"P' = 1/B'), checked on |theta| <= {args.interval:g}:")
    print(f"{'alias':<20} {'class':<12} {'admissible where':>28}")
    for alias, cls in sorted(quantizers.ALIASES.items()):
        check = pcpp.check_pair(cls(), interval=(-args.interval, args.interval))
        radius = "everywhere" if check.admissible else f"|theta| <= {check.radius:.4f}"
        print(f"{alias:<20} {cls.__name__:<12} {radius:>28}")
    return 0


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text!r}.")
    return value


def _add_quantizers(subparsers) -> None:
    parser = subparsers.add_parser(
        "quantizers",
        help="list the PC++ quantizer aliases and where each pair is admissible",
        description="List the PC++ aliases and the interval where each pair (F, B) is "
        "admissible: B' >= 0 and F a non-decreasing function of P, the integral of 1/B' "
        "(larq_prox.pcpp.check_pair). 'everywhere' means on the whole checked interval.",
    )  # fmt: skip
    parser.add_argument(
        "--interval", type=_positive_float, default=4.0,
        help="check the pairs on |theta| <= this (default: 4)",
    )  # fmt: skip
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


def _load_saved(path: str, option: str):
    """A saved Keras model (H5 file or SavedModel folder), or SystemExit naming `path`."""
    import tensorflow as tf

    import larq_prox.layers  # noqa: F401  (registers larq-prox's layers for deserialization)

    try:
        return tf.keras.models.load_model(path, compile=False)
    except (OSError, ValueError, TypeError, ImportError, KeyError) as error:
        raise SystemExit(
            f"error: {option} {path!r} is not a saved Keras model that loads here (an H5 "
            f"file or a SavedModel folder, e.g. from model.save('model.h5')): {error}"
        ) from error


def _load_model(spec: str, input_shape: tuple[int, ...] | None):
    """A built Keras model from a builder name, `zoo:<Name>` or a saved model path."""
    if spec in _BUILDERS:
        from larq_prox import models

        kwargs = {"input_shape": input_shape} if input_shape else {}
        try:
            return getattr(models, spec)(**kwargs)
        except ValueError as error:
            raise SystemExit(f"error: --model {spec} --input-shape: {error}") from error
    if spec.startswith("zoo:"):
        import larq_zoo

        name = spec[4:]
        modules = (larq_zoo.sota, larq_zoo.literature)
        found = [getattr(m, name) for m in modules if name[:1].isupper() and hasattr(m, name)]
        if not found:
            known = sorted(n for m in modules for n in dir(m) if n[:1].isupper())
            raise SystemExit(f"error: --model zoo:{name}: no such larq-zoo model; known: {known}")
        if input_shape is not None and len(input_shape) != 3:
            raise SystemExit(
                f"error: --input-shape {','.join(map(str, input_shape))}: zoo models take an "
                "image shape H,W,C (three numbers), e.g. --input-shape 224,224,3."
            )
        try:
            return found[0](weights=None, input_shape=input_shape)
        except ValueError as error:  # a feature map shrinks below a layer's window
            raise SystemExit(
                f"error: --model zoo:{name} cannot be built for --input-shape "
                f"{input_shape}; try a larger image (the zoo's default is 224,224,3). "
                f"Keras said: {str(error).splitlines()[0]}"
            ) from error
    if os.path.exists(spec):
        if input_shape:
            raise SystemExit("error: --input-shape applies to builders and zoo models only.")
        return _load_saved(spec, "--model")
    raise SystemExit(
        f"error: --model {spec!r} is neither one of {list(_BUILDERS)}, 'zoo:<Name>' "
        "(e.g. zoo:QuickNet), nor an existing saved model path."
    )


def _batch_size(text: str) -> int:
    values = _int_tuple(text, "--batch-size")
    if len(values) > 1:
        raise argparse.ArgumentTypeError(
            f"takes one batch size, got {text!r}; for several, add --sweep {text}."
        )
    return values[0]


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
        "--batch-size", type=_batch_size, required=True,
        help="samples per step (one number; --sweep takes several)",
    )  # fmt: skip
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
    from larq_prox import export

    if not os.path.exists(args.model_path):
        print(f"larq-prox export: MODEL_PATH {args.model_path} does not exist.", file=sys.stderr)
        return 2
    model = _load_saved(args.model_path, "MODEL_PATH")
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


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("larq-prox")
    except metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="larq-prox", description="PC++ quantizers and low-memory BNN training for Larq."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument(
        "--verbose", action="store_true",
        help="show TensorFlow's log lines and Python warnings (its start-up lines need "
        "TF_CPP_MIN_LOG_LEVEL=0 in the environment, see larq_prox/__init__.py)",
    )  # fmt: skip
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in (_add_quantizers, _add_memory, _add_export):
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # `import larq_prox` (which ran before this module) loaded TensorFlow without its
    # start-up lines; what TensorFlow logs later is hidden too unless --verbose.
    import larq_prox  # noqa: F401  (selects legacy Keras before TensorFlow loads)
    import tensorflow as tf

    if not args.verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # for the LCE subprocess
        tf.get_logger().setLevel("ERROR")
        tf.autograph.set_verbosity(0)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
