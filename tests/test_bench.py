"""`alexnet bench` end to end on a tiny configuration: it runs and its output is well formed.

No timed assertions: how fast the backends are is judged by running the benchmark
(docs/benchmarks.md), not here. The tiny run includes the inference-only backend (onnx): its
row has inference figures and "-" for training. The tiny configuration (1x67x67, batch 2, 2 steps, small
matmul) keeps this file to well under a minute on 2 CPU cores.
"""
import json
import os
import subprocess
import sys

import pytest

from common import ROOT
from common.backend import BACKENDS, all_speed_ups, capabilities, thread_variables, training_backends
from common.bench import Config, _compare, configs, plot, summarise, table, worker_environment
from common.machine import cpu_flags, cpu_model, usable_cpus
from common.cli import build_parser
from common.spec import book_alexnet
from common import shapes
from tests.conftest import REAL_DATA, get_backend

TINY = ["--batch-sizes", "2", "--input-size", "67", "--steps", "2", "--warmup", "1", "--matmul-size", "128"]
HAS_REAL_DATA = (REAL_DATA / "train-images-idx3-ubyte.gz").is_file() or (REAL_DATA / "train-images-idx3-ubyte").is_file()
DATA = ["--data", "synthetic,real", "--data-dir", str(REAL_DATA)] if HAS_REAL_DATA else ["--data", "synthetic"]


# The tiny run's rows: every backend in the registry's order, its own code and the book's where it trains.
EXPECTED_ROWS = [(name, impl) for name in BACKENDS
                 for impl in (("default", "plain") if capabilities(name).trains else ("default",))]

def bench(*args):
    """The command in a fresh interpreter, as from a shell."""
    return subprocess.run([sys.executable, "-m", "common", "bench", *args], capture_output=True, text=True,
                          timeout=600)


def table_rows(stdout):
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("backend ") and "train img/s" in line)
    rows = []
    for line in lines[start + 2:]:
        if not line.strip() or line.startswith("measured"):
            break
        rows.append(line.split())
    return lines[start], rows


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    get_backend("onnx")
    out = tmp_path_factory.mktemp("bench") / "run"
    result = bench("--backends", ",".join(BACKENDS), "--baseline", *TINY, *DATA, "--out", str(out))
    return result, out


INFERENCE_ONLY_NOTE = "bench: onnx (ONNX Runtime) runs inference only: its row has inference figures and - for training"
# The table's columns, as a row splits on whitespace: the training ones, and the inference ones.
TRAINING_CELLS, INFERENCE_CELLS = [5, 6, 7, 10, 11, 12, 13, 14], [8, 9]


def test_tiny_run_prints_the_table(all_backends, tiny_run):
    result, _ = tiny_run
    assert result.returncode == 0, result.stderr
    header, rows = table_rows(result.stdout)
    for column in ("train img/s", "infer img/s", "infer MFU", "MFU", "vs plain", "real/synth", "peak host"):
        assert column in header
    assert [(r[0], r[3]) for r in rows] == EXPECTED_ROWS  # in the order named
    assert all(r[1:3] == ["cpu", "fp32"] for r in rows)  # every row says which device ran it, in which math
    (onnx,) = [r for r in rows if r[0] == "onnx"]  # inference only: "-" in every training column, figures in the inference ones
    assert [onnx[i] for i in TRAINING_CELLS] == ["-"] * 8 and all(float(onnx[i]) > 0 for i in INFERENCE_CELLS)
    assert all(float(r[5]) > 0 for r in rows if r is not onnx)
    assert f"{INFERENCE_ONLY_NOTE}; --baseline skipped for it" in result.stdout.splitlines()
    assert "measured matmul peak" in result.stdout and "bench.json" in result.stdout
    assert "Traceback" not in result.stderr


