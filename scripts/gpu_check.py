"""The prepared GPU check that ``scripts/gpu-check.sh`` runs (see that script and docs/gpus.md).

One run, within a time budget (530 s on the GPU machine: under 9 minutes), from the source tree
with the machine's own packages (no network, no installed project). Which frameworks it covers is
read, not typed: every backend of the registry that trains, lists a GPU in its record and, in a
child process, imports and runs a convolution forward and backward on the GPU (``gpu_status``);
with ``--cpu-smoke``, every such backend that imports here stands in. In that order:

1. tests: ``pytest -m gpu tests/``, without the test modules (``tests/test_backend_NAME.py``) of
   the backends whose framework does not import here (a test parametrized over the registry skips
   a missing framework by itself);
2. bench: ``alexnet bench --backends NAME --device gpu`` for each backend side by side, at batch
   128 and 256, for each (precision, math mode) pair, most wanted first, with MFU against each
   framework's own matmul peak; it stops starting configurations when only the recipes' time is left;
3. train: the book's recipe on Fashion-MNIST at 224x224 (10 epochs, SGD lr 0.01, batch 128) for
   each backend in turn, each leaving ``recipe_reserve_s`` for every later one: first two epochs,
   then, resumed from their checkpoint, as many more as the time left allows (the summary says so
   when that is fewer than 10), and its test accuracy against the book's;
4. ablate: in the time the recipes left, ``alexnet bench --ablate`` at batch 256 for fp32 (with the
   book's plain code, ``--baseline``) and bf16, per backend, each only where its estimated time fits;
5. kernels: in the time still left, ``benchmarks/profile_NAME.py`` (for the backends that have one)
   on one bf16 step at batch 256: the device time by kernel group and the top kernels.

Everything the children print goes to the terminal and to ``gpu-check.log``; the summary is
``gpu-check.json`` and ``gpu-check.md`` in ``$OUT`` (the device tool's result folder) or, where
``$OUT`` is unset, in ``runs/gpu-check-MODE-TIME/``. Where no framework can compute on a GPU the
GPU steps are skipped with a message (exit 0); ``--cpu-smoke`` runs the same steps on CPU at tiny
sizes, and ``--prepare`` (run on the CPU machine, before the device call) copies Fashion-MNIST and
pytest's wheels into ``.gpu-carry/``, the one folder the device call carries.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a file: the project's own modules come from this tree

from common.backend import BACKENDS, PLAIN_MODULE, capabilities, training_backends  # noqa: E402
from common.bench import plain_min_input  # noqa: E402
from common.cli_args import OneLineErrorParser  # noqa: E402
from common.data import FILES, DataError, FashionMNIST, locate  # noqa: E402
from common.io import atomic_path, write_text_atomic  # noqa: E402

CARRY = ROOT / ".gpu-carry"
CARRY_DATA = CARRY / "fashion-mnist"
CARRY_WHEELS = CARRY / "wheels"
CARRY_LIMIT_BYTES = 64 * 2**20  # the device tool's limit for everything that travels
# pytest and what it needs on Python 3.12 (exceptiongroup and tomli only before 3.11): pure-Python wheels
PYTEST_WHEELS = ("pytest", "pluggy", "iniconfig", "packaging", "pygments")
DEVICE_PYTHON = "3.12"
RUN_TIMEOUT_S = 580  # the run call's timeout_s: the 530 s budget, the interpreter's start-up, margin
RUN_CALL = f'run(command="bash scripts/gpu-check.sh", carry=[".gpu-carry"], timeout_s={RUN_TIMEOUT_S})'
SUMMARY_JSON, SUMMARY_MD, LOG, ARCHIVE = "gpu-check.json", "gpu-check.md", "gpu-check.log", "gpu-check-runs.tar.gz"
CURVES = "train-curves-{backend}.png"  # each recipe's training curves
BOOK_TEST_ACC, BOOK_RANGE = 0.88, (0.86, 0.89)  # D2L 8.1 after 10 epochs (docs/training.md: "What to expect")
# (precision, math mode), most wanted first: the last are skipped first when time runs short.
# Under bf16 autocast the products run in bf16 whatever the math mode, so bf16/fp32 comes last.
BENCH_CONFIGS = (("fp32", "fp32"), ("fp32", "tf32"), ("bf16", "tf32"), ("bf16", "fp32"))
# The ablation, run after the book's recipes with whatever time is left, at one batch size on synthetic
# data: each speed-up flipped against the default; at fp32 also the book's plain code (`--baseline`
# runs float32 only).
ABLATE_CONFIGS = (("fp32", "tf32"), ("bf16", "tf32"))
# In this order: the ablation and the profile get what time the recipes leave.
STEPS = ("tests", "bench", "train", "ablate", "kernels")
# Run in the time left: their runs left out for want of it are said, not failures.
OPTIONAL_STEPS = ("ablate", "kernels")
PROFILE_CONFIG = ("bf16", "tf32")  # the profiled step: the precision whose MFU target is not met yet
PROFILE_SCRIPT = "benchmarks/profile_{backend}.py"  # a backend's kernel profile, where it has one
BACKEND_TESTS = "tests/test_backend_{backend}.py"  # a backend's own test module, left out where it cannot import
TRAIN_MATH = "tf32"  # the math mode of the training run, where `alexnet train` has --math
EVAL_SHARE = 0.1  # an epoch's evaluation (10,000 forward passes) against its 60,000 training steps
# The recipe's first run: two epochs, so that the second, free of compilation and warm-up, gives the
# time of the epochs still to come (the first one's includes compiling the step: XLA, torch.compile).
FIRST_RUN_EPOCHS = 2
FINISH_RESERVE_S = 20  # kept back from the budget for the summary and the archive
GRACE_S = 30  # the training is interrupted this long before its deadline: it finishes its step and saves
BENCH_MIN_S = 10  # the least a bench run is given (before one has run, the estimate)
ABLATE_WORKER_S = 15  # an ablation variant's seconds where no bench run of its backend has measured one
PROBE_TIMEOUT_S = 150  # importing a framework and proving its GPU, in a child


@dataclass(frozen=True)
class Profile:
    """Sizes and time of one kind of run: the real GPU check, or its CPU smoke test."""

    name: str
    device: str
    budget_s: int  # the whole check
    tests_max_s: int  # the GPU tests' share at most
    # Kept for each backend's recipe: the bench stops starting configurations when less than this times
    # the number of backends is left, and each recipe leaves this much for every later one.
    recipe_reserve_s: int
    bench_batches: tuple[int, ...]
    bench_input: int
    bench_steps: int
    bench_warmup: int
    ablate_batch: int
    train_epochs: int
    train_batch: int
    train_input: int
    limit_train: int | None = None
    limit_test: int | None = None


# The plan on an H200 with PyTorch and JAX, 530 s in all (under 9 minutes). Measured with PyTorch alone
# (2026-12-04): tests 16 s, a bench configuration 22-38 s, the recipe ~75 s. Not measured yet: JAX's
# runs, which compile their steps (each bench worker, and both runs of the recipe). Probe ~15 s; tests
# at most 100 s; bench until 2 x 100 s are left for the recipes (fp32/fp32, fp32/tf32 and bf16/tf32 for
# both if a configuration of the two takes ~65 s; bf16/fp32 if time is left); recipes, PyTorch's until
# 100 s are left for JAX's; ablation and kernel profile in what is left; 20 s for the summary.
GPU = Profile("gpu", "gpu", budget_s=530, tests_max_s=100, recipe_reserve_s=100, bench_batches=(128, 256),
              bench_input=224, bench_steps=20, bench_warmup=3, ablate_batch=256, train_epochs=10, train_batch=128,
              train_input=224)
# The same steps at the smallest sizes, so the script's logic and its summary are tested on CPU (the
# bench's input the smallest the book's plain code takes, for the ablation's --baseline; three epochs,
# so that the recipe's resumed run happens).
SMOKE = Profile("cpu-smoke", "cpu", budget_s=900, tests_max_s=300, recipe_reserve_s=60, bench_batches=(8,),
                bench_input=plain_min_input(), bench_steps=1, bench_warmup=0, ablate_batch=8, train_epochs=3,
                train_batch=128, train_input=65, limit_train=256, limit_test=256)


# ---------------------------------------------------------------- running children
class Log:
    """Everything printed, to the terminal and to the log file."""

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "a", buffering=1, encoding="utf-8", errors="replace")
        self._lock = threading.Lock()

    def write(self, text: str) -> None:
        with self._lock:
            sys.stdout.write(text)
            sys.stdout.flush()
            self._file.write(text)

    def say(self, line: str) -> None:
        self.write(f"gpu-check: {line}\n")

    def close(self) -> None:
        self._file.close()


@dataclass
class Outcome:
    returncode: int | None
    seconds: float
    timed_out: bool


def python_env(extra_path: Path | None = None) -> dict[str, str]:
    """This environment with the source tree (and ``extra_path``) first on the import path."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    parts = [str(ROOT), *([str(extra_path)] if extra_path else []), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in parts if p)
    return env


