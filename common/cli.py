"""The ``alexnet`` command (also ``python -m common``).

Every subcommand turns the project's errors into one line on stderr and exit code 2:
a user sees what is wrong (which layer, file or flag), never a traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from . import shapes
from .backend import BACKENDS, DEVICES, SPEED_UPS, DeviceError, load_backend, speed_up_choices
from .report import format_table, human_bytes
from .spec import VARIANTS, SpecError, get_spec
from .weights import WeightsError

EXIT_ERROR = 2
EXIT_MISMATCH = 1


# ---------------------------------------------------------------- argument types
def _int_list(text: str, *, name: str, count: int | None = None) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name} must be comma-separated integers, got {text!r}") from None
    if count is not None and len(values) != count:
        raise argparse.ArgumentTypeError(f"{name} needs {count} comma-separated integers, got {text!r}")
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{name} values must be positive, got {text!r}")
    return values


def input_shape_arg(text: str) -> tuple[int, int, int]:
    return _int_list(text, name="--input (C,H,W)", count=3)  # type: ignore[return-value]


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def backend_list(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if names == ["all"]:
        return list(BACKENDS)
    unknown = [n for n in names if n not in BACKENDS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown backend(s) {unknown or text!r}; choose from {', '.join(BACKENDS)} or all")
    return names


def speed_up_list(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [n for n in names if n not in SPEED_UPS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown speed-up(s) {unknown or text!r}; choose from {speed_up_choices()}")
    return names


def add_speed_up_args(parser) -> None:
    """``--on``/``--off``: switch a backend's speed-ups against its defaults (``common.backend.SPEED_UPS``)."""
    described = "; ".join(f"{s.name} ({s.backend}): {s.what}" for s in SPEED_UPS.values())
    parser.add_argument("--off", type=speed_up_list, default=(), metavar="SPEEDUP,...",
                        help=f"switch speed-ups off: {described}")
    parser.add_argument("--on", type=speed_up_list, default=(), metavar="SPEEDUP,...", help="switch speed-ups on")


def chosen_speed_ups(args, backend: str | None = None) -> dict[str, bool]:
    """--on/--off as {name: on}; with ``backend``, only that backend's (a multi-backend command)."""
    both = sorted(set(args.on) & set(args.off))
    if both:
        raise ValueError(f"--on and --off both name {', '.join(both)}")
    chosen = {name: True for name in args.on} | {name: False for name in args.off}
    return {name: on for name, on in chosen.items() if backend is None or SPEED_UPS[name].backend == backend}


def summary_backends(text: str) -> list[str]:
    return [] if text == "none" else backend_list(text)


def _spec_from(args):
    spec = get_spec(args.variant)
    if getattr(args, "num_classes", None):
        spec = spec.with_num_classes(args.num_classes)
    if getattr(args, "input", None):
        spec = spec.with_input(*args.input)
    return spec


def _add_spec_args(parser, *, input_help="C,H,W of one example (default: the variant's)"):
    parser.add_argument("--variant", choices=list(VARIANTS), default="book", help="which AlexNet (default: book)")
    parser.add_argument("--input", type=input_shape_arg, metavar="C,H,W", help=input_help)
    parser.add_argument("--num-classes", type=positive_int, metavar="N", help="classifier width (default: the variant's)")


# ---------------------------------------------------------------- summary
def cmd_summary(args) -> int:
    spec = _spec_from(args)
    names = args.backend
    expected = {layout: shapes.infer(spec, batch=args.batch, layout=layout) for layout in shapes.LAYOUTS}
    measured: dict[str, list] = {}
    for name in names:
        backend = load_backend(name)
        model = backend.build(spec, device="cpu")
        batch_shape = shapes.to_layout((args.batch, *spec.input_shape), backend.LAYOUT)
        measured[name] = backend.layer_summary(model, batch_shape, print_table=False)
        del model

    headers = ["layer", "kind"]
    headers += [f"{n} ({load_backend(n).LAYOUT})" for n in names] if names else ["output (NCHW)"]
    headers += ["params", "MACs", "memory"]
    rows, mismatches = [], []
    for index, info in enumerate(expected["NCHW"]):
        row = [info.name, info.kind]
        if names:
            for name in names:
                got = measured[name][index]
                want = expected[load_backend(name).LAYOUT][index]
                bad = got.shape != want.shape or got.params != want.params
                if bad:
                    mismatches.append(f"{name} {info.name}: shape {got.shape} params {got.params:,}, "
                                      f"expected {want.shape} params {want.params:,}")
                row.append("x".join(map(str, got.shape)) + (" !" if bad else ""))
        else:
            row.append(info.shape)
        row += [info.params, info.macs, human_bytes(info.activation_bytes)]
        rows.append(row)
    total = shapes.totals(expected["NCHW"])
    footer = ["total", ""] + [""] * max(len(names), 1) + [total["params"], total["macs"], human_bytes(total["activation_bytes"])]
    c, h, w = spec.input_shape
    print(f"AlexNet ({spec.name}), input {c}x{h}x{w}, batch {args.batch}; memory = float32 output of each layer")
    print(format_table(headers, rows, footer=footer))
    weights_bytes = 4 * total["params"]
    print(f"weights: {human_bytes(weights_bytes)} float32; training FLOPs per image: "
          f"{shapes.training_flops_per_image(spec) / 1e9:.2f} GFLOP")
    if mismatches:
        print("DISAGREEMENT with common.shapes (marked !):\n  " + "\n  ".join(mismatches), file=sys.stderr)
        return EXIT_MISMATCH
    if len(names) > 1:
        print(f"all {len(names)} backends agree with common.shapes on every layer")
    return 0


