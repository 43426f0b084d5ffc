"""The shared training loop, run through every backend on small synthetic data (fast).

Real-data convergence lives in test_convergence.py.
"""
import gc
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common.backend import all_speed_ups, prepared_reference
from common.machine import cpu_model
from common.data import FashionMNIST
from common.io import TEMP_PREFIX
from common.spec import book_alexnet
from common.train import (CHECKPOINT, CURVES_PNG, METRICS_CSV, METRICS_JSON, STEPS_CSV, DivergedError, TrainingError,
                          fit)
from common.weights import (GOOD_STEPS_KEY, LOSS_SCALE_GROWTH_INTERVAL, LOSS_SCALE_INITIAL, LOSS_SCALE_KEY,
                            LOSS_SCALED_PRECISIONS, loss_scale_entries, read_npz)
from tests.conftest import get_backend

from common import ROOT  # noqa: E402
SPEC = book_alexnet().with_input(1, 65, 65)  # the smallest valid input keeps these tests quick
SETTINGS = dict(batch_size=8, lr=0.05, momentum=0.9, weight_decay=5e-4, seed=3, progress=False)


def tiny_fashion_mnist(n_train: int = 40, n_test: int = 16) -> FashionMNIST:
    """``n_train`` training and ``n_test`` test images of noise (default 40 and 16), the same in every process."""
    rng = np.random.default_rng(0)
    return FashionMNIST(
        rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8), rng.integers(0, 10, n_train).astype(np.int64),
        rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8), rng.integers(0, 10, n_test).astype(np.int64),
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


def optimizer_state_of(run_dir):
    return {k: v for k, v in read_npz(run_dir / CHECKPOINT).items() if k.startswith("optim/")}


_UNINTERRUPTED: dict[str, dict] = {}


def uninterrupted_weights(backend, data):
    """The weights after 2 epochs with SETTINGS from seed 1, never stopped (computed once per backend)."""
    if backend.NAME not in _UNINTERRUPTED:
        model = backend.build(SPEC, seed=1, device="cpu")
        fit(backend, model, data, epochs=2, **SETTINGS)
        _UNINTERRUPTED[backend.NAME] = backend.export_weights(model)
    return _UNINTERRUPTED[backend.NAME]


def pt():
    """PyTorch, for tests of the common loop's own logic (the same code runs for every backend)."""
    return get_backend("pt")


def temporaries(folder):
    return sorted(p.name for p in Path(folder).iterdir() if p.name.startswith(TEMP_PREFIX))


def assert_same_weights(a, b):
    assert list(a) == list(b)
    for name in a:
        assert np.array_equal(a[name], b[name]), f"{name} differs"


def test_fit_writes_metrics_curves_and_checkpoint(backend, tiny_data, tmp_path):
    model = backend.build(SPEC, seed=1, device="cpu")
    history = fit(backend, model, tiny_data, epochs=2, run_dir=tmp_path, **SETTINGS)
    assert [row["epoch"] for row in history.rows] == [1, 2]
    assert all(np.isfinite(row["train_loss"]) and 0 <= row["test_acc"] <= 1 for row in history.rows)
    record = json.loads((tmp_path / METRICS_JSON).read_text())
    assert record["epochs"] == history.rows
    assert record["config"] == history.config and record["config"]["epochs"] == 2
    assert {k: record["config"][k] for k in ("backend", "variant", "input_size", "in_channels", "dropout", "seed")} == \
        {"backend": backend.NAME, "variant": "book", "input_size": [65, 65], "in_channels": 1, "dropout": [0.5, 0.5],
         "seed": 3}
    assert record["config"]["trainer_options"]["precision"] == "fp32"
    (session,) = record["sessions"]
    assert session["device"] == "cpu" and session["device_name"] == cpu_model()
    assert session["framework"].startswith(backend.FRAMEWORK) and session["command"]
    assert (tmp_path / METRICS_CSV).read_text().splitlines()[0].startswith("epoch,train_loss,train_acc")
    assert (tmp_path / CURVES_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert_same_weights(weights_of(tmp_path), backend.export_weights(model))
    momentum = {k for k in read_npz(tmp_path / CHECKPOINT) if k.startswith("optim/")}
    assert len(momentum) == 16  # a momentum buffer per parameter
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CHECKPOINT, METRICS_CSV, METRICS_JSON, CURVES_PNG, STEPS_CSV])
    steps = (tmp_path / STEPS_CSV).read_text().splitlines()
    assert steps[0] == "epoch,loss,acc" and len(steps) == 1 + 2 * 5  # 40 images, batch 8: 5 steps an epoch
    assert [float(line.split(",")[0]) for line in steps[1:]][4:6] == [1.0, 1.2]
    # time to accuracy: the run's epoch time so far, and the command's wall time (start-up included)
    first, second = history.rows
    assert first["training_s"] == first["seconds"] and second["training_s"] == first["seconds"] + second["seconds"]
    assert 0 < first["wall_s"] < second["wall_s"] and second["wall_s"] >= second["training_s"]


