"""The ``alexnet`` command (also ``python -m common``).

Every subcommand turns the project's errors into one line on stderr and exit code 2:
a user sees what is wrong (which layer, file or flag), never a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

from . import shapes, zoo
from .backend import (ARTIFACT_INPUT, ARTIFACT_OUTPUT, BACKENDS, DEVICES, DeviceError, apply_math_environment,
                      capabilities, exporting_backends, load_backend, training_backends)
from .cli_args import (DEVICE_HELP, EXIT_DIVERGED, EXIT_ERROR, EXIT_FAILURE, EXIT_MISMATCH, OneLineErrorParser, add_math_arg,
                       add_precision_arg, add_spec_args, add_speed_up_args, backend_list, chosen_speed_ups,
                       default_run_dir, dropout_rate, lr_value, momentum_value, non_negative_float, non_negative_int, positive_float,
                       positive_int, spec_from, summary_backends, training_backend_list)
from .divergence import PART_TOLERANCE, partings
from .divergence import report as divergence_report
from .errors import first_line
from .io import check_free_space, check_writable, remove_stale_temporaries, write_text_atomic
from .report import format_table, human_bytes
from .spec import VARIANTS, SpecError, get_spec
from .weights import WeightsError, check_finite

# ---------------------------------------------------------------- summary
def cmd_summary(args) -> int:
    spec = spec_from(args)
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
    spec = spec_from(args)
    report = run_parity(spec, args.backends, batch=args.batch, seed=args.seed, device=args.device,
                        tolerances=TOLERANCES.scaled(args.scale_tolerances))
    print(report.text)
    return 0 if report.passed else EXIT_MISMATCH


# ---------------------------------------------------------------- train / evaluate / compare
def _add_train_args(parser):
    parser.add_argument("--epochs", type=positive_int, default=10, help="passes over the training set (default 10)")
    parser.add_argument("--batch-size", type=positive_int, default=128,
                        help="images per SGD step, over all replicas (default 128)")
    parser.add_argument("--lr", type=lr_value, default=0.01, help="learning rate (default 0.01)")
    parser.add_argument("--momentum", type=momentum_value, default=0.0,
                        help="in [0, 1); the 2012 paper used 0.9 (default 0: the book's)")
    parser.add_argument("--weight-decay", type=non_negative_float, default=0.0,
                        help="coupled L2; the 2012 paper used 5e-4 (default 0)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="initial weights and batch order (default 0)")
    parser.add_argument("--limit-train", type=positive_int, metavar="N", help="train on the first N images only")
    parser.add_argument("--limit-test", type=positive_int, metavar="N", help="evaluate on the first N test images only")
    parser.add_argument("--input-size", type=positive_int, default=224, metavar="S",
                        help="resize 28x28 images to SxS (default 224, the book's; 65 is the smallest)")
    parser.add_argument("--device", choices=DEVICES, default="auto", help=DEVICE_HELP)
    parser.add_argument("--data-dir", type=Path, help="folder with the four Fashion-MNIST IDX files")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--dropout", type=dropout_rate, metavar="P",
                        help="dropout probability of both dropout layers (default the spec's 0.5; 0 turns dropout off)")
    add_precision_arg(parser)
    add_math_arg(parser)
    add_speed_up_args(parser)


def _training_spec(args):
    spec = get_spec("book").with_input(1, args.input_size)
    if getattr(args, "dropout", None) is not None:  # train and compare have --dropout; evaluate has no dropout
        spec = spec.with_dropout(args.dropout)
    shapes.infer(spec)  # too small an input: the layer where it collapses, before any framework is imported
    return spec


def _fit_kwargs(args, backend: str | None) -> dict:
    return dict(speed_ups=chosen_speed_ups(args, backend), epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                momentum=args.momentum, weight_decay=args.weight_decay, seed=args.seed, limit_train=args.limit_train,
                limit_test=args.limit_test, progress=not args.no_progress, log_epochs=True,
                precision=args.precision, math_mode=args.math, command=getattr(args, "command_line", None),
                replicas=getattr(args, "replicas", 1))


def _checked_weights(path: Path, spec):
    """Canonical weights from ``path``, every name, shape and dtype checked against ``spec`` and every
    value finite, before any framework is imported: a bad file is one line naming it and its problems."""
    from .weights import load_weights_file

    weights = load_weights_file(path, spec)
    check_finite(weights, source=str(path))
    return weights


def _stopped_status(history) -> int:
    """0, or 128 + the number of the signal that stopped the run (130 Ctrl-C, 143 SIGTERM), as a shell reports it."""
    return 128 + int(signal.Signals[history.stopped]) if history.stopped else 0


def _check_numerics(args, names) -> None:
    """Precision from the records, and the math mode into the environment: both before any
    framework is imported or any data is read."""
    for name in names:
        capabilities(name).check_precision(args.precision)
    apply_math_environment(args.math)


def cmd_train(args) -> int:
    from .data import FashionMNIST
    from .launch import started_as_replica
    from .replicas import SINGLE, check_replicas
    from .train import RUN_FILES, prepare_run_dir

    _check_numerics(args, [args.backend])

    spec = _training_spec(args)
    capabilities(args.backend).trainer_keywords(_fit_kwargs(args, None)["speed_ups"])  # --on/--off, no import
    check_replicas(args.replicas, args.batch_size)
    engines = capabilities(args.backend).replicas
    if args.replicas > 1 and not engines:
        raise ValueError(f"--replicas: backend {args.backend} has no data-parallel engine")
    if args.replicas > 1 and engines[0].processes and not started_as_replica():
        return _launch_replicas(args)  # one process per replica, each running this command
    backend, group = None, SINGLE
    if args.replicas > 1:  # the engine first: it decides the model's copies and this process's rank
        backend = load_backend(args.backend)
        group = backend.configure_replicas(args.replicas, args.device)
        if group.processes > 1 and args.run_dir is None:
            raise ValueError(f"{group.processes} processes train together: give them the same --run-dir")
    # Cheapest checks first: the run dir is created and test-written (and a leftover temporary file
    # removed), then the data is read, and only then are the framework and the model paid for.
    run_dir = args.run_dir or default_run_dir(args.backend)
    run_dir = prepare_run_dir(run_dir, resume=args.resume) if group.writer else Path(run_dir)  # rank 0 writes
    data = FashionMNIST.load(args.data_dir, progress=not args.no_progress and group.writer)
    backend = backend or load_backend(args.backend)
    model = backend.build(spec, seed=args.seed, device=args.device)
    history = backend.fit(model, data, run_dir=run_dir, resume=args.resume, checkpoint_every=args.checkpoint_every,
                          **_fit_kwargs(args, None))
    if group.writer:
        print(f"run directory: {run_dir} ({', '.join(RUN_FILES)})")
    return _stopped_status(history)


def _evaluate_image_folder(args) -> int:
    """Top-1 and top-5 accuracy over a folder of class folders (``common.images.labelled_images``)."""
    from . import images
    from .parity import to_backend_layout

    spec, weights, source = _prediction_weights(args)
    found, rule = images.labelled_images(args.images, spec)
    backend = load_backend(args.backend)
    model = backend.build(spec, weights=weights, device=args.device)
    top1 = top5 = 0
    for start in range(0, len(found), args.batch):
        chunk = found[start:start + args.batch]
        inputs = np.stack([images.model_input(spec, path) for path, _ in chunk])
        logits = backend.forward(model, to_backend_layout(inputs, backend.LAYOUT))
        for (_, label), best in zip(chunk, images.top_k(logits, 5)):
            ranked = [index for index, _ in best]
            top1 += ranked[0] == label
            top5 += label in ranked
    n = len(found)
    print(f"{backend.FRAMEWORK}, {spec.name} variant, weights {source}: top-1 {top1 / n:.4f}, top-5 {top5 / n:.4f} "
          f"on {n:,} images in {args.images} (classes by {rule})")
    return 0


def _launch_replicas(args) -> int:
    """``alexnet train --replicas N`` for an engine with one process per replica (PyTorch's DDP): the
    run dir is checked and the data found (downloaded once) here, then N copies of this command run
    with torchrun's variables on 127.0.0.1 (``common.launch``) and this process waits for them,
    passing on Ctrl-C and SIGTERM. The exit status is the first failing replica's (130/143 when a
    signal stopped the run)."""
    from .data import locate
    from .launch import python_command, replica_processes, run_processes
    from .machine import available_memory, usable_cpus
    from .replicas import check_replicas_fit, replica_bytes
    from .train import prepare_run_dir

    one_replica = replica_bytes(_training_spec(args), capabilities(args.backend).replicas[0],
                                args.batch_size // args.replicas)
    check_replicas_fit(args.replicas, one_replica, cpus=usable_cpus(), available=available_memory())
    run_dir = prepare_run_dir(args.run_dir or default_run_dir(args.backend), resume=args.resume)
    data_dir = locate(args.data_dir, progress=not args.no_progress)
    argv = shlex.split(args.command_line)[1:] + ["--run-dir", str(run_dir), "--data-dir", str(data_dir)]
    processes = replica_processes(python_command("-m", "common", *argv), args.replicas)
    # Rank 0 talks to the terminal (progress, records, errors); the others write to logs, shown only
    # where a replica failed differently from rank 0 (an error every replica meets is said once).
    logs = Path(tempfile.mkdtemp(prefix="alexnet-replicas-"))
    for process in processes[1:]:
        process.log = str(logs / f"replica-{process.env['RANK']}.log")
    codes: list[int] = []
    status = run_processes(processes, exit_codes=codes)
    killed, terminated = 128 + int(signal.SIGKILL), 128 + int(signal.SIGTERM)
    different = [(rank, code) for rank, code in enumerate(codes) if rank and code not in (0, codes[0])]
    ended = [rank for rank, code in different if code == terminated]  # stopped by the launcher after a failure
    for rank, code in different:
        if rank in ended:
            continue
        lines = [line for line in Path(processes[rank].log).read_text(errors="replace").splitlines() if line.strip()]
        print(f"alexnet train: replica {rank} failed (exit {code}): {lines[-1] if lines else 'no output'} "
              f"(log: {processes[rank].log})", file=sys.stderr)
    if ended:
        print(f"alexnet train: {len(ended)} other replica(s) stopped after that failure (SIGTERM)", file=sys.stderr)
    oom = [rank for rank, code in enumerate(codes) if code == killed]
    if oom:
        print(f"alexnet train: replica(s) {', '.join(map(str, oom))} killed by SIGKILL (exit {killed}), most likely "
              f"by the kernel's out-of-memory killer: each replica needs about {one_replica / 2**30:.1f} GiB; use "
              "fewer --replicas or a smaller --batch-size", file=sys.stderr)
    if not different:
        shutil.rmtree(logs, ignore_errors=True)
    return status


def cmd_evaluate(args) -> int:
    from .data import FashionMNIST
    from .train import evaluate

    if args.images is not None:
        return _evaluate_image_folder(args)
    if args.pretrained:
        raise ValueError("--pretrained weights are ImageNet's: evaluate them on a folder of images (--images DIR)")
    if not capabilities(args.backend).trains:
        raise ValueError(f"the {args.backend} backend evaluates folders of images only (--images DIR): the "
                         "Fashion-MNIST test set goes through a trainer's input pipeline, which it does not have")
    spec = _training_spec(args)
    weights = _checked_weights(args.weights, spec)  # before the data is read
    backend = load_backend(args.backend)
    data = FashionMNIST.load(args.data_dir, progress=not args.no_progress)
    model = backend.build(spec, weights=weights, device=args.device)
    n = min(args.limit_test or len(data.test_labels), len(data.test_labels))  # the images really scored
    loss, acc = evaluate(backend, model, data.test_images[:n], data.test_labels[:n], progress=not args.no_progress)
    print(f"{backend.FRAMEWORK}: test loss {loss:.4f}, test accuracy {acc:.4f} on {n:,} images ({args.weights})")
    if not np.isfinite(loss):
        print(f"alexnet evaluate: diverged: the test loss of {args.weights} is {loss} (finite weights whose "
              "logits overflow)", file=sys.stderr)
        return EXIT_DIVERGED
    return 0


def cmd_compare(args) -> int:
    from .data import FashionMNIST
    from .plots import plot_curves
    from .train import CHECKPOINT, prepare_run_dir

    spec = _training_spec(args)
    _check_numerics(args, args.backends)
    for name in args.backends:
        capabilities(name).trainer_keywords(_fit_kwargs(args, name)["speed_ups"])
    run_dir = args.run_dir or default_run_dir("compare")
    earlier = [run_dir / name / CHECKPOINT for name in args.backends if (run_dir / name / CHECKPOINT).exists()]
    if earlier:  # compare has no --resume: say so instead of train's advice
        raise ValueError(f"{run_dir} holds an earlier comparison ({earlier[0]}); compare starts afresh and cannot "
                         "continue one: use a new --run-dir")
    run_dirs = {name: prepare_run_dir(run_dir / name, resume=False) for name in args.backends}
    data = FashionMNIST.load(args.data_dir, progress=not args.no_progress)
    histories = {}
    for name in args.backends:
        backend = load_backend(name)
        model = backend.build(spec, seed=args.seed, device=args.device)
        histories[name] = history = backend.fit(model, data, run_dir=run_dirs[name], **_fit_kwargs(args, name))
        if history.stopped:
            return _stopped_status(history)
    plot = plot_curves(histories, run_dir / "compare.png")
    rows = [(name, h.last["train_loss"], h.last["test_loss"], h.last["test_acc"], h.last["images_per_s"],
             h.precision, h.math, h.device) for name, h in histories.items()]
    print(format_table(["backend", "train loss", "test loss", "test acc", "images/s", "precision", "math", "device"],
                       rows))
    parted = partings({name: [step["loss"] for step in h.steps] for name, h in histories.items()})
    dropout = any(getattr(layer, "rate", 0) for layer in spec.layers)
    if parted:
        print(divergence_report(parted, dropout=dropout))
    record = {name: {"device": h.device, "precision": h.precision, "math": h.math, "epochs": h.rows}
              for name, h in histories.items()}
    if not dropout:
        record["partings"] = {"tolerance": PART_TOLERANCE, "pairs": [asdict(p) for p in parted]}
    write_text_atomic(run_dir / "compare.json", json.dumps(record, indent=2) + "\n")
    print(f"curves: {plot}")
    return 0


# ---------------------------------------------------------------- convert
def _format_of(path: Path) -> str:
    """"npz", or the backend whose native checkpoint ``path`` is, by its ending (the records' native_suffixes)."""
    if path.suffix == ".npz":
        return "npz"
    for name in BACKENDS:
        if any(path.name.endswith(suffix) for suffix in capabilities(name).native_suffixes):
            return name
    endings = ", ".join(f"{'/'.join(capabilities(n).native_suffixes)} ({capabilities(n).framework})" for n in BACKENDS)
    raise ValueError(f"{path}: unknown weights format; use .npz (canonical), {endings}")


def cmd_convert(args) -> int:
    src, dst = Path(args.src), Path(args.dst)
    src_zoo = zoo.open_zoo_file(src)  # a torchvision or Gluon model-zoo file, recognised by its keys
    dst_zoo = zoo.WRITE_FORMATS[args.zoo] if args.zoo else None
    src_format = src_zoo.format.name if src_zoo else _format_of(src)
    dst_format = dst_zoo.name if dst_zoo else _format_of(dst)
    # zoo files hold the torchvision variant: it is the default when one is involved
    variant = args.variant or ("torchvision" if src_zoo or dst_zoo else "book")
    spec = spec_from(argparse.Namespace(**{**vars(args), "variant": variant}))
    if src_zoo:
        weights = zoo.to_canonical(src_zoo, spec)
    elif src_format == "npz":
        from .weights import load_weights_file

        weights = load_weights_file(src, spec)
    else:
        if not src.is_file():
            raise WeightsError(f"{src}: no such weights file")
        backend = load_backend(src_format)
        model = backend.build(spec, device="cpu")
        backend.load_native(model, src)
        weights = backend.export_weights(model)
    check_finite(weights, source=str(src))  # NaN weights would compute nothing but NaN: refused as evaluate does
    remove_stale_temporaries(dst.parent)  # what a killed convert left behind
    check_free_space(dst.parent, sum(np.asarray(v).nbytes for v in weights.values()), what=f"writing {dst}")
    if dst_zoo:
        zoo.write_zoo(dst, weights, dst_zoo, spec)
    elif dst_format == "npz":
        from .weights import save_weights

        save_weights(dst, weights)
    else:
        backend = load_backend(dst_format)
        model = backend.build(spec, weights=weights, device="cpu")
        backend.save_native(model, dst)
    print(f"wrote {dst} ({dst_format}) from {src} ({src_format}): {len(weights)} arrays, "
          f"{sum(int(np.prod(v.shape)) for v in weights.values()):,} parameters")
    return 0


# ---------------------------------------------------------------- export
def artifact_loader(path: Path) -> str:
    """How a consumer runs ``path`` with its framework alone (its record's ``Artifact.consumer``)."""
    for name in exporting_backends():
        for artifact in capabilities(name).exports:
            if path.name.endswith(artifact.ending):
                return artifact.consumer or "read through the file beside it"
    raise KeyError(f"{path.name}: no loader known for this artifact")  # pragma: no cover - a test holds the records


def _artifact_bytes(path: Path) -> int:
    """A file's size, or a folder's (a SavedModel) over every file in it."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def cmd_export(args) -> int:
    spec = spec_from(args)
    weights = _checked_weights(args.weights, spec)  # before the framework's import and any file
    check_writable(args.out)
    remove_stale_temporaries(args.out)  # what a killed export left behind (a SavedModel is ~100 MB)
    artifacts = len(capabilities(args.backend).exports)  # each holds the weights, at most once
    check_free_space(args.out, artifacts * sum(v.nbytes for v in weights.values()), what=f"the {args.backend} export")
    backend = load_backend(args.backend)
    model = backend.build(spec, weights=weights, device="cpu")
    paths = backend.export_artifacts(model, args.out)
    layout = backend.LAYOUT
    dims = ", ".join(shapes.to_layout(("batch", *(str(d) for d in spec.input_shape)), layout))
    print(f"AlexNet ({spec.name}) with {backend.FRAMEWORK} from {args.weights}: input '{ARTIFACT_INPUT}' float32 "
          f"({dims}) {layout}, output '{ARTIFACT_OUTPUT}' (batch, {spec.num_classes}); inference mode")
    for path in paths:
        print(f"  {path} ({human_bytes(_artifact_bytes(path))}): {artifact_loader(path)}")
    return 0


# ---------------------------------------------------------------- fetch-weights
def cmd_fetch_weights(args) -> int:
    source = zoo.PUBLISHED[args.source]
    path = zoo.fetch_weights(source, args.cache_dir, url=args.url, progress=not args.no_progress)
    print(f"{source.name} weights: {path} ({source.algorithm.upper()} starts with {source.hash_prefix}, as its name says)")
    if args.npz:
        from .weights import save_weights

        spec = get_spec("torchvision")
        save_weights(args.npz, zoo.read_zoo(path, spec)[1])
        print(f"canonical weights for --variant torchvision: {args.npz}")
    return 0


# ---------------------------------------------------------------- predict
def _prediction_weights(args):
    """(spec, canonical weights, description) from --pretrained, a model-zoo file or an .npz, every value
    finite (NaN weights would print NaN probabilities).

    Without --variant, a zoo file is the torchvision variant and an .npz is the variant whose
    layer shapes it has (the classifier's width read from fc8)."""
    spec, weights, source = _read_prediction_weights(args)
    check_finite(weights, source=source)
    return spec, weights, source


def _read_prediction_weights(args):
    from .spec import VARIANTS
    from .weights import check_weights, expected_shapes, read_npz

    size = getattr(args, "input_size", None)  # evaluate's --input-size S (its spec is C x S x S); predict has --input
    input_flag = "--input-size" if size else "--input"

    def sized(spec):
        return spec.with_input(spec.in_channels, size) if size else spec

    if args.pretrained:
        path = zoo.fetch_weights(args.pretrained, progress=not args.no_progress)
    else:
        path = args.weights
    zoo_file = zoo.open_zoo_file(path)
    if zoo_file is not None:
        spec = spec_from(argparse.Namespace(**{**vars(args), "variant": args.variant or "torchvision"}))
        return spec, zoo.to_canonical(zoo_file, spec), f"{path} ({zoo_file.format.name})"
    weights = {name: value for name, value in read_npz(path).items() if "/" not in name}  # no optimizer state
    if args.variant:
        spec = sized(spec_from(args))
    else:
        found = {name: value.shape for name, value in weights.items()}
        classes = found["fc8.bias"][0] if "fc8.bias" in found else None
        fitting = [name for name, factory in VARIANTS.items()
                   if classes and expected_shapes(sized(factory().with_num_classes(classes))) == found]
        if not fitting:
            where = f"input size {size}" if size else "its own input size"
            raise WeightsError(f"{path}: these weights fit no variant at {where} ({', '.join(VARIANTS)}); say which "
                               f"with --variant and {input_flag}")
        spec = sized(get_spec(fitting[0]).with_num_classes(classes))
    check_weights(spec, weights, source=str(path))
    return spec, weights, str(path)


def cmd_predict(args) -> int:
    from . import images
    from .parity import to_backend_layout

    spec, weights, source = _prediction_weights(args)
    inputs = np.stack([images.model_input(spec, path) for path in args.images])  # every image read first
    backend = load_backend(args.backend)
    model = backend.build(spec, weights=weights, device=args.device)
    logits = np.concatenate([backend.forward(model, to_backend_layout(inputs[i:i + args.batch], backend.LAYOUT))
                             for i in range(0, len(inputs), args.batch)])
    names = images.class_names(spec)
    print(f"{backend.FRAMEWORK}, {spec.name} variant, weights {source}")
    for path, best in zip(args.images, images.top_k(logits, args.top)):
        print(f"{path}:")
        for rank, (index, probability) in enumerate(best, 1):
            print(f"  {rank}. {probability:8.4%}  {names[index]} ({index})")
    return 0


# ---------------------------------------------------------------- main
def build_parser() -> OneLineErrorParser:
    frameworks = [capabilities(name).framework for name in BACKENDS]
    parser = OneLineErrorParser(prog="alexnet", description=f"One AlexNet spec in {', '.join(frameworks[:-1])} "
                                                            f"and {frameworks[-1]}, proven identical.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("summary", help="layer table: shapes per backend, parameters, MACs, memory")
    add_spec_args(p)
    p.add_argument("--backend", type=summary_backends, default="none", metavar="|".join([*BACKENDS, "all", "none"]),
                   help="measure shapes on these backends' native models (default none: the spec's own inference)")
    p.add_argument("--batch", type=positive_int, default=1, help="batch size of the shapes (default 1)")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("parity", help="check every backend against the float64 oracle: layers, loss, gradients, SGD steps")
    add_spec_args(p)
    p.add_argument("--backends", type=backend_list, default="all", metavar=",".join(BACKENDS),
                   help="backends to check, comma-separated (default all: every one that trains)")
    p.add_argument("--batch", type=positive_int, default=2, help="examples per checked batch (default 2)")
    p.add_argument("--seed", type=non_negative_int, help="weights and input seed (default: random, printed for replay)")
    p.add_argument("--device", choices=DEVICES, default="cpu",
                   help="where the backends compute; gpu checks with TF32 off (default cpu)")
    p.add_argument("--scale-tolerances", type=positive_float, default=1.0, metavar="F",
                   help="multiply every check's tolerance by F (default 1: the CPU-measured ones in the table)")
    p.set_defaults(func=cmd_parity)

    p = sub.add_parser("train", help="train on Fashion-MNIST with the book's recipe")
    p.add_argument("--backend", required=True, choices=training_backends(), help="the framework that trains (required)")
    _add_train_args(p)
    p.add_argument("--run-dir", type=Path, help="where metrics, curves and checkpoints go (default runs/BACKEND-TIME)")
    p.add_argument("--resume", action="store_true", help="continue the checkpoint in --run-dir")
    p.add_argument("--checkpoint-every", type=positive_int, metavar="N",
                   help="also save the checkpoint after every N-th step inside an epoch (default: at epoch ends)")
    p.add_argument("--replicas", type=positive_int, default=1, metavar="N",
                   help="synchronous data-parallel replicas through the framework's own engine ("
                        + ", ".join(f"{n}: {capabilities(n).replicas[0].name}" for n in training_backends()
                                    if capabilities(n).replicas)
                        + "); the batch size is split over them (default 1)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="test loss and accuracy of saved weights on Fashion-MNIST's test set, or "
                                        "top-1/top-5 on a folder of class folders of images (--images)")
    p.add_argument("--backend", required=True, choices=list(BACKENDS), help="the framework that evaluates (required)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--weights", type=Path, help="canonical .npz (a training checkpoint works); with --images "
                                                    "also a torchvision (.pth) / Gluon (.params) model-zoo file")
    which.add_argument("--pretrained", choices=list(zoo.PUBLISHED), help="with --images: the published ImageNet weights")
    p.add_argument("--images", type=Path, metavar="DIR",
                   help="DIR/<class>/<image>: folders named as the classes, or as many folders as classes in "
                        "sorted order (torchvision's ImageFolder rule; ImageNet's WordNet-ID folders)")
    p.add_argument("--variant", choices=list(VARIANTS), help="with --images: which AlexNet (default: from the weights)")
    p.add_argument("--batch", type=positive_int, default=16,
                   help="with --images: images per forward pass (default 16)")
    p.add_argument("--input-size", type=positive_int, default=224, metavar="S",
                   help="the SxS input the weights were trained at (default 224, the book's)")
    p.add_argument("--limit-test", type=positive_int, metavar="N",
                   help="evaluate on the first N test images only (default: all)")
    p.add_argument("--device", choices=DEVICES, default="auto", help=DEVICE_HELP)
    p.add_argument("--data-dir", type=Path, help="folder with the four Fashion-MNIST IDX files (default: found or "
                                                 "downloaded)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("compare", help="train several backends from the same weights on the same batches")
    p.add_argument("--backends", type=training_backend_list, default="all", metavar=",".join(training_backends()),
                   help="backends to train, comma-separated (default all: every one that trains)")
    _add_train_args(p)
    p.add_argument("--run-dir", type=Path, help="default runs/compare-TIME")
    p.set_defaults(func=cmd_compare)

    from .bench import add_bench_parser
    add_bench_parser(sub)

    loaders = "\n".join(f"  alexnet{artifact.ending}: {artifact.consumer}" for name in exporting_backends()
                        for artifact in capabilities(name).exports if artifact.consumer)
    p = sub.add_parser(
        "export", help="deployable artifacts (" + ", ".join(f"{capabilities(n).framework}: "
                                                            f"{' and '.join(capabilities(n).export_endings)}"
                                                            for n in exporting_backends())
                       + ") that run without this project",
        formatter_class=argparse.RawDescriptionHelpFormatter,  # one line per artifact
        description="Write the framework's own deployable files for canonical weights, each taking any batch\n"
                    "size, in inference mode; a consumer needs only the framework. Input "
                    f"'{ARTIFACT_INPUT}' float32 in the\nbackend's layout (NCHW: batch, C, H, W; NHWC: batch, "
                    f"H, W, C), output '{ARTIFACT_OUTPUT}'. Run them with (INPUT = '{ARTIFACT_INPUT}', OUTPUT = "
                    f"'{ARTIFACT_OUTPUT}'):\n{loaders}")
    p.add_argument("--backend", required=True, choices=exporting_backends(),
                   help="; ".join(f"{n}: {' and '.join('alexnet' + e for e in capabilities(n).export_endings)} "
                                  f"({capabilities(n).framework}, input {capabilities(n).layout})"
                                  for n in exporting_backends()))
    p.add_argument("--weights", required=True, type=Path, help="canonical .npz (a training checkpoint works)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    add_spec_args(p)
    p.set_defaults(func=cmd_export)
    suffixes = ", ".join(suffix for name in BACKENDS for suffix in capabilities(name).native_suffixes)
    p = sub.add_parser("convert", help="convert weights between .npz, the backends' own checkpoints and the "
                                       "torchvision / Gluon model-zoo AlexNet files")
    p.add_argument("src", help=f"input file: .npz or a backend's checkpoint ({suffixes}); a torchvision or Gluon "
                               "model-zoo AlexNet file is recognised by its keys")
    p.add_argument("dst", help="output file, format by its suffix (or --zoo)")
    p.add_argument("--zoo", choices=list(zoo.WRITE_FORMATS),
                   help="write DST with the model zoo's own keys, for torchvision.models.alexnet (.pth) or "
                        "gluon.model_zoo.vision.alexnet (.params)")
    add_spec_args(p)
    p.set_defaults(func=cmd_convert, variant=None)  # None: torchvision for zoo files, else book

    p = sub.add_parser("fetch-weights", help="download the published ImageNet weights of torchvision's or Gluon's "
                                             "AlexNet (cached, checked against the hash in the file's name)")
    p.add_argument("source", choices=list(zoo.PUBLISHED), help="whose published weights")
    p.add_argument("--cache-dir", type=Path, metavar="DIR", help=f"default {zoo.default_weights_dir()}")
    p.add_argument("--url", help="download from this address instead (a mirror); the hash must still match")
    p.add_argument("--npz", type=Path, metavar="OUT", help="also write canonical .npz weights (--variant torchvision)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_fetch_weights)

    p = sub.add_parser("predict", help="top-5 classes of image files, with names and probabilities")
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files (any format Pillow reads)")
    p.add_argument("--backend", required=True, choices=list(BACKENDS), help="the framework that predicts (required)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--weights", type=Path, help="canonical .npz, or a torchvision (.pth) / Gluon (.params) "
                                                    "model-zoo file")
    which.add_argument("--pretrained", choices=list(zoo.PUBLISHED),
                       help="the published ImageNet weights (fetched once into the cache, see fetch-weights)")
    add_spec_args(p)
    p.add_argument("--top", type=positive_int, default=5, metavar="K", help="classes shown per image (default 5)")
    p.add_argument("--batch", type=positive_int, default=16, help="images per forward pass (default 16)")
    p.add_argument("--device", choices=DEVICES, default="auto", help=DEVICE_HELP)
    p.add_argument("--no-progress", action="store_true", help="no progress bar while fetching weights")
    p.set_defaults(func=cmd_predict, variant=None)  # None: from the weights
    return parser


def _one_line(error: BaseException) -> str:
    """An error's message as one line: a list of problems (the weights checker's) joined by "; "."""
    head, *rest = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    return head + (" " + "; ".join(rest) if rest else "")


def _raised_in(error: BaseException) -> str:
    """The module whose code raised ``error`` (a framework's, for its own exceptions)."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_globals.get("__name__", "?") if tb is not None else "?"


def main(argv: list[str] | None = None) -> int:
    """Run one command; every failure is one line on stderr and an exit status (cli_args lists them)."""
    from .data import DataError
    from .shapes import InputTooSmallError
    from .train import DivergedError, TrainingError

    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["alexnet", *argv])
    prefix = f"alexnet {args.command}"
    try:
        return args.func(args)
    except DivergedError as error:
        print(f"{prefix}: diverged: {_one_line(error)}", file=sys.stderr)
        return EXIT_DIVERGED
    except (SpecError, InputTooSmallError, WeightsError, DataError, DeviceError, TrainingError,
            ImportError, ValueError, OSError) as error:
        print(f"{prefix}: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:  # outside the training loop (which saves and returns): nothing half-written
        print(f"\n{prefix}: interrupted", file=sys.stderr)
        return 128 + int(signal.SIGINT)
    except Exception as error:  # a framework's own exception (out of memory, a CUDA error ...): one line
        if os.environ.get("ALEXNET_DEBUG") == "1":
            raise
        print(f"{prefix}: failed: {type(error).__name__} in {_raised_in(error)}: "
              f"{first_line(error)} (ALEXNET_DEBUG=1 shows the traceback)", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
