"""The prepared GPU check that ``scripts/gpu-check.sh`` runs (see that script and docs/gpus.md).

One run, within a time budget (8 minutes on the GPU machine), from the source tree with only
numpy, PyTorch and the standard library (no TensorFlow, MXNet, network or installed project):

1. tests: ``pytest -m gpu tests/`` without TensorFlow's and MXNet's own modules (the GPU tests of
   PyTorch and of the shared code; a test parametrized over backends skips a missing framework);
2. bench: ``alexnet bench --backends pt --device gpu`` at batch 128 and 256 for each
   (precision, math mode) pair, with MFU;
3. train: the book's recipe on Fashion-MNIST at 224x224 (10 epochs, SGD lr 0.01, batch 128),
   first one epoch, then, resumed from its checkpoint, as many more as the time left allows
   (the summary says so when that is fewer than 10), and its test accuracy against the book's;
4. ablate: in the time the recipe left, ``alexnet bench --ablate`` at batch 256 for fp32 (with the
   book's plain PyTorch code, ``--baseline``) and bf16: what channels-last and torch.compile are
   worth on this GPU, and the library against the plain code.
5. kernels: in the time still left, ``benchmarks/profile_pt.py`` on one bf16 step at batch 256:
   the device time by kernel group and the top kernels, for the next round of speed work.

Everything the children print goes to the terminal and to ``gpu-check.log``; the summary is
``gpu-check.json`` and ``gpu-check.md`` in ``$OUT`` (the device tool's result folder) or, where
``$OUT`` is unset, in ``runs/gpu-check-MODE-TIME/``. Where no GPU is visible the GPU steps are skipped
with a message (exit 0); ``--cpu-smoke`` runs the same steps on CPU at tiny sizes, and
``--prepare`` (run on the CPU machine, before the device call) copies Fashion-MNIST and pytest's
wheels into ``.gpu-carry/``, the one folder the device call carries.
"""
from __future__ import annotations

import argparse
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
RUN_TIMEOUT_S = 570  # the run call's timeout_s: the 480 s budget, pytest's install, start-up, margin
RUN_CALL = f'run(command="bash scripts/gpu-check.sh", carry=[".gpu-carry"], timeout_s={RUN_TIMEOUT_S})'
SUMMARY_JSON, SUMMARY_MD, LOG, CURVES, ARCHIVE = (
    "gpu-check.json", "gpu-check.md", "gpu-check.log", "train-curves.png", "gpu-check-runs.tar.gz")
BOOK_TEST_ACC, BOOK_RANGE = 0.88, (0.86, 0.89)  # D2L 8.1 after 10 epochs (docs/training.md: "What to expect")
# (precision, math mode), most wanted first: the last are skipped first when time runs short.
# Under bf16 autocast the products run in bf16 whatever the math mode, so bf16/fp32 comes last.
BENCH_CONFIGS = (("fp32", "fp32"), ("fp32", "tf32"), ("bf16", "tf32"), ("bf16", "fp32"))
# The ablation, run after the book's recipe with whatever time is left, at one batch size on synthetic
# data: each speed-up (channels-last, torch.compile) flipped against the default; at fp32 also the
# book's plain PyTorch code (`--baseline` runs float32 only).
ABLATE_CONFIGS = (("fp32", "tf32"), ("bf16", "tf32"))
# In this order: the ablation and the profile get what time the recipe leaves.
STEPS = ("tests", "bench", "train", "ablate", "kernels")
PROFILE_CONFIG = ("bf16", "tf32")  # the profiled step: the precision whose MFU target is not met yet
TESTS = ("tests", "--ignore=tests/test_backend_tf.py", "--ignore=tests/test_backend_mx.py")
TRAIN_MATH = "tf32"  # the math mode of the training run, where `alexnet train` has --math
EVAL_SHARE = 0.1  # an epoch's evaluation (10,000 forward passes) against its 60,000 training steps
FINISH_RESERVE_S = 20  # kept back from the budget for the summary and the archive
TESTS_MAX_S = 120
GRACE_S = 30  # the training is interrupted this long before the deadline: it finishes its step and saves


