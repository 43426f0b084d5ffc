"""scripts/gpu-check.sh, the prepared GPU check: its run on CPU (the same steps at tiny sizes, for two
frameworks side by side) and the summary it writes, its clean skip where there is no GPU, which
backends and test modules it picks from what imports, and how it shortens the training."""
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

from common.backend import BACKENDS, capabilities, training_backends

from tests.conftest import REAL_DATA, REQUIRE_ALL

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
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=1200, env=env)


def test_epoch_plan_fits_the_time_left():
    plan = gpu_check().plan_epochs
    # epoch 1: 10 s of training (+10% for the test set: 11 s per epoch), 30 s in all (19 s start-up)
    assert plan(10, done=1, first_wall_s=30, epoch_s=10, left_s=1000) == 10
    assert plan(10, done=1, first_wall_s=30, epoch_s=10, left_s=19 + 7 * 11 + 5) == 8
    assert plan(10, done=1, first_wall_s=30, epoch_s=10, left_s=5) == 1  # never fewer than the epoch done
    # two epochs in 60 s, the second 10 s (the first compiled): 60 - 2 x 11 = 38 s of start-up again
    assert plan(10, done=2, first_wall_s=60, epoch_s=10, left_s=38 + 3 * 11 + 5) == 5
    assert plan(10, done=2, first_wall_s=60, epoch_s=10, left_s=5) == 2


@pytest.mark.parametrize("budget_s, epochs", [(350, 4), (10_000, 10)])
def test_the_recipe_runs_the_epochs_that_fit_and_says_when_fewer(tmp_path, monkeypatch, budget_s, epochs):
    """The training step's decisions, with the `alexnet train` runs faked: the first run trains two
    epochs in 220 s, 100 s of training each (so 110 s an epoch with the test set, no start-up)."""
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
        return module.Outcome(0, 220.0, False)

    monkeypatch.setattr(module, "run_logged", fake_train)
    monkeypatch.setattr(module, "has_flag", lambda subcommand, flag: False)
    name = training_backends()[0]
    check = module.Check(module.GPU, tmp_path, tmp_path, tmp_path / "data", budget_s=budget_s, backends=[name])
    check.summary["train"] = step = check.train()
    check.finish()
    (train,) = step["runs"]
    assert train["backend"] == name and train["epochs_planned"] == train["epochs_done"] == epochs
    assert [c[c.index("--epochs") + 1] for c in commands] == ["2", str(epochs)] and commands[1][-1] == "--resume"
    text = (tmp_path / "gpu-check.md").read_text()
    if epochs < 10:  # the 2 done and (350 - 20 - 30 s left) // 110 s = 2 more (no start-up: 220 s = 2 x 110 s)
        assert train["status"] == step["status"] == "partial" and not train["comparable_to_book"]
        assert f"so {epochs} epoch(s) fit" in train["shortened"] and train["shortened"] in text
        assert any("fewer epochs than the recipe's 10" in note for note in check.notes)
    else:
        assert train["status"] == step["status"] == "ok" and "shortened" not in train and "Shortened" not in text
        assert train["comparable_to_book"] and not train["within_book_range"]  # 0.85 < the book's 0.86


def test_each_recipe_leaves_its_reserve_to_the_later_ones(tmp_path, monkeypatch):
    """With two backends, the first one's recipe stops (is planned to stop) recipe_reserve_s before the
    deadline of the second, which gets all the time left."""
    module = gpu_check()
    deadlines = {}

    def fake_recipe(self, backend, until):
        deadlines[backend] = until
        return {"backend": backend, "status": "ok"}

    monkeypatch.setattr(module.Check, "recipe", fake_recipe)
    first, second = training_backends()[:2]
    check = module.Check(module.GPU, tmp_path, tmp_path, None, budget_s=600, backends=[first, second])
    assert check.train()["status"] == "ok"
    assert deadlines[second] - deadlines[first] == module.GPU.recipe_reserve_s
    assert deadlines[second] == check.deadline - module.GRACE_S


