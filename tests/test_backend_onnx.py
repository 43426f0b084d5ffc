"""alexnet_onnx: the ONNX graph built from the spec, run by ONNX Runtime, against the float64 reference.

Tolerance: relative error ||a-b||/||b|| <= 1e-4 per layer (the parity suite's); float32 is
expected near 1e-6 and each test prints what it measured. Small on purpose (2 CPU cores):
every variant at its smallest input and once at its own size (224 book, 227 paper), the
adaptive-pooling and LRN cases on tiny specs that isolate the layer.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

try:
    import onnxruntime  # noqa: F401
except ImportError as error:  # CI (ALEXNET_REQUIRE_ALL_BACKENDS=1) must not skip a backend
    if os.environ.get("ALEXNET_REQUIRE_ALL_BACKENDS") == "1":
        raise
    pytest.skip(f"ONNX Runtime unavailable: {error}", allow_module_level=True)

import alexnet_onnx as backend  # noqa: E402
from alexnet_onnx._model import adaptive_bins, uniform_window  # noqa: E402
from common import reference, shapes  # noqa: E402
from common.backend import DeviceError, training_backends  # noqa: E402
from common.cli import main  # noqa: E402
from common.parity import forward_case, layer_errors  # noqa: E402
from common.spec import (VARIANTS, AdaptiveAvgPool2d, Conv2d, Dense, Flatten,  # noqa: E402
                         LocalResponseNorm, ModelSpec, ReLU, book_alexnet, get_spec)
from common.weights import WeightsError, init_weights, save_weights  # noqa: E402

TOLERANCE = 1e-4
HAS_GPU = backend.gpu_available()
SMALL = book_alexnet().with_input(1, 65, 65)


def narrow(spec: ModelSpec) -> ModelSpec:
    """``spec`` with 64-wide fc6 and fc7 (at 65x65: 22M -> 3.8M parameters): for the tests about the
    graph, its files or one layer rather than about the classifier, so they stay quick on two cores."""
    return replace(spec, layers=tuple(replace(layer, out_features=64) if layer.name in ("fc6", "fc7") else layer
                                      for layer in spec.layers))


NARROW = narrow(SMALL)


def worst_layer(errors: dict[str, float]) -> tuple[str, float]:
    name = max(errors, key=errors.get)
    return name, errors[name]


def check_against_reference(spec: ModelSpec, seed: int, batch: int = 2, device: str = "cpu") -> dict[str, float]:
    weights, x, expected = forward_case(spec, seed, batch)
    model = backend.build(spec, weights=weights, device=device)
    errors = layer_errors(backend, model, x, expected)
    assert set(errors) == {layer.name for layer in spec.layers} | {"logits"}
    name, error = worst_layer(errors)
    print(f"{spec.name} {'x'.join(map(str, spec.input_shape))} batch {batch}: worst {name} {error:.2e}")
    assert error <= TOLERANCE, f"{name} off by {error:.2e}: {errors}"
    return errors


# ------------------------------------------------------------------ forward parity
@pytest.mark.parametrize("size", ["smallest", "own"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_matches_the_float64_reference_layer_by_layer(variant, size, seed):
    spec = get_spec(variant, num_classes=10)
    if size == "smallest":
        spec = spec.with_input(spec.in_channels, *shapes.smallest_input(spec))
    check_against_reference(spec, seed)


def tiny(*middle, input_size=(5, 7), channels=3) -> ModelSpec:
    """A network that isolates ``middle``: a 1x1 convolution before it, a classifier after it."""
    return ModelSpec("tiny", channels, input_size, (Conv2d("conv1", 4, 1), *middle, Flatten("flatten"),
                                                    Dense("fc", 3)))


POOLS = {  # (input H, W) -> output: the ONNX nodes that must express it
    "uniform 10x12->5x4": ((10, 12), (5, 4), {"AveragePool"}),
    "overlapping but uniform 7->6": ((7, 7), (6, 6), {"AveragePool"}),
    "torchvision 5x5->6x6, bins 1,2,2,2,2,1": ((5, 5), (6, 6), {"Slice", "ReduceMean", "Concat"}),
    "mixed 5x5->6x4": ((5, 5), (6, 4), {"Slice", "ReduceMean", "Concat", "AveragePool"}),
    "shrinking 11x11->3x3, sizes 4,5,4": ((11, 11), (3, 3), {"Slice", "ReduceMean", "Concat"}),
    "mixed 13x11->6x3": ((13, 11), (6, 3), {"Slice", "ReduceMean", "Concat", "AveragePool"}),
    "upsampling 1x2->3x5": ((1, 2), (3, 5), {"Slice", "ReduceMean", "Concat"}),
}


@pytest.mark.parametrize("case", list(POOLS))
def test_adaptive_average_pooling_is_pytorchs_exactly(case, seed):
    in_hw, out_hw, ops = POOLS[case]
    spec = tiny(AdaptiveAvgPool2d("avgpool", out_hw), input_size=in_hw)
    errors = check_against_reference(spec, seed, batch=3)
    assert errors["avgpool"] <= 1e-6
    model = backend.build(spec, device="cpu")
    used = {node.op_type for node in model.proto.graph.node} - {"Conv", "Flatten", "Gemm", "Constant"}
    assert used == ops


def test_adaptive_bins_are_pytorchs_rule():
    assert adaptive_bins(5, 6) == [(0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 5)]  # overlapping, unequal
    assert uniform_window(adaptive_bins(5, 6)) is None
    assert uniform_window(adaptive_bins(7, 6)) == (2, 1) and uniform_window(adaptive_bins(12, 6)) == (2, 2)
    assert uniform_window(adaptive_bins(1, 3)) is None  # every bin is row 0: no stride >= 1 fits


def test_alexnet_with_torchvisions_adaptive_pool_matches_the_reference(seed):
    """torchvision's place for it, after pool5; at 99x99 pool5 is 2x2, so 6x6 bins overlap unequally."""
    spec = narrow(book_alexnet().with_input(1, 99, 99))
    at = [layer.name for layer in spec.layers].index("pool5") + 1
    spec = replace(spec, layers=spec.layers[:at] + (AdaptiveAvgPool2d("avgpool", 6),) + spec.layers[at:])
    check_against_reference(spec, seed)