@dataclass(frozen=True)
class Profile:
    """Sizes and time of one kind of run: the real GPU check, or its CPU smoke test."""

    name: str
    device: str
    budget_s: int  # the whole check
    train_reserve_s: int  # the bench stops starting configurations when less than this is left
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


GPU = Profile("gpu", "gpu", budget_s=480, train_reserve_s=250, bench_batches=(128, 256), bench_input=224,
              bench_steps=20, bench_warmup=3, ablate_batch=256, train_epochs=10, train_batch=128, train_input=224)
# The same steps at the smallest sizes, so the script's logic and its summary are tested on CPU (the
# bench's input the smallest the book's plain code takes, for the ablation's --baseline).
SMOKE = Profile("cpu-smoke", "cpu", budget_s=600, train_reserve_s=60, bench_batches=(8,), bench_input=plain_min_input(),
                bench_steps=1, bench_warmup=0, ablate_batch=8, train_epochs=2, train_batch=128, train_input=65,
                limit_train=256, limit_test=256)


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
PROBE = """
import json, platform, numpy
info = {"python": platform.python_version(), "numpy": numpy.__version__}
try:
    import torch
    info.update(torch=torch.__version__, cuda=torch.version.cuda,
                cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
    import alexnet_pt
    status = alexnet_pt.gpu_status()  # proven by a convolution forward and backward on the GPU
    ok = status.usable
    info["gpu_available"] = ok
    info["gpu_reason"] = None if ok else status.detail
    if ok:
        info["gpu"] = torch.cuda.get_device_name(0)
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        info["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
except ImportError as error:
    info["gpu_available"], info["gpu_reason"] = False, f"PyTorch cannot load: {error}"
print("PROBE " + json.dumps(info))
"""


