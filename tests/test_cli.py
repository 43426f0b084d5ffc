"""The `alexnet` command as a user runs it: output, exit codes, one-line errors."""
import json
import subprocess
import sys

import numpy as np
import pytest

from common.backend import capabilities, training_backends
from common.cli import main
from common.spec import book_alexnet
from common.weights import (GOOD_STEPS_KEY, LOSS_SCALE_INITIAL, LOSS_SCALE_KEY, LOSS_SCALED_PRECISIONS, init_weights,
                            read_npz, save_weights)
from tests.conftest import REAL_DATA, TRAINING_BACKENDS, get_backend


def run(*args):
    """The command in a fresh interpreter, as from a shell."""
    return subprocess.run([sys.executable, "-m", "common", *args], capture_output=True, text=True, timeout=600)


def test_summary_all_backends_agree_on_a_non_square_input(all_backends, capsys):
    assert main(["summary", "--backend", "all", "--input", "1,224,244"]) == 0
    out = capsys.readouterr().out
    count = len(TRAINING_BACKENDS)
    flatten = next(line for line in out.splitlines() if line.startswith("flatten"))
    assert flatten.split()[2:2 + count] == ["1x7680"] * count
    conv1 = next(line for line in out.splitlines() if line.startswith("conv1"))
    by_layout = {"NCHW": "1x96x54x59", "NHWC": "1x54x59x96"}  # each backend measures in its own layout
    assert conv1.split()[2:2 + count] == [by_layout[capabilities(name).layout] for name in TRAINING_BACKENDS]
    assert f"all {count} backends agree" in out and "!" not in out


def test_summary_default_input(capsys):
    assert main(["summary", "--input", "1,224,224"]) == 0
    out = capsys.readouterr().out
    assert "1x6400" in out and "46,764,746" in out


def test_too_small_input_is_a_one_line_error():
    result = run("summary", "--input", "1,32,32")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "at layer 'pool2'" in result.stderr and "1x65x65" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["summary", "--input", "1,a,3"], "--input (C,H,W) must be comma-separated integers"),
    (["summary", "--input", "1,224"], "needs 3 comma-separated integers"),
    (["summary", "--backend", "caffe"], "unknown backend(s) ['caffe']"),
    (["train", "--backend", "pt", "--epochs", "0"], "argument --epochs: must be a positive integer, got '0'"),
])
def test_bad_flags_name_the_flag(args, message):
    result = run(*args)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_parity_command_passes_on_this_cpu(all_backends, capsys):
    assert main(["parity", "--input", "1,65,65", "--seed", "7"]) == 0
    out = capsys.readouterr().out
    assert "seed 7" in out and "PASS" in out and "FAIL" not in out
    assert all(name in out for name in TRAINING_BACKENDS)


def test_convert_round_trip_through_every_native_format(all_backends, tmp_path, capsys):
    spec_args = ["--input", "1,65,65"]
    weights = init_weights(book_alexnet().with_input(1, 65, 65), 4)
    save_weights(tmp_path / "start.npz", weights)
    chain = ["start.npz", "model.pt", "model.weights.h5", "model.params", "end.npz"]
    for src, dst in zip(chain, chain[1:]):
        assert main(["convert", str(tmp_path / src), str(tmp_path / dst), *spec_args]) == 0
    end = read_npz(tmp_path / "end.npz")
    assert list(end) == list(weights) and all(np.array_equal(end[k], weights[k]) for k in weights)


def test_convert_refuses_bad_input_and_writes_nothing(tmp_path, capsys):
    bad = init_weights(book_alexnet().with_input(1, 65, 65), 0)
    bad["fc8.weight"] = bad["fc8.weight"][:5]
    save_weights(tmp_path / "bad.npz", bad)
    assert main(["convert", str(tmp_path / "bad.npz"), str(tmp_path / "out.pt"), "--input", "1,65,65"]) == 2
    assert "fc8.weight: shape (5, 4096), expected (10, 4096)" in capsys.readouterr().err
    assert not (tmp_path / "out.pt").exists()
    assert main(["convert", str(tmp_path / "bad.npz"), str(tmp_path / "out.tflite")]) == 2
    assert "unknown weights format" in capsys.readouterr().err


@pytest.mark.skipif(not REAL_DATA.is_dir(), reason=f"real Fashion-MNIST not at {REAL_DATA}")
def test_train_then_evaluate_on_real_data(backend, tmp_path, capsys):
    run_dir = tmp_path / "run"
    common = ["--backend", backend.NAME, "--input-size", "65", "--limit-test", "64", "--data-dir", str(REAL_DATA),
              "--no-progress"]
    assert main(["train", *common, "--epochs", "1", "--limit-train", "64", "--batch-size", "32",
                 "--run-dir", str(run_dir)]) == 0
    assert f"{backend.NAME} epoch 1: train loss" in capsys.readouterr().out  # --no-progress: no bars, results still
    assert {p.name for p in run_dir.iterdir()} == {"checkpoint.npz", "metrics.csv", "metrics.json", "curves.png", "steps.csv"}
    assert main(["evaluate", *common, "--weights", str(run_dir / "checkpoint.npz")]) == 0
    assert "test accuracy" in capsys.readouterr().out
    assert main(["train", *common, "--device", "cpu", "--run-dir", str(run_dir)]) == 2  # would overwrite
    assert "pass resume" in capsys.readouterr().err