@pytest.mark.parametrize("precision", ["fp32", *LOSS_SCALED_PRECISIONS])
def test_resume_after_an_epoch_equals_an_uninterrupted_run(backend, tiny_data, tmp_path, precision):
    """The weights and the whole optimizer state end equal: in fp16 the loss scale and its count of
    finite steps too, which goes on across the resume only if the checkpoint carried it (float16 is
    slow on CPUs: 8 images in batches of 4 there)."""
    if precision not in backend.CAPABILITIES.precisions:
        pytest.skip(f"{backend.FRAMEWORK} does not train in {precision} here")
    data, settings = tiny_data, dict(SETTINGS, precision=precision)
    if precision != "fp32":
        data, settings = tiny_fashion_mnist(8, 4), dict(settings, batch_size=4)
    full = backend.build(SPEC, seed=1, device="cpu")
    expected = fit(backend, full, data, epochs=2, run_dir=tmp_path / "full", **settings)
    if precision == "fp32":
        _UNINTERRUPTED.setdefault(backend.NAME, backend.export_weights(full))
    first = backend.build(SPEC, seed=1, device="cpu")
    fit(backend, first, data, epochs=1, run_dir=tmp_path / "split", **settings)
    second = backend.build(SPEC, seed=99, device="cpu")  # different start: resume must overwrite it
    resumed = fit(backend, second, data, epochs=2, run_dir=tmp_path / "split", resume=True, **settings)
    assert_same_weights(backend.export_weights(second), backend.export_weights(full))
    assert_same_weights(optimizer_state_of(tmp_path / "split"), optimizer_state_of(tmp_path / "full"))
    assert [r["train_loss"] for r in resumed.rows] == [r["train_loss"] for r in expected.rows]
    assert resumed.steps == expected.steps
    assert len(resumed.sessions) == 2  # the start and the resume, each recorded
    assert resumed.rows[1]["training_s"] == resumed.rows[0]["seconds"] + resumed.rows[1]["seconds"]  # over sessions