def test_lrn_alpha_convention_is_pytorchs(seed):
    """ONNX's LRN divides alpha by size, like PyTorch and the spec. At alpha 1 a factor of size
    (the other convention, Caffe's and TensorFlow's) would be far outside the tolerance: checked
    by writing the node with alpha * size and seeing the parity check fail."""
    spec = tiny(ReLU("relu1"), LocalResponseNorm("norm1", size=3, alpha=1.0, beta=0.75, k=1.0), channels=6)
    spec = replace(spec, layers=(Conv2d("conv1", 8, 1), *spec.layers[1:]))
    errors = check_against_reference(spec, seed)
    assert errors["norm1"] <= 1e-6
    weights, x, expected = forward_case(spec, seed, 2)
    model = backend.build(spec, weights=weights, device="cpu")
    lrn = next(node for node in model.proto.graph.node if node.op_type == "LRN")
    next(a for a in lrn.attribute if a.name == "alpha").f *= 3  # undivided convention: alpha * size
    model._sessions.clear()
    assert layer_errors(backend, model, x, expected)["norm1"] > 0.01


# ------------------------------------------------------------------ the graph
def test_one_graph_serves_two_batch_sizes(seed):
    weights = init_weights(NARROW, seed)
    model = backend.build(NARROW, weights=weights, device="cpu")
    graph = model.proto.graph
    assert [d.dim_param for d in graph.input[0].type.tensor_type.shape.dim[:1]] == ["batch"]
    assert [d.dim_param or d.dim_value for d in graph.output[0].type.tensor_type.shape.dim] == ["batch", 10]
    session = model.session()
    rng = np.random.default_rng(seed)
    for batch in (1, 5):
        x = rng.standard_normal((batch, *NARROW.input_shape)).astype(np.float32)
        logits = backend.forward(model, x)
        assert logits.shape == (batch, 10) and logits.dtype == np.float32
        assert reference.relative_error(logits, reference.forward(NARROW, weights, x)[0]) <= TOLERANCE
    assert model.session() is session  # the same session, not one per batch size


def test_graph_is_valid_onnx_of_the_spec():
    import onnx

    model = backend.build(NARROW, device="cpu")
    onnx.checker.check_model(model.proto, full_check=True)  # includes ONNX's own shape inference
    assert model.proto.opset_import[0].version >= 17
    assert [i.name for i in model.proto.graph.initializer] == list(init_weights(NARROW))
    conv2 = next(node for node in model.proto.graph.node if node.name == "conv2")
    pads = next(a for a in conv2.attribute if a.name == "pads").ints
    assert list(pads) == [2, 2, 2, 2]  # explicit, from the spec
    assert "Dropout" not in {node.op_type for node in model.proto.graph.node}  # inference: identity


def test_layer_summary_agrees_with_common_shapes():
    spec = get_spec("paper", num_classes=10).with_input(3, 99, 101)
    model = backend.build(spec, device="cpu")
    rows = backend.layer_summary(model, (2, 3, 99, 101), print_table=False)
    expected = shapes.infer(spec, batch=2)
    assert [(r.name, r.shape, r.params) for r in rows] == [(e.name, e.shape, e.params) for e in expected]