def test_tiny_run_writes_json_with_every_figure_and_the_environment(all_backends, tiny_run):
    result, out = tiny_run
    assert result.returncode == 0, result.stderr
    payload = json.loads((out / "bench.json").read_text())
    spec = book_alexnet().with_input(1, 67)
    assert payload["flops_per_image"]["training"] == shapes.training_flops_per_image(spec)
    assert payload["settings"]["batch_sizes"] == [2] and payload["settings"]["steps"] == 2
    env = payload["environment"]
    assert env["cpu"] and env["usable_cpus"] >= 1 and len(env["load_average_before"]) == 3
    assert set(env["frameworks"]) == set(BACKENDS)
    assert all(env["frameworks"][name]["framework"].startswith(capabilities(name).framework + " ") for name in BACKENDS)
    results = payload["results"]
    assert len(results) == len(EXPECTED_ROWS)
    onnx = results.pop()
    assert onnx["backend"] == "onnx" and onnx["trains"] is False and onnx["device_name"] == cpu_model()
    assert onnx["train_images_per_s"] == onnx["train_step_s"] == {} and onnx["mfu"] is onnx["mfu_machine"] is None
    assert "over_plain" not in onnx and onnx["first_step_s"] == [None]
    inference = onnx["inference_images_per_s"]
    assert inference["n"] == 2 and 0 < inference["min"] <= inference["median"] and onnx["math"] == "fp32"
    assert list(onnx["matmul_gflops"]) == ["onnxruntime MatMul"] and onnx["matmul_gflops"]["onnxruntime MatMul"]["n"] == 2
    assert onnx["inference_mfu"] == pytest.approx(inference["median"] * payload["flops_per_image"]["inference"]
                                                  / (onnx["peak_gflops"] * 1e9))
    for row in results:
        assert row["trains"] is True and row["inference_mfu"] > 0
        assert row["device"] == "cpu" and row["device_name"] == cpu_model() and row["math"] == "fp32"
        train = row["train_images_per_s"]["synthetic"]
        assert train["n"] == 2 and 0 < train["min"] <= train["median"] <= train["max"]
        assert row["train_step_s"]["synthetic"]["median"] > 0 and row["inference_images_per_s"]["median"] > 0
        assert row["peak_gflops"] > 0 and row["peak_host_bytes"] > 0 and row["peak_device_bytes"] is None
        expected_mfu = train["median"] * payload["flops_per_image"]["training"] / (row["peak_gflops"] * 1e9)
        assert row["mfu"] == pytest.approx(expected_mfu)
        assert row["mfu_machine"] <= row["mfu"] + 1e-12  # the machine peak is the best of the frameworks'
        if row["impl"] == "plain":
            assert "over_plain" not in row and "real" not in row["train_images_per_s"]
        else:
            assert row["over_plain"] > 0 and row["options"]["precision"] == "fp32"
            if HAS_REAL_DATA:
                assert row["train_images_per_s"]["real"]["n"] == 2 and row["real_over_synthetic"] > 0
    defaults = {row["backend"]: row["options"] for row in results if row["impl"] == "alexnet"}
    # the CPU defaults (the tiny run is on CPU): the fastest correct path measured there
    # by the CPU's features: channels-last (alexnet_pt._model.prefers_channels_last) with AVX-512,
    # XLA (alexnet_tf._model.xla_by_default) without
    avx512 = "avx512f" in cpu_flags()
    assert defaults["pt"] == {"channels_last": avx512, "compile": False, "stem_matmul": False,
                               "fused_sgd": False, "cuda_graphs": False, "precision": "fp32"}
    assert defaults["tf"] == {"xla": not avx512, "precision": "fp32"}
    assert defaults["mx"] == {"hybridize": True, "precision": "fp32"}
    assert len(list((out / "logs").iterdir())) == len(EXPECTED_ROWS)  # one log per job