def test_fp16_skips_a_step_with_non_finite_gradients_and_halves_the_loss_scale(backend, tiny_data):
    """The dynamic loss scale's rule (common.weights): a finite step is applied and counted; a scale so
    large that the float16 backward overflows (2**40) gives infinite gradients, the step is skipped
    (weights and momentum as they were, the loss itself finite) and the scale halves; the 2000th finite
    step in a row doubles it."""
    if "fp16" not in backend.CAPABILITIES.precisions:
        pytest.skip(f"{backend.FRAMEWORK} does not train in fp16 here")
    model = backend.build(SPEC, seed=1, device="cpu")
    trainer = backend.make_trainer(model, lr=0.05, momentum=0.9, weight_decay=5e-4, precision="fp16")
    x, labels = trainer.prepare(tiny_data.train_images[:4]), tiny_data.train_labels[:4]

    def step_with(scale, good_steps):
        trainer.load_optimizer_state({**trainer.optimizer_state(), **loss_scale_entries(scale, good_steps)})
        before, state = backend.export_weights(model), trainer.optimizer_state()
        loss, _ = trainer.train_step(x, labels, seed=0)
        after = trainer.optimizer_state()
        changed = [name for name, value in backend.export_weights(model).items() if not np.array_equal(value, before[name])]
        momentum_changed = [k for k in state if k.startswith("momentum/") and not np.array_equal(after[k], state[k])]
        return loss, (float(after[LOSS_SCALE_KEY]), int(after[GOOD_STEPS_KEY])), changed, momentum_changed

    fresh = trainer.optimizer_state()
    assert (float(fresh[LOSS_SCALE_KEY]), int(fresh[GOOD_STEPS_KEY])) == (LOSS_SCALE_INITIAL, 0) == (2.0 ** 15, 0)
    loss, scale, changed, momentum_changed = step_with(2.0 ** 15, 0)
    assert np.isfinite(loss) and scale == (2.0 ** 15, 1) and len(changed) == len(momentum_changed) == 16
    loss, scale, changed, momentum_changed = step_with(2.0 ** 40, 7)
    assert np.isfinite(loss) and scale == (2.0 ** 39, 0) and changed == [] and momentum_changed == []
    loss, scale, changed, _ = step_with(2.0 ** 15, LOSS_SCALE_GROWTH_INTERVAL - 1)
    assert np.isfinite(loss) and scale == (2.0 ** 16, 0) and len(changed) == 16


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
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for epochs, seed, resume in ((1, 1, "0"), (2, 99, "1")):
        result = subprocess.run([sys.executable, "-c", FIT_IN_A_NEW_PROCESS, backend.NAME, str(epochs),
                                 str(tmp_path / "split"), str(seed), resume],
                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
    assert_same_weights(weights_of(tmp_path / "split"), uninterrupted_weights(backend, tiny_data))


def send(signum):
    """A test double's action: the signal arrives during this step, as from Ctrl-C or ``kill``."""
    def action(loss, correct):
        os.kill(os.getpid(), signum)
        return loss, correct
    return action


def test_ctrl_c_mid_epoch_saves_and_resume_matches(backend, tiny_data, tmp_path, capfd):
    model = backend.build(SPEC, seed=1, device="cpu")
    history = fit(Faulty(backend, 7, send(signal.SIGINT)), model, tiny_data, epochs=2, run_dir=tmp_path / "cut",
                  **SETTINGS)
    assert history.stopped == "SIGINT" and len(history.rows) == 1
    position = read_npz(tmp_path / "cut" / CHECKPOINT)["meta/position"]
    assert list(position[:2]) == [1, 2]  # epoch index 1, two batches done: it stopped after the step, not inside it
    assert f"holds epoch 2, batch 2 of 5; continue with --resume" in capfd.readouterr().err
    again = backend.build(SPEC, seed=5, device="cpu")
    fit(backend, again, tiny_data, epochs=2, run_dir=tmp_path / "cut", resume=True, **SETTINGS)
    assert_same_weights(backend.export_weights(again), uninterrupted_weights(backend, tiny_data))


def test_sigterm_is_handled_like_ctrl_c(tiny_data, tmp_path, capfd):
    """kill, docker stop, a batch scheduler: save at the next batch boundary, then stop; resume is exact.
    Sent during the last step of epoch 1, it stops before the test set is evaluated: the resumed run
    starts with that evaluation. (The handling is common code; PyTorch stands for all three.)"""
    backend = pt()
    model = backend.build(SPEC, seed=1, device="cpu")
    history = fit(Faulty(backend, 5, send(signal.SIGTERM)), model, tiny_data, epochs=2, run_dir=tmp_path, **SETTINGS)
    assert history.stopped == "SIGTERM" and history.rows == []
    assert list(read_npz(tmp_path / CHECKPOINT)["meta/position"][:2]) == [0, 5]
    err = capfd.readouterr().err
    assert "SIGTERM: stopping after this step and saving (send SIGTERM again to stop at once)" in err
    assert f"stopped by SIGTERM: the last finite checkpoint, {tmp_path / CHECKPOINT}, holds epoch 1, batch 5 of 5" in err
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is gone after fit
    again = backend.build(SPEC, seed=5, device="cpu")
    resumed = fit(backend, again, tiny_data, epochs=2, run_dir=tmp_path, resume=True, **SETTINGS)
    assert [row["epoch"] for row in resumed.rows] == [1, 2]
    assert_same_weights(backend.export_weights(again), uninterrupted_weights(backend, tiny_data))


def test_checkpoint_every_saves_mid_epoch_and_resume_is_bit_exact(backend, tiny_data, tmp_path):
    """A crash at step 8 (epoch 2, batch 3): the checkpoint of step 6 (epoch 2, batch 1) is what is left."""
    def crash(loss, correct):
        raise RuntimeError("simulated crash")

    model = backend.build(SPEC, seed=1, device="cpu")
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(Faulty(backend, 8, crash), model, tiny_data, epochs=2, run_dir=tmp_path, checkpoint_every=3, **SETTINGS)
    checkpoint = read_npz(tmp_path / CHECKPOINT)
    assert list(checkpoint["meta/position"][:2]) == [1, 1]
    assert len(json.loads(str(checkpoint["meta/history"]))["steps"]) == 6
    again = backend.build(SPEC, seed=5, device="cpu")
    fit(backend, again, tiny_data, epochs=2, run_dir=tmp_path, resume=True, checkpoint_every=3, **SETTINGS)
    assert_same_weights(backend.export_weights(again), uninterrupted_weights(backend, tiny_data))


def test_nan_loss_stops_and_keeps_the_last_finite_checkpoint(backend, tiny_data, tmp_path):
    model = backend.build(SPEC, seed=1, device="cpu")
    fit(backend, model, tiny_data, epochs=1, run_dir=tmp_path, **SETTINGS)
    saved = (tmp_path / CHECKPOINT).read_bytes()
    with pytest.raises(DivergedError, match=r"training loss became nan at epoch 2, batch 2 .*; the last finite "
                       rf"checkpoint, {tmp_path / CHECKPOINT}, holds the end of epoch 1$"):
        fit(Faulty(backend, 2, lambda loss, correct: (float("nan"), correct)), model, tiny_data, epochs=3,
            run_dir=tmp_path, resume=True, **SETTINGS)
    assert (tmp_path / CHECKPOINT).read_bytes() == saved


def test_nan_test_loss_stops_before_the_checkpoint_is_written(tiny_data, tmp_path):
    backend = pt()
    model = backend.build(SPEC, seed=1, device="cpu")

    class NanTestLoss(Faulty):
        def make_trainer(self, model, **kwargs):
            trainer = super().make_trainer(model, **kwargs)
            trainer.eval_step = lambda x, labels: (float("nan"), 0)
            return trainer

    with pytest.raises(DivergedError, match=rf"test loss became nan after epoch 1; no checkpoint was written to {tmp_path}$"):
        fit(NanTestLoss(backend, 0, None), model, tiny_data, epochs=1, run_dir=tmp_path, **SETTINGS)
    assert not (tmp_path / CHECKPOINT).exists() and temporaries(tmp_path) == []


def test_a_checkpoint_is_written_only_when_every_weight_is_finite(tiny_data, tmp_path):
    """Finite losses, but an infinite weight at the second save: nothing is written, the first checkpoint stays."""
    backend = pt()

    class InfiniteBiasAtSecondExport(Faulty):
        calls = 0

        def export_weights(self, model):
            weights = self._backend.export_weights(model)
            InfiniteBiasAtSecondExport.calls += 1
            if InfiniteBiasAtSecondExport.calls == 2:
                weights["conv3.bias"] = weights["conv3.bias"].copy()
                weights["conv3.bias"][7] = np.inf
            return weights

    model = backend.build(SPEC, seed=1, device="cpu")
    with pytest.raises(DivergedError, match=r"non-finite values \(NaN or infinity\) in conv3.bias at the end of epoch 2, "
                       r"not saved; the last finite checkpoint, .* holds the end of epoch 1"):
        fit(InfiniteBiasAtSecondExport(backend, 0, None), model, tiny_data, epochs=2, run_dir=tmp_path, **SETTINGS)
    assert list(read_npz(tmp_path / CHECKPOINT)["meta/position"][:2]) == [1, 0]
    assert np.isfinite(weights_of(tmp_path)["conv3.bias"]).all() and temporaries(tmp_path) == []


def test_a_second_signal_during_the_save_stops_at_once_and_keeps_the_previous_checkpoint(tiny_data, tmp_path,
                                                                                         monkeypatch, capfd):
    """Ctrl-C at step 7 asks for a save; Ctrl-C again while that save is being written stops it at once."""
    import common.weights

    backend = pt()
    model = backend.build(SPEC, seed=1, device="cpu")
    fit(backend, model, tiny_data, epochs=1, run_dir=tmp_path, **SETTINGS)
    before = (tmp_path / CHECKPOINT).read_bytes()
    real_write = common.weights.write_npz

    def write_interrupted(handle, arrays):
        handle.write(b"PK\x03\x04 half a checkpoint")
        os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C, in the middle of the write
        real_write(handle, arrays)

    monkeypatch.setattr(common.weights, "write_npz", write_interrupted)
    history = fit(Faulty(backend, 2, send(signal.SIGINT)), model, tiny_data, epochs=2, run_dir=tmp_path,
                  resume=True, **SETTINGS)
    assert history.stopped == "SIGINT"
    assert (tmp_path / CHECKPOINT).read_bytes() == before and temporaries(tmp_path) == []
    gc.collect()  # an interrupted zip writer left to the collector would print "Exception ignored in ..." here
    err = capfd.readouterr().err
    assert "Exception ignored" not in err and "Traceback" not in err
    assert "SIGINT again: stopping at once, without saving" in err
    assert "stopped by SIGINT: not saved (stopped at once); the last finite checkpoint" in err
    assert "holds the end of epoch 1; continue with --resume" in err


SLOW_SAVE = """
import os, sys, time
import common.weights
from common.backend import load_backend
from common.train import fit
from tests.test_train import SETTINGS, SPEC, tiny_fashion_mnist
real_write, calls = common.weights.write_npz, [0]

def write_then_hang(handle, arrays):
    calls[0] += 1
    if calls[0] < 2:
        return real_write(handle, arrays)
    handle.write(b"PK" + bytes(1 << 20))  # the second save: half written when the kill comes
    handle.flush()
    print("SAVING", flush=True)
    time.sleep(600)

common.weights.write_npz = write_then_hang
backend = load_backend("pt")
fit(backend, backend.build(SPEC, seed=1, device="cpu"), tiny_fashion_mnist(), epochs=2, run_dir=sys.argv[1],
    **SETTINGS)
"""


def test_sigkill_during_a_save_keeps_the_previous_checkpoint_and_the_next_start_cleans_up(tiny_data, tmp_path):
    backend = pt()
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    child = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, str(tmp_path)], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()  # blocks until the second save is under way
        assert line == "SAVING\n", child.stderr.read()[-2000:]
        before = (tmp_path / CHECKPOINT).read_bytes()
        (leftover,) = temporaries(tmp_path)
        assert leftover.endswith(CHECKPOINT)
    finally:
        child.kill()
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    assert (tmp_path / CHECKPOINT).read_bytes() == before  # the previous checkpoint, whole
    assert list(read_npz(tmp_path / CHECKPOINT)["meta/position"][:2]) == [1, 0]
    assert temporaries(tmp_path) == [leftover]  # what the killed writer left ...
    model = backend.build(SPEC, seed=9, device="cpu")
    fit(backend, model, tiny_data, epochs=2, run_dir=tmp_path, resume=True, **SETTINGS)
    assert temporaries(tmp_path) == []  # ... is removed by the next start, and the run completes exactly
    assert_same_weights(backend.export_weights(model), uninterrupted_weights(backend, tiny_data))


