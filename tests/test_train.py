"""The shared training loop, run through every backend on small synthetic data (fast).

Real-data convergence lives in test_convergence.py.
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common.backend import all_speed_ups
from common.data import FashionMNIST
from common.spec import book_alexnet
from common.train import CHECKPOINT, CURVES_PNG, METRICS_CSV, METRICS_JSON, STEPS_CSV, TrainingError, fit
from common.weights import read_npz

from common import ROOT  # noqa: E402
SPEC = book_alexnet().with_input(1, 65, 65)  # the smallest valid input keeps these tests quick
SETTINGS = dict(batch_size=8, lr=0.05, momentum=0.9, weight_decay=5e-4, seed=3, progress=False)


def tiny_fashion_mnist() -> FashionMNIST:
    """40 training and 16 test images of noise, the same in every process."""
    rng = np.random.default_rng(0)
    return FashionMNIST(
        rng.integers(0, 256, (40, 28, 28), dtype=np.uint8), rng.integers(0, 10, 40).astype(np.int64),
        rng.integers(0, 256, (16, 28, 28), dtype=np.uint8), rng.integers(0, 10, 16).astype(np.int64),
    )


@pytest.fixture(scope="module")
def tiny_data():
    return tiny_fashion_mnist()


class Faulty:
    """The real backend, with its trainer's step doing something extra at one step (a test double)."""

    def __init__(self, backend, at_step, action):
        self._backend, self._at_step, self._action = backend, at_step, action

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def make_trainer(self, model, **kwargs):
        trainer = self._backend.make_trainer(model, **kwargs)
        step, calls = trainer.train_step, [0]

        def train_step(x, labels, *, seed):
            calls[0] += 1
            loss, correct = step(x, labels, seed=seed)
            return self._action(loss, correct) if calls[0] == self._at_step else (loss, correct)

        trainer.train_step = train_step
        return trainer


def weights_of(run_dir):
    return {k: v for k, v in read_npz(run_dir / CHECKPOINT).items() if "/" not in k}


def assert_same_weights(a, b):
    assert list(a) == list(b)
    for name in a:
        assert np.array_equal(a[name], b[name]), f"{name} differs"


def test_fit_writes_metrics_curves_and_checkpoint(backend, tiny_data, tmp_path):
    model = backend.build(SPEC, seed=1, device="cpu")
    history = fit(backend, model, tiny_data, epochs=2, run_dir=tmp_path, **SETTINGS)
    assert [row["epoch"] for row in history.rows] == [1, 2]
    assert all(np.isfinite(row["train_loss"]) and 0 <= row["test_acc"] <= 1 for row in history.rows)
    assert json.loads((tmp_path / METRICS_JSON).read_text()) == history.rows
    assert (tmp_path / METRICS_CSV).read_text().splitlines()[0].startswith("epoch,train_loss,train_acc")
    assert (tmp_path / CURVES_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert_same_weights(weights_of(tmp_path), backend.export_weights(model))
    momentum = {k for k in read_npz(tmp_path / CHECKPOINT) if k.startswith("optim/")}
    assert len(momentum) == 16  # a momentum buffer per parameter
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CHECKPOINT, METRICS_CSV, METRICS_JSON, CURVES_PNG, STEPS_CSV])
    steps = (tmp_path / STEPS_CSV).read_text().splitlines()
    assert steps[0] == "epoch,loss,acc" and len(steps) == 1 + 2 * 5  # 40 images, batch 8: 5 steps an epoch
    assert [float(line.split(",")[0]) for line in steps[1:]][4:6] == [1.0, 1.2]


def test_resume_after_an_epoch_equals_an_uninterrupted_run(backend, tiny_data, tmp_path):
    full = backend.build(SPEC, seed=1, device="cpu")
    expected = fit(backend, full, tiny_data, epochs=2, run_dir=tmp_path / "full", **SETTINGS)
    first = backend.build(SPEC, seed=1, device="cpu")
    fit(backend, first, tiny_data, epochs=1, run_dir=tmp_path / "split", **SETTINGS)
    second = backend.build(SPEC, seed=99, device="cpu")  # different start: resume must overwrite it
    resumed = fit(backend, second, tiny_data, epochs=2, run_dir=tmp_path / "split", resume=True, **SETTINGS)
    assert_same_weights(backend.export_weights(second), backend.export_weights(full))
    assert [r["train_loss"] for r in resumed.rows] == [r["train_loss"] for r in expected.rows]
    assert resumed.steps == expected.steps


