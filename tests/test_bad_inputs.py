"""Bad input, one case at a time, through the `alexnet` command as a user meets it.

Every case asserts the exit status (2 bad input, 3 diverged, 4 a framework's own failure,
128 + N stopped by signal N), ONE line on stderr that names the problem (the flag, file,
field or layer), no traceback, and that no file was damaged or half-written (SHA-256 of
every file in the folders involved, before and after). Cases run in-process through
``common.cli.main``; signals go to a real subprocess. Training cases use PyTorch at 65x65 on
a few synthetic images (``FashionMNIST.load`` is replaced), so the suite needs neither the
real data nor minutes; the data-file cases run the real reader on files written here.
docs/training.md's "What happens when" table summarises these cases.
"""
from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import common.data
from common import ROOT
from common.cli import main
from common.data import FashionMNIST
from common.io import TEMP_PREFIX
from common.spec import book_alexnet
from common.weights import init_weights, read_npz, save_weights
from tests.conftest import get_backend
from tests.test_train import tiny_fashion_mnist

SPEC = book_alexnet().with_input(1, 65, 65)
TINY = tiny_fashion_mnist(64, 8)
TRAIN = ["train", "--backend", "pt", "--input-size", "65", "--batch-size", "8", "--limit-train", "16",
         "--limit-test", "8", "--epochs", "1", "--no-progress"]


# ----------------------------------------------------------------------------- helpers
def digest(*paths) -> dict[str, str]:
    """SHA-256 of every file under ``paths`` (files or folders): equal before and after = nothing damaged or added."""
    found = {}
    for path in map(Path, paths):
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
        for file in files:
            found[str(file)] = hashlib.sha256(file.read_bytes()).hexdigest()
    return found


def refused(capsys, argv, status, *names, keep=()) -> str:
    """Run ``alexnet argv``; assert the exit status, one line on stderr naming each of ``names``, no
    traceback, and every file under ``keep`` unchanged. Returns the line."""
    before = digest(*keep)
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse's errors exit from parse_args
        code = exit_.code
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == status, err
    assert "Traceback" not in out + err
    assert len(lines) == 1, err
    for name in names:
        assert name in lines[0], lines[0]
    assert digest(*keep) == before, "a file was changed or added"
    return lines[0]


@pytest.fixture
def no_data(monkeypatch):
    """For cases that must fail before any data is read: reading it fails the test."""
    def load(*args, **kwargs):
        raise AssertionError("the data was loaded before the bad input was found")
    monkeypatch.setattr(FashionMNIST, "load", classmethod(load))