def test_resume_refuses_a_different_run(backend, tiny_data, tmp_path):
    model = backend.build(SPEC, seed=1, device="cpu")
    fit(backend, model, tiny_data, epochs=1, run_dir=tmp_path, **SETTINGS)
    with pytest.raises(TrainingError, match=r"different run \(batch_size: checkpoint 8, now 4\); resume with"):
        fit(backend, model, tiny_data, epochs=2, run_dir=tmp_path, resume=True, **dict(SETTINGS, batch_size=4))
    no_dropout = backend.build(SPEC.with_dropout(0.0), device="cpu")
    with pytest.raises(TrainingError, match=r"\(dropout: checkpoint \[0.5, 0.5\], now \[0.0, 0.0\]\)"):
        fit(backend, no_dropout, tiny_data, epochs=2, run_dir=tmp_path, resume=True, **SETTINGS)
    with pytest.raises(TrainingError, match=r"has finished 1 epoch\(s\) already; ask for more \(--epochs, now 1\)"):
        fit(backend, model, tiny_data, epochs=1, run_dir=tmp_path, resume=True, **SETTINGS)


def test_resume_with_other_speed_ups_names_the_flags_that_match_the_checkpoint(backend, tiny_data, tmp_path):
    """The speed-ups' defaults follow the machine (CPU features, GPU math mode): a checkpoint moved to
    another machine differs in nothing the user typed, so the refusal names the flags to pass."""
    name = backend.CAPABILITIES.speed_ups[0].name
    model = backend.build(SPEC, seed=1, device="cpu")
    saved = fit(backend, model, tiny_data, epochs=1, run_dir=tmp_path, **SETTINGS).config["trainer_options"][name]
    flipped = {name: not saved}
    flag = f"--{'on' if saved else 'off'} {name}"
    with pytest.raises(TrainingError, match=rf"different run \(trainer_options: .*\); resume with the same settings: "
                                            rf"{flag} \(the defaults follow the machine; the checkpoint's last "
                                            rf"session ran on .+\)$"):
        fit(backend, model, tiny_data, epochs=2, run_dir=tmp_path, resume=True, speed_ups=flipped, **SETTINGS)
    again = backend.build(SPEC, seed=1, device="cpu")  # MXNet's model keeps the hybridize state it was given
    fit(backend, again, tiny_data, epochs=2, run_dir=tmp_path, resume=True, **SETTINGS)  # the same options resume
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