def run_logged(label: str, command: list[str], log: Log, *, deadline: float, interrupt: bool = False,
               env: dict[str, str] | None = None) -> Outcome:
    """Run ``command`` in the repository root, its output into ``log``. At ``deadline`` its whole
    process group gets SIGINT (``interrupt``: the trainer then saves after its step and stops)
    and GRACE_S later SIGKILL, or SIGKILL at once; workers it started go with it."""
    log.write(f"$ {' '.join(command)}\n")
    began = time.monotonic()
    process = subprocess.Popen(command, cwd=ROOT, env=env or python_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
    pump = threading.Thread(target=lambda: [log.write(line) for line in process.stdout], daemon=True)
    pump.start()
    timed_out = False
    try:
        process.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        timed_out = True
        log.say(f"time is up: {'interrupting (SIGINT)' if interrupt else 'stopping'} {label}")
        if interrupt:
            _signal_group(process, signal.SIGINT)
            try:
                process.wait(timeout=GRACE_S - 5)
            except subprocess.TimeoutExpired:
                pass
        _signal_group(process, signal.SIGKILL)
        process.wait()
    except BaseException:
        _signal_group(process, signal.SIGKILL)
        raise
    pump.join(timeout=5)
    return Outcome(process.returncode, time.monotonic() - began, timed_out)


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


def capture(command: list[str], env: dict[str, str] | None = None, timeout: float = 120) -> tuple[int, str]:
    result = subprocess.run(command, cwd=ROOT, env=env or python_env(), capture_output=True, text=True,
                            timeout=timeout, errors="replace")
    return result.returncode, result.stdout + result.stderr


# ---------------------------------------------------------------- what is there
# Run in a child per backend (this process holds no framework and no GPU memory): whether the backend
# imports, whether its framework computes on the GPU (``gpu_status``: a convolution forward and backward
# there, asked only with argv[2] "gpu" and where its record lists a GPU), and its runtime as it reports it.
PROBE = """
import json, sys
from common.backend import capabilities, load_backend
from common.errors import first_line
name, device = sys.argv[1], sys.argv[2]
info = {"framework": capabilities(name).framework}
try:
    backend = load_backend(name)
except Exception as error:  # ImportError, or a framework that breaks on import (a numpy it was not built for)
    info.update(importable=False, reason=first_line(error))
else:
    info["importable"] = True
    if device == "gpu" and "gpu" in backend.CAPABILITIES.devices:
        status = backend.gpu_status()
        info.update(gpu_usable=status.usable, gpu_detail=status.detail, gpu_present=status.present)
    try:
        info["runtime"] = backend.runtime_info("gpu" if info.get("gpu_usable") else "cpu")
    except Exception as error:
        info["runtime"] = {"error": first_line(error)}
print("PROBE " + json.dumps(info, default=str))
"""


def probe_backend(name: str, device: str) -> dict:
    """What the PROBE child says of backend ``name`` (or why it said nothing)."""
    try:
        code, out = capture([sys.executable, "-c", PROBE, name, device], timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"framework": capabilities(name).framework, "importable": False,
                "reason": f"the probe did not finish in {PROBE_TIMEOUT_S} s"}
    line = next((line for line in out.splitlines() if line.startswith("PROBE ")), None)
    if line is None:
        tail = [text for text in out.splitlines() if text.strip()][-1:]
        return {"framework": capabilities(name).framework, "importable": False,
                "reason": f"the probe failed (exit {code}){': ' + tail[0].strip() if tail else ''}"}
    return json.loads(line[len("PROBE "):])


def probe(log: Log, device: str) -> dict:
    """Versions, the GPU and every backend of the registry, each asked in its own child, at once."""
    import platform

    import numpy

    from common.bench import machine_environment

    info = {"machine": machine_environment(), "python": platform.python_version(), "numpy": numpy.__version__}
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(BACKENDS)) as pool:
        found = dict(zip(BACKENDS, pool.map(lambda name: probe_backend(name, device), BACKENDS)))
    info["backends"] = found
    usable = [info for info in found.values() if info.get("gpu_usable")]
    info["gpu_available"] = bool(usable)
    if usable:
        info["gpu"] = usable[0]["gpu_detail"]
    if shutil.which("nvidia-smi"):
        code, out = capture(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
        info["nvidia_smi"] = out.strip() if code == 0 else f"exit {code}: {out.strip()[:200]}"
    return info


def choose_backends(env: dict, device: str, asked: list[str] | None) -> tuple[list[str], dict[str, str]]:
    """The backends the check runs, from the probe: those of ``asked`` (default: every backend that
    trains) whose record lists a GPU, whose framework imports, and, on the GPU, computes there; and
    why each other one is left out."""
    chosen, left_out = [], {}
    for name in asked or training_backends():
        record, info = capabilities(name), env["backends"].get(name, {})
        if not record.trains:
            left_out[name] = f"{record.framework} runs inference only"
        elif "gpu" not in record.devices:
            left_out[name] = f"{record.framework}'s backend lists no GPU"
        elif not info.get("importable"):
            left_out[name] = info.get("reason") or f"{record.framework} does not import here"
        elif device == "gpu" and not info.get("gpu_usable"):
            left_out[name] = f"{record.framework} cannot compute on a GPU here: {info.get('gpu_detail')}"
        else:
            chosen.append(name)
    return chosen, left_out


def default_tests(env: dict) -> tuple[str, ...]:
    """``tests``, less the own module of each backend whose framework does not import here."""
    ignored = [BACKEND_TESTS.format(backend=name) for name, info in env["backends"].items()
               if not info.get("importable") and (ROOT / BACKEND_TESTS.format(backend=name)).is_file()]
    return ("tests", *(f"--ignore={path}" for path in ignored))


def has_plain(backend: str) -> bool:
    """Whether the backend's package holds the book's plain code (what ``bench --baseline`` runs)."""
    return (ROOT / BACKENDS[backend] / f"{PLAIN_MODULE}.py").is_file()


def has_flag(subcommand: str, flag: str) -> bool:
    """Whether ``alexnet SUBCOMMAND`` takes ``flag`` (so the check runs before and after it is added)."""
    code, out = capture([sys.executable, "-m", "common", subcommand, "--help"])
    return code == 0 and flag in out.split()


# ---------------------------------------------------------------- the steps
class Check:
    def __init__(self, profile: Profile, work: Path, dest: Path, data_dir: Path | None, budget_s: float,
                 tests: tuple[str, ...] | None = None, configs: tuple[tuple[str, str], ...] = BENCH_CONFIGS,
                 ablate_configs: tuple[tuple[str, str], ...] = ABLATE_CONFIGS, backends: list[str] | None = None):
        self.profile, self.work, self.dest, self.data_dir = profile, work, dest, data_dir
        self.test_args, self.configs, self.ablate_configs = tests, configs, ablate_configs
        self.asked = backends  # None: every backend that can (chosen from the probe)
        self.backends: list[str] = list(backends or [])
        self.worker_s: dict[str, float] = {}  # a bench worker's seconds per backend, measured by the bench
        self.started = time.time()
        self.start = time.monotonic()
        self.budget_s = budget_s
        self.deadline = self.start + budget_s - FINISH_RESERVE_S
        self.log = Log(work / LOG)
        self.notes: list[str] = []
        self.summary: dict = {
            "mode": profile.name, "run_call": RUN_CALL, "budget_s": budget_s,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started)),
            "data_dir": str(data_dir) if data_dir else None,
        }

    def left(self, until: float | None = None) -> float:
        return (until or self.deadline) - time.monotonic()

    def note(self, text: str) -> None:
        self.notes.append(text)
        self.log.say(text)

    def data_args(self) -> list[str]:
        return ["--data-dir", str(self.data_dir)] if self.data_dir else []

    # ------------------------------------------------------------ 1. tests
    def tests(self) -> dict:
        env = None
        if capture([sys.executable, "-c", "import pytest"])[0] != 0:
            env = self._install_pytest()
            if env is None:
                return {"status": "skipped", "reason": self.notes[-1]}
        junit = self.work / "pytest.xml"
        # a module that cannot be collected (a framework's API moved) is an error in the report, and the others run
        command = [sys.executable, "-m", "pytest", "-q", "-rs", "-m", "gpu", "-p", "no:cacheprovider",
                   "--continue-on-collection-errors", f"--junitxml={junit}",
                   *(self.test_args or default_tests(self.summary["environment"]))]
        env = env or python_env()
        if self.data_dir:
            env["ALEXNET_DATA_DIR"] = str(self.data_dir)
        # SIGINT at the deadline: pytest stops the test it is in and still writes its JUnit report
        outcome = run_logged("the tests", command, self.log, interrupt=True, env=env,
                             deadline=time.monotonic() + min(self.profile.tests_max_s, self.left()))
        result = {"command": " ".join(command[1:]), "seconds": round(outcome.seconds, 1),
                  "exit_code": outcome.returncode, **junit_counts(junit)}
        if outcome.timed_out:
            result["status"] = "timed out"
            self.note(f"tests: stopped after {outcome.seconds:.0f} s")
        else:
            result["status"] = "passed" if outcome.returncode == 0 else "failed"
        return result

    def _install_pytest(self) -> dict[str, str] | None:
        wheels = sorted(CARRY_WHEELS.glob("*.whl"))
        if not wheels:
            self.note(f"tests: skipped, pytest is not installed and {CARRY_WHEELS.relative_to(ROOT)} holds no "
                      "wheels (run scripts/gpu-check.sh --prepare before the device call)")
            return None
        site = self.work / "site"
        command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                   "--target", str(site), *map(str, wheels)]
        outcome = run_logged("pip install", command, self.log, deadline=time.monotonic() + 60)
        if outcome.returncode != 0:
            self.note(f"tests: skipped, installing pytest from {CARRY_WHEELS.relative_to(ROOT)} failed "
                      f"(exit {outcome.returncode})")
            return None
        self.log.say(f"pytest installed from {len(wheels)} carried wheels into {site}")
        return python_env(site)

    # ------------------------------------------------------------ 2. bench
    def bench(self) -> dict:
        """Each configuration for every backend, side by side; a configuration starts only when the
        time for all the backends' runs (as the last ones took) is left before the recipes' reserve."""
        p = self.profile
        math_flag = has_flag("bench", "--math")
        configs = self.configs if math_flag else tuple(dict.fromkeys((prec, None) for prec, _ in self.configs))
        if not math_flag:
            self.note("bench: `alexnet bench` has no --math flag yet: each precision ran once, in the math mode "
                      "the trainer leaves")
        reserve = p.recipe_reserve_s * len(self.backends)
        until = self.deadline - reserve
        runs, last = [], {}
        for precision, math_mode in configs:
            label = f"{precision}/{math_mode or 'default'}"
            need = sum(max(last.get(b, 0.0), BENCH_MIN_S) for b in self.backends)
            left = self.left(until)
            if left < need:
                runs += [{"backend": b, "precision": precision, "math": math_mode, "status": "skipped"}
                         for b in self.backends]
                self.note(f"bench {label}: skipped, {max(left, 0):.0f} s were left before the {reserve} s kept for "
                          f"the recipes" + (f" and its runs took {need:.0f} s last time" if last else ""))
                continue
            for backend in self.backends:
                folder = f"bench-{backend}-{precision}-{math_mode or 'default'}"
                run = self._bench_run(f"bench {backend} {label}", folder, backend, precision, math_mode,
                                      p.bench_batches, [], until)
                last[backend] = run["seconds"]
                if run["status"] == "ok":
                    self.worker_s[backend] = run["seconds"] / len(p.bench_batches)
                runs.append(run)
        return {"status": runs_status(runs), "math_flag": math_flag, "backends": list(self.backends), "runs": runs}

    def _bench_run(self, label: str, folder: str, backend: str, precision: str, math_mode: str | None,
                   batches: tuple[int, ...], extra: list[str], until: float, data: str | None = None) -> dict:
        """One `alexnet bench --backends BACKEND` invocation, stopped at ``until``; its rows, or why none."""
        p = self.profile
        out = self.work / folder
        command = [sys.executable, "-m", "common", "bench", "--backends", backend, "--device", p.device,
                   "--precision", precision, *(["--math", math_mode] if math_mode else []),
                   "--batch-sizes", ",".join(map(str, batches)), "--input-size", str(p.bench_input),
                   "--steps", str(p.bench_steps), "--warmup", str(p.bench_warmup),
                   "--data", data or ("synthetic,real" if self.data_dir else "synthetic"),
                   *self.data_args(), *extra,
                   "--timeout", str(max(int(self.left(until)), 1)), "--out", str(out)]
        outcome = run_logged(label, command, self.log, deadline=until)
        run = {"backend": backend, "precision": precision, "math": math_mode, "command": " ".join(command[1:]),
               "seconds": round(outcome.seconds, 1), "exit_code": outcome.returncode}
        if outcome.timed_out:
            run["status"] = "timed out"
            self.note(f"{label}: stopped after {outcome.seconds:.0f} s, at its deadline")
        elif outcome.returncode != 0 or not (out / "bench.json").is_file():
            run["status"] = "failed"
        else:
            run.update(status="ok", rows=bench_rows(json.loads((out / "bench.json").read_text())))
        return run

    # ------------------------------------------------------------ 3. train
    def train(self) -> dict:
        """The book's recipe for each backend in turn, each leaving ``recipe_reserve_s`` for every later one."""
        runs = []
        for index, backend in enumerate(self.backends):
            later = len(self.backends) - index - 1
            # SIGINT then: the trainer saves after its step, within GRACE_S
            until = self.deadline - GRACE_S - self.profile.recipe_reserve_s * later
            runs.append(self.recipe(backend, until))
        return {"status": runs_status(runs), "runs": runs}

    def recipe(self, backend: str, until: float) -> dict:
        p = self.profile
        run_dir = self.work / f"train-{backend}"
        math_flag = has_flag("train", "--math")
        base = [sys.executable, "-m", "common", "train", "--backend", backend, "--device", p.device,
                "--lr", "0.01", "--batch-size", str(p.train_batch), "--input-size", str(p.train_input),
                "--run-dir", str(run_dir), "--no-progress", *self.data_args(),
                *(["--math", TRAIN_MATH] if math_flag else []),
                *(["--limit-train", str(p.limit_train)] if p.limit_train else []),
                *(["--limit-test", str(p.limit_test)] if p.limit_test else [])]
        result = {"backend": backend, "framework": capabilities(backend).framework, "epochs_target": p.train_epochs,
                  "batch_size": p.train_batch, "input_size": p.train_input,
                  "lr": 0.01, "precision": "fp32", "math": TRAIN_MATH if math_flag else None,
                  "limit_train": p.limit_train, "limit_test": p.limit_test,
                  "book_test_acc": BOOK_TEST_ACC, "book_range": list(BOOK_RANGE), "commands": []}
        if not math_flag:
            self.note(f"train {backend}: `alexnet train` has no --math flag yet: the math mode the trainer leaves")
        if self.data_dir is None:
            return self._train_result(result, run_dir, "skipped", f"train {backend}: skipped, no Fashion-MNIST (run "
                                      "scripts/gpu-check.sh --prepare before the device call)")
        first_epochs = min(FIRST_RUN_EPOCHS, p.train_epochs)
        first = base + ["--epochs", str(first_epochs)]
        result["commands"].append(" ".join(first[1:]))
        what = f"{backend}: epoch{'s 1-' if first_epochs > 1 else ' '}{first_epochs}"
        outcome = run_logged(f"training {what}", first, self.log, deadline=until, interrupt=True)
        rows = read_rows(run_dir)
        if outcome.timed_out:
            return self._train_result(result, run_dir, "timed out",
                                      f"train {what} did not finish in the {outcome.seconds:.0f} s left")
        if outcome.returncode != 0 or len(rows) < first_epochs:
            return self._train_result(result, run_dir, "failed", f"train {what} failed (exit {outcome.returncode})")
        epoch_s = rows[-1]["seconds"]
        planned = plan_epochs(p.train_epochs, done=len(rows), first_wall_s=outcome.seconds, epoch_s=epoch_s,
                              left_s=self.left(until))
        result["epochs_planned"] = planned
        if planned < p.train_epochs:
            result["shortened"] = (
                f"fewer epochs than the recipe's {p.train_epochs}: the first {len(rows)} took {outcome.seconds:.0f} s "
                f"with start-up (the last {epoch_s:.0f} s of training, {rows[-1]['images_per_s']:.0f} img/s), so "
                f"{planned} epoch(s) fit the {self.left(until):.0f} s left to this recipe of the {self.budget_s:.0f} s "
                "budget")
            self.note(f"train {backend}: {result['shortened']}")
        status, reason = ("ok" if planned == p.train_epochs else "partial"), None
        if planned > len(rows):
            more = base + ["--epochs", str(planned), "--resume"]
            result["commands"].append(" ".join(more[1:]))
            outcome = run_logged(f"training {backend}: epochs {len(rows) + 1}-{planned}", more, self.log,
                                 deadline=until, interrupt=True)
            if outcome.timed_out:
                status, reason = "partial", (f"train {backend}: interrupted at the deadline, after the last whole "
                                             "epoch (the estimate from the first run was too low)")
            elif outcome.returncode != 0:
                status, reason = "failed", f"train {backend}: the resumed run failed (exit {outcome.returncode})"
        return self._train_result(result, run_dir, status, reason)

    def _train_result(self, result: dict, run_dir: Path, status: str, reason: str | None) -> dict:
        if reason:
            self.note(reason)
        rows = read_rows(run_dir)
        result.update(status=status, rows=rows, epochs_done=len(rows))
        if rows:
            last = rows[-1]
            later = [r["images_per_s"] for r in rows[1:]] or [rows[0]["images_per_s"]]
            result.update(test_acc=last["test_acc"], test_loss=last["test_loss"], train_loss=last["train_loss"],
                          images_per_s_first_epoch=rows[0]["images_per_s"],
                          images_per_s=sorted(later)[len(later) // 2])
            full = len(rows) == result["epochs_target"] and not result["limit_train"]
            result["comparable_to_book"] = full
            result["within_book_range"] = full and last["test_acc"] >= BOOK_RANGE[0]
        if (run_dir / "curves.png").is_file():
            result["curves"] = CURVES.format(backend=result["backend"])
            shutil.copyfile(run_dir / "curves.png", self.dest / result["curves"])
        return result

    # ------------------------------------------------------------ 4. ablate
    def ablate(self) -> dict:
        """`alexnet bench --ablate` (and `--baseline` at fp32) at one batch size, in the time the
        recipes left, for each backend where its estimated time fits: what each speed-up and the
        library itself are worth on this device."""
        p = self.profile
        runs = []
        for precision, math_mode in self.ablate_configs:
            for backend in self.backends:
                label = f"ablate {backend} {precision}/{math_mode}"
                baseline = precision == "fp32" and has_plain(backend)
                variants = 1 + baseline + sum(p.device in s.devices for s in capabilities(backend).speed_ups)
                need = variants * self.worker_s.get(backend, ABLATE_WORKER_S)
                if self.left() < need:
                    runs.append({"backend": backend, "precision": precision, "math": math_mode, "status": "skipped"})
                    self.note(f"{label}: skipped, {max(self.left(), 0):.0f} s were left and its {variants} runs "
                              f"take about {need:.0f} s")
                    continue
                extra = ["--ablate", *(["--baseline"] if baseline else [])]
                runs.append(self._bench_run(label, f"ablate-{backend}-{precision}-{math_mode}", backend, precision,
                                            math_mode, (p.ablate_batch,), extra, self.deadline, data="synthetic"))
        return {"status": runs_status(runs), "runs": runs}

    # ------------------------------------------------------------ 5. kernels
    def kernels(self) -> dict:
        """Where one training step's device time goes (``benchmarks/profile_NAME.py``, for each backend
        that has one) at the ablation's batch size, in the time left: the next round of speed work."""
        runs = [self._profile(backend) for backend in self.backends
                if (ROOT / PROFILE_SCRIPT.format(backend=backend)).is_file()]
        return {"status": runs_status(runs), "runs": runs}

    def _profile(self, backend: str) -> dict:
        p = self.profile
        precision, math_mode = PROFILE_CONFIG
        command = [sys.executable, str(ROOT / PROFILE_SCRIPT.format(backend=backend)), "--device", p.device,
                   "--precision", precision, "--math", math_mode, "--batch", str(p.ablate_batch),
                   "--input-size", str(p.bench_input), "--steps", str(max(p.bench_steps // 2, 1)),
                   "--warmup", str(p.bench_warmup), "--top", "15"]
        result = {"backend": backend, "precision": precision, "math": math_mode, "batch_size": p.ablate_batch,
                  "command": " ".join(command[1:])}
        if self.left() < 30:
            self.note(f"kernels {backend}: skipped, {max(self.left(), 0):.0f} s were left")
            return {**result, "status": "skipped"}
        self.log.write(f"$ {' '.join(command)}\n")
        try:
            code, out = capture(command, timeout=self.left())
        except subprocess.TimeoutExpired:
            self.note(f"kernels {backend}: the profile stopped at the deadline")
            return {**result, "status": "timed out"}
        lines = [line for line in out.splitlines() if line.strip() and not line.startswith(("USDT", "/", "  _warn"))]
        self.log.write("\n".join(lines) + "\n")
        return {**result, "status": "ok" if code == 0 else "failed", "exit_code": code, "lines": lines}

    # ------------------------------------------------------------ all of it
    def run(self) -> int:
        s = self.summary
        self.log.say(f"{self.profile.name} mode, budget {self.budget_s:.0f} s, work folder {self.work}, "
                     f"summary to {self.dest}")
        s["environment"] = env = probe(self.log, self.profile.device)
        self.log.say("environment: " + json.dumps({k: v for k, v in env.items() if k != "machine"}))
        self.backends, left_out = choose_backends(env, self.profile.device, self.asked)
        s["backends"], s["backends_left_out"] = self.backends, left_out
        s["step_seconds"] = {"probe": round(time.monotonic() - self.start, 1)}
        for name, why in left_out.items():
            self.log.say(f"backend {name} left out: {why}")
        if self.asked:
            for name in self.asked:
                if name in left_out:
                    self.note(f"{name} was asked for but is left out: {left_out[name]}")
        if self.profile.device == "gpu" and not self.backends:
            why = "; ".join(left_out.values()) or "no backend asked for"
            self.note(f"no GPU here ({why}): the GPU steps (tests -m gpu, bench --device gpu, the book's recipe "
                      "on the GPU) are skipped; --cpu-smoke runs the same steps on CPU at tiny sizes")
            s["status"] = "skipped"
            return 0
        if not self.backends:
            self.note("no backend can run here: " + "; ".join(f"{n}: {r}" for n, r in left_out.items()))
            s["status"] = "failed"
            return 1
        self.log.say(f"backends: {', '.join(self.backends)}")
        if self.data_dir is not None:
            try:
                self.data_dir = locate(self.data_dir, download_missing=False)
            except DataError as error:
                self.note(f"{error}: the bench runs on synthetic data only and the training is skipped")
                self.data_dir = None
        s["data_dir"] = str(self.data_dir) if self.data_dir else None
        for step in STEPS:
            self.log.say(f"--- {step} ({self.left():.0f} s left)")
            began = time.monotonic()
            s[step] = getattr(self, step)()
            s["step_seconds"][step] = round(time.monotonic() - began, 1)
        states = {s[step]["status"] for step in STEPS}
        # complete: every required step ran whole; an optional one may have left runs out for want of time
        whole = all(s[step]["status"] in {"ok", "passed"} or (step in OPTIONAL_STEPS and all(
            run["status"] in {"ok", "skipped"} for run in s[step].get("runs", []))) for step in STEPS)
        s["status"] = "failed" if "failed" in states else "complete" if whole else "partial"
        return 1 if s["status"] == "failed" else 0

    def finish(self) -> None:
        self.summary.update(seconds=round(time.time() - self.started, 1), notes=self.notes)
        self.summary.setdefault("status", "interrupted")
        write_text_atomic(self.dest / SUMMARY_JSON, json.dumps(self.summary, indent=2) + "\n")
        write_text_atomic(self.dest / SUMMARY_MD, markdown(self.summary))
        self.log.say(f"summary: {self.dest / SUMMARY_JSON}, {self.dest / SUMMARY_MD} (status {self.summary['status']})")
        self.log.close()
        if self.dest != self.work:
            shutil.copyfile(self.work / LOG, self.dest / LOG)
            archive(self.work, self.dest / ARCHIVE)


# ---------------------------------------------------------------- reading results
def plan_epochs(target: int, *, done: int, first_wall_s: float, epoch_s: float, left_s: float) -> int:
    """How many epochs in all (at least the ``done`` ones, at most ``target``) fit in ``left_s``,
    from the first run: ``done`` epochs in ``first_wall_s`` for the whole process, the last of them
    ``epoch_s`` of training (its metrics; the first epoch's time includes compiling the step). An
    epoch is its training plus EVAL_SHARE for the test set; the rest of the first run's wall time
    (start-up, loading the data, compiling) is paid again by the resumed run."""
    epoch_s = max(epoch_s * (1 + EVAL_SHARE), 1e-3)
    startup_s = max(first_wall_s - done * epoch_s, 0.0)
    more = math.floor((left_s - startup_s) / epoch_s)
    return max(done, min(target, done + more))


def runs_status(runs: list[dict]) -> str:
    """A step's status from its runs': ok only if every one is (none asked for: ok)."""
    states = {r["status"] for r in runs}
    return ("ok" if states <= {"ok"} else "failed" if "failed" in states else "skipped" if states == {"skipped"}
            else "partial")


def read_rows(run_dir: Path) -> list[dict]:
    """The per-epoch rows of a run's metrics.json ({"config", "sessions", "epochs"})."""
    try:
        return json.loads((run_dir / "metrics.json").read_text())["epochs"]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def junit_counts(path: Path) -> dict[str, int]:
    """passed/failed/errors/skipped from pytest's JUnit XML (empty if it wrote none)."""
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError):
        return {}
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["skip_reasons"] = sorted({s.get("message", "") for s in suite.iter("skipped")})
    return counts


def bench_rows(payload: dict) -> list[dict]:
    """The figures of each bench row that the summary reports."""
    rows = []
    for r in payload["results"]:
        train = r["train_images_per_s"]  # empty for a backend that runs inference only
        headline = train.get("synthetic") or train.get("real")
        env = r.get("environment", {})
        rows.append({
            "backend": r["backend"], "batch_size": r["batch_size"], "variant": r["variant"], "device": r["device"],
            "device_name": env.get("gpu") or payload["environment"].get("cpu"),
            "train_images_per_s": headline["median"] if headline else None,
            "train_images_per_s_real": train["real"]["median"] if "real" in train else None,
            "real_over_synthetic": r.get("real_over_synthetic"),
            "inference_images_per_s": r["inference_images_per_s"]["median"],
            "mfu": r["mfu"], "peak_gflops": r["peak_gflops"], "peak_op": r["peak_op"],
            "over_plain": r.get("over_plain"),
            "first_step_s": r["first_step_s"], "peak_device_bytes": r.get("peak_device_bytes"),
            "options": r.get("options"),
        })
    return rows


def archive(work: Path, path: Path) -> None:
    """The work folder (bench JSON and logs, metrics, steps) without checkpoints or installed packages."""
    skip = {"checkpoint.npz", "site", LOG}

    def keep(info: tarfile.TarInfo):
        return None if set(Path(info.name).parts) & skip else info

    with atomic_path(path) as tmp, tarfile.open(tmp, "w:gz") as tar:
        tar.add(work, arcname=work.name, filter=keep)


# ---------------------------------------------------------------- the summary in words
def _table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    lines += ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _fmt(value, spec: str = ".1f") -> str:
    return "" if value is None else format(value, spec)


def _runtime(info: dict) -> str:
    """A backend's framework and version, and the CUDA it runs on where it says."""
    runtime = info.get("runtime") or {}
    cuda = ", ".join(f"{key} {runtime[key]}" for key in ("cuda", "cudnn") if runtime.get(key))
    return (runtime.get("framework") or info.get("framework", "?")) + (f" (CUDA {cuda})" if cuda else "")


def markdown(s: dict) -> str:
    env = s.get("environment", {})
    device = env.get("gpu") or env.get("machine", {}).get("cpu", "?")
    backends = s.get("backends") or []
    frameworks = [_runtime(info) for name, info in env.get("backends", {}).items() if name in backends]
    out = [f"# GPU check ({s['mode']}): {s['status']}", "",
           f"{device}; started {s['started']}, {s.get('seconds', 0):.0f} s of a {s['budget_s']:.0f} s budget.",
           f"Python {env.get('python')}, numpy {env.get('numpy')}"
           + (f", {', '.join(frameworks)}" if frameworks else "")
           + (f"; nvidia-smi: {env['nvidia_smi']}" if env.get("nvidia_smi") else "") + ".",
           f"The device call: `{s['run_call']}`.", ""]
    if backends or s.get("backends_left_out"):
        out += [f"Backends run: {', '.join(backends) or 'none'}."]
        out += [f"- left out: {name}: {why}" for name, why in (s.get("backends_left_out") or {}).items()]
        out += [""]
    if s.get("step_seconds"):
        out += ["Seconds per step: " + ", ".join(f"{k} {v:.0f}" for k, v in s["step_seconds"].items()) + ".", ""]
    tests = s.get("tests")
    if tests:
        out += ["## Tests (`pytest -m gpu`)", "",
                f"{tests['status']}: {tests.get('passed', '?')} passed, {tests.get('failures', '?')} failed, "
                f"{tests.get('errors', '?')} errors, {tests.get('skipped', '?')} skipped "
                f"({_fmt(tests.get('seconds'), '.0f')} s).", ""]
        out += [f"- skipped: {reason}" for reason in tests.get("skip_reasons", [])] + [""]
    bench = s.get("bench")
    if bench:
        first = (bench.get("backends") or [None])[0]
        cells: dict[tuple, list] = {}  # (precision, math, batch) -> rows of each backend, side by side
        for run in bench["runs"]:
            key = (run["precision"], run["math"] or "default")
            for r in run.get("rows", []):
                cells.setdefault((*key, r["batch_size"]), []).append(r)
            if not run.get("rows"):
                cells.setdefault((*key, ""), []).append({"backend": run["backend"], "status": run["status"]})
        rows = []
        for (precision, math_mode, batch), found in cells.items():
            reference = next((r for r in found if r["backend"] == first and r.get("train_images_per_s")), None)
            for r in found:
                if "status" in r:
                    rows.append([precision, math_mode, batch, r["backend"], r["status"], "", "", "", "", "", ""])
                    continue
                ratio = (r["train_images_per_s"] / reference["train_images_per_s"]
                         if reference and r.get("train_images_per_s") else None)
                rows.append([precision, math_mode, batch, r["backend"], _fmt(r["train_images_per_s"]),
                             _fmt(ratio, ".2f"), _fmt(r["real_over_synthetic"], ".2f"),
                             _fmt(r["inference_images_per_s"]), _fmt(r["mfu"], ".2f"),
                             _fmt(r["peak_gflops"] / 1000, ".3g"), r["device_name"]])
        out += [f"## Bench (`alexnet bench --backends {','.join(bench.get('backends') or [])}`, one run per backend)",
                "", _table(["precision", "math", "batch", "backend", "train img/s", f"vs {first}", "real/synth",
                            "infer img/s", "MFU", "peak TFLOP/s", "device"], rows), "",
                "MFU: training FLOPs per image x img/s over the matmul peak each framework measured in the same "
                "process and precision" + (" and math mode." if bench["math_flag"] else
                                           " (in the bench's own math mode for the peak: it has no --math yet)."),
                ""]
    train = s.get("train")
    if train and train.get("runs"):
        runs = train["runs"]
        out += ["## The book's recipe (`alexnet train`, 10 epochs, batch 128, lr 0.01, 224x224)", "",
                _table(["backend", "status", "epochs", "test acc", "the book's ~0.88", "train img/s",
                        "epoch 1 img/s"],
                       [[r["backend"], r["status"], f"{r['epochs_done']} of {r['epochs_target']}",
                         _fmt(r.get("test_acc"), ".4f"), _verdict(r), _fmt(r.get("images_per_s"), ".0f"),
                         _fmt(r.get("images_per_s_first_epoch"), ".0f")] for r in runs]), ""]
        for r in runs:
            out += [f"### {r['framework']} (`alexnet train --backend {r['backend']}`)", ""]
            if not r.get("rows"):
                out += [f"{r['status']}: no epoch finished.", ""]
                continue
            out += [f"{r['status']}: {r['epochs_done']} of {r['epochs_target']} epochs, batch {r['batch_size']}, "
                    f"{r['input_size']}x{r['input_size']}, lr {r['lr']}, math {r['math'] or 'default'}: "
                    f"**test accuracy {r['test_acc']:.4f}** (the book: about {BOOK_TEST_ACC}, {BOOK_RANGE[0]}-"
                    f"{BOOK_RANGE[1]} after 10 epochs; {_verdict(r)}), {r['images_per_s']:.0f} training img/s "
                    f"(epoch 1: {r['images_per_s_first_epoch']:.0f})."
                    + (f" **Shortened**: {r['shortened']}." if r.get("shortened") else ""),
                    "", _table(["epoch", "train loss", "train acc", "test loss", "test acc", "img/s", "seconds"],
                               [[e["epoch"], _fmt(e["train_loss"], ".4f"), _fmt(e["train_acc"], ".4f"),
                                 _fmt(e["test_loss"], ".4f"), _fmt(e["test_acc"], ".4f"), _fmt(e["images_per_s"]),
                                 _fmt(e["seconds"])] for e in r["rows"]]), ""]
    ablation = s.get("ablate")
    if ablation and ablation["runs"]:
        rows = []
        for run in ablation["runs"]:
            for r in run.get("rows", []):
                rows.append([run["backend"], run["precision"], run["math"], r["variant"], r["batch_size"],
                             _fmt(r["train_images_per_s"]), _fmt(r["over_plain"], ".2f"),
                             _fmt(r["inference_images_per_s"]), _fmt(r["mfu"], ".2f")])
            if not run.get("rows"):
                rows.append([run["backend"], run["precision"], run["math"], run["status"], "", "", "", "", ""])
        out += ["## Ablation (`alexnet bench --ablate`, synthetic data)", "",
                _table(["backend", "precision", "math", "variant", "batch", "train img/s", "vs plain", "infer img/s",
                        "MFU"], rows), "",
                "Each speed-up flipped against the default; *plain (book)* is the book's own code for that "
                "framework (the backend's _plain.py) in the same math mode, float32 only.", ""]
    for run in (s.get("kernels") or {}).get("runs", []):
        if run.get("lines"):
            out += [f"## Where a {run['precision']} {run['backend']} step's time goes "
                    f"(`{PROFILE_SCRIPT.format(backend=run['backend'])}`, batch {run['batch_size']})", "",
                    "```", *run["lines"], "```", ""]
    if s.get("notes"):
        out += ["## Notes", ""] + [f"- {n}" for n in s["notes"]] + [""]
    return "\n".join(out)


def _verdict(r: dict) -> str:
    if "test_acc" not in r:
        return ""
    if not r.get("comparable_to_book"):
        return "not comparable (fewer epochs or fewer images than the recipe)"
    return "within" if r["within_book_range"] else "outside"


# ---------------------------------------------------------------- --prepare
def carried_bytes() -> int:
    return sum(f.stat().st_size for f in CARRY.rglob("*") if f.is_file()) if CARRY.is_dir() else 0


def tree_bytes() -> int | None:
    """What travels besides .gpu-carry: tracked and untracked-not-ignored files (None without git)."""
    try:
        names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                               capture_output=True, check=True).stdout.split(b"\0")
    except (OSError, subprocess.CalledProcessError):
        return None
    return sum((ROOT / n.decode()).stat().st_size for n in names if n and (ROOT / n.decode()).is_file())


def prepare(data_dir: Path | None) -> int:
    """Copy the four Fashion-MNIST files and pytest's wheels into .gpu-carry/, then say its size."""
    source = find_data(data_dir)
    if data_complete(CARRY_DATA):
        print(f"prepare: {CARRY_DATA.relative_to(ROOT)} already holds Fashion-MNIST (checksums verified)")
    else:
        copy_data(source, CARRY_DATA)
        print(f"prepare: Fashion-MNIST copied from {source} to {CARRY_DATA.relative_to(ROOT)}")
    download_wheels(CARRY_WHEELS)
    size, tree = carried_bytes(), tree_bytes()
    print(f"prepare: {CARRY.relative_to(ROOT)} holds {size / 2**20:.1f} MiB"
          + (f", the working tree {tree / 2**20:.1f} MiB" if tree is not None else "")
          + f" (the device tool carries at most {CARRY_LIMIT_BYTES / 2**20:.0f} MiB in all)")
    if size + (tree or 0) > CARRY_LIMIT_BYTES:
        print("prepare: error: more than the device tool carries; leave out untracked files", file=sys.stderr)
        return 2
    print(f"prepare: done; the device call is {RUN_CALL}")
    return 0


def find_data(data_dir: Path | None) -> Path:
    """--data-dir, $ALEXNET_DATA_DIR, the shared/ folder beside this checkout (where the tests
    look), the user cache, Debian's package: the first that holds all four files."""
    if data_dir is not None:
        return locate(data_dir, download_missing=False)
    beside = ROOT.parent / "shared" / "data" / "fashion-mnist"
    if not os.environ.get("ALEXNET_DATA_DIR") and data_complete(beside, verify=False):
        return beside
    return locate(None, download_missing=False, progress=False)


def data_complete(folder: Path, verify: bool = True) -> bool:
    try:
        locate(folder, download_missing=False)
    except DataError:
        return False
    if verify:
        FashionMNIST.load(folder, download_missing=False, progress=False)  # DataError if a checksum is wrong
    return True


def copy_data(source: Path, dest: Path) -> None:
    """The four files, gzipped as the official ones are, checked, then moved into place at once."""
    import gzip

    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".fashion-mnist-", dir=dest.parent))
    try:
        for spec in FILES.values():
            if (source / spec.name).is_file():
                shutil.copyfile(source / spec.name, staging / spec.name)
            else:  # only the decompressed file (locate accepts either): gzip it, a quarter of the size
                with open(source / spec.raw_name, "rb") as raw, gzip.open(staging / spec.name, "wb") as packed:
                    shutil.copyfileobj(raw, packed)
        FashionMNIST.load(staging, download_missing=False, progress=False)
        if dest.exists():
            shutil.rmtree(dest)
        staging.chmod(0o755)  # mkdtemp made it private
        staging.rename(dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def download_wheels(dest: Path) -> None:
    """pytest and its dependencies as pure-Python wheels for the device's Python (one version each)."""
    staging = Path(tempfile.mkdtemp(prefix=".wheels-", dir=dest.parent))
    try:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--no-deps",
                        "--python-version", DEVICE_PYTHON, "--dest", str(staging), *PYTEST_WHEELS], check=True)
        if dest.exists():
            shutil.rmtree(dest)
        staging.chmod(0o755)  # mkdtemp made it private
        staging.rename(dest)
    except subprocess.CalledProcessError as error:
        if any(dest.glob("*.whl")):
            print(f"prepare: warning: pip download failed (exit {error.returncode}); keeping the wheels already "
                  f"in {dest.relative_to(ROOT)}", file=sys.stderr)
        else:
            print(f"prepare: warning: pip download failed (exit {error.returncode}); the device runs its tests "
                  "only if it has pytest", file=sys.stderr)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"prepare: wheels in {dest.relative_to(ROOT)}: {', '.join(sorted(p.name for p in dest.glob('*.whl')))}")