def test_summary_command_measures_the_onnx_graph(capsys):
    assert main(["summary", "--backend", "onnx", "--input", "1,65,67"]) == 0
    out = capsys.readouterr().out
    assert "onnx (NCHW)" in out and "!" not in out
    assert next(line for line in out.splitlines() if line.startswith("conv1")).split()[2] == "1x96x15x15"


def test_forward_checks_the_input_shape():
    model = backend.build(NARROW, device="cpu")
    with pytest.raises(ValueError, match=r"NCHW input \(N, 1, 65, 65\), got \(2, 65, 65, 1\)"):
        backend.forward(model, np.zeros((2, 65, 65, 1), np.float32))


# ------------------------------------------------------------------ weights and files
def test_weights_round_trip_bit_exactly_and_param_counts(seed):
    weights = init_weights(NARROW, seed)
    model = backend.build(NARROW, weights=weights, device="cpu")
    exported = backend.export_weights(model)
    assert list(exported) == list(weights)
    assert all(exported[k].dtype == np.float32 and np.array_equal(exported[k], weights[k]) for k in weights)
    assert backend.param_counts(model) == {row.name: row.params for row in shapes.infer(NARROW)}
    assert backend.parameter_devices(model) == {"cpu"}


def test_save_and_load_native_round_trip(tmp_path, seed):
    source = backend.build(NARROW, seed=seed, device="cpu")
    path = backend.save_native(source, tmp_path / "alexnet.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alexnet.onnx"]  # no temporary left behind
    target = backend.build(NARROW, seed=seed + 1, device="cpu")
    x = np.random.default_rng(seed).standard_normal((2, *NARROW.input_shape)).astype(np.float32)
    before = backend.forward(target, x)
    backend.load_native(target, path)
    loaded, original = backend.export_weights(target), backend.export_weights(source)
    assert all(np.array_equal(loaded[k], original[k]) for k in original)
    after = backend.forward(target, x)  # the sessions were rebuilt with the new weights
    assert np.array_equal(after, backend.forward(source, x)) and not np.allclose(after, before)


def test_saved_file_runs_in_plain_onnxruntime_in_a_fresh_process(tmp_path, seed):
    """The .onnx is deployable: a consumer with only onnxruntime and numpy, at two batch sizes."""
    weights = init_weights(NARROW, seed)
    backend.save_native(backend.build(NARROW, weights=weights, device="cpu"), tmp_path / "alexnet.onnx")
    rng = np.random.default_rng(seed)
    inputs = {f"x{b}": rng.standard_normal((b, *NARROW.input_shape)).astype(np.float32) for b in (1, 3)}
    np.savez(tmp_path / "inputs.npz", **inputs)
    consumer = (
        "import sys, numpy as np, onnxruntime as ort\n"
        "s = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])\n"
        "x = np.load(sys.argv[2])\n"
        "np.savez(sys.argv[3], **{k: s.run(None, {s.get_inputs()[0].name: x[k]})[0] for k in x.files})\n"
        "ours = {'common', 'alexnet_pt', 'alexnet_tf', 'alexnet_mx', 'alexnet_onnx'}\n"
        "assert not ours & {m.split('.')[0] for m in sys.modules}, 'project code was imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", consumer, str(tmp_path / "alexnet.onnx"), str(tmp_path / "inputs.npz"),
                           str(tmp_path / "out.npz")], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    with np.load(tmp_path / "out.npz") as out:
        for key, x in inputs.items():
            assert out[key].shape == (x.shape[0], 10)
            assert reference.relative_error(out[key], reference.forward(NARROW, weights, x)[0]) <= TOLERANCE


def test_bad_weights_file_names_the_key_and_changes_nothing(tmp_path, seed):
    weights = init_weights(NARROW, seed)
    bad = dict(weights, **{"fc7.weight": weights["fc7.weight"][:, :-1]})
    del bad["conv3.bias"]
    save_weights(tmp_path / "bad.npz", bad)
    with pytest.raises(WeightsError, match=r"missing conv3.bias") as raised:
        backend.build(NARROW, weights=tmp_path / "bad.npz", device="cpu")
    assert "fc7.weight: shape (64, 63), expected (64, 64)" in str(raised.value)
    assert str(tmp_path / "bad.npz") in str(raised.value)
    model = backend.build(NARROW, weights=weights, device="cpu")
    with pytest.raises(WeightsError, match="missing conv3.bias"):
        backend.load_weights(model, tmp_path / "bad.npz")
    assert all(np.array_equal(v, weights[k]) for k, v in backend.export_weights(model).items())  # untouched