@pytest.fixture(scope="module")
def pt_model():
    return pt().build(SPEC, device="cpu")


@pytest.mark.parametrize("bad, message", [
    (dict(epochs=0), "epochs must be a positive int"),
    (dict(lr=-1.0), "lr must be a positive number"),
    (dict(momentum=1.5), r"momentum must be in \[0, 1\)"),
    (dict(limit_train=0), "limit_train must be a positive int"),
    (dict(lr=float("nan")), "lr must be a positive number, got nan"),
    (dict(lr=float("inf")), "lr must be a positive number, got inf"),
    (dict(momentum=float("nan")), r"momentum must be in \[0, 1\), got nan"),
    (dict(weight_decay=float("nan")), "weight_decay must be a finite number >= 0, got nan"),
    (dict(weight_decay=float("inf")), "weight_decay must be a finite number >= 0, got inf"),
    (dict(seed=-1), "seed must be an int >= 0"),
    (dict(checkpoint_every=0), "checkpoint_every must be a positive int"),
])
def test_bad_settings_are_refused(tiny_data, bad, message, tmp_path, pt_model):
    """Refused before anything is written or trained (the checks are common code: one backend suffices)."""
    backend, model = pt(), pt_model
    before = backend.export_weights(model)
    with pytest.raises(ValueError, match=message):
        fit(backend, model, tiny_data, run_dir=tmp_path / "run", **{**SETTINGS, **bad})
    assert not (tmp_path / "run").exists()
    assert_same_weights(backend.export_weights(model), before)