@pytest.fixture
def tiny(monkeypatch):
    """Tiny noise data for the cases that train or evaluate with PyTorch (skipped where it is not installed)."""
    get_backend("pt")
    monkeypatch.setattr(FashionMNIST, "load", classmethod(lambda cls, *args, **kwargs: TINY))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A completed one-epoch PyTorch run (checkpoint, metrics, curves) that cases may read but not change."""
    get_backend("pt")  # skipped with the reason where PyTorch is not installed
    run = tmp_path_factory.mktemp("finished") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FashionMNIST, "load", classmethod(lambda cls, *args, **kwargs: TINY))
        assert main([*TRAIN, "--run-dir", str(run)]) == 0
    return run


@pytest.fixture(scope="module")
def good_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "good.npz"
    save_weights(path, init_weights(SPEC, 0))
    return path


def edited(source: Path, target: Path, edit) -> Path:
    """A copy of the .npz ``source`` at ``target`` with ``edit(arrays)`` applied (written as the project writes)."""
    arrays = read_npz(source)
    edit(arrays)
    save_weights(target, arrays)
    return target


# ----------------------------------------------------------------------------- flags
ARGUMENTS = [
    (["train", "--lr", "nan"], "argument --lr: must be a finite number, got 'nan'"),
    (["train", "--lr", "inf"], "argument --lr: must be a finite number, got 'inf'"),
    (["train", "--lr", "-0.1"], "argument --lr: must be a number > 0, got '-0.1'"),
    (["train", "--lr", "0"], "argument --lr: must be a number > 0, got '0'"),
    (["train", "--lr", "fast"], "argument --lr: must be a number, got 'fast'"),
    (["train", "--lr", "1e300"], "argument --lr: lr must be at most 3.403e+38 (float32's largest"),
    (["train", "--momentum", "inf"], "argument --momentum: must be a finite number, got 'inf'"),
    (["train", "--momentum", "nan"], "argument --momentum: must be a finite number, got 'nan'"),
    (["train", "--momentum", "1"], "argument --momentum: must be a number in [0, 1), got '1'"),
    (["train", "--momentum", "-0.5"], "argument --momentum: must be a number in [0, 1), got '-0.5'"),
    (["train", "--weight-decay", "nan"], "argument --weight-decay: must be a finite number, got 'nan'"),
    (["train", "--weight-decay=-inf"], "argument --weight-decay: must be a finite number, got '-inf'"),
    (["train", "--weight-decay=-1e-4"], "argument --weight-decay: must be a number >= 0, got '-1e-4'"),
    (["train", "--epochs", "0"], "argument --epochs: must be a positive integer, got '0'"),
    (["train", "--epochs", "-2"], "argument --epochs: must be a positive integer, got '-2'"),
    (["train", "--epochs", "1.5"], "argument --epochs: must be a positive integer, got '1.5'"),
    (["train", "--batch-size", "0"], "argument --batch-size: must be a positive integer, got '0'"),
    (["train", "--batch-size", "many"], "argument --batch-size: must be a positive integer, got 'many'"),
    (["train", "--limit-train", "0"], "argument --limit-train: must be a positive integer, got '0'"),
    (["train", "--limit-test", "-1"], "argument --limit-test: must be a positive integer, got '-1'"),
    (["train", "--seed", "-1"], "argument --seed: must be an integer >= 0, got '-1'"),
    (["train", "--seed", "x"], "argument --seed: must be an integer >= 0, got 'x'"),
    (["train", "--input-size", "nan"], "argument --input-size: must be a positive integer, got 'nan'"),
    (["train", "--checkpoint-every", "0"], "argument --checkpoint-every: must be a positive integer, got '0'"),
    (["train", "--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    (["train", "--backend", "caffe"], "argument --backend: invalid choice: 'caffe'"),
    (["train", "--off", "warp"], "argument --off: unknown speed-up(s) ['warp']"),
    (["evaluate", "--weights", "w.npz", "--limit-test", "0"], "argument --limit-test: must be a positive integer"),
    (["compare", "--backends", "pt,caffe"], "argument --backends: unknown backend(s) ['caffe']"),
    (["compare", "--lr", "inf"], "argument --lr: must be a finite number, got 'inf'"),
    (["parity", "--scale-tolerances", "nan"], "argument --scale-tolerances: must be a finite number, got 'nan'"),
    (["parity", "--scale-tolerances", "-1"], "argument --scale-tolerances: must be a number > 0, got '-1'"),
    (["parity", "--seed", "-3"], "argument --seed: must be an integer >= 0, got '-3'"),
    (["summary", "--batch", "0"], "argument --batch: must be a positive integer, got '0'"),
    (["summary", "--input", "0,65,65"], "argument --input: --input (C,H,W) values must be positive, got '0,65,65'"),
    (["summary", "--input", "1,65"], "argument --input: --input (C,H,W) needs 3 comma-separated integers"),
    (["summary", "--variant", "vgg"], "argument --variant: invalid choice: 'vgg'"),
    (["bench", "--steps", "nan"], "argument --steps: must be a positive integer, got 'nan'"),
    (["bench", "--batch-sizes", "32,0"], "argument --batch-sizes: batch sizes values must be positive"),
]


@pytest.mark.parametrize("argv, message", ARGUMENTS, ids=[" ".join(a) for a, _ in ARGUMENTS])
def test_a_bad_flag_value_is_one_line_naming_the_flag(argv, message, tmp_path, capsys, no_data):
    command, *rest = argv
    needs_backend = command in ("train", "evaluate") and "--backend" not in rest
    full = [command, *(["--backend", "pt"] if needs_backend else []), *rest]
    if command in ("train", "compare"):
        full += ["--run-dir", tmp_path / "run"]
    line = refused(capsys, full, 2, message, keep=[tmp_path])
    assert line.startswith(f"alexnet {command}: error: ")
    assert not (tmp_path / "run").exists()  # refused before the run dir was made


@pytest.mark.parametrize("argv, names", [
    (["summary", "--input", "1,32,32"], ["at layer 'pool2'", "1x65x65"]),
    ([*TRAIN, "--input-size", "64"], ["layer", "65"]),
    (["evaluate", "--backend", "pt", "--weights", "w.npz", "--input-size", "40"], ["layer", "65"]),
    ([*TRAIN, "--off", "xla"], ["speed-up 'xla' belongs to backend tf, not pt"]),
    ([*TRAIN, "--on", "channels_last", "--off", "channels_last"], ["--on and --off both name channels_last"]),
], ids=["summary input too small", "train input too small", "evaluate input too small", "another backend's speed-up",
        "on and off"])
def test_a_spec_or_speed_up_that_cannot_work_is_refused_before_any_work(argv, names, tmp_path, capsys, no_data):
    refused(capsys, [*argv, *(["--run-dir", tmp_path / "run"] if argv[0] == "train" else [])], 2, *names,
            keep=[tmp_path])
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- output locations
def test_a_run_dir_inside_a_file_is_refused_before_the_data_is_read(tmp_path, capsys, no_data):
    (tmp_path / "file").write_text("not a folder")
    refused(capsys, [*TRAIN, "--run-dir", tmp_path / "file" / "run"], 2,
            f"run directory {tmp_path / 'file' / 'run'} is not writable (Not a directory)", keep=[tmp_path])


def test_a_run_dir_that_is_a_file_is_refused_before_the_data_is_read(tmp_path, capsys, no_data):
    (tmp_path / "run").write_text("a file")
    refused(capsys, [*TRAIN, "--run-dir", tmp_path / "run"], 2, f"run directory {tmp_path / 'run'} is not writable",
            keep=[tmp_path])


# ----------------------------------------------------------------------------- weights files
def _weights_cases():
    def nan(arrays):
        arrays["conv2.weight"][0, 0, 0, 0] = np.nan

    def inf(arrays):
        arrays["fc8.bias"][3] = -np.inf

    def rename(arrays):
        arrays["conv1.w"] = arrays.pop("conv1.weight")

    def shape(arrays):
        arrays["fc8.weight"] = arrays["fc8.weight"][:5]

    def dtype(arrays):
        arrays["conv1.bias"] = arrays["conv1.bias"].astype(np.float64)

    def pickled(tmp, good):
        np.savez(tmp / "pickled.npz", **{"conv1.weight": np.array([{"run": "code"}], dtype=object)})
        return tmp / "pickled.npz"

    def not_zip(tmp, good):
        (tmp / "text.npz").write_text("these are not weights")
        return tmp / "text.npz"

    def truncated(tmp, good):
        (tmp / "cut.npz").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
        return tmp / "cut.npz"

    return [
        ("missing file", lambda tmp, good: tmp / "nothing.npz", [], ["nothing.npz: no such weights file"]),
        ("a folder", lambda tmp, good: tmp, [], [f"{{tmp}}: no such weights file"]),
        ("not a zip", not_zip, [], ["text.npz: not a readable .npz file"]),
        ("truncated", truncated, [], ["cut.npz: not a readable .npz file"]),
        ("pickled", pickled, [], ["pickled.npz: refused, the file holds a pickled object"]),
        ("wrong keys", lambda tmp, good: edited(good, tmp / "keys.npz", rename), [],
         ["keys.npz do not fit", "missing conv1.weight (96, 1, 11, 11)", "unexpected conv1.w"]),
        ("wrong shape", lambda tmp, good: edited(good, tmp / "shape.npz", shape), [],
         ["shape.npz do not fit", "fc8.weight: shape (5, 4096), expected (10, 4096)"]),
        ("wrong dtype", lambda tmp, good: edited(good, tmp / "dtype.npz", dtype), [],
         ["conv1.bias: dtype float64, expected float32"]),
        ("NaN weight", lambda tmp, good: edited(good, tmp / "nan.npz", nan), [],
         ["nan.npz: non-finite values (NaN or infinity) in conv2.weight"]),
        ("infinite bias", lambda tmp, good: edited(good, tmp / "inf.npz", inf), [],
         ["inf.npz: non-finite values (NaN or infinity) in fc8.bias"]),
        ("another input size", lambda tmp, good: good, ["--input-size", "100"],
         ["do not fit spec 'book' with input 1x100x100", "fc6.weight: shape (4096, 256), expected (4096, 1024)"]),
    ]


WEIGHTS = _weights_cases()


@pytest.mark.parametrize("builder, extra, names", [c[1:] for c in WEIGHTS], ids=[c[0] for c in WEIGHTS])
def test_bad_weights_are_refused_by_evaluate_before_the_data_is_read(builder, extra, names, good_weights, tmp_path,
                                                                     capsys, no_data):
    path = builder(tmp_path, good_weights)
    names = [name.replace("{tmp}", str(tmp_path)) for name in names]
    refused(capsys, ["evaluate", "--backend", "pt", "--input-size", "65", "--weights", path, *extra], 2, *names,
            keep=[tmp_path, good_weights])


def _export_flags(extra):
    """evaluate's --input-size S as export's --input 1,S,S."""
    return [f"1,{a},{a}" if prev == "--input-size" else "--input" if a == "--input-size" else a
            for prev, a in zip([None, *extra], extra)]


@pytest.mark.parametrize("builder, extra, names", [c[1:] for c in WEIGHTS], ids=[c[0] for c in WEIGHTS])
def test_bad_weights_are_refused_by_export_before_any_file(builder, extra, names, good_weights, tmp_path, capsys):
    """The same checker as evaluate's, before the framework is imported or the output folder made."""
    path = builder(tmp_path, good_weights)
    names = [name.replace("{tmp}", str(tmp_path)) for name in names]
    refused(capsys, ["export", "--backend", "pt", "--input", "1,65,65", "--weights", path, "--out", tmp_path / "out",
                     *_export_flags(extra)], 2, *names, keep=[tmp_path, good_weights])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("backend", ["pt", "tf", "mx", "onnx"])