def test_the_bench_starts_a_configuration_only_when_the_runs_of_all_its_backends_fit(tmp_path, monkeypatch):
    """Side by side or not at all: a configuration starts when the time its backends' runs took last
    is left before the recipes' reserve (recipe_reserve_s each); the rest are skipped for every backend."""
    module = gpu_check()
    first, second = training_backends()[:2]
    check = module.Check(module.GPU, tmp_path, tmp_path, None, budget_s=600, backends=[first, second])
    clock, took = [0.0], {first: 40.0, second: 60.0}
    reserve = 2 * module.GPU.recipe_reserve_s
    check.deadline = 280.0 + reserve  # the bench may run until 280 s
    monkeypatch.setattr(check, "left", lambda until=None: (until or check.deadline) - clock[0])
    monkeypatch.setattr(module, "has_flag", lambda subcommand, flag: True)

    def fake_bench_run(label, folder, backend, precision, math_mode, batches, extra, until, data=None):
        clock[0] += took[backend]
        return {"backend": backend, "precision": precision, "math": math_mode, "status": "ok",
                "seconds": took[backend], "rows": []}

    monkeypatch.setattr(check, "_bench_run", fake_bench_run)
    bench = check.bench()  # at 0 s and 100 s a configuration starts; at 200 s 80 s are left, 100 s needed
    assert [(r["backend"], r["precision"], r["math"], r["status"]) for r in bench["runs"]] == [
        (first, "fp32", "fp32", "ok"), (second, "fp32", "fp32", "ok"),
        (first, "fp32", "tf32", "ok"), (second, "fp32", "tf32", "ok"),
        (first, "bf16", "tf32", "skipped"), (second, "bf16", "tf32", "skipped"),
        (first, "bf16", "fp32", "skipped"), (second, "bf16", "fp32", "skipped")]
    assert bench["status"] == "partial" and bench["backends"] == [first, second]
    assert check.notes[0] == (f"bench bf16/tf32: skipped, 80 s were left before the {reserve} s kept for the "
                              "recipes and its runs took 100 s last time")
    assert check.worker_s == {first: 20.0, second: 30.0}  # per batch size: what the ablation's estimate uses