# ---------------------------------------------------------------- main
def bench_configs(text: str) -> tuple[tuple[str, str], ...]:
    from common.backend import MATH_MODES, PRECISIONS

    if text.strip() == "none":
        return ()
    configs = []
    for part in text.split(","):
        precision, _, math_mode = part.strip().partition(":")
        if precision not in PRECISIONS or math_mode not in MATH_MODES:
            raise argparse.ArgumentTypeError(f"want PRECISION:MATH with PRECISION one of {', '.join(PRECISIONS)} "
                                             f"and MATH one of {', '.join(MATH_MODES)}, got {part!r}")
        configs.append((precision, math_mode))
    return tuple(configs)


def backend_names(text: str) -> list[str]:
    names = list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [name for name in names if name not in training_backends()]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"want backends that train, of {', '.join(training_backends())}; "
                                         f"got {text!r}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = OneLineErrorParser(
        prog="scripts/gpu-check.sh",
        formatter_class=argparse.RawDescriptionHelpFormatter,  # the run call must stay on one line
        description="The prepared GPU check, for every backend whose framework computes on the GPU here: the\n"
                    "GPU tests, alexnet bench on the GPU and the book's recipe on Fashion-MNIST, within a\n"
                    "time budget, with a JSON and Markdown summary.",
        epilog=f"The device call, after --prepare here:\n  {RUN_CALL}")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--prepare", action="store_true",
                      help="on the CPU machine, before the device call: copy Fashion-MNIST and pytest's wheels "
                           "into .gpu-carry/")
    mode.add_argument("--cpu-smoke", action="store_true", help="the same steps on CPU at tiny sizes")
    parser.add_argument("--budget", type=float, metavar="S",
                        help=f"seconds for the whole check (default: {GPU.budget_s} on "
                        f"the GPU, {SMOKE.budget_s} for --cpu-smoke)")
    parser.add_argument("--data-dir", type=Path, help="Fashion-MNIST (default: .gpu-carry/fashion-mnist if "
                        "prepared, else where `alexnet train` finds it)")
    parser.add_argument("--out", type=Path, help="summary folder (default $OUT, else the work folder)")
    parser.add_argument("--work", type=Path, help="folder for the runs' own files (default runs/gpu-check-MODE-TIME)")
    parser.add_argument("--tests", type=shlex.split, metavar="'ARG ...'",
                        help="what pytest -m gpu runs, one quoted string (default: tests, less the own module "
                             f"{BACKEND_TESTS.format(backend='NAME')} of each backend whose framework does not import)")
    parser.add_argument("--backends", type=backend_names, metavar="NAME,...",
                        help="the backends to run, of those that can (default: every backend that trains, lists a GPU "
                             "and, on the GPU, computes there; with --cpu-smoke, that imports here)")
    parser.add_argument("--configs", type=bench_configs, default=BENCH_CONFIGS, metavar="PRECISION:MATH,...",
                        help="bench configurations, most wanted first (default: "
                             + ",".join(f"{p}:{m}" for p, m in BENCH_CONFIGS) + "; none: no bench)")
    parser.add_argument("--ablate-configs", type=bench_configs, default=ABLATE_CONFIGS, metavar="PRECISION:MATH,...",
                        help="ablation configurations, run after the recipes in the time left (default: "
                             + ",".join(f"{p}:{m}" for p, m in ABLATE_CONFIGS) + "; none: no ablation)")
    args = parser.parse_args(argv)
    print(f"gpu-check: the device call: {RUN_CALL} (after scripts/gpu-check.sh --prepare here)", flush=True)
    if args.prepare:
        try:
            return prepare(args.data_dir)
        except (DataError, OSError) as error:
            print(f"gpu-check --prepare: error: {error}", file=sys.stderr)
            return 2
    # Started in the background (as a device tool may), this process can inherit SIGINT ignored, and so
    # would its children: SIGINT is how the tests and the training are stopped at their deadline.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    profile = SMOKE if args.cpu_smoke else GPU
    work = args.work or ROOT / "runs" / f"gpu-check-{profile.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    work.mkdir(parents=True, exist_ok=True)
    dest = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else work)
    dest.mkdir(parents=True, exist_ok=True)
    data_dir = args.data_dir or (CARRY_DATA if CARRY_DATA.is_dir() else None)
    check = Check(profile, work.resolve(), dest.resolve(), data_dir, args.budget or profile.budget_s,
                  tuple(args.tests) if args.tests is not None else None, args.configs, args.ablate_configs,
                  args.backends)
    try:
        return check.run()
    except KeyboardInterrupt:
        check.note("interrupted (Ctrl-C)")
        return 130
    finally:
        check.finish()


if __name__ == "__main__":
    sys.exit(main())