def test_changing_lr_between_steps_takes_effect_in_every_backend(backend):
    """Two SGD steps (momentum 0.9, weight decay 5e-4) with ``trainer.lr`` changed in between equal
    PyTorch's rule computed in float64 from the backend's own gradients at each point."""
    spec = SPEC.with_dropout(0.0)
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (8, 28, 28), dtype=np.uint8), rng.integers(0, 10, 8)
    x = prepared_reference(images, spec, backend.LAYOUT)
    model = backend.build(spec, seed=2, device="cpu")
    trainer = backend.make_trainer(model, lr=0.05, momentum=0.9, weight_decay=5e-4)
    momentum, decay = 0.9, 5e-4
    buffers = {}
    for lr in (0.05, 0.01):
        trainer.lr = lr
        assert trainer.lr == pytest.approx(lr)
        before = {k: v.astype(np.float64) for k, v in backend.export_weights(model).items()}
        _, grads = backend.loss_and_grads(model, x, labels)
        trainer.train_step(x, labels, seed=0)
        after = backend.export_weights(model)
        for name, w in before.items():
            buffers[name] = momentum * buffers.get(name, 0.0) + grads[name] + decay * w
            expected, moved = -lr * buffers[name], after[name] - w
            error = np.linalg.norm(moved - expected) / np.linalg.norm(expected)
            # measured: at most 5.1e-4 here (fc7.weight: float32 rounding of w - lr * buf); 4.0 when a
            # trainer ignores the new lr (what MXNet did)
            assert error < 5e-3, f"lr {lr}: {name} moved {error:.2e} (relative) away from the SGD step"
    with pytest.raises(ValueError, match="lr must be a positive number, got nan"):
        trainer.lr = float("nan")
    assert trainer.lr == pytest.approx(0.01)


@pytest.mark.parametrize("channels", [1, 3])
def test_prepare_follows_the_one_rule_for_input_channels(backend, channels):
    """Every backend's prepare equals common.backend.prepared_reference: the grey image in each channel."""
    spec = book_alexnet(in_channels=channels, input_size=65)
    images = np.random.default_rng(channels).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    trainer = backend.make_trainer(backend.build(spec, device="cpu"), lr=0.01)
    prepared = trainer.prepare(images)
    got = np.asarray(prepared.asnumpy() if hasattr(prepared, "asnumpy") else prepared)
    expected = prepared_reference(images, spec, backend.LAYOUT)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    trainer.train_step(prepared, np.arange(3), seed=0)  # the model takes it


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