def test_tiny_run_draws_the_chart(all_backends, tiny_run):
    result, out = tiny_run
    assert result.returncode == 0, result.stderr
    png = (out / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_a_speed_up_can_be_switched_off(all_backends, tmp_path):
    result = bench("--backends", "mx", "--off", "hybridize", *TINY, "--data", "synthetic", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    (row,) = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert row["options"]["hybridize"] is False and row["variant"] == "hybridize=off"


def test_ablation_flips_each_speed_up_of_a_backend():
    args = build_parser().parse_args(["bench", "--backends", "pt,tf", "--ablate", "--baseline", "--off", "xla"])
    assert configs(args, "tf", 32, None) == [Config("tf", "alexnet", 32, (("xla", False),))]
    assert configs(args, "tf", 32, {"xla": False}) == [Config("tf", "plain", 32),
                                                       Config("tf", "alexnet", 32, (("xla", True),))]
    resolved = {"channels_last": False, "compile": False, "stem_matmul": False, "fused_sgd": False, "cuda_graphs": False}
    flipped = configs(args, "pt", 128, resolved, "cpu")
    assert [c.variant for c in flipped] == ["plain (book)", "channels_last=on", "compile=on", "stem_matmul=on",
                                            "fused_sgd=on"]  # not cuda_graphs: it acts on a GPU only
    assert [c.variant for c in configs(args, "pt", 128, resolved, "gpu")][-1] == "cuda_graphs=on"
    assert all(all_speed_ups()[b] for b in training_backends())  # every training backend has one to ablate


def test_summary_and_table_from_worker_results():
    """The arithmetic behind the table, on made-up worker results (no framework needed)."""
    flops = {"training": 6_000_000_000, "inference": 2_000_000_000}
    result = {"train_s": {"synthetic": [2.0, 1.0, 4.0], "real": [2.0, 2.0, 2.0]}, "eval_s": [0.5, 0.5, 0.5],
              "matmul": {"n": 2048, "gflops": {"a": [90.0, 100.0, 110.0], "b": [10.0, 10.0, 10.0]}},
              "options": {"precision": "fp32"}, "device": "cpu", "device_name": "Some CPU", "math": "fp32",
              "first_step_s": 3.0,
              "peak_host_bytes": 2 ** 30, "peak_device_bytes": None, "environment": {}}
    row = summarise(Config("pt", "alexnet", 4), [result], flops)
    assert row["train_images_per_s"]["synthetic"]["median"] == 2.0  # 4 images / 2 s
    assert row["real_over_synthetic"] == 1.0
    assert row["peak_gflops"] == 100.0 and row["peak_op"] == "a"
    assert row["mfu"] == pytest.approx(2.0 * 6e9 / 100e9)
    assert row["inference_mfu"] == pytest.approx(8.0 * 2e9 / 100e9)
    text = table([row])
    assert "pt" in text and "default" in text and "1.0 GiB" in text and "0.12" in text


@pytest.mark.parametrize("args, message", [
    (["--batch-sizes", "0"], "argument --batch-sizes: batch sizes values must be positive"),
    (["--batch-sizes", "32,x"], "argument --batch-sizes: batch sizes must be comma-separated integers"),
    (["--precision", "fp64"], "argument --precision: invalid choice: 'fp64'"),
    (["--data", "imagenet"], "argument --data: choose synthetic, real or synthetic,real"),
    (["--off", "turbo"], "argument --off: unknown speed-up(s) ['turbo']"),
    (["--steps", "0"], "argument --steps: must be a positive integer, got '0'"),
    (["--warmup", "-1"], "argument --warmup: must be an integer >= 0"),
    (["--backends", "caffe"], "unknown backend(s) ['caffe']"),
    (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
])
def test_a_wrong_flag_value_is_a_one_line_error(args, message):
    result = bench(*args)
    assert result.returncode == 2
    assert message in result.stderr.splitlines()[-1] and "Traceback" not in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--input-size", "32"], "at layer 'pool2'"),
    (["--baseline", "--input-size", "65"], "--baseline needs --input-size 67 or more"),
    (["--baseline", "--precision", "bf16"], "--baseline runs the book's float32 code"),
    (["--backends", "pt,mx", "--precision", "bf16"], "the MXNet backend (mx) trains in precision fp32, not 'bf16'"),
    (["--backends", "tf", "--on", "compile"], "speed-up compile belongs to backend pt"),
    (["--on", "compile", "--off", "compile"], "--on and --off both name compile"),
    (["--backends", "pt,onnx", "--precision", "bf16"],
     "--precision bf16: the ONNX Runtime backend (onnx) runs in precision fp32, not 'bf16'"),
    (["--backends", "onnx", "--math", "tf32"], "--math tf32: the ONNX Runtime backend (onnx) has math mode fp32, not 'tf32'"),
])
def test_impossible_requests_are_one_line_errors_before_any_work(args, message, tmp_path):
    result = bench(*args, "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("alexnet bench: error: ") and message in lines[0]
    assert not (tmp_path / "out").exists()


def test_gpu_without_a_gpu_is_a_clear_error(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = bench("--backends", "pt", "--device", "gpu", *TINY, "--data", "synthetic", "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--device gpu was asked for, but PyTorch cannot compute on a GPU here: " in lines[0]
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_workers_get_every_usable_core_unless_told_otherwise(monkeypatch):
    """MXNet would give its operators half the CPUs (it assumes hyper-threading): the workers get them all."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    env = worker_environment(None)
    assert env["OMP_NUM_THREADS"] == str(usable_cpus()) and env["MKL_NUM_THREADS"] == "1"  # a user's setting wins
    assert all(worker_environment(3)[name] == "3" for name in thread_variables())
    assert "OMP_NUM_THREADS" not in worker_environment(0)  # 0: each framework's own default
    assert str(ROOT) in env["PYTHONPATH"].split(os.pathsep)


def test_scaling_is_images_per_s_at_n_over_n_times_one_replica():
    """--replicas: made-up results for 1 and 2 replicas of 4 images each (global batch 8)."""
    from common.bench import _compare

    flops = {"training": 6_000_000_000, "inference": 2_000_000_000}

    def result(step_s):
        return {"train_s": {"synthetic": [step_s] * 3}, "eval_s": [0.5] * 3,
                "matmul": {"n": 64, "gflops": {"a": [100.0] * 3}}, "options": {}, "device": "cpu",
                "device_name": "Some CPU", "math": "fp32", "first_step_s": 1.0, "peak_host_bytes": 1,
                "peak_device_bytes": None, "environment": {}}

    one = summarise(Config("pt", "alexnet", 4), [result(1.0)], flops)  # 4 img/s
    two = summarise(Config("pt", "alexnet", 4, replicas=2), [result(1.6)], flops)  # 8 images in 1.6 s: 5 img/s
    assert two["global_batch"] == 8 and two["train_images_per_s"]["synthetic"]["median"] == 5.0
    _compare([one, two], 100.0, flops)
    assert two["scaling"] == pytest.approx(5.0 / (2 * 4.0)) and "scaling" not in one
    assert "2 replicas" in two["variant"] and "0.62" in table([one, two])


def test_two_pytorch_replicas_are_timed_with_their_scaling(tmp_path):
    """End to end: two DDP processes started by the bench, one result, the scaling column filled."""
    pytest.importorskip("torch")
    result = bench("--backends", "pt", "--replicas", "1,2", *TINY, "--data", "synthetic", "--out", str(tmp_path / "o"))
    assert result.returncode == 0, result.stderr
    header, rows = table_rows(result.stdout)
    assert "scaling" in header
    assert [r[3:5] for r in rows] == [["default", "2"], ["default,", "2"]]  # the second: "default, 2 replicas"
    payload = json.loads((tmp_path / "o" / "bench.json").read_text())
    second = payload["results"][1]
    assert second["replicas"] == 2 and second["global_batch"] == 4 and 0 < second["scaling"]


def test_an_inference_only_backend_alone_gets_its_row_and_one_line_on_what_is_skipped(tmp_path):
    """--backends onnx: the training comparisons asked for are skipped for it, said in one line."""
    get_backend("onnx")
    result = bench("--backends", "onnx", "--baseline", "--ablate", "--replicas", "1,2", *TINY, "--data", "synthetic",
                   "--out", str(tmp_path / "o"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"{INFERENCE_ONLY_NOTE}; --baseline, --ablate, --replicas 2 skipped for it"
    assert "inference img/s" in lines[1] and "Traceback" not in result.stderr
    _, rows = table_rows(result.stdout)
    assert [(r[0], r[3]) for r in rows] == [("onnx", "default")]
    assert [rows[0][i] for i in TRAINING_CELLS] == ["-"] * 8
    (row,) = json.loads((tmp_path / "o" / "bench.json").read_text())["results"]
    assert row["trains"] is False and row["inference_images_per_s"]["median"] > 0 and row["inference_mfu"] > 0
    assert (tmp_path / "o" / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_inference_only_row_has_no_training_figures_in_summary_table_and_chart(tmp_path):
    """Made-up worker results of a training backend and of onnx (no framework needed)."""
    flops = {"training": 6_000_000_000, "inference": 2_000_000_000}

    def result(train_s):
        return {"train_s": train_s, "eval_s": [0.5] * 3, "matmul": {"n": 64, "gflops": {"a": [100.0] * 3}},
                "options": {"precision": "fp32"}, "device": "cpu", "device_name": "Some CPU", "math": "fp32",
                "first_step_s": 1.0 if train_s else None, "first_inference_s": 0.7, "peak_host_bytes": 1,
                "peak_device_bytes": None, "environment": {}}

    pt = summarise(Config("pt", "alexnet", 4), [result({"synthetic": [1.0] * 3})], flops)
    onnx = summarise(Config("onnx", "alexnet", 4), [result({})], flops)
    _compare([pt, onnx], 100.0, flops)
    assert pt["trains"] and pt["mfu"] == pytest.approx(4.0 * 6e9 / 100e9)
    assert not onnx["trains"] and onnx["train_images_per_s"] == {} and onnx["mfu"] is onnx["mfu_machine"] is None
    assert onnx["inference_images_per_s"]["median"] == 8.0 and onnx["inference_mfu"] == pytest.approx(8.0 * 2e9 / 100e9)
    assert json.loads(json.dumps(onnx)) == onnx  # bench.json holds it as it is
    header, *_, pt_line, onnx_line = table([pt, onnx]).splitlines()
    assert onnx_line.split()[:5] == ["onnx", "cpu", "fp32", "default", "4"]
    assert [onnx_line.split()[i] for i in TRAINING_CELLS] == ["-"] * 8
    assert [onnx_line.split()[i] for i in INFERENCE_CELLS] == ["8.0", "0.16"]
    assert [pt_line.split()[i] for i in INFERENCE_CELLS] == ["8.0", "0.16"] and pt_line.split()[5] == "4.0"
    png = plot([pt, onnx], flops, 100.0, tmp_path / "bench.png", "tiny")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_takes_an_inference_only_backend_where_named_and_defaults_to_the_training_ones():

    assert build_parser().parse_args(["bench"]).backends == training_backends()
    assert "onnx" not in training_backends() and set(training_backends()) < set(BACKENDS)
    assert build_parser().parse_args(["bench", "--backends", "pt,onnx"]).backends == ["pt", "onnx"]


def test_the_profiling_tool_groups_one_steps_time_by_what_the_kernels_do(tmp_path):
    """benchmarks/profile_pt.py (a tool for speed work, not a benchmark): on CPU at the smallest
    size it prints the wall time, the groups that add up to the profiled time, and the top operators."""
    pt = get_backend("pt")
    command = [sys.executable, str(ROOT / "benchmarks" / "profile_pt.py"), "--device", "cpu", "--batch", "2",
               "--input-size", "67", "--steps", "1", "--warmup", "1", "--top", "3"]
    result = subprocess.run(command + ["--trace", str(tmp_path / "trace.json")], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "trace.json").read_text())["traceEvents"]  # the Chrome trace, whole
    assert [p.name for p in tmp_path.iterdir()] == ["trace.json"]  # no temporary left beside it
    lines = [line for line in result.stdout.splitlines() if not line.startswith("USDT")]
    assert lines[0].startswith("AlexNet 1x67x67, batch 2, fp32, math fp32, CPU")
    total = float(lines[1].split("operators (self CPU time) ")[1].split(" ms")[0])
    groups = {line.split()[0] for line in lines[2:] if line.startswith("  ") and "ms" in line and "[" not in line}
    shares = [float(line.split()[-1].rstrip("%")) for line in lines[2:] if line.startswith("  ") and "[" not in line]
    assert total > 0 and {"convolution", "matrix"} <= groups and sum(shares) == pytest.approx(100, abs=0.5)
    assert sum("[convolution]" in line or "[matrix product]" in line for line in lines) >= 1
    for bad in (["--on", "xla"], ["--input-size", "40"], ["--batch", "0"],  # another backend's speed-up, too small
                ["--trace", str(tmp_path / "missing" / "trace.json")]):  # refused before the work, not after
        refused = subprocess.run(command + bad, capture_output=True, text=True, timeout=300)
        assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        assert refused.stderr.startswith("benchmarks/profile_pt.py: error: ") and "Traceback" not in refused.stderr
    if not pt.gpu_available():  # a GPU asked for where there is none: one line, exit 2
        refused = subprocess.run(command[:2] + ["--device", "gpu"], capture_output=True, text=True, timeout=300)
        assert refused.returncode == 2 and refused.stderr.startswith("benchmarks/profile_pt.py: error: ")
        assert len(refused.stderr.strip().splitlines()) == 1
