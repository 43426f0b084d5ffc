"""The training loop, written once for every backend.

A backend supplies a Trainer (prepare, train_step, eval_step, optimizer state); this
module owns everything else: batch order, progress bar, metrics files, curves, atomic
checkpoints, exact resume, signals and divergence handling. So every backend sees
the same batches in the same order and keep the same records by construction.

Faults, and what survives them:

* A checkpoint is written only when the test loss and every array in it (weights, momentum
  buffers) are finite. A NaN or infinite training loss, test loss or weight stops the run
  with :class:`DivergedError`, naming the last checkpoint, which is finite and untouched.
* Ctrl-C (SIGINT) and SIGTERM stop at the next batch boundary (training or test batch) and
  save there; a second signal stops at once without saving. ``History.stopped`` names the
  signal (the CLI exits 128 + its number: 130, 143).
* Every file is written through ``common.io`` (complete or not at all): a run killed while
  saving keeps its previous checkpoint, and the temporary file it leaves is removed when the
  run directory is next used. The run directory is created and test-written before any data
  is loaded; a full disk becomes a TrainingError naming what is kept.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import shlex
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from . import data as fmnist
from .backend import checked_lr, checked_momentum, checked_weight_decay, effective_math
from .io import check_writable, remove_stale_temporaries, write_text_atomic
from .replicas import SINGLE, check_replicas
from .machine import cpu_model, process_seconds
from .spec import Dropout
from .weights import check_finite, non_finite, read_npz, save_weights

CHECKPOINT = "checkpoint.npz"
METRICS_CSV = "metrics.csv"
METRICS_JSON = "metrics.json"
STEPS_CSV = "steps.csv"
CURVES_PNG = "curves.png"
RUN_FILES = (METRICS_CSV, METRICS_JSON, STEPS_CSV, CURVES_PNG, CHECKPOINT)
OPTIM_PREFIX = "optim/"
META_PREFIX = "meta/"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingError(RuntimeError):
    """Training cannot go on (a resume that does not match its run, a run dir that cannot be written)."""


class DivergedError(TrainingError):
    """A training loss, test loss or weight became NaN or infinite; the last finite checkpoint is kept."""


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
    # The model: which AlexNet, its input channels, classes and dropout rates (per Dropout layer).
    variant: str = "book"
    in_channels: int = 1
    num_classes: int = 10
    dropout: tuple[float, ...] = (0.5, 0.5)
    math: str = "fp32"  # the float32 math mode in effect (common.backend.effective_math: fp32 on a CPU)
    # Data-parallel replicas: the same step as one replica up to float32 rounding, so a resume that
    # repeats a run bit for bit keeps their number.
    replicas: int = 1
    # The trainer's speed options as resolved (Trainer.options, precision included): they change the
    # rounding, so a resumed run repeats an uninterrupted one bit for bit only with the same ones.
    trainer_options: tuple[tuple[str, object], ...] = ()

    def __post_init__(self):
        for name in ("epochs", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        for name in ("limit_train", "limit_test"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")
        checked_lr(self.lr), checked_momentum(self.momentum), checked_weight_decay(self.weight_decay)

    @classmethod
    def of(cls, backend: str, spec, **settings) -> "TrainConfig":
        """The config of training ``spec`` with ``settings`` (the fit keywords of the same names)."""
        dropout = tuple(float(layer.rate) for layer in spec.layers if isinstance(layer, Dropout))
        return cls(backend, input_size=tuple(spec.input_size), variant=spec.name, in_channels=spec.in_channels,
                   num_classes=spec.num_classes, dropout=dropout, **settings)

    def comparable(self) -> dict[str, Any]:
        """The fields a resumed run must share with the run it continues (epochs may grow)."""
        fields = asdict(self)
        fields.pop("epochs")
        fields["input_size"] = list(self.input_size)
        fields["dropout"] = list(self.dropout)
        fields["trainer_options"] = dict(self.trainer_options)
        return fields


@dataclass
class History:
    """Per-epoch metrics rows (metrics.csv/json) and per-step training loss (steps.csv).

    ``config`` is the run's recipe (``TrainConfig.comparable()`` and the epochs asked for);
    ``sessions`` has one record per start or resume: when, the command line, framework and
    version, the device actually used (CPU model or GPU name). metrics.json holds all three."""

    backend: str
    rows: list[dict[str, float]] = field(default_factory=list)
    steps: list[dict[str, float]] = field(default_factory=list)  # epoch progress (1.5 = mid epoch 2), loss, acc
    stopped: str | None = None  # "SIGINT" or "SIGTERM" when a signal ended the run
    config: dict[str, Any] = field(default_factory=dict)
    sessions: list[dict[str, Any]] = field(default_factory=list)

    @property
    def device(self) -> str:
        """Where the latest session computed: "cpu: <model>" or "gpu: <name>"."""
        session = self.sessions[-1] if self.sessions else {}
        return f"{session.get('device', '?')}: {session.get('device_name', '?')}"

    @property
    def precision(self) -> str:
        return self.config.get("trainer_options", {}).get("precision", "fp32")

    @property
    def math(self) -> str:
        return self.config.get("math", "fp32")

    @property
    def last(self) -> dict[str, float]:
        return self.rows[-1] if self.rows else {}


def step_seed(seed: int, epoch: int, batch: int) -> int:
    """The dropout seed of one step: a function of its position only, so resume is exact."""
    return int(np.random.default_rng([seed, epoch, batch]).integers(0, 2**31 - 1))


class _StopRequested(Exception):
    """Raised by the loop at a batch boundary after a first SIGINT/SIGTERM."""


def evaluate(backend, model, images: np.ndarray, labels: np.ndarray, *, batch_size: int = 256,
             trainer=None, progress: bool = False, should_stop: Callable[[], bool] | None = None) -> tuple[float, float]:
    """(mean loss, accuracy) in inference mode over ``images``. ``should_stop`` is asked between
    batches (``fit`` passes its signal flag, so a stop does not wait for the whole test set)."""
    trainer = trainer or backend.make_trainer(model, lr=0.01)
    loss_sum, correct = 0.0, 0
    starts = range(0, len(labels), batch_size)
    for start in _progress(starts, progress, desc=f"{backend.NAME} eval", unit="batch"):
        if should_stop is not None and should_stop():
            raise _StopRequested
        chunk = slice(start, start + batch_size)
        loss, right = trainer.eval_step(trainer.prepare(images[chunk]), labels[chunk])
        loss_sum, correct = loss_sum + loss, correct + right
    return loss_sum / len(labels), correct / len(labels)


def prepare_run_dir(run_dir: str | os.PathLike, *, resume: bool) -> Path:
    """Before any data is loaded or model built: create ``run_dir`` and prove a file can be
    written there, remove what writers killed mid-save left behind, and check that a checkpoint
    is there exactly when resuming. Errors name the folder or file."""
    run = check_writable(run_dir, what="run directory")
    remove_stale_temporaries(run)
    checkpoint = run / CHECKPOINT
    if resume and not checkpoint.is_file():
        raise TrainingError(f"--resume: no checkpoint at {checkpoint}")
    if not resume and checkpoint.exists():
        raise TrainingError(f"{checkpoint} exists: pass resume (--resume) to continue it, or use a new run dir")
    return run


def fit(backend, model, data: fmnist.FashionMNIST | None = None, *, epochs: int = 10, batch_size: int = 128,
        lr: float = 0.01, momentum: float = 0.0, weight_decay: float = 0.0, seed: int = 0,
        run_dir: str | os.PathLike | None = None, resume: bool = False, limit_train: int | None = None,
        limit_test: int | None = None, data_dir: str | os.PathLike | None = None,
        progress: bool = True, speed_ups: Mapping[str, bool] | None = None,
        log_epochs: bool | None = None, precision: str = "fp32", math_mode: str = "fp32",
        checkpoint_every: int | None = None, command: str | None = None, replicas: int = 1) -> History:
    """Train ``model`` with the book's recipe by default (SGD lr 0.01, batch 128, 10 epochs).

    With ``run_dir``: metrics.csv/json, curves.png and checkpoint.npz are written there after
    every epoch (the checkpoint atomically, and only when finite); ``checkpoint_every=N`` also
    saves after every N-th step inside an epoch. ``resume=True`` continues from the checkpoint
    with the very batches an uninterrupted run would have used next. ``speed_ups`` switches the
    backend's speed-ups against its defaults (``backend.CAPABILITIES.speed_ups``, e.g. ``{"xla": False}``).
    ``progress`` shows progress bars; ``log_epochs`` (default: as ``progress``) prints a line per epoch.
    ``precision`` ("fp32", "bf16", "fp16": the backend's ``CAPABILITIES.precisions``) and ``math_mode``
    ("fp32" or "tf32" float32 math on GPUs) are checked before any data is loaded.
    ``command`` is recorded as the command line (default: this process's ``sys.argv``).
    ``replicas`` N > 1 trains with the framework's data-parallel engine, set up (``backend.configure_replicas(N)``)
    before the model was built: each step's ``batch_size`` examples are split over the replicas, and
    in a group of processes, each runs this loop and rank 0 alone shows progress and writes the run.
    Raises DivergedError on NaN/inf (the module docstring lists every fault and what is kept).
    """
    log_epochs = progress if log_epochs is None else log_epochs
    keywords = backend.CAPABILITIES.trainer_keywords(speed_ups or {})
    group = _replica_group(backend, check_replicas(replicas, batch_size))
    progress, log_epochs = progress and group.writer, log_epochs and group.writer
    backend.CAPABILITIES.check_precision(precision)
    backend.set_math_mode(math_mode)
    spec = backend.model_spec(model)
    on_gpu = "gpu" in backend.parameter_devices(model)
    config = TrainConfig.of(backend.NAME, spec, epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum,
                            weight_decay=weight_decay, seed=seed, limit_train=limit_train, limit_test=limit_test,
                            math=effective_math(math_mode, "gpu" if on_gpu else "cpu"), replicas=replicas)
    if checkpoint_every is not None and (not isinstance(checkpoint_every, int) or checkpoint_every < 1):
        raise ValueError(f"checkpoint_every must be a positive int, got {checkpoint_every!r}")
    if (resume or checkpoint_every) and run_dir is None:
        raise ValueError("resume and checkpoint_every need the run_dir that holds the checkpoint")
    run = None if run_dir is None else prepare_run_dir(run_dir, resume=resume) if group.writer else Path(run_dir)
    data = data if data is not None else fmnist.FashionMNIST.load(data_dir, progress=progress)
    train_x, train_y = data.train_images[:limit_train], data.train_labels[:limit_train]
    test_x, test_y = data.test_images[:limit_test], data.test_labels[:limit_test]
    trainer = backend.make_trainer(model, lr=lr, momentum=momentum, weight_decay=weight_decay, precision=precision,
                                   **keywords, **({"replicas": replicas} if replicas > 1 else {}))
    if run is not None:  # a trainer that cannot checkpoint its state says so now, not after an epoch; every
        # process asks its own: one refusing alone would leave the others waiting for it in the first step
        trainer.optimizer_state()
    config = replace(config, trainer_options=tuple(sorted(trainer.options.items())))
    history = History(backend.NAME, config={**config.comparable(), "epochs": epochs})
    batches_per_epoch = fmnist.num_batches(len(train_y), batch_size, drop_last=False)
    position = _Position()
    if resume:
        position, history.rows, history.steps, history.sessions = _restore(run, config, backend, model, trainer)
        if position.epoch >= epochs:
            raise TrainingError(f"{run / CHECKPOINT} has finished {position.epoch} epoch(s) already; "
                                f"ask for more (--epochs, now {epochs}) to train further")
    history.sessions.append(_session(backend, model, command))
    if replicas > 1:
        history.sessions[-1].update(replicas=replicas, engine=group.engine, processes=group.processes)
    saved = _Saved(run, batches_per_epoch, _copy(position) if resume else None)

    def save(*, plot: bool = True) -> None:
        if group.writer:
            _save_run(run, config, backend, model, trainer, position, history, saved, plot=plot)

    stop = _StopOnSignal(quiet=not group.writer)

    def stopping() -> bool:
        """Whether to stop here. Processes of a replica group decide together (a signal may reach one
        before another): any one's request stops them all after the same step."""
        return trainer.agree(bool(stop.requested)) if group.processes > 1 else bool(stop.requested)
    with stop:
        try:
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
                        raise DivergedError(f"training loss became {loss} at epoch {epoch + 1}, batch "
                                            f"{position.batch + 1} (lr {lr} too high?); {saved.describe()}")
                    position.advance(loss, correct, len(indices))
                    history.steps.append({"epoch": epoch + position.batch / batches_per_epoch, "loss": loss,
                                          "acc": correct / len(indices)})
                    if stopping():
                        raise _StopRequested
                    done = epoch * batches_per_epoch + position.batch
                    if checkpoint_every and done % checkpoint_every == 0 and position.batch < batches_per_epoch:
                        save(plot=False)
                        if stopping():
                            raise _StopRequested
                    if hasattr(bar, "set_postfix"):
                        elapsed = time.perf_counter() - started
                        bar.set_postfix(loss=f"{position.loss_sum / position.seen:.4f}",
                                        acc=f"{position.correct / position.seen:.3f}",
                                        img_s=f"{position.seen_this_session / max(elapsed, 1e-9):.1f}")
                seconds = time.perf_counter() - started
                test_loss, test_acc = evaluate(backend, model, test_x, test_y, trainer=trainer, progress=progress,
                                               should_stop=stopping)
                if not math.isfinite(test_loss):
                    raise DivergedError(f"test loss became {test_loss} after epoch {epoch + 1}; {saved.describe()}")
                history.rows.append({
                    "epoch": epoch + 1,
                    "train_loss": position.loss_sum / position.seen,
                    "train_acc": position.correct / position.seen,
                    "test_loss": test_loss,
                    "test_acc": test_acc,
                    "images_per_s": position.seen_this_session / max(seconds, 1e-9),
                    "seconds": seconds,
                    # time to this accuracy: epoch time of the whole run (resumed sessions too), and the
                    # wall time of this command so far (start-up, data, compilation and evaluation included)
                    "training_s": sum(row["seconds"] for row in history.rows) + seconds,
                    "wall_s": process_seconds(),
                })
                position = _Position(epoch + 1)
                if run is not None:
                    save()
                if stopping():
                    raise _StopRequested
                if log_epochs:
                    row = history.last
                    print(f"{backend.NAME} epoch {row['epoch']}: train loss {row['train_loss']:.4f} "
                          f"acc {row['train_acc']:.3f}, test loss {row['test_loss']:.4f} acc {row['test_acc']:.3f}, "
                          f"{row['images_per_s']:.1f} images/s; {row['training_s']:.1f} s of training, "
                          f"{row['wall_s']:.1f} s since the command started")
        except (_StopRequested, KeyboardInterrupt):
            # KeyboardInterrupt: a second signal (stop at once), or one raised outside our handler
            history.stopped = stop.name or "SIGINT"
            forced = stop.forced or not stop.requested
            if run is not None and not forced and saved.at != position.where:
                try:  # the handler is still installed: one more signal interrupts this save, cleanly
                    save()
                except KeyboardInterrupt:
                    forced = True
            note = "not saved (stopped at once); " if run is not None and saved.at != position.where else ""
            if group.writer:
                _say(f"stopped by {history.stopped}: {note}{saved.describe()}"
                     + ("; continue with --resume\n" if saved.at is not None else "\n"))
    return history


def _replica_group(backend, replicas: int):
    """The replica group ``fit`` runs in: one replica, or what ``backend.configure_replicas`` set up."""
    if replicas == 1:
        return SINGLE
    if not backend.CAPABILITIES.replicas:
        raise ValueError(f"the {backend.FRAMEWORK} backend ({backend.NAME}) has no data-parallel engine")
    group = backend.replica_group()
    if group.replicas != replicas:
        raise ValueError(f"replicas={replicas}, but {group.replicas} replica(s) are set up: call "
                         f"{backend.__name__}.configure_replicas({replicas}) before building the model")
    return group


class _StopOnSignal:
    """SIGINT (Ctrl-C) and SIGTERM (kill, docker stop, batch schedulers) ask the loop to stop at the
    next batch boundary and save, so a checkpoint never holds a half-applied update; a second
    signal stops at once without saving (an interrupted save leaves the previous checkpoint)."""

    def __init__(self, *, quiet: bool = False):
        self.requested = self.forced = False
        self.name: str | None = None
        self.quiet = quiet  # replicas other than rank 0 stop without a word: rank 0 speaks for them
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.forced:
            return  # already stopping at once
        if self.requested:
            self.forced = True
            if not self.quiet:
                _say(f"\n{name} again: stopping at once, without saving\n")
            raise KeyboardInterrupt
        self.requested, self.name = True, name
        again = "press Ctrl-C again" if signum == signal.SIGINT else f"send {name} again"
        if not self.quiet:
            _say(f"\n{name}: stopping after this step and saving ({again} to stop at once)\n")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        return False


def _say(text: str) -> None:
    """A status line on stderr, written without Python's buffered streams: safe from a signal
    handler that interrupts another write (tqdm writes to stderr all the time)."""
    try:
        os.write(sys.stderr.fileno(), text.encode())
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):  # a captured or closed stream
        print(text, end="", file=sys.stderr, flush=True)


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

    @property
    def where(self) -> tuple[int, int]:
        return self.epoch, self.batch


def _copy(position: _Position) -> _Position:
    return replace(position)


def describe_position(epoch: int, batch: int, batches_per_epoch: int) -> str:
    """"the end of epoch 2", or "epoch 3, batch 5 of 469" (epoch and batch as a checkpoint stores them)."""
    if batch == 0:
        return f"the end of epoch {epoch}" if epoch else "the start"
    return f"epoch {epoch + 1}, batch {batch} of {batches_per_epoch}"


class _Saved:
    """Where the checkpoint on disk stands (None: none written), for messages that name it truly."""

    def __init__(self, run: Path | None, batches_per_epoch: int, position: _Position | None):
        self.run, self.batches_per_epoch = run, batches_per_epoch
        self.at = position.where if position is not None else None

    def describe(self) -> str:
        if self.run is None:
            return "nothing was saved (no run directory)"
        if self.at is None:
            return f"no checkpoint was written to {self.run}"
        return f"the last finite checkpoint, {self.run / CHECKPOINT}, holds {describe_position(*self.at, self.batches_per_epoch)}"


def _session(backend, model, command: str | None) -> dict[str, Any]:
    """This start or resume: when, the command line, framework and version, the device actually used."""
    device = "gpu" if "gpu" in backend.parameter_devices(model) else "cpu"
    info = backend.runtime_info(device)
    return {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": command if command is not None else shlex.join(sys.argv),
        "backend": backend.NAME,
        "framework": info.get("framework", backend.FRAMEWORK),
        "device": device,
        "device_name": backend.gpu_status().detail if device == "gpu" else cpu_model(),
        "python": platform.python_version(),
        "runtime": info,
    }


def _save_run(run: Path, config: TrainConfig, backend, model, trainer, position: _Position, history: History,
              saved: _Saved, *, plot: bool = True) -> None:
    """The checkpoint (only if every array is finite), then the metrics and, with ``plot``, the curves."""
    where = describe_position(*position.where, saved.batches_per_epoch)
    weights = backend.export_weights(model)
    optim = {f"{OPTIM_PREFIX}{name}": value for name, value in trainer.optimizer_state().items()}
    bad = non_finite({**weights, **optim})
    if bad:
        raise DivergedError(f"non-finite values (NaN or infinity) in {', '.join(bad)} at {where}, not saved; "
                            f"{saved.describe()}")
    meta = {
        f"{META_PREFIX}config": np.array(json.dumps(config.comparable())),
        f"{META_PREFIX}position": np.array([position.epoch, position.batch, position.correct, position.seen], np.int64),
        f"{META_PREFIX}loss_sum": np.array(position.loss_sum, np.float64),
        f"{META_PREFIX}history": np.array(json.dumps({"rows": history.rows, "steps": history.steps})),
        f"{META_PREFIX}sessions": np.array(json.dumps(history.sessions, default=str)),
    }
    try:
        save_weights(run / CHECKPOINT, weights, **optim, **meta)
        saved.at = position.where
        write_metrics(run, history)
        if plot:
            from .plots import plot_curves  # matplotlib is imported only when a run dir asks for a plot

            plot_curves({backend.NAME: history}, run / CURVES_PNG)
    except OSError as error:  # a full disk, a folder gone: the atomic writer has left the old files
        raise TrainingError(f"could not save the run at {where} ({error.strerror or error}); "
                            f"{saved.describe()}") from None


def _restore(run: Path, config: TrainConfig, backend, model, trainer):
    """Position, history rows, steps and sessions from the checkpoint, after checking it belongs
    to this run (same recipe) and is finite; then the weights and optimizer state are loaded."""
    path = run / CHECKPOINT
    arrays = read_npz(path)
    try:
        saved = json.loads(str(arrays[f"{META_PREFIX}config"]))
        epoch, batch, correct, seen = (int(v) for v in arrays[f"{META_PREFIX}position"])
        loss_sum = float(arrays[f"{META_PREFIX}loss_sum"])
        saved_history = json.loads(str(arrays[f"{META_PREFIX}history"]))
        rows, steps = saved_history["rows"], saved_history["steps"]
        sessions = json.loads(str(arrays[f"{META_PREFIX}sessions"])) if f"{META_PREFIX}sessions" in arrays else []
    except (KeyError, TypeError, ValueError) as error:
        raise TrainingError(f"{path}: not a training checkpoint of this project (missing or bad {error})") from None
    wanted = config.comparable()
    for name in wanted:  # checkpoints from before a field was recorded cannot be checked on it
        saved.setdefault(name, wanted[name])
    differences = [f"{k}: checkpoint {saved.get(k)!r}, now {v!r}" for k, v in wanted.items() if saved.get(k) != v]
    if differences:
        raise TrainingError(f"{path} was written by a different run ({'; '.join(differences)}); "
                            f"resume with the same settings{_matching_flags(saved, wanted, sessions)}")
    check_finite(arrays, source=str(path))
    backend.load_weights(model, {k: v for k, v in arrays.items() if "/" not in k})
    trainer.load_optimizer_state({k[len(OPTIM_PREFIX):]: v for k, v in arrays.items() if k.startswith(OPTIM_PREFIX)})
    return _Position(epoch, batch, loss_sum, correct, seen), rows, steps, sessions


def _matching_flags(saved: dict, wanted: dict, sessions: list[dict]) -> str:
    """The flags that give a resume the checkpoint's trainer options ("" where they agree): the
    speed-ups' defaults follow the machine (CPU features, GPU math mode), so a checkpoint moved to
    another machine can differ in nothing the user typed."""
    before, now = saved.get("trainer_options") or {}, wanted.get("trainer_options") or {}
    flags = [f"--{'on' if value else 'off'} {name}" if isinstance(value, bool) else f"--{name} {value}"
             for name, value in sorted(before.items()) if now.get(name) != value]
    if not flags:
        return ""
    where = sessions[-1].get("device_name") if sessions else None
    return (f": {' '.join(flags)} (the defaults follow the machine"
            + (f"; the checkpoint's last session ran on {where}" if where else "") + ")")


def write_metrics(run: Path, history: History) -> None:
    """metrics.json ({"config", "sessions", "epochs": rows}), metrics.csv (per epoch) and steps.csv
    (per step), each replaced atomically."""
    run.mkdir(parents=True, exist_ok=True)
    record = {"config": history.config, "sessions": history.sessions, "epochs": history.rows}
    write_text_atomic(run / METRICS_JSON, json.dumps(record, indent=2, default=str) + "\n")
    for name, rows in ((METRICS_CSV, history.rows), (STEPS_CSV, history.steps)):
        if rows:
            text = io.StringIO()
            # every key of every row: a run resumed from an older version has rows without the newer ones
            writer = csv.DictWriter(text, fieldnames=list(dict.fromkeys(key for row in rows for key in row)))
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
