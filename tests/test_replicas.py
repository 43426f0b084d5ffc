"""Data parallelism in each framework's own engine: two replicas take the same SGD step as one.

Every run here is a fresh process (``tests/replica_worker.py``): TensorFlow's logical devices
and MultiWorkerMirroredStrategy, PyTorch's process group and MXNet's parameter servers can only
be set up before a framework starts. The single-process engines (TensorFlow's MirroredStrategy
over two logical CPU devices, MXNet's ``device`` KVStore over two CPU contexts) run in one
process; the multi-process ones (PyTorch DDP over gloo, TensorFlow MultiWorkerMirroredStrategy,
MXNet ``dist_sync`` with a scheduler and a server) in two worker processes on 127.0.0.1, started
by ``common.launch`` with a timeout, so nothing can hang.

The 65x65 AlexNet takes 4 steps (momentum 0.9, weight decay 5e-4, dropout off) on global
batches of 8, 8, 8 and 5 (the last split 3 + 2). Tolerances, float32: the replicas sum their
gradients in another order than one replica does, so the results differ in the last bits; here
the largest differences were ~4e-9 (weights) and ~3e-8 (momentum buffers). The asserted bounds
are 1e-6 and 1e-5 for the bulk of every array. A decision that float32 rounding can tip (a
ReLU input within rounding of zero, design.md) is not a bug, and it happens: on an AMD EPYC
(AVX2) one fc7 unit of one example flipped under TensorFlow's two replicas, which moved
fc7.bias by 3.8e-6 and its momentum by 8.1e-5 in one element each, everything else staying
below 2e-7 / 4e-6. So an array may hold a few such elements (``FLIPPED_ELEMENTS``) beyond the
bound, up to ``FLIP_FACTOR`` times it; the classic mistakes move whole arrays (weight decay
added once per replica: ~1e-4 on every momentum buffer; MXNet's ``step`` with the per-replica
batch: every step twice too long), and ``test_the_equivalence_rule_tells_a_flip_from_a_bug``
holds the rule to that.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from common import ROOT
from common.backend import capabilities
from common.launch import Process, replica_processes, run_processes
from common.replicas import ReplicaGroup, check_replicas, free_port, replica_seed, shard, shard_bounds
from common.spec import book_alexnet
from common.weights import GOOD_STEPS_KEY, LOSS_SCALE_INITIAL, LOSS_SCALE_KEY, init_weights
from tests.conftest import REQUIRE_ALL, TRAINING_BACKENDS

WORKER = str(Path(__file__).with_name("replica_worker.py"))
WEIGHT_TOL, MOMENTUM_TOL, LOSS_RTOL = 1e-6, 1e-5, 1e-5
FLIPPED_ELEMENTS, FLIP_FACTOR = 4, 100  # per array: elements a tipped decision may move, and how far
TIMEOUT = 180  # seconds for a whole group of processes; they take 5-25 s here


# ------------------------------------------------------------------ framework-free rules
def test_shards_split_a_batch_evenly_and_cover_it():
    assert shard_bounds(8, 2) == [(0, 4), (4, 8)]
    assert shard_bounds(5, 2) == [(0, 3), (3, 5)]
    assert shard_bounds(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert shard_bounds(1, 2) == [(0, 1), (1, 1)]  # a replica may get nothing from a tiny last batch
    for batch in range(0, 20):
        for replicas in (1, 2, 3, 4):
            covered = np.concatenate([np.arange(batch)[shard(batch, replicas, r)] for r in range(replicas)])
            assert np.array_equal(covered, np.arange(batch))


def test_replica_seeds_depend_on_step_and_replica_only():
    assert replica_seed(12345, 0, 1) == 12345  # one replica: the step seed itself (unchanged path)
    seeds = {replica_seed(step, r, 2) for step in range(50) for r in range(2)}
    assert len(seeds) == 100  # no two (step, replica) pairs share masks
    assert replica_seed(3, 1, 2) == replica_seed(3, 1, 2)
    assert all(0 <= s < 2**31 - 1 for s in seeds)


def test_bad_replica_counts_are_refused_with_one_line():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="replicas must be a positive int"):
            check_replicas(bad)
    with pytest.raises(ValueError, match="batch size 9 does not split evenly over 2 replicas"):
        check_replicas(2, 9)
    assert check_replicas(4, 128) == 4


def test_a_group_knows_its_writer():
    assert ReplicaGroup("ddp", 2, rank=0, processes=2).writer
    assert not ReplicaGroup("ddp", 2, rank=1, processes=2, first_replica=1).writer
    with pytest.raises(ValueError):
        ReplicaGroup("ddp", 2, rank=2, processes=2)


# ------------------------------------------------------------------ the proof
def get_backend(name: str) -> None:
    """Skip (fail in CI) without the framework; it is imported by the worker processes only."""
    package = capabilities(name).package
    if importlib.util.find_spec(package) is None:
        if REQUIRE_ALL:
            raise ImportError(f"{package} is not installed")
        pytest.skip(f"{package} is not installed")


def _run(processes: list[Process], tmp_path: Path) -> None:
    log = tmp_path / "log.txt"
    with open(log, "w") as out:
        code = run_processes(processes, timeout=TIMEOUT, grace=5, stdout=out, stderr=out, cwd=str(ROOT))
    assert code == 0, f"exit {code}:\n" + log.read_text()[-4000:]


def _worker(backend: str, replicas: int, out: Path, *extra: str) -> list[str]:
    return [sys.executable, WORKER, backend, str(replicas), str(out), *extra]


def _load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def _assert_equivalent_arrays(result: dict[str, np.ndarray], names: list[str], tol: float,
                              reference: dict[str, np.ndarray] | None = None) -> float:
    """Each ``result[name]`` equals ``reference[name]`` (default: ``result["ref/" + name]``) within
    ``tol``, but for at most FLIPPED_ELEMENTS elements per array off by up to FLIP_FACTOR x tol
    (a decision rounding tipped: module docstring); returns the largest difference."""
    worst, faults = 0.0, []
    for name in names:
        diff = np.abs(result[name] - (result[f"ref/{name}"] if reference is None else reference[name]))
        beyond = int((diff > tol).sum())
        worst = max(worst, float(diff.max()))
        if beyond > FLIPPED_ELEMENTS or diff.max() > FLIP_FACTOR * tol:
            faults.append(f"{name}: {beyond} of {diff.size} elements beyond {tol:g}, worst {diff.max():.3g}")
    assert not faults, "; ".join(faults)
    return worst


def test_the_equivalence_rule_tells_a_flip_from_a_bug():
    rng = np.random.default_rng(0)
    reference = {name: rng.normal(0, 0.03, size).astype(np.float32) for name, size in (("w", 4096), ("b", 10))}
    rounding = {name: value + np.float32(1e-7) for name, value in reference.items()}
    flipped = {**rounding, "w": rounding["w"].copy()}
    flipped["w"][17] += np.float32(8.1e-5)  # one element, as the tipped fc7 unit moved its momentum
    assert _assert_equivalent_arrays(rounding, ["w", "b"], MOMENTUM_TOL, reference) < MOMENTUM_TOL
    assert _assert_equivalent_arrays(flipped, ["w", "b"], MOMENTUM_TOL, reference) > MOMENTUM_TOL
    for bug in ({**rounding, "w": reference["w"] * np.float32(1.01)},  # a whole array off (a step too long)
                {**rounding, "b": reference["b"] + np.float32(2e-5)},  # a small array off (doubled decay)
                {**rounding, "w": flipped["w"] + np.float32(5e-3) * (np.arange(4096) == 5)}):  # one far off
        with pytest.raises(AssertionError, match="elements beyond"):
            _assert_equivalent_arrays(bug, ["w", "b"], MOMENTUM_TOL, reference)


def _check_equivalent(result: dict[str, np.ndarray], engine: str) -> dict[str, float]:
    """Two replicas against one replica, from rank 0's file; returns the measured worst differences."""
    assert str(result["engine"]) == engine
    names = [k for k in result if f"ref/{k}" in result and k not in ("losses", "corrects", "eval")]
    weights = [k for k in names if "/" not in k]
    momentum = [k for k in names if k.startswith("momentum/")]
    assert len(weights) == 16
    worst = {"weights": _assert_equivalent_arrays(result, weights, WEIGHT_TOL)}
    if engine != "dist_sync":  # the servers keep dist_sync's momentum
        assert len(momentum) == 16
        worst["momentum"] = _assert_equivalent_arrays(result, momentum, MOMENTUM_TOL)
    # the steps moved the weights far more than the tolerance: the comparison is not between untouched models
    initial = init_weights(book_alexnet().with_input(1, 65, 65), 7)
    assert max(float(np.abs(result[f"ref/{k}"] - initial[k]).max()) for k in weights) > 100 * WEIGHT_TOL
    np.testing.assert_allclose(result["losses"], result["ref/losses"], rtol=LOSS_RTOL)
    assert np.array_equal(result["corrects"], result["ref/corrects"])
    np.testing.assert_allclose(result["eval"], result["ref/eval"], rtol=1e-5)
    assert result["agree"].tolist() == [True, False]
    assert bool(result["copies_equal"])
    print(f"{engine}: worst |2 replicas - 1 replica| {worst}")
    return worst