# ---------------------------------------------------------------- parity
def cmd_parity(args) -> int:
    from .parity import TOLERANCES, run_parity

    if not 0 < args.scale_tolerances < float("inf"):
        raise ValueError(f"--scale-tolerances must be a positive number, got {args.scale_tolerances}")
    spec = _spec_from(args)
    report = run_parity(spec, args.backends, batch=args.batch, seed=args.seed, device=args.device,
                        tolerances=TOLERANCES.scaled(args.scale_tolerances))
    print(report.text)
    return 0 if report.passed else EXIT_MISMATCH


# ---------------------------------------------------------------- train / evaluate / compare
def _add_train_args(parser):
    parser.add_argument("--epochs", type=positive_int, default=10)
    parser.add_argument("--batch-size", type=positive_int, default=128)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--momentum", type=float, default=0.0, help="the 2012 paper used 0.9 (default 0: the book's)")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="the 2012 paper used 5e-4 (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="initial weights and batch order (default 0)")
    parser.add_argument("--limit-train", type=positive_int, metavar="N", help="train on the first N images only")
    parser.add_argument("--limit-test", type=positive_int, metavar="N", help="evaluate on the first N test images only")
    parser.add_argument("--input-size", type=positive_int, default=224, metavar="S",
                        help="resize 28x28 images to SxS (default 224, the book's; 65 is the smallest)")
    parser.add_argument("--device", choices=DEVICES, default="auto")
    parser.add_argument("--data-dir", type=Path, help="folder with the four Fashion-MNIST IDX files")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_speed_up_args(parser)


def _training_spec(args):
    return get_spec("book").with_input(1, args.input_size)


def _fit_kwargs(args, backend: str) -> dict:
    return dict(speed_ups=chosen_speed_ups(args, backend), epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
                weight_decay=args.weight_decay, seed=args.seed, limit_train=args.limit_train,
                limit_test=args.limit_test, progress=not args.no_progress, log_epochs=True)


def _default_run_dir(label: str) -> Path:
    return Path("runs") / f"{label}-{time.strftime('%Y%m%d-%H%M%S')}"


def cmd_train(args) -> int:
    backend = load_backend(args.backend)
    run_dir = args.run_dir or _default_run_dir(args.backend)
    model = backend.build(_training_spec(args), seed=args.seed, device=args.device)
    # fit checks --on/--off, then loads the data: a wrong flag fails before that work
    history = backend.fit(model, data_dir=args.data_dir, run_dir=run_dir, resume=args.resume,
                          **_fit_kwargs(args, None))
    from .train import RUN_FILES

    print(f"run directory: {run_dir} ({', '.join(RUN_FILES)})")
    return 130 if history.stopped else 0


def cmd_evaluate(args) -> int:
    from .data import FashionMNIST
    from .train import evaluate

    backend = load_backend(args.backend)
    data = FashionMNIST.load(args.data_dir, progress=not args.no_progress)
    model = backend.build(get_spec("book").with_input(1, args.input_size), weights=args.weights, device=args.device)
    n = args.limit_test or len(data.test_labels)
    loss, acc = evaluate(backend, model, data.test_images[:n], data.test_labels[:n], progress=not args.no_progress)
    print(f"{backend.FRAMEWORK}: test loss {loss:.4f}, test accuracy {acc:.4f} on {n:,} images ({args.weights})")
    return 0


def cmd_compare(args) -> int:
    from .data import FashionMNIST
    from .plots import plot_curves

    data = FashionMNIST.load(args.data_dir, progress=not args.no_progress)
    run_dir = args.run_dir or _default_run_dir("compare")
    histories = {}
    for name in args.backends:
        backend = load_backend(name)
        model = backend.build(_training_spec(args), seed=args.seed, device=args.device)
        histories[name] = backend.fit(model, data, run_dir=run_dir / name, **_fit_kwargs(args, name))
    plot = plot_curves(histories, run_dir / "compare.png")
    rows = [(name, h.last["train_loss"], h.last["test_loss"], h.last["test_acc"], h.last["images_per_s"])
            for name, h in histories.items()]
    print(format_table(["backend", "train loss", "test loss", "test acc", "images/s"], rows))
    (run_dir / "compare.json").write_text(json.dumps({name: h.rows for name, h in histories.items()}, indent=2) + "\n")
    print(f"curves: {plot}")
    return 0


# ---------------------------------------------------------------- convert
NATIVE_SUFFIXES = {".pt": "pt", ".pth": "pt", ".h5": "tf", ".params": "mx"}


def _format_of(path: Path) -> str:
    if path.suffix == ".npz":
        return "npz"
    try:
        return NATIVE_SUFFIXES[path.suffix]
    except KeyError:
        raise ValueError(f"{path}: unknown weights format; use .npz (canonical), .pt/.pth (PyTorch), "
                         ".weights.h5 (Keras) or .params (Gluon)") from None


def cmd_convert(args) -> int:
    src, dst = Path(args.src), Path(args.dst)
    src_format, dst_format = _format_of(src), _format_of(dst)
    spec = _spec_from(args)
    if src_format == "npz":
        from .weights import load_weights_file

        weights = load_weights_file(src, spec)
    else:
        if not src.is_file():
            raise WeightsError(f"{src}: no such weights file")
        backend = load_backend(src_format)
        model = backend.build(spec, device="cpu")
        backend.load_native(model, src)
        weights = backend.export_weights(model)
    if dst_format == "npz":
        from .weights import save_weights

        save_weights(dst, weights)
    else:
        backend = load_backend(dst_format)
        model = backend.build(spec, weights=weights, device="cpu")
        backend.save_native(model, dst)
    print(f"wrote {dst} ({dst_format}) from {src} ({src_format}): {len(weights)} arrays, "
          f"{sum(int(np.prod(v.shape)) for v in weights.values()):,} parameters")
    return 0


# ---------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alexnet", description="One AlexNet spec in PyTorch, TensorFlow and MXNet.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("summary", help="layer table: shapes per backend, parameters, MACs, memory")
    _add_spec_args(p)
    p.add_argument("--backend", type=summary_backends, default="none", metavar="pt|tf|mx|all|none",
                   help="measure shapes on these backends' native models (default none: the spec's own inference)")
    p.add_argument("--batch", type=positive_int, default=1)
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("parity", help="check every backend against the float64 oracle: layers, loss, gradients, SGD steps")
    _add_spec_args(p)
    p.add_argument("--backends", type=backend_list, default="all", metavar="pt,tf,mx")
    p.add_argument("--batch", type=positive_int, default=2)
    p.add_argument("--seed", type=int, help="weights and input seed (default: random, printed for replay)")
    p.add_argument("--device", choices=DEVICES, default="cpu")
    p.add_argument("--scale-tolerances", type=float, default=1.0, metavar="F",
                   help="multiply every check's tolerance by F (default 1: the CPU-measured ones in the table)")
    p.set_defaults(func=cmd_parity)

    p = sub.add_parser("train", help="train on Fashion-MNIST with the book's recipe")
    p.add_argument("--backend", required=True, choices=list(BACKENDS))
    _add_train_args(p)
    p.add_argument("--run-dir", type=Path, help="where metrics, curves and checkpoints go (default runs/BACKEND-TIME)")
    p.add_argument("--resume", action="store_true", help="continue the checkpoint in --run-dir")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="test loss and accuracy of saved weights")
    p.add_argument("--backend", required=True, choices=list(BACKENDS))
    p.add_argument("--weights", required=True, type=Path, help="canonical .npz (a training checkpoint works)")
    p.add_argument("--input-size", type=positive_int, default=224, metavar="S")
    p.add_argument("--limit-test", type=positive_int, metavar="N")
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--data-dir", type=Path)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("compare", help="train several backends from the same weights on the same batches")
    p.add_argument("--backends", type=backend_list, default="all", metavar="pt,tf,mx")
    _add_train_args(p)
    p.add_argument("--run-dir", type=Path, help="default runs/compare-TIME")
    p.set_defaults(func=cmd_compare)

    from .bench import add_bench_parser
    add_bench_parser(sub)

    p = sub.add_parser("convert", help="convert weights between .npz and PyTorch/Keras/Gluon checkpoints")
    p.add_argument("src", help="input file: .npz, .pt/.pth, .weights.h5 or .params")
    p.add_argument("dst", help="output file, format by its suffix")
    _add_spec_args(p)
    p.set_defaults(func=cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .data import DataError
    from .shapes import InputTooSmallError
    from .train import TrainingError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (SpecError, InputTooSmallError, WeightsError, DataError, DeviceError, TrainingError,
            ImportError, ValueError, OSError) as error:
        print(f"alexnet {args.command}: error: {error}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