def test_the_backends_and_test_modules_come_from_what_imports_and_computes_on_the_gpu():
    """Which frameworks the check runs is read from the probe (each backend imported in a child, its
    GPU proven by gpu_status), never a list of names: on the GPU the backends that compute there, in
    the smoke the ones that import; the test modules of the backends that do not import are left out."""
    module = gpu_check()
    training = training_backends()
    usable, present, missing = training[0], training[-1], training[1]
    env = {"backends": {name: {"importable": False, "reason": f"no {name} here"} for name in BACKENDS}}
    env["backends"][usable] = {"importable": True, "gpu_usable": True, "gpu_detail": "a GPU"}
    env["backends"][present] = {"importable": True, "gpu_usable": False, "gpu_detail": "no kernels for it"}
    chosen, left_out = module.choose_backends(env, "gpu", None)
    assert chosen == [usable] and "no kernels for it" in left_out[present] and left_out[missing] == f"no {missing} here"
    assert module.choose_backends(env, "cpu", None)[0] == [usable, present]  # the smoke: what imports stands in
    assert module.choose_backends(env, "cpu", [present])[0] == [present]
    tests = module.default_tests(env)
    assert tests[0] == "tests" and all(t.startswith("--ignore=tests/test_backend_") for t in tests[1:])
    ignored = {t.removeprefix("--ignore=") for t in tests[1:]}
    assert ignored == {f"tests/test_backend_{name}.py" for name in BACKENDS if name not in (usable, present)
                       and (ROOT / f"tests/test_backend_{name}.py").is_file()}
    assert f"tests/test_backend_{present}.py" not in ignored  # it imports: its GPU tests run and say why they skip


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
@pytest.mark.slow
def test_cpu_smoke_runs_every_step_and_writes_the_summary(tmp_path):
    """The quick form of --cpu-smoke (the newest backend of the registry, the parity GPU tests, one bench
    and one ablation configuration): every step runs for real on CPU, and the summary holds what the
    runs' own files say. Several backends side by side are held by the planning tests above; one keeps
    this run short."""
    out, work = tmp_path / "out", tmp_path / "work"
    training = training_backends()
    backends = [training[-1]]  # the newest framework
    result = run_script("--cpu-smoke", "--backends", ",".join(backends),
                        "--tests", "tests/test_parity.py",  # GPU tests parametrized over the registry
                        "--configs", "fp32:fp32", "--ablate-configs", "fp32:fp32",
                        "--data-dir", str(REAL_DATA), "--out", str(out), "--work", str(work))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "carry=[\".gpu-carry\"]" in result.stdout.splitlines()[0]
    summary = json.loads((out / "gpu-check.json").read_text())
    missing = summary.get("backends_left_out", {})
    if missing and not REQUIRE_ALL:
        pytest.skip(f"a framework does not import here: {missing}")
    assert summary["backends"] == backends and not missing
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["gpu-check.json", "gpu-check.md", "gpu-check.log", "gpu-check-runs.tar.gz",
         *(f"train-curves-{name}.png" for name in backends)])
    assert summary["mode"] == "cpu-smoke" and summary["status"] == "complete", summary.get("notes")
    assert set(summary["step_seconds"]) == {"probe", "tests", "bench", "train", "ablate", "kernels"}
    text = (out / "gpu-check.md").read_text()

    tests = summary["tests"]
    assert tests["status"] == "passed" and tests["failures"] == tests["errors"] == 0
    assert tests["tests"] >= 2 and tests["skipped"] == tests["tests"]  # GPU tests, no GPU: all skip, with reasons
    assert tests["skip_reasons"]

    assert summary["bench"]["backends"] == backends
    assert [run["backend"] for run in summary["bench"]["runs"]] == backends
    for run in summary["bench"]["runs"]:
        name = run["backend"]
        assert run["status"] == "ok" and run["precision"] == "fp32", run
        bench = json.loads((work / f"bench-{name}-fp32-fp32" / "bench.json").read_text())
        (row,) = run["rows"]
        (raw,) = bench["results"]
        assert row["backend"] == raw["backend"] == name
        assert row["batch_size"] == raw["batch_size"] == 8 and row["device"] == "cpu"
        assert row["train_images_per_s"] == raw["train_images_per_s"]["synthetic"]["median"] > 0
        assert row["mfu"] == raw["mfu"] > 0 and row["real_over_synthetic"] == raw["real_over_synthetic"]
        assert f"| fp32 | fp32 | 8 | {name} | {row['train_images_per_s']:.1f} |" in text  # side by side

    assert summary["train"]["status"] == "ok"
    assert [r["backend"] for r in summary["train"]["runs"]] == backends
    for train in summary["train"]["runs"]:
        name = train["backend"]
        metrics = json.loads((work / f"train-{name}" / "metrics.json").read_text())["epochs"]
        assert train["status"] == "ok"
        assert train["epochs_target"] == train["epochs_planned"] == train["epochs_done"] == 3
        assert [r["epoch"] for r in train["rows"]] == [1, 2, 3] and train["rows"] == metrics
        assert len(train["commands"]) == 2 and f"--backend {name} " in train["commands"][0]
        assert train["commands"][0].endswith("--epochs 2") and train["commands"][1].endswith("--epochs 3 --resume")
        assert train["test_acc"] == metrics[-1]["test_acc"] and 0 <= train["test_acc"] <= 1
        assert train["comparable_to_book"] is False  # 256 images at 65x65 are not the book's recipe
        assert f"test accuracy {train['test_acc']:.4f}" in text and f"`alexnet train --backend {name}`" in text
        assert f"| {name} | ok | 3 of 3 | {train['test_acc']:.4f} |" in text
    assert "not comparable" in text

    assert summary["ablate"]["status"] == "ok"
    assert [run["backend"] for run in summary["ablate"]["runs"]] == backends
    for ablation in summary["ablate"]["runs"]:
        name = ablation["backend"]
        assert ablation["status"] == "ok", ablation
        raw = json.loads((work / f"ablate-{name}-fp32-fp32" / "bench.json").read_text())["results"]
        assert [r["variant"] for r in ablation["rows"]] == [r["variant"] for r in raw]
        flipped = {f"{s.name}={'off' if raw[0]['options'][s.name] else 'on'}"  # each speed-up that acts on a CPU
                   for s in capabilities(name).speed_ups if "cpu" in s.devices}
        assert {r["variant"] for r in raw} == {"default", "plain (book)", *flipped}
        (default,) = [r for r in ablation["rows"] if r["variant"] == "default"]
        assert default["over_plain"] > 0 and default["batch_size"] == 8
        assert f"| {name} | fp32 | fp32 | plain (book) |" in text
    assert "## Ablation" in text

    profiled = [name for name in backends if (ROOT / "benchmarks" / f"profile_{name}.py").is_file()]
    kernels = summary["kernels"]  # the profile of one bf16 step, in the time left, where a backend has the script
    assert kernels["status"] == "ok" and [k["backend"] for k in kernels["runs"]] == profiled, kernels
    for run in kernels["runs"]:
        assert run["status"] == "ok" and run["batch_size"] == 8, run
        assert run["lines"][0].startswith("AlexNet 1x67x67, batch 8, bf16") and "convolution" in "".join(run["lines"])
        assert f"## Where a bf16 {run['backend']} step's time goes" in text and run["lines"][1] in text
    with tarfile.open(out / "gpu-check-runs.tar.gz") as tar:
        names = tar.getnames()
    for name in backends:
        assert any(n.endswith(f"train-{name}/metrics.json") for n in names)
        assert any(n.endswith(f"bench-{name}-fp32-fp32/bench.json") for n in names)
    assert not any(n.endswith(("checkpoint.npz", ".msgpack")) for n in names)  # the weights stay behind


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


def test_an_unknown_backend_is_a_one_line_error():
    result = run_script("--cpu-smoke", "--backends", "nope")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("scripts/gpu-check.sh: error: argument --backends: ") and "'nope'" in line
    assert all(name in line for name in training_backends())
