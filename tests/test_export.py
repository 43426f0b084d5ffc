"""``alexnet export``: each deployable artifact runs in a fresh process with its framework's plain
loader and no project code, at two batch sizes, and agrees with the float64 reference.

Tolerance: relative error <= 1e-4 on the logits (the parity suite's). A narrow AlexNet (64-wide
fc6/fc7) keeps the files and the export small on two cores; the CLI is run on the real one.
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from common import reference
from common.backend import exporting_backends
from common.cli import main
from common.spec import book_alexnet
from common.weights import init_weights, save_weights
from tests.conftest import REQUIRE_ALL, get_backend

TOLERANCE = 1e-4
SPEC = book_alexnet().with_input(1, 65, 65)
NARROW = replace(SPEC, layers=tuple(replace(layer, out_features=64) if layer.name in ("fc6", "fc7") else layer
                                    for layer in SPEC.layers))
BATCHES = (1, 3)

# The consumer: the framework alone (no project module may be imported), by the artifact's ending.
CONSUMER = """
import sys
import numpy as np
path, inputs, outputs = sys.argv[1:]
x = np.load(inputs)
if path.endswith(".pt2"):
    import torch
    program = torch.export.load(path).module()
    run = lambda a: program(torch.from_numpy(a)).detach().numpy()
else:
    import onnxruntime
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    run = lambda a: session.run(None, {session.get_inputs()[0].name: a})[0]
np.savez(outputs, **{key: run(x[key]) for key in x.files})
ours = sorted(m for m in sys.modules if m.split(".")[0] == "common" or m.startswith("alexnet_"))
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


def run_in_fresh_process(artifact, tmp_path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    np.savez(tmp_path / "inputs.npz", **inputs)
    out = tmp_path / f"{artifact.name}.out.npz"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing of this project on the path
    proc = subprocess.run([sys.executable, "-c", CONSUMER, str(artifact), str(tmp_path / "inputs.npz"), str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with np.load(out) as result:
        return {key: result[key] for key in result.files}


@pytest.mark.parametrize("name", exporting_backends())
def test_every_artifact_runs_in_a_fresh_process_at_two_batch_sizes(name, tmp_path, seed):
    backend = get_backend(name)
    needs("onnxruntime", "onnxscript")  # the consumer of .onnx files; PyTorch's ONNX exporter (the onnx extra)
    weights = init_weights(NARROW, seed)
    paths = backend.export_artifacts(backend.build(NARROW, weights=weights, device="cpu"), tmp_path / "out")
    assert sorted(p.suffix for p in paths) == sorted(backend.CAPABILITIES.exports)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in paths)  # no leftovers
    rng = np.random.default_rng(seed)
    inputs = {f"batch{b}": rng.standard_normal((b, *NARROW.input_shape)).astype(np.float32) for b in BATCHES}
    for path in paths:
        outputs = run_in_fresh_process(path, tmp_path, inputs)
        for key, x in inputs.items():
            expected = reference.forward(NARROW, weights, x)[0]
            assert outputs[key].shape == expected.shape
            error = reference.relative_error(outputs[key], expected)
            print(f"{name} {path.name} {key}: {error:.2e}")
            assert error <= TOLERANCE, f"{path.name} at {key}: {error:.2e}"


def test_export_command_writes_the_onnx_graph_and_says_how_to_run_it(tmp_path, seed, capsys):
    get_backend("onnx")
    weights = init_weights(SPEC, seed)
    save_weights(tmp_path / "w.npz", weights)
    assert main(["export", "--backend", "onnx", "--weights", str(tmp_path / "w.npz"), "--input", "1,65,65",
                 "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "input 'input' float32 (batch, 1, 65, 65) NCHW, output 'logits' (batch, 10)" in out
    assert "onnxruntime.InferenceSession(path)" in out
    x = np.random.default_rng(seed).standard_normal((2, *SPEC.input_shape)).astype(np.float32)
    got = run_in_fresh_process(tmp_path / "out" / "alexnet.onnx", tmp_path, {"x": x})["x"]
    assert reference.relative_error(got, reference.forward(SPEC, weights, x)[0]) <= TOLERANCE


def test_export_with_wrong_weights_is_one_line_and_writes_nothing(tmp_path, capsys):
    get_backend("onnx")
    weights = init_weights(SPEC, 0)
    save_weights(tmp_path / "w.npz", weights)
    code = main(["export", "--backend", "onnx", "--weights", str(tmp_path / "w.npz"), "--input", "1,99,99",
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("alexnet export: error: ") and "fc6.weight: shape (4096, 256)" in err
    assert list((tmp_path / "out").iterdir()) == []


def test_export_refuses_a_backend_without_artifacts(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--backend", "tf", "--weights", "w.npz", "--out", "x"])
    assert "invalid choice: 'tf'" in capsys.readouterr().err


def test_pt_export_without_onnxscript_names_the_extra_and_writes_nothing(tmp_path, monkeypatch):
    backend = get_backend("pt")
    model = backend.build(NARROW, device="cpu")
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # what an environment without it imports
    with pytest.raises(ImportError, match=r"needs onnxscript .*alexnet-three\[onnx\]"):
        backend.export_artifacts(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