def probe(log: Log) -> dict:
    """Versions and the GPU, asked in a child (this process holds no GPU memory)."""
    from common.bench import machine_environment

    info = {"machine": machine_environment()}
    code, out = capture([sys.executable, "-c", PROBE])
    line = next((line for line in out.splitlines() if line.startswith("PROBE ")), None)
    if line is None:
        log.write(out)
        info.update(gpu_available=False, gpu_reason=f"the probe failed (exit {code})")
    else:
        info.update(json.loads(line[len("PROBE "):]))
    if shutil.which("nvidia-smi"):
        code, out = capture(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
        info["nvidia_smi"] = out.strip() if code == 0 else f"exit {code}: {out.strip()[:200]}"
    return info


def has_flag(subcommand: str, flag: str) -> bool:
    """Whether ``alexnet SUBCOMMAND`` takes ``flag`` (so the check runs before and after it is added)."""
    code, out = capture([sys.executable, "-m", "common", subcommand, "--help"])
    return code == 0 and flag in out.split()


# ---------------------------------------------------------------- the steps
class Check:
    def __init__(self, profile: Profile, work: Path, dest: Path, data_dir: Path | None, budget_s: float,
                 tests: tuple[str, ...] = TESTS, configs: tuple[tuple[str, str], ...] = BENCH_CONFIGS,
                 ablate_configs: tuple[tuple[str, str], ...] = ABLATE_CONFIGS):
        self.profile, self.work, self.dest, self.data_dir = profile, work, dest, data_dir
        self.test_args, self.configs, self.ablate_configs = tests, configs, ablate_configs
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
        command = [sys.executable, "-m", "pytest", "-q", "-rs", "-m", "gpu", "-p", "no:cacheprovider",
                   f"--junitxml={junit}", *self.test_args]
        env = env or python_env()
        if self.data_dir:
            env["ALEXNET_DATA_DIR"] = str(self.data_dir)
        outcome = run_logged("the tests", command, self.log, deadline=time.monotonic() + min(TESTS_MAX_S, self.left()),
                             env=env)
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
        p = self.profile
        math_flag = has_flag("bench", "--math")
        configs = self.configs if math_flag else tuple(dict.fromkeys((prec, None) for prec, _ in self.configs))
        if not math_flag:
            self.note("bench: `alexnet bench` has no --math flag yet: each precision ran once, in the math mode "
                      "the trainer leaves (PyTorch's default on a GPU: TF32 convolutions, full-fp32 matmuls)")
        until = self.deadline - p.train_reserve_s
        runs, last = [], 0.0
        for precision, math_mode in configs:
            label = f"{precision}/{math_mode or 'default'}"
            left = self.left(until)
            if left < max(last, 10):
                runs.append({"precision": precision, "math": math_mode, "status": "skipped"})
                self.note(f"bench {label}: skipped, {max(left, 0):.0f} s were left before the {p.train_reserve_s} s "
                          f"kept for training" + (f" and the previous configuration took {last:.0f} s" if last else ""))
                continue
            run = self._bench_run(f"bench {label}", f"bench-{precision}-{math_mode or 'default'}", precision,
                                  math_mode, p.bench_batches, [], until)
            last = run["seconds"]
            runs.append(run)
        return {"status": runs_status(runs), "math_flag": math_flag, "runs": runs}

    def _bench_run(self, label: str, folder: str, precision: str, math_mode: str | None, batches: tuple[int, ...],
                   extra: list[str], until: float, data: str | None = None) -> dict:
        """One `alexnet bench --backends pt` invocation, stopped at ``until``; its rows, or why none."""
        p = self.profile
        out = self.work / folder
        command = [sys.executable, "-m", "common", "bench", "--backends", "pt", "--device", p.device,
                   "--precision", precision, *(["--math", math_mode] if math_mode else []),
                   "--batch-sizes", ",".join(map(str, batches)), "--input-size", str(p.bench_input),
                   "--steps", str(p.bench_steps), "--warmup", str(p.bench_warmup),
                   "--data", data or ("synthetic,real" if self.data_dir else "synthetic"),
                   *self.data_args(), *extra,
                   "--timeout", str(max(int(self.left(until)), 1)), "--out", str(out)]
        outcome = run_logged(label, command, self.log, deadline=until)
        run = {"precision": precision, "math": math_mode, "command": " ".join(command[1:]),
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
        p = self.profile
        run_dir = self.work / "train"
        math_flag = has_flag("train", "--math")
        base = [sys.executable, "-m", "common", "train", "--backend", "pt", "--device", p.device,
                "--lr", "0.01", "--batch-size", str(p.train_batch), "--input-size", str(p.train_input),
                "--run-dir", str(run_dir), "--no-progress", *self.data_args(),
                *(["--math", TRAIN_MATH] if math_flag else []),
                *(["--limit-train", str(p.limit_train)] if p.limit_train else []),
                *(["--limit-test", str(p.limit_test)] if p.limit_test else [])]
        result = {"epochs_target": p.train_epochs, "batch_size": p.train_batch, "input_size": p.train_input,
                  "lr": 0.01, "precision": "fp32", "math": TRAIN_MATH if math_flag else None,
                  "limit_train": p.limit_train, "limit_test": p.limit_test,
                  "book_test_acc": BOOK_TEST_ACC, "book_range": list(BOOK_RANGE), "commands": []}
        if not math_flag:
            self.note("train: `alexnet train` has no --math flag yet: the math mode the trainer leaves "
                      "(PyTorch's default on a GPU: TF32 convolutions, full-fp32 matmuls)")
        if self.data_dir is None:
            return self._train_result(result, run_dir, "skipped", "train: skipped, no Fashion-MNIST (run "
                                      "scripts/gpu-check.sh --prepare before the device call)")
        until = self.deadline - GRACE_S  # SIGINT then: the trainer saves after its step, within GRACE_S
        first = base + ["--epochs", "1"]
        result["commands"].append(" ".join(first[1:]))
        outcome = run_logged("training epoch 1", first, self.log, deadline=until, interrupt=True)
        rows = read_rows(run_dir)
        if outcome.timed_out:
            return self._train_result(result, run_dir, "timed out",
                                      f"train: the first epoch did not finish in the {outcome.seconds:.0f} s left")
        if outcome.returncode != 0 or not rows:
            return self._train_result(result, run_dir, "failed",
                                      f"train: the first epoch failed (exit {outcome.returncode})")
        planned = plan_epochs(p.train_epochs, first_wall_s=outcome.seconds, first_epoch_s=rows[0]["seconds"],
                              left_s=self.left(until))
        result["epochs_planned"] = planned
        if planned < p.train_epochs:
            result["shortened"] = (
                f"fewer epochs than the recipe's {p.train_epochs}: epoch 1 took {outcome.seconds:.0f} s with start-up "
                f"({rows[0]['seconds']:.0f} s training, {rows[0]['images_per_s']:.0f} img/s), so {planned} epoch(s) "
                f"fit the {self.left(until):.0f} s left of the {self.budget_s:.0f} s budget")
            self.note(f"train: {result['shortened']}")
        status, reason = ("ok" if planned == p.train_epochs else "partial"), None
        if planned > 1:
            more = base + ["--epochs", str(planned), "--resume"]
            result["commands"].append(" ".join(more[1:]))
            outcome = run_logged(f"training epochs 2-{planned}", more, self.log, deadline=until, interrupt=True)
            if outcome.timed_out:
                status, reason = "partial", ("train: interrupted at the deadline, after the last whole epoch "
                                             "(the estimate from epoch 1 was too low)")
            elif outcome.returncode != 0:
                status, reason = "failed", f"train: the resumed run failed (exit {outcome.returncode})"
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
            shutil.copyfile(run_dir / "curves.png", self.dest / CURVES)
        return result

    # ------------------------------------------------------------ 4. ablate
    def ablate(self) -> dict:
        """`alexnet bench --ablate` (and `--baseline` at fp32) at one batch size, in the time the
        recipe left: what each speed-up and the library itself are worth on this device."""
        runs = []
        for precision, math_mode in self.ablate_configs:
            label = f"ablate {precision}/{math_mode}"
            if self.left() < 30:
                runs.append({"precision": precision, "math": math_mode, "status": "skipped"})
                self.note(f"{label}: skipped, {max(self.left(), 0):.0f} s were left")
                continue
            extra = ["--ablate", *(["--baseline"] if precision == "fp32" else [])]
            runs.append(self._bench_run(label, f"ablate-{precision}-{math_mode}", precision, math_mode,
                                        (self.profile.ablate_batch,), extra, self.deadline, data="synthetic"))
        return {"status": runs_status(runs), "runs": runs}

    # ------------------------------------------------------------ 5. kernels
    def kernels(self) -> dict:
        """Where one training step's device time goes (benchmarks/profile_pt.py) at the ablation's
        batch size, in the time left: the starting point of the next round of speed work."""
        p = self.profile
        precision, math_mode = PROFILE_CONFIG
        command = [sys.executable, str(ROOT / "benchmarks" / "profile_pt.py"), "--device", p.device,
                   "--precision", precision, "--math", math_mode, "--batch", str(p.ablate_batch),
                   "--input-size", str(p.bench_input), "--steps", str(max(p.bench_steps // 2, 1)),
                   "--warmup", str(p.bench_warmup), "--top", "15"]
        result = {"precision": precision, "math": math_mode, "batch_size": p.ablate_batch,
                  "command": " ".join(command[1:])}
        if self.left() < 30:
            self.note(f"kernels: skipped, {max(self.left(), 0):.0f} s were left")
            return {**result, "status": "skipped"}
        self.log.write(f"$ {' '.join(command)}\n")
        try:
            code, out = capture(command, timeout=self.left())
        except subprocess.TimeoutExpired:
            self.note("kernels: the profile stopped at the deadline")
            return {**result, "status": "timed out"}
        lines = [line for line in out.splitlines() if line.strip() and not line.startswith(("USDT", "/", "  _warn"))]
        self.log.write("\n".join(lines) + "\n")
        return {**result, "status": "ok" if code == 0 else "failed", "exit_code": code, "lines": lines}

    # ------------------------------------------------------------ all of it
    def run(self) -> int:
        s = self.summary
        self.log.say(f"{self.profile.name} mode, budget {self.budget_s:.0f} s, work folder {self.work}, "
                     f"summary to {self.dest}")
        s["environment"] = env = probe(self.log)
        self.log.say("environment: " + json.dumps({k: v for k, v in env.items() if k != "machine"}))
        if self.profile.device == "gpu" and not env.get("gpu_available"):
            why = env.get("gpu_reason") or "PyTorch sees no CUDA GPU"
            self.note(f"no GPU here ({why}): the GPU steps (tests -m gpu, bench --device gpu, the book's recipe "
                      "on the GPU) are skipped; --cpu-smoke runs the same steps on CPU at tiny sizes")
            s["status"] = "skipped"
            return 0
        if self.data_dir is not None:
            try:
                self.data_dir = locate(self.data_dir, download_missing=False)
            except DataError as error:
                self.note(f"{error}: the bench runs on synthetic data only and the training is skipped")
                self.data_dir = None
        s["data_dir"] = str(self.data_dir) if self.data_dir else None
        for step in STEPS:
            self.log.say(f"--- {step} ({self.left():.0f} s left)")
            s[step] = getattr(self, step)()
        states = {s[step]["status"] for step in STEPS}
        s["status"] = "failed" if "failed" in states else "complete" if states <= {"ok", "passed"} else "partial"
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
def plan_epochs(target: int, *, first_wall_s: float, first_epoch_s: float, left_s: float) -> int:
    """How many epochs in all (at least the 1 done, at most ``target``) fit in ``left_s``, from
    the first run: ``first_epoch_s`` of training (its metrics), ``first_wall_s`` for the whole
    process. An epoch is its training plus EVAL_SHARE for the test set; the rest of the first
    run's wall time (start-up, loading the data) is paid again by the resumed run."""
    epoch_s = max(first_epoch_s * (1 + EVAL_SHARE), 1e-3)
    startup_s = max(first_wall_s - epoch_s, 0.0)
    more = math.floor((left_s - startup_s) / epoch_s)
    return max(1, min(target, 1 + more))


def runs_status(runs: list[dict]) -> str:
    """A bench step's status from its runs': ok only if every one is (none asked for: ok)."""
    states = {r["status"] for r in runs}
    return "ok" if states <= {"ok"} else "failed" if "failed" in states else "partial"


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
            "batch_size": r["batch_size"], "variant": r["variant"], "device": r["device"],
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


def markdown(s: dict) -> str:
    env = s.get("environment", {})
    device = env.get("gpu") or env.get("machine", {}).get("cpu", "?")
    out = [f"# GPU check ({s['mode']}): {s['status']}", "",
           f"{device}; started {s['started']}, {s.get('seconds', 0):.0f} s of a {s['budget_s']:.0f} s budget.",
           f"Python {env.get('python')}, numpy {env.get('numpy')}, PyTorch {env.get('torch')} "
           + (f"(CUDA {env['cuda']}, cuDNN {env.get('cudnn')})" if env.get("cuda") else "(no CUDA)")
           + (f"; nvidia-smi: {env['nvidia_smi']}" if env.get("nvidia_smi") else "") + ".",
           f"The device call: `{s['run_call']}`.", ""]
    tests = s.get("tests")
    if tests:
        out += ["## Tests (`pytest -m gpu`)", "",
                f"{tests['status']}: {tests.get('passed', '?')} passed, {tests.get('failures', '?')} failed, "
                f"{tests.get('errors', '?')} errors, {tests.get('skipped', '?')} skipped "
                f"({_fmt(tests.get('seconds'), '.0f')} s).", ""]
        out += [f"- skipped: {reason}" for reason in tests.get("skip_reasons", [])] + [""]
    bench = s.get("bench")
    if bench:
        rows = []
        for run in bench["runs"]:
            for r in run.get("rows", []):
                rows.append([run["precision"], run["math"] or "default", r["batch_size"],
                             _fmt(r["train_images_per_s"]), _fmt(r["real_over_synthetic"], ".2f"),
                             _fmt(r["inference_images_per_s"]), _fmt(r["mfu"], ".2f"),
                             _fmt(r["peak_gflops"] / 1000, ".3g"), r["device_name"]])
            if not run.get("rows"):
                rows.append([run["precision"], run["math"] or "default", "", run["status"], "", "", "", "", ""])
        out += ["## Bench (`alexnet bench --backends pt`)", "",
                _table(["precision", "math", "batch", "train img/s", "real/synth", "infer img/s", "MFU",
                        "peak TFLOP/s", "device"], rows), "",
                "MFU: training FLOPs per image x img/s over the matmul peak PyTorch measured in the same "
                "process and precision" + (" and math mode." if bench["math_flag"] else
                                           " (in the bench's own math mode for the peak: it has no --math yet)."),
                ""]
    train = s.get("train")
    if train:
        out += ["## The book's recipe (`alexnet train --backend pt`)", ""]
        if train.get("rows"):
            verdict = ("within" if train["within_book_range"] else "outside") if train["comparable_to_book"] else \
                "not comparable (fewer epochs or fewer images than the recipe)"
            out += [f"{train['status']}: {train['epochs_done']} of {train['epochs_target']} epochs, "
                    f"batch {train['batch_size']}, {train['input_size']}x{train['input_size']}, lr {train['lr']}, "
                    f"math {train['math'] or 'default'}: **test accuracy {train['test_acc']:.4f}** (the book: about "
                    f"{BOOK_TEST_ACC}, {BOOK_RANGE[0]}-{BOOK_RANGE[1]} after 10 epochs; {verdict}), "
                    f"{train['images_per_s']:.0f} training img/s (epoch 1: {train['images_per_s_first_epoch']:.0f})."
                    + (f" **Shortened**: {train['shortened']}." if train.get("shortened") else ""),
                    "", _table(["epoch", "train loss", "train acc", "test loss", "test acc", "img/s", "seconds"],
                               [[r["epoch"], _fmt(r["train_loss"], ".4f"), _fmt(r["train_acc"], ".4f"),
                                 _fmt(r["test_loss"], ".4f"), _fmt(r["test_acc"], ".4f"), _fmt(r["images_per_s"]),
                                 _fmt(r["seconds"])] for r in train["rows"]]), ""]
        else:
            out += [f"{train['status']}: no epoch finished.", ""]
    ablation = s.get("ablate")
    if ablation and ablation["runs"]:
        rows = []
        for run in ablation["runs"]:
            for r in run.get("rows", []):
                rows.append([run["precision"], run["math"], r["variant"], r["batch_size"],
                             _fmt(r["train_images_per_s"]), _fmt(r["over_plain"], ".2f"),
                             _fmt(r["inference_images_per_s"]), _fmt(r["mfu"], ".2f")])
            if not run.get("rows"):
                rows.append([run["precision"], run["math"], run["status"], "", "", "", "", ""])
        out += ["## Ablation (`alexnet bench --backends pt --ablate`, synthetic data)", "",
                _table(["precision", "math", "variant", "batch", "train img/s", "vs plain", "infer img/s", "MFU"],
                       rows), "",
                "Each speed-up flipped against the default; *plain (book)* is the book's PyTorch code "
                "(alexnet_pt/_plain.py) in the same math mode, float32 only.", ""]
    kernels = s.get("kernels")
    if kernels and kernels.get("lines"):
        out += [f"## Where a {kernels['precision']} step's time goes (`benchmarks/profile_pt.py`, batch "
                f"{kernels['batch_size']})", "", "```", *kernels["lines"], "```", ""]
    if s.get("notes"):
        out += ["## Notes", ""] + [f"- {n}" for n in s["notes"]] + [""]
    return "\n".join(out)


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


def main(argv: list[str] | None = None) -> int:
    parser = OneLineErrorParser(
        prog="scripts/gpu-check.sh",
        formatter_class=argparse.RawDescriptionHelpFormatter,  # the run call must stay on one line
        description="The prepared GPU check: PyTorch's GPU tests, alexnet bench on the GPU and the book's\n"
                    "recipe on Fashion-MNIST, within a time budget, with a JSON and Markdown summary.",
        epilog=f"The device call, after --prepare here:\n  {RUN_CALL}")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--prepare", action="store_true",
                      help="on the CPU machine, before the device call: copy Fashion-MNIST and pytest's wheels "
                           "into .gpu-carry/")
    mode.add_argument("--cpu-smoke", action="store_true", help="the same steps on CPU at tiny sizes")
    parser.add_argument("--budget", type=float, metavar="S", help="seconds for the whole check (default: 480 on "
                        "the GPU, 600 for --cpu-smoke)")
    parser.add_argument("--data-dir", type=Path, help="Fashion-MNIST (default: .gpu-carry/fashion-mnist if "
                        "prepared, else where `alexnet train` finds it)")
    parser.add_argument("--out", type=Path, help="summary folder (default $OUT, else the work folder)")
    parser.add_argument("--work", type=Path, help="folder for the runs' own files (default runs/gpu-check-MODE-TIME)")
    parser.add_argument("--tests", type=shlex.split, default=TESTS, metavar="'ARG ...'",
                        help=f"what pytest -m gpu runs, one quoted string (default: '{' '.join(TESTS)}')")
    parser.add_argument("--configs", type=bench_configs, default=BENCH_CONFIGS, metavar="PRECISION:MATH,...",
                        help="bench configurations, most wanted first (default: "
                             + ",".join(f"{p}:{m}" for p, m in BENCH_CONFIGS) + "; none: no bench)")
    parser.add_argument("--ablate-configs", type=bench_configs, default=ABLATE_CONFIGS, metavar="PRECISION:MATH,...",
                        help="ablation configurations, run after the recipe in the time left (default: "
                             + ",".join(f"{p}:{m}" for p, m in ABLATE_CONFIGS) + "; none: no ablation)")
    args = parser.parse_args(argv)
    print(f"gpu-check: the device call: {RUN_CALL} (after scripts/gpu-check.sh --prepare here)", flush=True)
    if args.prepare:
        try:
            return prepare(args.data_dir)
        except (DataError, OSError) as error:
            print(f"gpu-check --prepare: error: {error}", file=sys.stderr)
            return 2
    profile = SMOKE if args.cpu_smoke else GPU
    work = args.work or ROOT / "runs" / f"gpu-check-{profile.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    work.mkdir(parents=True, exist_ok=True)
    dest = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else work)
    dest.mkdir(parents=True, exist_ok=True)
    data_dir = args.data_dir or (CARRY_DATA if CARRY_DATA.is_dir() else None)
    check = Check(profile, work.resolve(), dest.resolve(), data_dir, args.budget or profile.budget_s,
                  tuple(args.tests), args.configs, args.ablate_configs)
    try:
        return check.run()
    except KeyboardInterrupt:
        check.note("interrupted (Ctrl-C)")
        return 130
    finally:
        check.finish()


if __name__ == "__main__":
    sys.exit(main())