def test_weights_for_another_input_are_one_line_from_every_export(backend, good_weights, tmp_path, capsys):
    refused(capsys, ["export", "--backend", backend, "--weights", good_weights, "--out", tmp_path / "out"], 2,
            f"alexnet export: error: {good_weights} do not fit spec 'book' with input 1x224x224 (1 problem(s)): "
            "fc6.weight: shape (4096, 256), expected (4096, 6400)", keep=[tmp_path, good_weights])
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- checkpoints
def _copy_run(finished_run, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    return run


def _checkpoint_cases():
    def config(field, value):
        def edit(arrays):
            saved = json.loads(str(arrays["meta/config"]))
            saved[field] = value
            arrays["meta/config"] = np.array(json.dumps(saved))
        return edit

    def nan(arrays):
        arrays["fc7.weight"][5, 5] = np.nan

    def plain_weights(arrays):
        for name in [n for n in arrays if "/" in n]:
            del arrays[name]

    def replace_checkpoint(write):
        """A run dir holding only a checkpoint, made by ``write(path, finished checkpoint)``."""
        def build(finished_run, tmp):
            (tmp / "run").mkdir()
            write(tmp / "run" / "checkpoint.npz", finished_run / "checkpoint.npz")
            return tmp / "run"
        return build

    def edit_checkpoint(edit):
        return replace_checkpoint(lambda path, finished: edited(finished, path, edit))

    return [
        ("no checkpoint", lambda run, tmp: tmp / "empty", ["--resume"], ["--resume: no checkpoint at", "empty"]),
        ("exists without --resume", lambda run, tmp: run, [], ["checkpoint.npz exists: pass resume (--resume)"]),
        ("not a zip", replace_checkpoint(lambda p, _: p.write_bytes(os.urandom(4096))), ["--resume"],
         ["checkpoint.npz: not a readable .npz file"]),
        ("truncated", replace_checkpoint(lambda p, finished: p.write_bytes(finished.read_bytes()[:100_000])),
         ["--resume"], ["checkpoint.npz: not a readable .npz file"]),
        ("pickled", replace_checkpoint(lambda p, _: np.savez(p, x=np.array([None], dtype=object))), ["--resume"],
         ["checkpoint.npz: refused, the file holds a pickled object"]),
        ("plain weights", edit_checkpoint(plain_weights), ["--resume"],
         ["checkpoint.npz: not a training checkpoint of this project"]),
        ("another batch size", lambda run, tmp: run, ["--resume", "--batch-size", "16"],
         ["was written by a different run (batch_size: checkpoint 8, now 16); resume with the same settings"]),
        ("another input size", lambda run, tmp: run, ["--resume", "--input-size", "70"],
         ["(input_size: checkpoint [65, 65], now [70, 70])"]),
        ("another backend's run", edit_checkpoint(config("backend", "tf")), ["--resume", "--epochs", "2"],
         ["(backend: checkpoint 'tf', now 'pt')"]),
        ("another dropout", edit_checkpoint(config("dropout", [0.0, 0.0])), ["--resume", "--epochs", "2"],
         ["(dropout: checkpoint [0.0, 0.0], now [0.5, 0.5])"]),
        ("NaN weights", edit_checkpoint(nan), ["--resume", "--epochs", "2"],
         ["checkpoint.npz: non-finite values (NaN or infinity) in fc7.weight"]),
        ("already finished", lambda run, tmp: run, ["--resume"],
         ["has finished 1 epoch(s) already; ask for more (--epochs, now 1)"]),
    ]


CHECKPOINTS = _checkpoint_cases()


@pytest.mark.parametrize("builder, extra, names", [c[1:] for c in CHECKPOINTS], ids=[c[0] for c in CHECKPOINTS])
def test_a_bad_checkpoint_is_refused_and_left_as_it_was(builder, extra, names, finished_run, tmp_path, capsys, tiny):
    run = builder(finished_run, tmp_path)
    refused(capsys, [*TRAIN, "--run-dir", run, *extra], 2, *names, keep=[tmp_path, finished_run])


# ----------------------------------------------------------------------------- data files
IMAGES = "train-images-idx3-ubyte.gz"  # the first file the reader reads


def _idx(dims, payload: bytes | None = None) -> bytes:
    header = bytes([0, 0, 8, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)
    return header + (payload if payload is not None else bytes(int(np.prod(dims))))


DATA_FILES = [
    ("not IDX at all", b"hello, world", "bad IDX magic"),
    ("too short", b"\x00\x00", "2 bytes is too short for an IDX header"),
    ("corrupt gzip", b"\x1f\x8b" + os.urandom(64), "corrupt gzip data"),
    ("truncated gzip", gzip.compress(_idx((10, 28, 28)), mtime=0)[:40], "corrupt gzip data"),
    ("truncated IDX", gzip.compress(_idx((60000, 28, 28), b"\x00" * 1000), mtime=0), "truncated: 1016 bytes"),
    ("trailing bytes", _idx((2, 28, 28)) + b"junk", "4 trailing bytes"),
    ("labels where images belong", _idx((60000,)), "expected a 3-D IDX file"),
    ("not the official data", gzip.compress(_idx((3, 28, 28)), mtime=0), "decompressed SHA-256 is"),
]


@pytest.mark.parametrize("content, message", [c[1:] for c in DATA_FILES], ids=[c[0] for c in DATA_FILES])
def test_a_bad_data_file_is_named_before_the_model_is_built(content, message, tmp_path, capsys, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    for spec in common.data.FILES.values():
        (data / spec.name).write_bytes(b"placeholder")
    (data / IMAGES).write_bytes(content)
    monkeypatch.setattr("common.cli.load_backend",
                        lambda *a, **k: pytest.fail("the framework was loaded before the data was read"))
    refused(capsys, [*TRAIN, "--run-dir", tmp_path / "run", "--data-dir", data], 2, f"{data / IMAGES}: {message}",
            keep=[tmp_path])


@pytest.mark.parametrize("folder", ["empty", "missing"])
def test_a_data_dir_without_the_files_is_named(folder, tmp_path, capsys):
    data = tmp_path / "data"
    if folder == "empty":
        data.mkdir()
    refused(capsys, [*TRAIN, "--run-dir", tmp_path / "run", "--data-dir", data], 2,
            f"data directory {data} lacks {IMAGES}, train-labels-idx1-ubyte.gz", keep=[tmp_path])


def _data_mirror_variable() -> str | None:
    """The data module's mirror-override variable, where this checkout has one (the download work adds it)."""
    source = Path(common.data.__file__)
    files = source.parent.rglob("*.py") if source.name == "__init__.py" else [source]
    return "ALEXNET_DATA_MIRROR" if any("ALEXNET_DATA_MIRROR" in f.read_text() for f in files) else None


@pytest.mark.skipif(_data_mirror_variable() is None,
                    reason="common.data has no ALEXNET_DATA_MIRROR override in this checkout, so no mirror can be "
                           "pointed at a closed port (the empty --data-dir cases stand in)")
def test_a_mirror_that_refuses_is_named_and_nothing_is_left_in_the_cache(tmp_path, capsys, monkeypatch):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("ALEXNET_DATA_MIRROR", f"http://127.0.0.1:{port}/")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(common.data.ENV_VAR, raising=False)
    monkeypatch.setattr(common.data.dataset, "DEBIAN_DIR", tmp_path / "no-debian-package")  # where the lookup reads it
    refused(capsys, [*TRAIN, "--run-dir", tmp_path / "run"], 2, f"127.0.0.1:{port}", keep=[tmp_path])


# ----------------------------------------------------------------------------- faults while training
def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(finished_run, tmp_path, capsys, tiny, monkeypatch):
    run = _copy_run(finished_run, tmp_path)

    def write_on_a_full_disk(member, array, **kwargs):
        member.write(b"\x93NUMPY the first bytes")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(np.lib.format, "write_array", write_on_a_full_disk)
    refused(capsys, [*TRAIN, "--run-dir", run, "--resume", "--epochs", "2"], 2,
            "could not save the run at the end of epoch 2 (No space left on device)",
            f"the last finite checkpoint, {run / 'checkpoint.npz'}, holds the end of epoch 1", keep=[tmp_path])


FAILED_SAVE = """
import errno, gc, os, sys
import numpy as np
from common.weights import save_weights
def fail(member, array, **kwargs):
    member.write(b"x" * 100)
    raise {error}
np.lib.format.write_array = fail
try:
    save_weights(sys.argv[1], {{"w": np.zeros(3, np.float32)}})
except BaseException as error:
    print("raised", type(error).__name__)
gc.collect()
"""


@pytest.mark.parametrize("error", ["OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))", "KeyboardInterrupt"],
                         ids=["full disk", "second signal"])
def test_a_failed_save_leaves_no_writer_for_the_garbage_collector(error, tmp_path):
    """A save cut short (a full disk, a second Ctrl-C or SIGTERM) raises once; no half-closed zip writer
    is left behind to print "Exception ignored in ZipFile.__del__ ... seek of closed file" later."""
    result = subprocess.run([sys.executable, "-c", FAILED_SAVE.format(error=error), str(tmp_path / "w.npz")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["raised", error.split("(")[0]], result.stderr
    assert result.stderr == ""
    assert list(tmp_path.iterdir()) == []


def test_a_frameworks_own_exception_is_one_line(tmp_path, capsys, tiny, monkeypatch):
    get_backend("pt")
    import alexnet_pt._trainer

    def out_of_memory(self, x, labels, *, seed):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\n(many more lines of detail)")

    monkeypatch.setattr(alexnet_pt._trainer.Trainer, "train_step", out_of_memory)
    refused(capsys, [*TRAIN, "--run-dir", tmp_path / "run"], 4, "alexnet train: failed: RuntimeError in ",
            "test_bad_inputs: CUDA out of memory. Tried to allocate 2.00 GiB (ALEXNET_DEBUG=1 shows the traceback)",
            keep=[tmp_path])


def test_a_diverging_run_exits_3_and_keeps_the_last_finite_checkpoint(tmp_path, capsys, tiny):
    """lr 1e9: the first step leaves huge but finite weights (saved: --checkpoint-every 1); the next loss is not finite."""
    run = tmp_path / "run"
    line = refused(capsys, [*TRAIN, "--run-dir", run, "--lr", "1e9", "--checkpoint-every", "1"], 3,
                   "alexnet train: diverged: training loss became", "at epoch 1, batch 2 (lr 1000000000.0 too high?)",
                   f"the last finite checkpoint, {run / 'checkpoint.npz'}, holds epoch 1, batch 1 of 2")
    assert "nan" in line or "inf" in line
    assert list(read_npz(run / "checkpoint.npz")["meta/position"][:2]) == [0, 1]
    assert not any(p.name.startswith(TEMP_PREFIX) for p in run.iterdir())


def test_asking_for_a_gpu_without_one_is_refused(tmp_path, capsys, tiny):
    if get_backend("pt").gpu_available():
        pytest.skip("PyTorch sees a GPU here")
    refused(capsys, [*TRAIN, "--run-dir", tmp_path / "run", "--device", "gpu"], 2,
            "--device gpu was asked for, but PyTorch cannot compute on a GPU here", keep=[tmp_path])


def test_evaluate_refuses_nan_weights_from_a_diverged_checkpoint(finished_run, tmp_path, capsys, no_data):
    nan = edited(finished_run / "checkpoint.npz", tmp_path / "diverged.npz",
                 lambda arrays: arrays["fc6.bias"].__setitem__(0, np.nan))
    refused(capsys, ["evaluate", "--backend", "pt", "--input-size", "65", "--weights", nan], 2,
            f"{nan}: non-finite values (NaN or infinity) in fc6.bias", keep=[tmp_path, finished_run])


# ----------------------------------------------------------------------------- signals
DRIVER = """
import sys
import common.data
from tests.conftest import get_backend
from tests.test_train import tiny_fashion_mnist
data = tiny_fashion_mnist(64, 8)
common.data.FashionMNIST.load = classmethod(lambda cls, *args, **kwargs: data)  # no real data needed
from common.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_a_running_train_saves_at_the_next_step_and_exits_128_plus_n(signum, status, tmp_path, capsys,
                                                                                 tiny):
    """`alexnet train` in its own process, saving every step; the signal comes once the first checkpoint exists."""
    get_backend("pt")
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    argv = ["train", "--backend", "pt", "--input-size", "65", "--batch-size", "8", "--epochs", "2", "--limit-train", "32",
            "--limit-test", "8", "--no-progress", "--checkpoint-every", "1", "--run-dir", str(run)]
    child = subprocess.Popen([sys.executable, "-c", DRIVER, *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (run / "checkpoint.npz").exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        child.send_signal(signum)
        out, err = child.communicate(timeout=240)
    finally:
        child.kill()
    name = signal.Signals(signum).name
    assert child.returncode == status, err[-3000:]
    assert "Traceback" not in out + err
    assert f"{name}: stopping after this step and saving" in err
    stopped = [line for line in err.splitlines() if line.startswith("stopped by")]
    assert stopped and stopped[0].startswith(f"stopped by {name}: the last finite checkpoint, {run / 'checkpoint.npz'}")
    assert stopped[0].endswith("; continue with --resume")
    epoch, batch = read_npz(run / "checkpoint.npz")["meta/position"][:2]
    assert (epoch, batch) != (0, 0)
    assert not any(p.name.startswith(TEMP_PREFIX) for p in run.iterdir())
    if signum == signal.SIGTERM:  # and the run goes on from there
        assert main(argv[:-4] + ["--run-dir", str(run), "--resume"]) == 0
        assert "pt epoch 2:" in capsys.readouterr().out


# ----------------------------------------------------------------------------- silently wrong, no more
def _nan_weights(good_weights, tmp_path) -> Path:
    return edited(good_weights, tmp_path / "nan.npz", lambda arrays: arrays["conv2.weight"].__setitem__(0, np.nan))


def test_predict_refuses_nan_weights(good_weights, tmp_path, capsys):
    """Before: exit 0 and "nan%" rows. The same refusal as evaluate's, before any image is read."""
    nan = _nan_weights(good_weights, tmp_path)
    refused(capsys, ["predict", tmp_path / "no-image.png", "--backend", "pt", "--weights", nan, "--variant", "book",
                     "--input", "1,65,65"], 2, f"{nan}: non-finite values (NaN or infinity) in conv2.weight",
            keep=[tmp_path])


def test_convert_refuses_nan_weights_and_writes_nothing(good_weights, tmp_path, capsys):
    nan = _nan_weights(good_weights, tmp_path)
    refused(capsys, ["convert", nan, tmp_path / "out.npz", "--input", "1,65,65"], 2,
            f"{nan}: non-finite values (NaN or infinity) in conv2.weight", keep=[tmp_path])


def test_evaluate_reports_the_images_really_scored(good_weights, capsys, tiny):
    assert main(["evaluate", "--backend", "pt", "--input-size", "65", "--weights", str(good_weights),
                 "--limit-test", "100000000", "--no-progress"]) == 0
    assert f"on {len(TINY.test_labels)} images" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["convert", "{good}", "{tmp}/w.npz", "--input", "1,65,65"],
                                  ["export", "--backend", "pt", "--weights", "{good}", "--out", "{tmp}/out",
                                   "--input", "1,65,65"]], ids=["convert", "export"])
def test_a_full_disk_is_named_before_a_framework_writes(argv, good_weights, tmp_path, capsys, monkeypatch):
    """Some frameworks' writers abort the process on a full disk (PyTorch: SIGABRT, h5py: a segfault):
    the free space is checked first, and the line says so."""
    import common.io

    monkeypatch.setattr(common.io.shutil, "disk_usage", lambda path: SimpleNamespace(total=10 << 30, used=10 << 30,
                                                                                     free=4096))
    argv = [a.format(good=good_weights, tmp=tmp_path) for a in argv]
    refused(capsys, argv, 2, "No space left on device", keep=[tmp_path])
    assert not (tmp_path / "w.npz").exists() and not any((tmp_path / "out").glob("*alexnet*"))


def test_a_later_convert_removes_what_a_killed_one_left(good_weights, tmp_path, capsys):
    stale = tmp_path / f"{TEMP_PREFIX}999999999-0123abcd-w.npz"  # a writer that is no longer alive
    stale.write_bytes(b"half a file")
    assert main(["convert", str(good_weights), str(tmp_path / "w.npz"), "--input", "1,65,65"]) == 0
    assert not stale.exists() and (tmp_path / "w.npz").is_file()


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` grey pixels (its image data is empty)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_a_huge_image_is_bad_input(tmp_path, capsys, good_weights):
    """A 20000x20000 PNG: Pillow's decompression-bomb guard is an unreadable image, exit 2."""
    pytest.importorskip("PIL.Image")
    path = tmp_path / "huge.png"
    path.write_bytes(png_header(20000, 20000))  # the size is all Pillow reads before it refuses
    refused(capsys, ["predict", path, "--backend", "pt", "--weights", good_weights, "--variant", "book",
                     "--input", "1,65,65"], 2, f"{path}: not a readable image", "decompression bomb", keep=[tmp_path])


NON_FINITE = [("NaN", np.nan), ("+inf", np.inf), ("-inf", -np.inf)]


@pytest.mark.parametrize("name, value", NON_FINITE, ids=[n for n, _ in NON_FINITE])
def test_forward_refuses_a_non_finite_pixel_in_every_backend(every_backend, name, value):
    """Before: MXNet's and TensorFlow's pooling and ReLU dropped a NaN and returned plausible logits."""
    spec = SPEC
    model = every_backend.build(spec, device="cpu")
    x = np.zeros((2, *spec.input_shape), np.float32)
    x[1, 0, 10, 10] = value
    x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if every_backend.LAYOUT == "NHWC" else x
    with pytest.raises(ValueError, match=r"the input holds 1 non-finite value\(s\) \(NaN or infinity\)"):
        every_backend.forward(model, x)


@pytest.mark.parametrize("labels, message", [
    ([0, 10], r"labels must be in 0\.\.9, got \[10\]"),
    ([-1, 3], r"labels must be in 0\.\.9, got \[-1\]"),
    ([1.7, 3.2], "labels must be whole class numbers"),
    ([1, 2, 3], r"labels must be one per example: expected shape \(2,\)"),
], ids=["10", "-1", "fractions", "one too many"])
def test_loss_and_grads_checks_labels_by_one_rule_in_every_backend(backend, labels, message):
    """Before: MXNet returned a finite loss for label 10 or -1, and every backend truncated 1.7 to 1."""
    model = backend.build(SPEC.with_dropout(0), device="cpu")
    x = np.zeros((2, *SPEC.input_shape), np.float32)
    x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if backend.LAYOUT == "NHWC" else x
    with pytest.raises(ValueError, match=message):
        backend.loss_and_grads(model, x, np.array(labels))


def test_load_weights_refuses_none_and_nan_weights(every_backend, good_weights):
    model = every_backend.build(SPEC, device="cpu")
    with pytest.raises(ValueError, match="weights must be a mapping of canonical arrays or an .npz path, got NoneType"):
        every_backend.load_weights(model, None)
    nan = {name: value.copy() for name, value in read_npz(good_weights).items()}
    nan["fc8.bias"][0] = np.nan
    with pytest.raises(ValueError, match=r"non-finite values \(NaN or infinity\) in fc8.bias"):
        every_backend.load_weights(model, nan)


# ----------------------------------------------------------------------------- runaway replicas
def test_more_replicas_than_cpus_are_refused_before_any_process_starts(tmp_path, capsys, no_data, monkeypatch):
    """Before: --replicas 1000 started about 1000 processes and woke the kernel's out-of-memory killer."""
    import common.launch
    import common.machine

    monkeypatch.setattr(common.machine, "usable_cpus", lambda: 2)
    monkeypatch.setattr(common.launch, "run_processes", lambda *a, **k: pytest.fail("replicas were started"))
    refused(capsys, [*TRAIN, "--batch-size", "9", "--replicas", "3", "--run-dir", tmp_path / "run"], 2,
            "--replicas 3: each replica process needs a CPU of its own and this process may use 2; use --replicas 2",
            keep=[tmp_path])
    assert not (tmp_path / "run").exists()


def test_replicas_that_would_not_fit_in_memory_are_refused(tmp_path, capsys, no_data, monkeypatch):
    import common.launch
    import common.machine

    monkeypatch.setattr(common.machine, "usable_cpus", lambda: 64)
    monkeypatch.setattr(common.machine, "available_memory", lambda: 1 << 30)
    monkeypatch.setattr(common.launch, "run_processes", lambda *a, **k: pytest.fail("replicas were started"))
    line = refused(capsys, [*TRAIN, "--batch-size", "64", "--replicas", "64", "--run-dir", tmp_path / "run"], 2,
                   "--replicas 64: each replica process needs about", "1.0 GiB is available; use --replicas",
                   "or a smaller --batch-size", keep=[tmp_path])
    assert not (tmp_path / "run").exists(), line


def test_a_replica_killed_by_sigkill_is_named_as_out_of_memory(tmp_path, capsys, monkeypatch):
    """Before: 55 lines of "replica N failed (exit 143): no output", memory never named. Now the replicas the
    launcher stopped are one line, and a SIGKILL names the out-of-memory killer."""
    import common.data
    import common.launch

    def run_processes(processes, *, exit_codes, **kwargs):
        for process in processes[1:]:
            Path(process.log).write_text("")  # no output
        exit_codes[:] = [1, 137] + [143] * (len(processes) - 2)
        return 1

    monkeypatch.setattr(common.launch, "run_processes", run_processes)
    monkeypatch.setattr(common.data, "locate", lambda *a, **k: tmp_path / "data")
    assert main([*TRAIN, "--batch-size", "8", "--replicas", "2", "--run-dir", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("alexnet train: replica 1 failed (exit 137)")
    assert err[-1].startswith("alexnet train: replica(s) 1 killed by SIGKILL (exit 137), most likely by the "
                              "kernel's out-of-memory killer: each replica needs about")
    assert len(err) == 2


def test_a_signal_while_starting_replicas_starts_no_more(monkeypatch):
    """Before: SIGTERM to the launcher did not stop it starting replicas."""
    import common.launch

    started = []
    real_popen = subprocess.Popen

    def popen(*args, **kwargs):
        started.append(real_popen(*args, **kwargs))
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the launcher is starting them
        return started[-1]

    monkeypatch.setattr(common.launch.subprocess, "Popen", popen)
    sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
    codes: list[int] = []
    status = common.launch.run_processes([common.launch.Process(sleeper) for _ in range(4)], grace=5, exit_codes=codes)
    assert len(started) == 1 and codes == [143] and status == 143


# ----------------------------------------------------------------------------- exits that say why
def test_parity_on_a_gpu_without_one_is_exit_2_with_the_reason(capsys):
    """Before: exit 1 and a table of '-'."""
    backend = get_backend("pt")
    if backend.gpu_available():
        pytest.skip("PyTorch computes on a GPU here")
    refused(capsys, ["parity", "--backends", "pt", "--device", "gpu", "--input", "1,65,65"], 2,
            "--device gpu was asked for, but PyTorch cannot compute on a GPU here")


def test_bench_refuses_an_unwritable_out_before_the_benchmark(tmp_path, capsys, monkeypatch):
    """Before: the whole benchmark ran, then failed to write, and its results were lost."""
    import common.bench

    monkeypatch.setattr(common.bench, "_run_jobs", lambda *a, **k: pytest.fail("the benchmark ran"))
    (tmp_path / "file").write_text("not a folder")
    refused(capsys, ["bench", "--backends", "pt", "--data", "synthetic", "--out", tmp_path / "file" / "out"], 2,
            f"output folder {tmp_path / 'file' / 'out'} is not writable", keep=[tmp_path])


def test_compare_into_an_earlier_comparison_does_not_advise_resume(finished_run, tmp_path, capsys, no_data):
    (tmp_path / "cmp" / "pt").mkdir(parents=True)
    shutil.copy(finished_run / "checkpoint.npz", tmp_path / "cmp" / "pt" / "checkpoint.npz")
    line = refused(capsys, ["compare", "--backends", "pt", "--run-dir", tmp_path / "cmp"], 2,
                   "holds an earlier comparison", "compare starts afresh and cannot continue one: use a new --run-dir",
                   keep=[tmp_path])
    assert "--resume" not in line


def test_compare_refuses_a_backend_named_twice_before_any_work(tmp_path, capsys, no_data):
    refused(capsys, ["compare", "--backends", "pt,pt", "--run-dir", tmp_path / "cmp"], 2,
            "argument --backends: backend(s) pt named more than once in 'pt,pt'", keep=[tmp_path])
    assert not (tmp_path / "cmp").exists()


def test_evaluate_on_images_names_its_own_flag(good_weights, tmp_path, capsys):
    """Weights for 65x65 inputs evaluated on a folder of images: evaluate has --input-size, not --input."""
    pytest.importorskip("PIL.Image")
    refused(capsys, ["evaluate", "--backend", "pt", "--weights", good_weights, "--images", tmp_path], 2,
            "these weights fit no variant at input size 224", "say which with --variant and --input-size")


def test_a_tensorflow_failure_is_one_line_from_a_fresh_interpreter(tmp_path):
    """Before: absl/oneDNN log lines came before the one line."""
    get_backend("tf")
    (tmp_path / "rand.weights.h5").write_bytes(os.urandom(4096))
    result = subprocess.run([sys.executable, "-m", "common", "convert", str(tmp_path / "rand.weights.h5"),
                             str(tmp_path / "w.npz"), "--input", "1,65,65"], cwd=ROOT, capture_output=True, text=True,
                            timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 2
    assert result.stderr.splitlines() == [result.stderr.strip()], result.stderr
    assert "not a readable Keras weights file" in result.stderr


@pytest.mark.parametrize("settings, message", [
    (dict(lr=float("nan")), "lr must be a positive number, got nan"),
    (dict(lr=1e300), r"lr must be at most 3\.403e\+38"),
    (dict(lr=0.01, momentum=1.5), r"momentum must be in \[0, 1\), got 1.5"),
], ids=["lr nan", "lr 1e300", "momentum 1.5"])
def test_make_trainer_checks_its_settings_in_every_backend(backend, settings, message):
    model = backend.build(SPEC, device="cpu")
    with pytest.raises(ValueError, match=message):
        backend.make_trainer(model, **settings)


# ----------------------------------------------------------------------------- compare: a parting is not a bug
def test_compare_says_where_two_backends_part_and_whether_a_spike_came_first():
    """Before: three curves that agreed for 12 steps, spiked, then went separate ways looked like a broken
    backend. Now each pair's first parting step is named, with the spike before it, and what that means."""
    from common.divergence import MEANING, PART_TOLERANCE, partings, report

    agree = [2.30, 2.29, 2.27, 2.25]
    spiked = agree + [3.4, 2.9, 2.8]
    parted = partings({"pt": spiked, "tf": agree + [3.4, 2.3, 2.3], "mx": [2.30, 2.40, 2.27, 2.25, 3.4, 2.9, 2.8]})
    described = [p.describe() for p in parted]
    assert described == [
        "pt vs tf: part at step 6 of 7 (pt 2.9, tf 2.3), after a loss spike at step 5",
        "pt vs mx: part at step 2 of 7 (pt 2.29, mx 2.4), with no loss spike before",
        "tf vs mx: part at step 2 of 7 (tf 2.29, mx 2.4), with no loss spike before",
    ]
    text = report(parted)
    assert text.splitlines()[0] == (f"training losses per step, parted where they differ by more than "
                                    f"{PART_TOLERANCE:g} (relative):")
    assert text.endswith(MEANING) and "alexnet parity" in MEANING
    assert report(partings({"pt": agree, "tf": [x * (1 + 1e-5) for x in agree]})).endswith("agree on all 4 steps")
    assert "--dropout 0" in report(parted, dropout=True)