# Every single-process engine of the registry (Capabilities.replicas): one process drives both replicas.
IN_ONE_PROCESS = [(name, engine.name) for name in TRAINING_BACKENDS for engine in capabilities(name).replicas
                  if not engine.processes]


@pytest.mark.parametrize("name, engine", IN_ONE_PROCESS)
def test_two_replicas_in_one_process_take_one_replica_step(name, engine, tmp_path):
    get_backend(name)
    _run([Process(_worker(name, 2, tmp_path / "run"))], tmp_path)
    _check_equivalent(_load(tmp_path / "run-0.npz"), engine)


def test_two_tensorflow_replicas_in_fp16_keep_one_loss_scale(tmp_path):
    """fp16 under MirroredStrategy: each replica decides on the all-reduced gradients and sets its own copy
    of the loss scale, so the copies stay equal and count the same finite steps as one replica. Float16
    shards round differently from the whole batch: measured here, the worst parameter's change is 0.030
    relative from one replica's and the losses 4.4e-6 (0.1 and 1e-4 asserted)."""
    get_backend("tf")
    _run([Process(_worker("tf", 2, tmp_path / "run", "--precision", "fp16"))], tmp_path)
    result = _load(tmp_path / "run-0.npz")
    assert str(result["engine"]) == "mirrored" and bool(result["copies_equal"])
    for key in (LOSS_SCALE_KEY, GOOD_STEPS_KEY):
        assert result[key] == result[f"ref/{key}"], key
    assert (float(result[LOSS_SCALE_KEY]), int(result[GOOD_STEPS_KEY])) == (LOSS_SCALE_INITIAL, 4)  # 4 finite steps
    initial = init_weights(book_alexnet().with_input(1, 65, 65), 7)
    for name, start in initial.items():
        change, reference_change = result[name] - start, result[f"ref/{name}"] - start
        assert np.linalg.norm(change - reference_change) <= 0.1 * np.linalg.norm(reference_change), name
    np.testing.assert_allclose(result["losses"], result["ref/losses"], rtol=1e-4)


