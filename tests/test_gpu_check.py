"""scripts/gpu-check.sh, the prepared GPU check: its run on CPU (the same steps at tiny sizes) and
the summary it writes, its clean skip where there is no GPU, and how it shortens the training."""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from common.backend import capabilities

from tests.conftest import REAL_DATA

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu-check.sh"
needs_data = pytest.mark.skipif(not REAL_DATA.is_dir(), reason=f"real Fashion-MNIST not at {REAL_DATA}")


def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("OUT", None)  # the device tool's variable: the tests name --out themselves
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=900, env=env)


def test_epoch_plan_fits_the_time_left():
    plan = gpu_check().plan_epochs
    # epoch 1: 10 s of training (+10% for the test set: 11 s per epoch), 30 s in all (19 s start-up)
    assert plan(10, first_wall_s=30, first_epoch_s=10, left_s=1000) == 10
    assert plan(10, first_wall_s=30, first_epoch_s=10, left_s=19 + 7 * 11 + 5) == 8
    assert plan(10, first_wall_s=30, first_epoch_s=10, left_s=5) == 1  # never fewer than the epoch done


@pytest.mark.parametrize("budget_s, epochs", [(400, 4), (10_000, 10)])
def test_the_recipe_runs_the_epochs_that_fit_and_says_when_fewer(tmp_path, monkeypatch, budget_s, epochs):
    """The training step's decisions, with the two `alexnet train` runs faked: epoch 1 takes
    120 s in all, 100 s of them training (so 110 s an epoch with the test set, 10 s start-up)."""
    module = gpu_check()
    commands = []

    def fake_train(label, command, log, *, deadline, interrupt=False, env=None):
        commands.append(command)
        run_dir = Path(command[command.index("--run-dir") + 1])
        run_dir.mkdir(parents=True, exist_ok=True)
        epochs_asked = int(command[command.index("--epochs") + 1])
        rows = [{"epoch": e, "train_loss": 0.5, "train_acc": 0.8, "test_loss": 0.5, "test_acc": 0.85,
                 "images_per_s": 600.0, "seconds": 100.0} for e in range(1, epochs_asked + 1)]
        (run_dir / "metrics.json").write_text(json.dumps({"config": {}, "sessions": [], "epochs": rows}))
        return module.Outcome(0, 120.0, False)

    monkeypatch.setattr(module, "run_logged", fake_train)
    monkeypatch.setattr(module, "has_flag", lambda subcommand, flag: False)
    check = module.Check(module.GPU, tmp_path, tmp_path, tmp_path / "data", budget_s=budget_s)
    check.summary["train"] = train = check.train()
    check.finish()
    assert train["epochs_planned"] == train["epochs_done"] == epochs
    assert [c[c.index("--epochs") + 1] for c in commands] == ["1", str(epochs)] and commands[1][-1] == "--resume"
    text = (tmp_path / "gpu-check.md").read_text()
    if epochs < 10:  # (400 - 20 - 30 s left, less 10 s start-up) // 110 s = 3 more epochs
        assert train["status"] == "partial" and not train["comparable_to_book"]
        assert f"so {epochs} epoch(s) fit" in train["shortened"] and train["shortened"] in text
        assert any("fewer epochs than the recipe's 10" in note for note in check.notes)
    else:
        assert train["status"] == "ok" and "shortened" not in train and "Shortened" not in text
        assert train["comparable_to_book"] and not train["within_book_range"]  # 0.85 < the book's 0.86


def test_without_a_gpu_the_check_skips_its_gpu_steps_and_says_so(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the check would run")
    result = run_script("--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"))
    assert result.returncode == 0, result.stderr
    first = result.stdout.splitlines()[0]
    assert 'run(command="bash scripts/gpu-check.sh", carry=[".gpu-carry"], timeout_s=' in first
    assert "no GPU here" in result.stdout and "--cpu-smoke" in result.stdout
    summary = json.loads((tmp_path / "out" / "gpu-check.json").read_text())
    assert summary["mode"] == "gpu" and summary["status"] == "skipped"
    assert not {"tests", "bench", "train", "ablate", "kernels"} & set(summary)
    assert "no GPU here" in (tmp_path / "out" / "gpu-check.md").read_text()


