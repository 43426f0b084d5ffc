"""``alexnet export``: each deployable artifact runs in a fresh process with its framework's plain
loader and no project code, at two batch sizes, and agrees with the float64 reference.

Tolerance: relative error <= 1e-4 on the logits (the parity suite's). A narrow AlexNet (64-wide
fc6/fc7) keeps the files and the export small on two cores; the CLI is run on the real one.
Each artifact takes its backend's layout: NHWC for TensorFlow's SavedModel, NCHW for the rest.
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from common import reference
from common.backend import ARTIFACT_INPUT, ARTIFACT_OUTPUT, BACKENDS, capabilities, exporting_backends
from common.cli import main
from common.parity import to_backend_layout
from common.spec import book_alexnet, paper_alexnet
from common.weights import init_weights, save_weights
from tests.conftest import REQUIRE_ALL, get_backend

TOLERANCE = 1e-4
SPEC = book_alexnet().with_input(1, 65, 65)


def narrow(spec):
    return replace(spec, layers=tuple(replace(layer, out_features=64) if layer.name in ("fc6", "fc7") else layer
                                      for layer in spec.layers))


NARROWS = {"book": narrow(SPEC), "paper": narrow(paper_alexnet().with_input(3, 67, 67).with_num_classes(10))}
NARROW = NARROWS["book"]
BATCHES = (1, 3)
# Top-level packages of this project, named exactly: the editable install's finder module
# (__editable___alexnet_three_..._finder) is loaded in every process and is not project code.
OURS = sorted({"common", *BACKENDS.values()})
# The consumer: the framework alone (no project module may be imported), running the artifact
# as its backend's record says anyone can (``Artifact.consumer``).
CONSUMER = f"""
import sys
import numpy as np
path, inputs, outputs, INPUT, OUTPUT = sys.argv[1:]
x = np.load(inputs)
exec(sys.stdin.read())  # the record's consumer: defines run(x)
np.savez(outputs, **{{key: run(x[key]) for key in x.files}})
ours = sorted(m for m in sys.modules if m.split(".")[0] in {OURS!r})
assert not ours, ours
"""


def needs(*modules: str) -> None:
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as error:
            if REQUIRE_ALL:
                raise
            pytest.skip(f"{module} unavailable: {error}")


def run_in_fresh_process(artifact, consumer: str, tmp_path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    np.savez(tmp_path / "inputs.npz", **inputs)
    out = tmp_path / f"{artifact.name}.out.npz"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing of this project on the path
    proc = subprocess.run([sys.executable, "-c", CONSUMER, str(artifact), str(tmp_path / "inputs.npz"), str(out),
                           ARTIFACT_INPUT, ARTIFACT_OUTPUT], input=consumer,
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with np.load(out) as result:
        return {key: result[key] for key in result.files}


# Every backend on the book's network; the paper's (LRN: TensorFlow's own op, MXNet's from
# primitives, which once failed in the whole graph at batch >= 2) where LRN is the backend's own code.
@pytest.mark.parametrize("name, variant", [(name, "book") for name in exporting_backends()]
                         + [("tf", "paper"), ("mx", "paper")])
def test_every_artifact_runs_in_a_fresh_process_at_two_batch_sizes(name, variant, tmp_path, seed):
    backend = get_backend(name)
    needs(*(module for artifact in backend.CAPABILITIES.exports for module in artifact.needs))
    spec = NARROWS[variant]
    weights = init_weights(spec, seed)
    paths = backend.export_artifacts(backend.build(spec, weights=weights, device="cpu"), tmp_path / "out")
    assert sorted(p.name for p in paths) == sorted("alexnet" + ending for ending in backend.CAPABILITIES.export_endings)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in paths)  # no leftovers
    rng = np.random.default_rng(seed)
    inputs_nchw = {f"batch{b}": rng.standard_normal((b, *spec.input_shape)).astype(np.float32) for b in BATCHES}
    inputs = {key: to_backend_layout(x, backend.LAYOUT) for key, x in inputs_nchw.items()}  # the artifact's layout
    consumers = {"alexnet" + a.ending: a.consumer for a in backend.CAPABILITIES.exports if a.consumer}
    entry_points = [path for path in paths if path.name in consumers]
    assert entry_points
    for path in entry_points:
        outputs = run_in_fresh_process(path, consumers[path.name], tmp_path, inputs)
        for key, x in inputs_nchw.items():
            expected = reference.forward(spec, weights, x)[0]
            assert outputs[key].shape == expected.shape
            error = reference.relative_error(outputs[key], expected)
            print(f"{name} {variant} {path.name} {key}: {error:.2e}")
            assert error <= TOLERANCE, f"{path.name} at {key}: {error:.2e}"


def test_every_exported_file_has_a_loader_and_every_backend_exports(capsys):
    for name in BACKENDS:
        artifacts = capabilities(name).exports
        assert any(artifact.consumer for artifact in artifacts), name  # something a consumer opens
        for artifact in artifacts:  # the consumer defines run from path, INPUT and OUTPUT, and is valid Python
            compile(artifact.consumer, artifact.ending, "exec")
            assert not artifact.consumer or "run = " in artifact.consumer, artifact
    assert exporting_backends() == list(BACKENDS)
    with pytest.raises(SystemExit):
        main(["export", "--backend", "caffe", "--weights", "w.npz", "--out", "x"])
    assert "invalid choice: 'caffe'" in capsys.readouterr().err


def test_export_command_writes_the_onnx_graph_and_says_how_to_run_it(tmp_path, seed, capsys):
    get_backend("onnx")
    weights = init_weights(SPEC, seed)
    save_weights(tmp_path / "w.npz", weights)
    assert main(["export", "--backend", "onnx", "--weights", str(tmp_path / "w.npz"), "--input", "1,65,65",
                 "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "input 'input' float32 (batch, 1, 65, 65) NCHW, output 'logits' (batch, 10)" in out
    (artifact,) = capabilities("onnx").exports
    assert artifact.consumer in out  # the very code the fresh process runs below
    x = np.random.default_rng(seed).standard_normal((2, *SPEC.input_shape)).astype(np.float32)
    got = run_in_fresh_process(tmp_path / "out" / "alexnet.onnx", artifact.consumer, tmp_path, {"x": x})["x"]
    assert reference.relative_error(got, reference.forward(SPEC, weights, x)[0]) <= TOLERANCE


def test_export_command_says_the_savedmodel_takes_nhwc(tmp_path, seed, capsys):
    """The SavedModel takes TensorFlow's own layout: the command says so, and NHWC input is what
    matches the reference (the file is removed by the next export: a killed one's leftovers go)."""
    get_backend("tf")
    weights = init_weights(SPEC, seed)
    save_weights(tmp_path / "w.npz", weights)
    (tmp_path / "out").mkdir()
    leftover = tmp_path / "out" / ".tmp-999999999-0123abcd-alexnet_savedmodel"  # no such process
    (leftover / "variables").mkdir(parents=True)
    assert main(["export", "--backend", "tf", "--weights", str(tmp_path / "w.npz"), "--input", "1,65,65",
                 "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "input 'input' float32 (batch, 65, 65, 1) NHWC, output 'logits' (batch, 10)" in out
    (artifact,) = capabilities("tf").exports
    assert artifact.consumer in out
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["alexnet_savedmodel"]
    x = np.random.default_rng(seed).standard_normal((2, *SPEC.input_shape)).astype(np.float32)
    got = run_in_fresh_process(tmp_path / "out" / "alexnet_savedmodel", artifact.consumer, tmp_path,
                               {"x": to_backend_layout(x, "NHWC")})
    assert reference.relative_error(got["x"], reference.forward(SPEC, weights, x)[0]) <= TOLERANCE


@pytest.mark.parametrize("name", ["onnx", "tf", "mx"])
def test_export_with_wrong_weights_is_one_line_and_writes_nothing(name, tmp_path, capsys):
    get_backend(name)
    weights = init_weights(SPEC, 0)
    save_weights(tmp_path / "w.npz", weights)
    code = main(["export", "--backend", name, "--weights", str(tmp_path / "w.npz"), "--input", "1,99,99",
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("alexnet export: error: ") and "fc6.weight: shape (4096, 256)" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_export_to_an_unwritable_folder_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    save_weights(tmp_path / "w.npz", init_weights(SPEC, 0))
    code = main(["export", "--backend", "mx", "--weights", str(tmp_path / "w.npz"), "--input", "1,65,65",
                 "--out", str(blocker / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"alexnet export: error: output folder {blocker / 'out'} is not writable")
    assert len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "w.npz"]


def test_savedmodel_export_that_fails_midway_leaves_no_folder(tmp_path, monkeypatch):
    backend = get_backend("tf")
    from alexnet_tf._framework import tf

    save = tf.saved_model.save

    def save_then_fail(obj, export_dir, **kwargs):  # the whole model written, then a full disk
        save(obj, export_dir, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tf.saved_model, "save", save_then_fail)
    with pytest.raises(OSError, match="No space left"):
        backend.export_artifacts(backend.build(NARROW, device="cpu"), tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_mxnet_export_has_no_dropout_and_a_failed_one_leaves_neither_file(tmp_path, monkeypatch):
    backend = get_backend("mx")
    from alexnet_mx._framework import mx

    model = backend.build(NARROW, device="cpu")
    symbol, params = backend.export_artifacts(model, tmp_path / "good")
    graph = json.loads(symbol.read_text())
    ops = {node["op"] for node in graph["nodes"]}
    assert "Dropout" not in ops and {"Convolution", "FullyConnected"} <= ops
    assert [graph["nodes"][i]["name"] for i in graph["arg_nodes"]][0] == ARTIFACT_INPUT
    assert sorted(mx.nd.load(str(params))) == sorted(f"arg:{name.replace('.', '_')}" for name in
                                                     backend.export_weights(model))

    def fail(*args, **kwargs):  # the symbol is written by then
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mx.nd, "save", fail)
    with pytest.raises(OSError, match="No space left"):
        backend.export_artifacts(model, tmp_path / "bad")
    assert list((tmp_path / "bad").iterdir()) == []


def test_pt_export_without_onnxscript_names_the_extra_and_writes_nothing(tmp_path, monkeypatch):
    backend = get_backend("pt")
    model = backend.build(NARROW, device="cpu")
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # what an environment without it imports
    with pytest.raises(ImportError, match=r"needs onnxscript .*alexnet-three\[onnx\]"):
        backend.export_artifacts(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_pt_export_whose_onnx_file_fails_leaves_neither_file(tmp_path, monkeypatch, capsys):
    """The pair is written whole or not at all: the .pt2 is complete when the ONNX export fails
    (a full disk), and neither file, nor a temporary, is left; the command says so in one line."""
    get_backend("pt")
    needs("onnxscript")
    import torch

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch.onnx, "export", full_disk)
    save_weights(tmp_path / "w.npz", init_weights(SPEC, 0))
    code = main(["export", "--backend", "pt", "--weights", str(tmp_path / "w.npz"), "--input", "1,65,65",
                 "--out", str(tmp_path / "out")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and lines == ["alexnet export: error: [Errno 28] No space left on device"]
    assert list((tmp_path / "out").iterdir()) == []