def _pt_processes(out: Path, *extra: str) -> list[Process]:
    return replica_processes(_worker("pt", 2, out, *extra), 2, threads=1)


def _tf_processes(out: Path) -> list[Process]:
    workers = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    return [Process(_worker("tf", 2, out), {"TF_CONFIG": json.dumps(
        {"cluster": {"worker": workers}, "task": {"type": "worker", "index": rank}}), "OMP_NUM_THREADS": "1"})
        for rank in range(2)]


def _mx_processes(out: Path, worker: list[str] | None = None) -> list[Process]:
    """A dist_sync job: scheduler, server, then two workers running ``worker`` (default: the proof's worker)."""
    roles = {"DMLC_PS_ROOT_URI": "127.0.0.1", "DMLC_PS_ROOT_PORT": str(free_port()), "DMLC_NUM_WORKER": "2",
             "DMLC_NUM_SERVER": "1", "DMLC_NODE_HOST": "127.0.0.1", "OMP_NUM_THREADS": "1"}
    serve = [sys.executable, "-c", "import alexnet_mx; alexnet_mx.serve_kvstore()"]
    return [Process(serve, {**roles, "DMLC_ROLE": "scheduler"}), Process(serve, {**roles, "DMLC_ROLE": "server"})] + \
        [Process(worker or _worker("mx", 2, out), {**roles, "DMLC_ROLE": "worker"}) for _ in range(2)]