@needs_data
def test_cpu_smoke_runs_every_step_and_writes_the_summary(tmp_path):
    """The quick form of --cpu-smoke (one test module, one bench and one ablation configuration):
    all four steps run for real on CPU, and the summary holds what their own files say."""
    out, work = tmp_path / "out", tmp_path / "work"
    result = run_script("--cpu-smoke", "--tests", "tests/test_backend_pt.py", "--configs", "fp32:fp32",
                        "--ablate-configs", "fp32:fp32",
                        "--data-dir", str(REAL_DATA), "--out", str(out), "--work", str(work))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "carry=[\".gpu-carry\"]" in result.stdout.splitlines()[0]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["gpu-check.json", "gpu-check.md", "gpu-check.log", "train-curves.png", "gpu-check-runs.tar.gz"])
    summary = json.loads((out / "gpu-check.json").read_text())
    assert summary["mode"] == "cpu-smoke" and summary["status"] == "complete", summary.get("notes")

    tests = summary["tests"]
    assert tests["status"] == "passed" and tests["failures"] == tests["errors"] == 0
    assert tests["tests"] >= 1 and tests["skipped"] == tests["tests"]  # GPU tests, no GPU: all skip, with reasons
    assert tests["skip_reasons"]

    (run,) = summary["bench"]["runs"]
    assert run["status"] == "ok" and run["precision"] == "fp32"
    bench = json.loads(next(work.glob("bench-fp32-*/bench.json")).read_text())
    (row,) = run["rows"]
    (raw,) = bench["results"]
    assert row["batch_size"] == raw["batch_size"] == 8 and row["device"] == "cpu"
    assert row["train_images_per_s"] == raw["train_images_per_s"]["synthetic"]["median"] > 0
    assert row["mfu"] == raw["mfu"] > 0 and row["real_over_synthetic"] == raw["real_over_synthetic"]

    train = summary["train"]
    metrics = json.loads((work / "train" / "metrics.json").read_text())["epochs"]
    assert train["status"] == "ok" and train["epochs_target"] == train["epochs_planned"] == train["epochs_done"] == 2
    assert [r["epoch"] for r in train["rows"]] == [1, 2] and train["rows"] == metrics
    assert len(train["commands"]) == 2 and train["commands"][1].endswith("--epochs 2 --resume")
    assert train["test_acc"] == metrics[-1]["test_acc"] and 0 <= train["test_acc"] <= 1
    assert train["comparable_to_book"] is False  # 256 images at 65x65 are not the book's recipe

    (ablation,) = summary["ablate"]["runs"]
    assert summary["ablate"]["status"] == ablation["status"] == "ok"
    raw = json.loads((work / "ablate-fp32-fp32" / "bench.json").read_text())["results"]
    assert [r["variant"] for r in ablation["rows"]] == [r["variant"] for r in raw]
    flipped = {f"{s.name}={'off' if raw[0]['options'][s.name] else 'on'}"  # each speed-up that acts on a CPU
               for s in capabilities("pt").speed_ups if "cpu" in s.devices}
    assert {r["variant"] for r in raw} == {"default", "plain (book)", *flipped}
    assert "stem_matmul=on" in flipped and not any(v.startswith("cuda_graphs") for v in flipped)
    (default,) = [r for r in ablation["rows"] if r["variant"] == "default"]
    assert default["over_plain"] > 0 and default["batch_size"] == 8

    text = (out / "gpu-check.md").read_text()
    assert f"test accuracy {train['test_acc']:.4f}" in text and "| fp32 |" in text and "not comparable" in text
    assert "## Ablation" in text and "| plain (book) |" in text

    kernels = summary["kernels"]  # the profile of one bf16 step, in the time left
    assert kernels["status"] == "ok" and kernels["batch_size"] == 8, kernels
    assert kernels["lines"][0].startswith("AlexNet 1x67x67, batch 8, bf16") and "convolution" in "".join(kernels["lines"])
    assert "## Where a bf16 step's time goes" in text and kernels["lines"][1] in text
    with tarfile.open(out / "gpu-check-runs.tar.gz") as tar:
        names = tar.getnames()
    assert any(n.endswith("train/metrics.json") for n in names) and any(n.endswith("bench.json") for n in names)
    assert not any(n.endswith("checkpoint.npz") for n in names)  # 178 MiB of weights stay behind


@needs_data
def test_prepare_copies_the_four_files_as_they_are(tmp_path):
    module = gpu_check()
    module.copy_data(REAL_DATA, tmp_path / "fashion-mnist")
    for spec in module.FILES.values():
        assert (tmp_path / "fashion-mnist" / spec.name).read_bytes() == (REAL_DATA / spec.name).read_bytes()
    assert module.data_complete(tmp_path / "fashion-mnist")


def test_prepare_names_a_data_folder_that_lacks_the_files(tmp_path):
    (tmp_path / "data").mkdir()
    with gzip.open(tmp_path / "data" / "train-images-idx3-ubyte.gz", "wb") as handle:
        handle.write(b"not the data")
    result = run_script("--prepare", "--data-dir", str(tmp_path / "data"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert str(tmp_path / "data") in line and "t10k-labels-idx1-ubyte.gz" in line


@pytest.mark.parametrize("flag", ["--configs", "--ablate-configs"])
def test_a_bad_bench_configuration_is_a_one_line_error(flag):
    result = run_script("--cpu-smoke", flag, "fp32:fp64")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()  # no usage block before it
    assert line.startswith(f"scripts/gpu-check.sh: error: argument {flag}: ") and "'fp32:fp64'" in line