FIT_IN_A_NEW_PROCESS = """
import sys
from common.backend import load_backend
from common.train import fit
from tests.test_train import SETTINGS, SPEC, tiny_fashion_mnist
backend = load_backend(sys.argv[1])
model = backend.build(SPEC, seed=int(sys.argv[4]), device="cpu")
fit(backend, model, tiny_fashion_mnist(), epochs=int(sys.argv[2]), run_dir=sys.argv[3], resume=sys.argv[5] == "1",
    **SETTINGS)
"""


def test_resume_in_a_new_process_equals_an_uninterrupted_run(backend, tiny_data, tmp_path):
    """What users do: stop, and resume later in another process (its own traces, allocations, threads)."""
    full = backend.build(SPEC, seed=1, device="cpu")
    fit(backend, full, tiny_data, epochs=2, run_dir=tmp_path / "full", **SETTINGS)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for epochs, seed, resume in ((1, 1, "0"), (2, 99, "1")):
        result = subprocess.run([sys.executable, "-c", FIT_IN_A_NEW_PROCESS, backend.NAME, str(epochs),
                                 str(tmp_path / "split"), str(seed), resume],
                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
    assert_same_weights(weights_of(tmp_path / "split"), backend.export_weights(full))


def test_ctrl_c_mid_epoch_saves_and_resume_matches(backend, tiny_data, tmp_path):
    full = backend.build(SPEC, seed=1, device="cpu")
    fit(backend, full, tiny_data, epochs=2, run_dir=tmp_path / "full", **SETTINGS)

    def interrupt(loss, correct):
        os.kill(os.getpid(), signal.SIGINT)  # as if the user pressed Ctrl-C during step 7 (epoch 2)
        return loss, correct

    model = backend.build(SPEC, seed=1, device="cpu")
    history = fit(Faulty(backend, 7, interrupt), model, tiny_data, epochs=2, run_dir=tmp_path / "cut", **SETTINGS)
    assert history.stopped == "interrupted" and len(history.rows) == 1
    position = read_npz(tmp_path / "cut" / CHECKPOINT)["meta/position"]
    assert list(position[:2]) == [1, 2]  # epoch index 1, two batches done: it stopped after the step, not inside it
    again = backend.build(SPEC, seed=5, device="cpu")
    fit(backend, again, tiny_data, epochs=2, run_dir=tmp_path / "cut", resume=True, **SETTINGS)
    assert_same_weights(backend.export_weights(again), backend.export_weights(full))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(backend, tiny_data, tmp_path):
    model = backend.build(SPEC, seed=1, device="cpu")
    fit(backend, model, tiny_data, epochs=1, run_dir=tmp_path, **SETTINGS)
    saved = (tmp_path / CHECKPOINT).read_bytes()
    with pytest.raises(TrainingError, match=r"loss became nan at epoch 2, batch 2.*last good checkpoint"):
        fit(Faulty(backend, 2, lambda loss, correct: (float("nan"), correct)), model, tiny_data, epochs=3,
            run_dir=tmp_path, resume=True, **SETTINGS)
    assert (tmp_path / CHECKPOINT).read_bytes() == saved


def test_resume_refuses_a_different_run(backend, tiny_data, tmp_path):
    model = backend.build(SPEC, seed=1, device="cpu")
    fit(backend, model, tiny_data, epochs=1, run_dir=tmp_path, **SETTINGS)
    with pytest.raises(TrainingError, match="batch_size: checkpoint 8, now 4"):
        fit(backend, model, tiny_data, epochs=2, run_dir=tmp_path, resume=True, **dict(SETTINGS, batch_size=4))
    with pytest.raises(TrainingError, match="exists: pass resume"):
        fit(backend, model, tiny_data, epochs=2, run_dir=tmp_path, **SETTINGS)
    with pytest.raises(TrainingError, match="no checkpoint"):
        fit(backend, model, tiny_data, epochs=2, run_dir=tmp_path / "empty", resume=True, **SETTINGS)


def test_speed_ups_are_recorded_and_a_resume_must_keep_them(backend, tiny_data, tmp_path):
    (speed_up, *_) = backend.CAPABILITIES.speed_ups
    model = backend.build(SPEC, seed=1, device="cpu")
    fit(backend, model, tiny_data, epochs=1, run_dir=tmp_path, **SETTINGS)
    recorded = json.loads(str(read_npz(tmp_path / CHECKPOINT)["meta/config"]))["trainer_options"]
    default = recorded[speed_up.name]
    assert isinstance(default, bool) and recorded["precision"] == "fp32"
    flipped = {speed_up.name: not default}
    with pytest.raises(TrainingError, match=f"trainer_options: checkpoint .*'{speed_up.name}': {default}"):
        fit(backend, model, tiny_data, epochs=2, run_dir=tmp_path, resume=True, speed_ups=flipped, **SETTINGS)
    fit(backend, model, tiny_data, epochs=1, run_dir=tmp_path / "flipped", speed_ups=flipped, **SETTINGS)
    recorded = json.loads(str(read_npz(tmp_path / "flipped" / CHECKPOINT)["meta/config"]))["trainer_options"]
    assert recorded[speed_up.name] is (not default)


def test_another_backends_speed_up_is_refused(backend, tiny_data):
    owner, other = next((b, s) for b, speed_ups in all_speed_ups().items() if b != backend.NAME
                        for s in speed_ups.values())
    model = backend.build(SPEC, device="cpu")
    with pytest.raises(ValueError, match=f"speed-up '{other.name}' belongs to backend {owner}, not {backend.NAME}"):
        fit(backend, model, tiny_data, speed_ups={other.name: False}, **SETTINGS)


@pytest.mark.parametrize("bad, message", [
    (dict(epochs=0), "epochs must be a positive int"),
    (dict(lr=-1.0), "lr must be a positive number"),
    (dict(momentum=1.5), r"momentum must be in \[0, 1\)"),
    (dict(limit_train=0), "limit_train must be a positive int"),
])
def test_bad_settings_are_refused(backend, tiny_data, bad, message):
    model = backend.build(SPEC, device="cpu")
    with pytest.raises(ValueError, match=message):
        fit(backend, model, tiny_data, **{**SETTINGS, **bad})


def test_same_batches_and_same_start_give_close_curves_across_backends(all_backends, tiny_data):
    """Training parity by statistics: same init, same batches; dropout masks differ per framework."""
    losses = {}
    for backend in all_backends:
        model = backend.build(SPEC.with_dropout(0.0), seed=1, device="cpu")
        losses[backend.NAME] = fit(backend, model, tiny_data, epochs=1, **SETTINGS).rows[0]["train_loss"]
    values = np.array(list(losses.values()))
    assert np.ptp(values) / values.mean() < 1e-3, losses


def test_cpu_build_keeps_parameters_on_cpu(backend):
    assert backend.parameter_devices(backend.build(SPEC, device="cpu")) == {"cpu"}


@pytest.mark.gpu
def test_training_on_gpu_keeps_parameters_there_and_lowers_the_loss(backend, tiny_data):
    if not backend.gpu_available():
        pytest.skip(f"{backend.FRAMEWORK} sees no GPU here")
    model = backend.build(SPEC.with_dropout(0.0), seed=1, device="gpu")
    history = fit(backend, model, tiny_data, epochs=5, **dict(SETTINGS, lr=0.01, momentum=0.0, weight_decay=0.0))
    losses = [row["train_loss"] for row in history.rows]
    assert losses[-1] < losses[0], losses
    assert backend.parameter_devices(model) == {"gpu"}