@pytest.mark.parametrize("name, engine", [("pt", "ddp"), ("tf", "multi_worker"), ("mx", "dist_sync")])
def test_two_replica_processes_take_one_replica_step(name, engine, tmp_path):
    get_backend(name)
    out = tmp_path / "run"
    processes = {"pt": _pt_processes, "tf": _tf_processes, "mx": _mx_processes}[name](out)
    for process in processes:
        process.env.setdefault("PYTHONPATH", str(ROOT))
    _run(processes, tmp_path)
    first, second = _load(tmp_path / "run-0.npz"), _load(tmp_path / "run-1.npz")
    _check_equivalent(first, engine)
    # the processes end with the same model, bit for bit, and report the same global figures
    for key in second:
        if not key.startswith("ref/"):
            assert np.array_equal(first[key], second[key]), key


def test_pytorch_replicas_draw_dropout_masks_from_their_own_seeds(tmp_path):
    """Dropout on: DDP's step equals one process doing each replica's slice under
    ``replica_seed(step seed, replica)`` and summing: the masks are the documented ones."""
    get_backend("pt")
    _run(_pt_processes(tmp_path / "run", "--dropout", "0.5"), tmp_path)
    result = _load(tmp_path / "run-0.npz")
    weights = [k for k in result if f"ref/{k}" in result]
    assert len(weights) == 16
    _assert_equivalent_arrays(result, weights, WEIGHT_TOL)


# ------------------------------------------------------------------ the launcher: nothing hangs, nothing is left
SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


def test_one_failing_process_ends_the_others(tmp_path):
    import time

    began = time.monotonic()
    code = run_processes([Process(SLEEPER), Process([sys.executable, "-c", "raise SystemExit(3)"])], grace=2)
    assert code == 3 and time.monotonic() - began < 20


def test_a_timeout_ends_every_process():
    import time

    began = time.monotonic()
    assert run_processes([Process(SLEEPER), Process(SLEEPER)], timeout=1, grace=2) == 124
    assert time.monotonic() - began < 20


def test_replica_processes_carry_torchruns_variables():
    processes = replica_processes(["prog"], 3, port=12345, threads=1)
    assert [p.env["RANK"] for p in processes] == ["0", "1", "2"]
    assert all(p.env["WORLD_SIZE"] == "3" and p.env["MASTER_ADDR"] == "127.0.0.1" and p.env["MASTER_PORT"] == "12345"
               for p in processes)


LAUNCHER = """
import sys
from common.launch import Process, run_processes
child = '''
import os, signal, sys, time
def note(signum, frame):
    open(os.path.join(sys.argv[1], f"got-{signal.Signals(signum).name}-{os.getpid()}"), "w").close()
    sys.exit(0)
signal.signal(signal.SIGINT, note)
signal.signal(signal.SIGTERM, note)
open(os.path.join(sys.argv[1], f"ready-{os.getpid()}"), "w").close()
time.sleep(60)
'''
sys.exit(run_processes([Process([sys.executable, "-c", child, sys.argv[1]]) for _ in range(2)], grace=5))
"""