def test_bad_onnx_files_are_refused_with_the_reason(tmp_path):
    model = backend.build(NARROW, device="cpu")
    other = backend.build(NARROW.with_num_classes(3), device="cpu")
    backend.save_native(other, tmp_path / "three_classes.onnx")
    with pytest.raises(WeightsError, match=r"fc8.weight: shape \(3, 64\), expected \(10, 64\)"):
        backend.load_native(model, tmp_path / "three_classes.onnx")
    (tmp_path / "garbage.onnx").write_bytes(b"\x00\xffnot a protobuf" * 10)
    with pytest.raises(WeightsError, match="garbage.onnx"):
        backend.load_native(model, tmp_path / "garbage.onnx")
    with pytest.raises(WeightsError, match="no such ONNX file"):
        backend.load_native(model, tmp_path / "absent.onnx")


def test_convert_writes_and_reads_onnx(tmp_path, seed, capsys):
    weights = init_weights(SMALL, seed)
    save_weights(tmp_path / "w.npz", weights)
    assert main(["convert", str(tmp_path / "w.npz"), str(tmp_path / "w.onnx"), "--input", "1,65,65"]) == 0
    assert main(["convert", str(tmp_path / "w.onnx"), str(tmp_path / "back.npz"), "--input", "1,65,65"]) == 0
    with np.load(tmp_path / "back.npz", allow_pickle=False) as back:
        assert sorted(back.files) == sorted(weights) and all(np.array_equal(back[k], weights[k]) for k in weights)
    assert "(onnx)" in capsys.readouterr().out


# ------------------------------------------------------------------ inference only
@pytest.mark.parametrize("call", [
    lambda m: backend.make_trainer(m, lr=0.01),
    lambda m: backend.Trainer(m),
    lambda m: backend.loss_and_grads(m, np.zeros((1, 1, 65, 65), np.float32), np.zeros(1, int)),
    lambda m: backend.fit(m, epochs=1),
    lambda m: backend.forward(m, np.zeros((1, 1, 65, 65), np.float32), training=True),
], ids=["make_trainer", "Trainer", "loss_and_grads", "fit", "forward-training"])
def test_training_names_say_the_backend_is_inference_only(call):
    model = backend.build(NARROW, device="cpu")
    with pytest.raises(backend.InferenceOnlyError, match="alexnet_onnx is inference only") as raised:
        call(model)
    assert isinstance(raised.value, NotImplementedError) and isinstance(raised.value, ValueError)


@pytest.mark.parametrize("args, message", [
    (["train", "--backend", "onnx"], "invalid choice: 'onnx'"),
    (["compare", "--backends", "pt,onnx"], "backend(s) onnx run inference only and cannot train"),
])  # `alexnet bench --backends onnx` times its inference (tests/test_bench.py)
def test_training_commands_refuse_onnx_in_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as raised:
        main(args)
    err = capsys.readouterr().err
    assert raised.value.code == 2 and message in err and "Traceback" not in err


def test_all_means_the_training_backends():
    from common.cli_args import backend_list

    assert backend_list("all") == training_backends() and "onnx" not in training_backends()
    assert backend_list("onnx,pt") == ["onnx", "pt"]


# ------------------------------------------------------------------ devices
@pytest.mark.skipif(HAS_GPU, reason="ONNX Runtime runs on a GPU here, so device='gpu' is valid")
def test_gpu_request_without_a_usable_cuda_provider_raises():
    with pytest.raises(DeviceError, match=r"ONNX Runtime cannot compute on a GPU here: this ONNX Runtime build has no CUDA"):
        backend.build(NARROW, device="gpu")
    assert backend.parameter_devices(backend.build(NARROW, device="auto")) == {"cpu"}


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="no CUDA provider that runs a graph (onnxruntime-gpu and a GPU)")
def test_gpu_graph_matches_the_reference_on_the_cuda_provider(seed):
    model = backend.build(NARROW, device="gpu")
    assert backend.parameter_devices(model) == {"gpu"}
    check_against_reference(SMALL, seed, device="gpu")


def test_bench_hooks_run_a_matmul_and_describe_the_runtime():
    products = backend.matmul_products(64, "cpu", "fp32")
    assert list(products) == ["onnxruntime MatMul"]
    products["onnxruntime MatMul"]()
    info = backend.runtime_info("cpu")
    assert info["framework"].startswith("ONNX Runtime 1.") and "CPUExecutionProvider" in info["providers"]
    assert backend.peak_device_memory("cpu") is None
    with pytest.raises(ValueError, match="not 'bf16'"):
        backend.matmul_products(64, "cpu", "bf16")
