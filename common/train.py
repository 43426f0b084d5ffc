"""The training loop, written once for every backend.

A backend supplies a Trainer (prepare, train_step, eval_step, optimizer state); this
module owns everything else: batch order, progress bar, metrics files, curves, atomic
checkpoints, exact resume, Ctrl-C and divergence handling. So the three frameworks see
the same batches in the same order and keep the same records by construction.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from . import data as fmnist
from .backend import device_description, effective_math
from .io import write_text_atomic
from .weights import read_npz, save_weights

CHECKPOINT = "checkpoint.npz"
METRICS_CSV = "metrics.csv"
METRICS_JSON = "metrics.json"
STEPS_CSV = "steps.csv"
CURVES_PNG = "curves.png"
RUN_FILES = (METRICS_CSV, METRICS_JSON, STEPS_CSV, CURVES_PNG, CHECKPOINT)
OPTIM_PREFIX = "optim/"
META_PREFIX = "meta/"


class TrainingError(RuntimeError):
    """Training cannot go on (diverged, or a resume that does not match its run)."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides which numbers a run computes; a resume must match it."""

    backend: str
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    seed: int = 0
    limit_train: int | None = None
    limit_test: int | None = None
    input_size: tuple[int, int] = (224, 224)
    math: str = "fp32"  # the float32 math mode in effect (common.backend.effective_math)
    # The trainer's speed options as resolved (Trainer.options): they change the rounding, so a
    # resumed run repeats an uninterrupted one bit for bit only with the same ones.
    trainer_options: tuple[tuple[str, object], ...] = ()

    def __post_init__(self):
        for name in ("epochs", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        for name in ("limit_train", "limit_test"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")

    def comparable(self) -> dict[str, Any]:
        """The fields a resumed run must share with the run it continues (epochs may grow)."""
        fields = asdict(self)
        fields.pop("epochs")
        fields["input_size"] = list(self.input_size)
        fields["trainer_options"] = dict(self.trainer_options)
        return fields


@dataclass
class History:
    """Per-epoch metrics rows (metrics.csv/json) and per-step training loss (steps.csv)."""

    backend: str
    rows: list[dict[str, float]] = field(default_factory=list)
    steps: list[dict[str, float]] = field(default_factory=list)  # epoch progress (1.5 = mid epoch 2), loss, acc
    stopped: str | None = None  # "interrupted" when Ctrl-C ended the run
    device: str = ""  # where the parameters really were: "gpu: <name>" or "cpu: <model>"
    precision: str = "fp32"
    math: str = "fp32"  # "tf32" only on a GPU asked for it

    @property
    def last(self) -> dict[str, float]:
        return self.rows[-1] if self.rows else {}


def step_seed(seed: int, epoch: int, batch: int) -> int:
    """The dropout seed of one step: a function of its position only, so resume is exact."""
    return int(np.random.default_rng([seed, epoch, batch]).integers(0, 2**31 - 1))


def evaluate(backend, model, images: np.ndarray, labels: np.ndarray, *, batch_size: int = 256,
             trainer=None, progress: bool = False) -> tuple[float, float]:
    """(mean loss, accuracy) in inference mode over ``images``."""
    trainer = trainer or backend.make_trainer(model, lr=0.01)
    loss_sum, correct = 0.0, 0
    starts = range(0, len(labels), batch_size)
    for start in _progress(starts, progress, desc=f"{backend.NAME} eval", unit="batch"):
        chunk = slice(start, start + batch_size)
        loss, right = trainer.eval_step(trainer.prepare(images[chunk]), labels[chunk])
        loss_sum, correct = loss_sum + loss, correct + right
    return loss_sum / len(labels), correct / len(labels)


def fit(backend, model, data: fmnist.FashionMNIST | None = None, *, epochs: int = 10, batch_size: int = 128,
        lr: float = 0.01, momentum: float = 0.0, weight_decay: float = 0.0, seed: int = 0,
        run_dir: str | os.PathLike | None = None, resume: bool = False, limit_train: int | None = None,
        limit_test: int | None = None, data_dir: str | os.PathLike | None = None,
        progress: bool = True, speed_ups: Mapping[str, bool] | None = None,
        log_epochs: bool | None = None, precision: str = "fp32", math_mode: str = "fp32") -> History:
    """Train ``model`` with the book's recipe by default (SGD lr 0.01, batch 128, 10 epochs).

    With ``run_dir``: metrics.csv/json, curves.png and checkpoint.npz are written there after
    every epoch (the checkpoint atomically); ``resume=True`` continues from its checkpoint
    with the very batches an uninterrupted run would have used next. ``speed_ups`` switches the
    backend's speed-ups against its defaults (``backend.CAPABILITIES.speed_ups``, e.g. ``{"xla": False}``).
    ``progress`` shows progress bars; ``log_epochs`` (default: as ``progress``) prints a line per epoch.
    ``precision`` ("fp32", "bf16", "fp16": the backend's ``CAPABILITIES.precisions``) and ``math_mode``
    ("fp32" or "tf32" float32 math on GPUs) are checked before any data is loaded.
    """
    log_epochs = progress if log_epochs is None else log_epochs
    keywords = backend.CAPABILITIES.trainer_keywords(speed_ups or {})
    backend.CAPABILITIES.check_precision(precision)
    backend.set_math_mode(math_mode)
    spec = backend.model_spec(model)
    device = device_description(backend, model)
    math_mode = effective_math(math_mode, "gpu" if device.startswith("gpu") else "cpu")
    config = TrainConfig(backend.NAME, epochs, batch_size, lr, momentum, weight_decay, seed,
                         limit_train, limit_test, spec.input_size, math_mode)
    if resume and run_dir is None:
        raise ValueError("resume=True needs the run_dir that holds the checkpoint")
    data = data if data is not None else fmnist.FashionMNIST.load(data_dir, progress=progress)
    train_x, train_y = data.train_images[:limit_train], data.train_labels[:limit_train]
    test_x, test_y = data.test_images[:limit_test], data.test_labels[:limit_test]
    trainer = backend.make_trainer(model, lr=lr, momentum=momentum, weight_decay=weight_decay, precision=precision,
                                   **keywords)
    config = replace(config, trainer_options=tuple(sorted(trainer.options.items())))
    run = Path(run_dir) if run_dir is not None else None
    history = History(backend.NAME, device=device, precision=precision, math=math_mode)
    position = _Position()
    if resume:
        position, history.rows, history.steps = _restore(run, config, backend, model, trainer)
    elif run is not None and (run / CHECKPOINT).exists():
        raise TrainingError(f"{run / CHECKPOINT} exists: pass resume (--resume) to continue it, or use a new run dir")

    batches_per_epoch = fmnist.num_batches(len(train_y), batch_size, drop_last=False)
    interrupt = _InterruptAtBatchEnd()
    try:
        with interrupt:
            for epoch in range(position.epoch, epochs):
                started = time.perf_counter()
                bar = _progress(
                    fmnist.batch_indices(len(train_y), batch_size, seed, epoch, start_batch=position.batch),
                    progress, total=batches_per_epoch, initial=position.batch,
                    desc=f"{backend.NAME} epoch {epoch + 1}/{epochs}", unit="batch",
                )
                for indices in bar:
                    loss, correct = trainer.train_step(
                        trainer.prepare(train_x[indices]), train_y[indices], seed=step_seed(seed, epoch, position.batch)
                    )
                    if not math.isfinite(loss):
                        where = f"epoch {epoch + 1}, batch {position.batch + 1}"
                        kept = f"; the last good checkpoint is {run / CHECKPOINT}" if run and (run / CHECKPOINT).exists() else ""
                        raise TrainingError(f"loss became {loss} at {where} (lr {lr} too high?){kept}")
                    position.advance(loss, correct, len(indices))
                    history.steps.append({"epoch": epoch + position.batch / batches_per_epoch, "loss": loss,
                                          "acc": correct / len(indices)})
                    if interrupt.requested:
                        raise KeyboardInterrupt
                    if hasattr(bar, "set_postfix"):
                        elapsed = time.perf_counter() - started
                        bar.set_postfix(loss=f"{position.loss_sum / position.seen:.4f}",
                                        acc=f"{position.correct / position.seen:.3f}",
                                        img_s=f"{position.seen_this_session / max(elapsed, 1e-9):.1f}")
                seconds = time.perf_counter() - started
                test_loss, test_acc = evaluate(backend, model, test_x, test_y, trainer=trainer, progress=progress)
                history.rows.append({
                    "epoch": epoch + 1,
                    "train_loss": position.loss_sum / position.seen,
                    "train_acc": position.correct / position.seen,
                    "test_loss": test_loss,
                    "test_acc": test_acc,
                    "images_per_s": position.seen_this_session / max(seconds, 1e-9),
                    "seconds": seconds,
                })
                position = _Position(epoch + 1)
                if run is not None:
                    _save_run(run, config, backend, model, trainer, position, history)
                if interrupt.requested:
                    raise KeyboardInterrupt
                if log_epochs:
                    row = history.last
                    print(f"{backend.NAME} epoch {row['epoch']}: train loss {row['train_loss']:.4f} "
                          f"acc {row['train_acc']:.3f}, test loss {row['test_loss']:.4f} acc {row['test_acc']:.3f}, "
                          f"{row['images_per_s']:.1f} images/s")
    except KeyboardInterrupt:
        history.stopped = "interrupted"
        if run is not None and position.seen and not interrupt.forced:
            _save_run(run, config, backend, model, trainer, position, history)
        if run is not None and (run / CHECKPOINT).exists():
            print(f"\nstopped: {run / CHECKPOINT} holds the run up to its last completed step; continue with --resume")
    return history


class _InterruptAtBatchEnd:
    """The first Ctrl-C asks the loop to stop after the current step, so a checkpoint never
    holds a half-applied update; a second one stops at once without saving."""

    def __init__(self):
        self.requested = self.forced = False
        self._previous = None

    def _handle(self, signum, frame):
        if self.requested:
            self.forced = True
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: stopping after this step and saving (press again to stop at once)", flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


@dataclass
class _Position:
    """Where a run stands inside an epoch, and its running sums (saved in checkpoints)."""

    epoch: int = 0
    batch: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    seen_this_session: int = 0

    def advance(self, mean_loss: float, correct: int, count: int) -> None:
        self.batch += 1
        self.loss_sum += mean_loss * count
        self.correct += correct
        self.seen += count
        self.seen_this_session += count


def _save_run(run: Path, config: TrainConfig, backend, model, trainer, position: _Position, history: History) -> None:
    meta = {
        f"{META_PREFIX}config": np.array(json.dumps(config.comparable())),
        f"{META_PREFIX}position": np.array([position.epoch, position.batch, position.correct, position.seen], np.int64),
        f"{META_PREFIX}loss_sum": np.array(position.loss_sum, np.float64),
        f"{META_PREFIX}history": np.array(json.dumps({"rows": history.rows, "steps": history.steps})),
    }
    optim = {f"{OPTIM_PREFIX}{name}": value for name, value in trainer.optimizer_state().items()}
    save_weights(run / CHECKPOINT, backend.export_weights(model), **optim, **meta)
    write_metrics(run, history)
    from .plots import plot_curves  # matplotlib is imported only when a run dir asks for a plot

    plot_curves({backend.NAME: history}, run / CURVES_PNG)


def _restore(run: Path, config: TrainConfig, backend, model, trainer) -> tuple[_Position, list[dict], list[dict]]:
    path = run / CHECKPOINT
    if not path.exists():
        raise TrainingError(f"--resume: no checkpoint at {path}")
    arrays = read_npz(path)
    try:
        saved = json.loads(str(arrays[f"{META_PREFIX}config"]))
        epoch, batch, correct, seen = (int(v) for v in arrays[f"{META_PREFIX}position"])
        loss_sum = float(arrays[f"{META_PREFIX}loss_sum"])
        saved_history = json.loads(str(arrays[f"{META_PREFIX}history"]))
        rows, steps = saved_history["rows"], saved_history["steps"]
    except (KeyError, TypeError, ValueError) as error:
        raise TrainingError(f"{path}: not a training checkpoint of this project ({error})") from None
    wanted = config.comparable()
    saved.setdefault("trainer_options", wanted["trainer_options"])  # checkpoints from before they were recorded
    saved.setdefault("math", "fp32")  # likewise: before the math mode was recorded, float32 was strict
    differences = [f"{k}: checkpoint {saved.get(k)!r}, now {v!r}" for k, v in wanted.items() if saved.get(k) != v]
    if differences:
        raise TrainingError(f"{path} was written by a different run; resume with the same settings:\n  "
                            + "\n  ".join(differences))
    backend.load_weights(model, {k: v for k, v in arrays.items() if "/" not in k})
    trainer.load_optimizer_state({k[len(OPTIM_PREFIX):]: v for k, v in arrays.items() if k.startswith(OPTIM_PREFIX)})
    return _Position(epoch, batch, loss_sum, correct, seen), rows, steps


def write_metrics(run: Path, history: History) -> None:
    """metrics.json, metrics.csv (per epoch) and steps.csv (per step), each replaced atomically."""
    run.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run / METRICS_JSON, json.dumps(history.rows, indent=2) + "\n")
    for name, rows in ((METRICS_CSV, history.rows), (STEPS_CSV, history.steps)):
        if rows:
            text = io.StringIO()
            writer = csv.DictWriter(text, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
            write_text_atomic(run / name, text.getvalue())


def bound_fit(module_name: str):
    """``fit`` bound to the backend module ``module_name``: the one loop, offered on each backend
    module so users call ``alexnet_xx.fit(model, ...)``."""

    def fit_with_backend(model, data=None, **options):
        """Train ``model`` with the shared loop, ``common.train.fit`` (same batches and records in every backend)."""
        return fit(sys.modules[module_name], model, data, **options)

    fit_with_backend.__name__ = "fit"
    return fit_with_backend


def _progress(iterable, enabled: bool, **kwargs):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, leave=False, dynamic_ncols=True, **kwargs)