def _start_launcher(folder: Path):
    import subprocess
    import time

    parent = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(folder)], cwd=str(ROOT))
    deadline = time.monotonic() + 20
    while len(list(folder.glob("ready-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(list(folder.glob("ready-*"))) == 2
    return parent


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_a_signal_to_the_launcher_reaches_every_process(signum, tmp_path):
    import signal

    parent = _start_launcher(tmp_path)
    parent.send_signal(getattr(signal, signum))
    assert parent.wait(timeout=20) == 0
    assert len(list(tmp_path.glob(f"got-{signum}-*"))) == 2


def test_processes_die_with_a_killed_launcher(tmp_path):
    import os
    import signal
    import time

    parent = _start_launcher(tmp_path)
    pids = [int(p.name.rsplit("-", 1)[1]) for p in tmp_path.glob("ready-*")]
    parent.send_signal(signal.SIGKILL)
    parent.wait(timeout=20)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in pids)


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie (dead, not yet reaped by init) is not alive
        return stat.read().split(")")[-1].split()[0] != "Z"


# ------------------------------------------------------------------ alexnet train --replicas N
from tests.conftest import REAL_DATA  # noqa: E402

needs_data = pytest.mark.skipif(not REAL_DATA.is_dir(), reason=f"real Fashion-MNIST not at {REAL_DATA}")
SMALL = ["--epochs", "1", "--limit-train", "20", "--batch-size", "8", "--limit-test", "16", "--input-size", "65",
         "--momentum", "0.9", "--weight-decay", "5e-4", "--dropout", "0", "--data-dir", str(REAL_DATA), "--no-progress"]


def train(*args, timeout=TIMEOUT):
    import subprocess

    return subprocess.run([sys.executable, "-m", "common", "train", *args], capture_output=True, text=True,
                          cwd=str(ROOT), timeout=timeout)


def _weights(run: Path) -> dict[str, np.ndarray]:
    return {k: v for k, v in _load(run / "checkpoint.npz").items() if "/" not in k or k.startswith("optim/")}


@needs_data
@pytest.mark.parametrize("name", TRAINING_BACKENDS)
def test_train_with_two_replicas_writes_one_run_equal_to_one_replica(name, tmp_path):
    """3 steps of 8, 8 and 4 images (limit 20): the run directory of 2 replicas holds the numbers of 1."""
    get_backend(name)
    two = train("--backend", name, "--replicas", "2", *SMALL, "--run-dir", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("run directory:") == 1 and two.stdout.count(f"{name} epoch 1:") == 1  # rank 0 only
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(
        ["checkpoint.npz", "curves.png", "metrics.csv", "metrics.json", "steps.csv"])
    record = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert record["config"]["replicas"] == 2 and record["config"]["dropout"] == [0.0, 0.0]
    assert record["sessions"][0]["replicas"] == 2
    one = train("--backend", name, *SMALL, "--run-dir", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = _weights(tmp_path / "two"), _weights(tmp_path / "one")
    assert sorted(a) == sorted(b) and len(a) == 32  # weights and momentum buffers
    _assert_equivalent_arrays(a, sorted(a), MOMENTUM_TOL, reference=b)
    losses = [json.loads((tmp_path / run / "metrics.json").read_text())["epochs"][0]["train_loss"]
              for run in ("two", "one")]
    assert losses[0] == pytest.approx(losses[1], rel=LOSS_RTOL)


@needs_data
def test_a_replicated_run_resumes(tmp_path):
    get_backend("pt")
    run = str(tmp_path / "run")
    first = train("--backend", "pt", "--replicas", "2", *SMALL, "--run-dir", run)
    assert first.returncode == 0, first.stderr[-3000:]
    again = train("--backend", "pt", "--replicas", "2", *SMALL, "--epochs", "2", "--run-dir", run, "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [row["epoch"] for row in record["epochs"]] == [1, 2] and len(record["sessions"]) == 2


@needs_data
def test_a_run_resumes_with_its_own_number_of_replicas_only(tmp_path):
    get_backend("pt")
    run = str(tmp_path / "run")
    first = train("--backend", "pt", *SMALL, "--run-dir", run)
    assert first.returncode == 0, first.stderr[-3000:]
    other = train("--backend", "pt", "--replicas", "2", *SMALL, "--epochs", "2", "--run-dir", run, "--resume")
    assert other.returncode == 2, other.stderr[-3000:]
    lines = [line for line in other.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and "replicas: checkpoint 1, now 2" in lines[0] and "Traceback" not in other.stderr


@pytest.mark.parametrize("args, message", [
    (["--replicas", "2", "--batch-size", "9"], "the batch size 9 does not split evenly over 2 replicas"),
    (["--replicas", "0"], "argument --replicas: must be a positive integer"),
    (["--dropout", "1"], "argument --dropout: must be a number in [0, 1)"),
])
def test_bad_replica_settings_are_one_line_errors(args, message, tmp_path):
    result = train("--backend", "pt", *args, "--run-dir", str(tmp_path / "run"), timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "run").exists()


def _processes_naming(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                pass
    return [pid for pid in found if _alive(pid)]


@needs_data
@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_a_signal_stops_every_replica_after_the_same_step_and_rank_0_saves(signum, tmp_path):
    import signal
    import subprocess
    import time

    get_backend("pt")
    run = tmp_path / "run"
    args = [a for a in SMALL if a != "20"] + ["--limit-train", "800", "--checkpoint-every", "2"]
    args.remove("--limit-train")
    parent = subprocess.Popen([sys.executable, "-m", "common", "train", "--backend", "pt", "--replicas", "2", *args,
                               "--run-dir", str(run)], cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    deadline = time.monotonic() + TIMEOUT
    while not (run / "checkpoint.npz").exists() and parent.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert parent.poll() is None, parent.communicate()[1][-3000:]
    parent.send_signal(getattr(signal, signum))
    out, err = parent.communicate(timeout=120)
    assert parent.returncode == 128 + int(getattr(signal, signum)), err[-3000:]
    assert err.count(f"stopped by {signum}") == 1  # rank 0 speaks for the group
    position = _load(run / "checkpoint.npz")["meta/position"]
    assert 2 <= position[1] < 100  # saved inside the epoch (100 steps), at the step the replicas agreed on
    assert _processes_naming(str(run)) == []  # no replica left behind


@needs_data
def test_every_dist_sync_worker_refuses_a_momentum_checkpoint_and_the_job_ends(tmp_path):
    """MXNet's dist_sync keeps the momentum on the parameter servers, where it cannot be read: each worker
    refuses before any step, in one line, exit 2, and the servers then end by themselves. (Once only
    rank 0 refused and the other worker waited on the servers for ever: the launcher had to kill it.)"""
    get_backend("mx")
    run = tmp_path / "run"
    worker = [sys.executable, "-m", "common", "train", "--backend", "mx", "--replicas", "2", *SMALL,
              "--run-dir", str(run)]
    processes = _mx_processes(run, worker)
    for index, process in enumerate(processes):
        process.env.setdefault("PYTHONPATH", str(ROOT))
        process.log = str(tmp_path / f"{index}-{process.env['DMLC_ROLE']}.log")
    codes: list[int] = []
    # grace: after the first worker's exit, how long the others may take to end by themselves
    run_processes(processes, timeout=TIMEOUT, grace=30, cwd=str(ROOT), exit_codes=codes)
    logs = {Path(p.log).name: Path(p.log).read_text(errors="replace") for p in processes}
    assert codes == [0, 0, 2, 2], (codes, {name: text[-1500:] for name, text in logs.items()})
    for process in processes[2:]:
        text = logs[Path(process.log).name]
        errors = [line for line in text.splitlines() if "error" in line.lower()]
        assert len(errors) == 1 and "Traceback" not in text, text[-3000:]
        assert errors[0].startswith("alexnet train: error: ") and "dist_sync" in errors[0]
        assert "parameter servers" in errors[0] and "momentum" in errors[0]
    assert not (run / "checkpoint.npz").exists()
    assert _processes_naming(str(run)) == []
