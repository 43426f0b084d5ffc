"""Argument types and flags that several ``alexnet`` commands share (``common.cli`` and
``common.bench`` both import them from here; neither imports the other's helpers).

Reads each backend's ``Capabilities`` without importing any framework, so ``alexnet --help``
and argument errors stay instant.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from .backend import (BACKENDS, MATH_MODES, PRECISIONS, all_speed_ups, capabilities, checked_lr, speed_up_choices, speed_up_owner,
                      training_backends)
from .spec import VARIANTS, get_spec

# Exit statuses of the `alexnet` command (docs/training.md's "What happens when" table lists them).
EXIT_MISMATCH = 1  # a check ran and found a disagreement
EXIT_ERROR = 2  # bad input: one line on stderr, no traceback
EXIT_DIVERGED = 3  # training stopped: a loss or a weight became NaN or infinite; the last finite checkpoint is kept
EXIT_FAILURE = 4  # the framework (or this program) failed unexpectedly: one line; ALEXNET_DEBUG=1 shows the traceback
# A run stopped by a signal exits 128 + its number, as a shell reports it: 130 for Ctrl-C (SIGINT), 143 for SIGTERM.


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse with its errors as one line (``alexnet train: error: argument --lr: ...``) and exit
    status EXIT_ERROR; the usage it would print first is one ``--help`` away. Subcommand parsers
    inherit the class."""

    def error(self, message):
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (a learning rate, a tolerance)."""
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def lr_value(text: str) -> float:
    """--lr: the one rule for learning rates (``common.backend.checked_lr``)."""
    try:
        return checked_lr(positive_float(text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (weight decay)."""
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}")
    return value


def momentum_value(text: str) -> float:
    """SGD momentum: a number in [0, 1) (1 or more never forgets a gradient and diverges)."""
    value = _number(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text!r}")
    return value


def dropout_rate(text: str) -> float:
    """A dropout probability in [0, 1) (0 turns dropout off; 1 would drop everything)."""
    value = _number(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text!r}")
    return value


def int_list(text: str, *, name: str, count: int | None = None) -> tuple[int, ...]:
    """"32,128" -> (32, 128); every value positive, ``count`` of them if given."""
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
    return int_list(text, name="--input (C,H,W)", count=3)  # type: ignore[return-value]


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def backend_list(text: str) -> list[str]:
    """Backend names, comma-separated; "all" is every backend that trains (an inference-only one,
    such as onnx, is compared where it is named)."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if names == ["all"]:
        return training_backends()
    unknown = [n for n in names if n not in BACKENDS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown backend(s) {unknown or text!r}; choose from {', '.join(BACKENDS)} "
                                         f"or all ({', '.join(training_backends())})")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:  # a backend against itself compares nothing (and its run folders would collide)
        raise argparse.ArgumentTypeError(f"backend(s) {', '.join(twice)} named more than once in {text!r}")
    return names


def training_backend_list(text: str) -> list[str]:
    """``backend_list`` for commands that train: an inference-only backend is refused by its record."""
    names = backend_list(text)
    inference_only = [n for n in names if not capabilities(n).trains]
    if inference_only:
        raise argparse.ArgumentTypeError(
            f"backend(s) {', '.join(inference_only)} run inference only and cannot train; "
            f"choose from {', '.join(training_backends())} or all")
    return names


def summary_backends(text: str) -> list[str]:
    return [] if text == "none" else backend_list(text)


def speed_up_list(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    known = {name for speed_ups in all_speed_ups().values() for name in speed_ups}
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown speed-up(s) {unknown or text!r}; choose from {speed_up_choices()}")
    return names


def add_speed_up_args(parser) -> None:
    """``--on``/``--off``: switch a backend's speed-ups against its defaults (its ``CAPABILITIES.speed_ups``)."""
    described = "; ".join(f"{s.name} ({backend}): {s.what}"
                          for backend, speed_ups in all_speed_ups().items() for s in speed_ups.values())
    parser.add_argument("--off", type=speed_up_list, default=(), metavar="SPEEDUP,...",
                        help=f"switch speed-ups off: {described} (default: none; each backend's defaults apply)")
    parser.add_argument("--on", type=speed_up_list, default=(), metavar="SPEEDUP,...",
                        help="switch speed-ups on (default: none; each backend's defaults apply)")


def chosen_speed_ups(args, backend: str | None = None) -> dict[str, bool]:
    """--on/--off as {name: on}; with ``backend``, only that backend's (a multi-backend command)."""
    both = sorted(set(args.on) & set(args.off))
    if both:
        raise ValueError(f"--on and --off both name {', '.join(both)}")
    chosen = {name: True for name in args.on} | {name: False for name in args.off}
    return {name: on for name, on in chosen.items() if backend is None or speed_up_owner(name) == backend}


def add_spec_args(parser, *, input_help="C,H,W of one example (default: the variant's)") -> None:
    parser.add_argument("--variant", choices=list(VARIANTS), default="book", help="which AlexNet (default: book)")
    parser.add_argument("--input", type=input_shape_arg, metavar="C,H,W", help=input_help)
    parser.add_argument("--num-classes", type=positive_int, metavar="N", help="classifier width (default: the variant's)")


DEVICE_HELP = "auto: a GPU where the framework can compute on one, else the CPU (default auto)"


def spec_from(args):
    """The ModelSpec that --variant, --input and --num-classes describe."""
    spec = get_spec(args.variant)
    if getattr(args, "num_classes", None):
        spec = spec.with_num_classes(args.num_classes)
    if getattr(args, "input", None):
        spec = spec.with_input(*args.input)
    return spec


def default_run_dir(label: str) -> Path:
    return Path("runs") / f"{label}-{time.strftime('%Y%m%d-%H%M%S')}"


def add_math_arg(parser, *, default: str = "fp32") -> None:
    parser.add_argument("--math", choices=MATH_MODES, default=default,
                        help=f"float32 math on GPUs: fp32 (strict) or tf32 (tensor cores, ~1e-3 relative); set "
                             f"before any framework is imported, the same in every backend (default {default}; "
                             "a CPU always computes fp32)")


def add_precision_arg(parser) -> None:
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="fp32 (default: what the parity suite checks) or bf16/fp16 mixed precision with float32 "
                             "weights (each backend's CAPABILITIES.precisions says which it has)")