@pytest.mark.skipif(not REAL_DATA.is_dir(), reason=f"real Fashion-MNIST not at {REAL_DATA}")
def test_compare_trains_every_backend_on_the_same_batches(all_backends, tmp_path, capsys):
    run_dir = tmp_path / "cmp"
    assert main(["compare", "--backends", ",".join(TRAINING_BACKENDS), "--input-size", "65", "--epochs", "1", "--limit-train", "32",
                 "--limit-test", "32", "--batch-size", "16", "--data-dir", str(REAL_DATA), "--no-progress",
                 "--run-dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert all(f"\n{name} " in out for name in TRAINING_BACKENDS)
    assert (run_dir / "compare.png").read_bytes()[:4] == b"\x89PNG"
    histories = json.loads((run_dir / "compare.json").read_text())
    assert sorted(histories) == sorted(TRAINING_BACKENDS)
    first_losses = [histories[name]["epochs"][0]["train_loss"] for name in TRAINING_BACKENDS]
    assert max(first_losses) - min(first_losses) < 0.05  # same start, same batches: close (dropout differs)
    for name in TRAINING_BACKENDS:  # every row says where and how it computed
        assert histories[name]["device"].startswith("cpu: ") and histories[name]["math"] == "fp32"
        assert histories[name]["precision"] == "fp32"
    assert "cpu: " in out


def test_parity_command_fails_loudly_on_a_transposed_dense_kernel(all_backends, monkeypatch, capsys):
    """A backend that loads fc7 transposed (shapes still fit: 4096x4096) must fail the command."""
    import common.parity

    real_load = common.parity.load_backend

    class TransposesFc7:
        def __init__(self, backend):
            self._backend = backend

        def __getattr__(self, name):
            return getattr(self._backend, name)

        def build(self, spec, *, weights, **kwargs):
            weights = dict(weights, **{"fc7.weight": np.ascontiguousarray(weights["fc7.weight"].T)})
            return self._backend.build(spec, weights=weights, **kwargs)

    monkeypatch.setattr(common.parity, "load_backend",
                        lambda name: TransposesFc7(real_load(name)) if name == "tf" else real_load(name))
    assert main(["parity", "--input", "1,65,65", "--seed", "3"]) == 1
    out = capsys.readouterr().out
    fc7 = next(line for line in out.splitlines() if line.startswith("fc7 "))
    assert fc7.split()[1] != "FAIL" and "FAIL" in fc7  # pt passes, tf fails on that very layer
    assert out.rstrip().splitlines()[-1].startswith("FAIL")


@pytest.mark.parametrize("args, message", [
    (["--backend", "pt", "--off", "xla"], "speed-up 'xla' belongs to backend tf, not pt"),
    (["--backend", "pt", "--on", "compile", "--off", "compile"], "--on and --off both name compile"),
    (["--backend", "mx", "--off", "turbo"], "argument --off: unknown speed-up(s) ['turbo']"),
])
def test_train_speed_up_flags_are_checked_before_any_work(args, message, tmp_path):
    result = run("train", *args, "--run-dir", str(tmp_path / "run"), "--data-dir", str(tmp_path / "nothing-here"))
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


# Every mixed precision a training backend's record lists, as (backend, precision).
MIXED_PRECISIONS = [(name, precision) for name in training_backends() for precision in capabilities(name).precisions
                    if precision != "fp32"]


@pytest.mark.skipif(not REAL_DATA.is_dir(), reason=f"real Fashion-MNIST not at {REAL_DATA}")
@pytest.mark.parametrize("name, precision", MIXED_PRECISIONS, ids=[f"{n}-{p}" for n, p in MIXED_PRECISIONS])
def test_train_in_mixed_precision_on_the_cpu_where_the_framework_has_it(name, precision, tmp_path):
    get_backend(name)  # skipped with the reason where the framework is not installed
    run_dir = tmp_path / "run"
    assert main(["train", "--backend", name, "--precision", precision, "--input-size", "65", "--epochs", "1",
                 "--limit-train", "32", "--limit-test", "32", "--batch-size", "16", "--data-dir", str(REAL_DATA),
                 "--no-progress", "--run-dir", str(run_dir)]) == 0
    checkpoint = read_npz(run_dir / "checkpoint.npz")
    config = json.loads(str(checkpoint["meta/config"]))
    assert config["trainer_options"]["precision"] == precision and config["math"] == "fp32"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert np.isfinite(metrics["epochs"][0]["test_loss"]) and metrics["config"]["trainer_options"]["precision"] == precision
    # fp16's loss scale is kept for --resume: two finite steps from 2**15 (none skipped at this scale)
    scaled = precision in LOSS_SCALED_PRECISIONS
    assert (f"optim/{LOSS_SCALE_KEY}" in checkpoint) == scaled
    if scaled:
        assert float(checkpoint[f"optim/{LOSS_SCALE_KEY}"]) == LOSS_SCALE_INITIAL
        assert int(checkpoint[f"optim/{GOOD_STEPS_KEY}"]) == 2


def test_a_precision_the_backend_lacks_is_refused_before_any_work(tmp_path):
    result = run("train", "--backend", "mx", "--precision", "bf16", "--run-dir", str(tmp_path / "run"),
                 "--data-dir", str(tmp_path / "nothing-here"))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1
    assert lines[0] == ("alexnet train: error: the MXNet backend (mx) trains in precision fp32, not 'bf16': "
                        + dict(capabilities("mx").precision_gaps)["bf16"])
    assert not (tmp_path / "run").exists()


def test_every_flag_has_a_help_text_that_names_its_default():
    """The CLI reads like its manual: no flag without a help text, none with a default it does not state."""
    import argparse

    from common.cli import build_parser

    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    silent = []
    for name, parser in commands.choices.items():
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            stated = action.help and (action.required or action.default in (None, False) or "default" in action.help)
            if not stated:
                silent.append(f"{name} {(action.option_strings or [action.dest])[0]}")
    assert silent == []
