"""Numerical parity: every backend against the float64 oracle (common.parity), never against
another backend, so each one is checked on its own and a bug shared by every backend fails.

Checked: every layer's output (inference), the loss, every parameter's gradient, and every
parameter's change after 3 SGD steps with momentum 0.9 and weight decay 5e-4 through the
backend's own Trainer. Tolerances: common.parity.TOLERANCES (measured margins in
docs/parity.md). Weights and inputs are fresh each run; the seed is printed (replay:
ALEXNET_TEST_SEED=N). tests/test_parity_mutations.py shows each check failing on planted bugs.
"""
import os

import numpy as np
import pytest

from common import reference, shapes
from common.parity import (TOLERANCES, build_oracle, compare, forward_case, layer_errors, low_precision_errors,
                           to_backend_layout)
from common.spec import book_alexnet, get_spec, paper_alexnet
from common.weights import expected_shapes, init_weights

SPECS = {
    "book": book_alexnet(),  # the full 224x224 network users train; training checks on its smallest input
    "paper": paper_alexnet(num_classes=10).with_input(3, 99, 99),  # LRN and grouped convolutions
}


@pytest.fixture(scope="module", params=list(SPECS))
def oracle(request):
    seed = int(os.environ.get("ALEXNET_TEST_SEED", np.random.default_rng().integers(0, 2**31 - 1)))
    print(f"\nparity oracle {request.param}: seed {seed} (replay with ALEXNET_TEST_SEED={seed})")
    return build_oracle(SPECS[request.param], seed)


def test_every_backend_matches_the_float64_oracle(oracle, backend):
    report = compare(oracle, [backend])
    result = report.results[backend.NAME]
    spec, params = oracle.spec, list(expected_shapes(oracle.train_spec))
    assert list(result.forward) == [layer.name for layer in spec.layers] + ["logits"]
    assert list(result.loss) == ["loss_and_grads", "train_step 1", "train_step 2", "train_step 3"]
    assert list(result.gradients) == params and list(result.steps) == params
    assert report.passed, "\n".join(map(str, report.failures)) + "\n" + report.text


def test_an_inference_only_backend_is_checked_on_the_forward_pass(oracle):
    """ONNX Runtime trains nothing: parity checks its every layer against the oracle and shows "-"
    for the training checks instead of failing on the missing trainer."""
    from tests.conftest import get_backend

    report = compare(oracle, [get_backend("onnx")])
    result = report.results["onnx"]
    assert list(result.forward) == [layer.name for layer in oracle.spec.layers] + ["logits"]
    assert not (result.loss or result.gradients or result.steps or result.problems)
    assert report.passed, report.text
    rows = {line.split()[0]: line.split()[1:] for line in report.text.splitlines() if line.strip()}
    assert all(rows[check][0] == "-" for check in ("loss", "gradients", "steps")), report.text


# Mixed precision against the same float64 oracle, each precision with its own tolerances on the worst
# relative error of a step's loss and of a parameter's change after the 3 steps (common.parity.
# low_precision_errors). Measured before they were chosen: book network, seeds 0-4, this CPU (AMD EPYC, AVX2);
# float32 gives up to 1e-6 and 1.2e-4 (seeds 0-1):
#   bf16 (8 mantissa bits):  loss 3.7e-4..1.9e-3 (pt), 1.1e-3..4.0e-3 (tf); change 0.22..0.28 (pt), 0.26..0.28 (tf)
#   fp16 (11 bits, scale 2**15): loss 2.0e-4..1.3e-3 (pt), 1.1e-4..9.3e-4 (tf); change 0.11..0.17 (pt), 0.11..0.18 (tf)
# asserted: bf16 loss 1e-2, change 0.5; fp16 loss 4e-3, change 0.35 (about 2-3 times the worst measured). The
# changes' errors are large because the updates come from low-precision gradients: these bounds catch a wrong
# recipe (a loss scale not divided out multiplies the change by 2**15), not rounding.
LOW_PRECISION_TOLERANCES = {"bf16": {"loss": 1e-2, "steps": 0.5}, "fp16": {"loss": 4e-3, "steps": 0.35}}


@pytest.mark.parametrize("precision", list(LOW_PRECISION_TOLERANCES))
def test_mixed_precision_training_matches_the_oracle_within_its_own_tolerances(oracle, backend, precision):
    if precision not in backend.CAPABILITIES.precisions:
        with pytest.raises(ValueError, match=f"trains in precision fp32, not '{precision}'"):
            backend.make_trainer(backend.build(oracle.train_spec, device="cpu"), lr=0.01, precision=precision)
        return
    if oracle.spec.name != "book":
        pytest.skip("mixed precision is measured on the book network")
    result = low_precision_errors(backend, oracle, precision)
    print(f"{backend.NAME} {precision}: loss {result.loss:.2e}, worst parameter change {result.steps:.2e}")
    tolerances = LOW_PRECISION_TOLERANCES[precision]
    assert result.loss <= tolerances["loss"] and result.steps <= tolerances["steps"], result
    assert result.loss > 1e-5  # it really computed in low precision (float32: up to 1e-6)


def _on_gpu(backend):
    if not backend.gpu_available():
        pytest.skip(f"{backend.FRAMEWORK} cannot compute on a GPU here: {backend.gpu_status().detail}")


@pytest.mark.gpu
def test_every_backend_matches_the_float64_oracle_on_the_gpu(oracle, backend):
    """The whole parity check (every layer, loss, gradients, 3 SGD steps) with the model on the GPU,
    in strict float32 (check_backend turns TF32 off): the same tolerances as on the CPU."""
    _on_gpu(backend)
    report = compare(oracle, [backend], device="gpu")
    assert report.device == "gpu" and report.passed, "\n".join(map(str, report.failures)) + "\n" + report.text


@pytest.mark.gpu
@pytest.mark.parametrize("precision", list(LOW_PRECISION_TOLERANCES))
def test_mixed_precision_on_the_gpu_matches_the_oracle_within_its_own_tolerances(oracle, backend, precision):
    _on_gpu(backend)
    if precision not in backend.CAPABILITIES.precisions or oracle.spec.name != "book":
        pytest.skip(f"{backend.NAME} {precision} on the {oracle.spec.name} network is not measured")
    result = low_precision_errors(backend, oracle, precision, device="gpu")
    print(f"{backend.NAME} {precision} on the GPU: loss {result.loss:.2e}, worst parameter change {result.steps:.2e}")
    tolerances = LOW_PRECISION_TOLERANCES[precision]
    assert result.loss <= tolerances["loss"] and result.steps <= tolerances["steps"], result
    assert result.loss > 1e-5


@pytest.mark.gpu
def test_the_math_mode_acts_on_the_gpu(oracle, backend):
    """--math is real: TF32 moves the GPU's logits away from the oracle's by far more than strict
    float32 does (float32 rounding ~1e-6; TF32 keeps 10 mantissa bits, ~1e-3), and stays close."""
    _on_gpu(backend)
    errors = {}
    for math_mode in ("fp32", "tf32"):
        backend.set_math_mode(math_mode)
        model = backend.build(oracle.spec, weights=oracle.weights, device="gpu")
        logits = backend.forward(model, to_backend_layout(oracle.x, backend.LAYOUT))
        expected = oracle.activations[oracle.spec.layers[-1].name]
        errors[math_mode] = reference.relative_error(logits.astype(np.float64), expected)
    backend.set_math_mode("fp32")
    print(f"{backend.NAME} logits on the GPU against float64: {errors}")
    assert errors["fp32"] < TOLERANCES.forward and 1e-2 > errors["tf32"] > 10 * errors["fp32"], errors


def test_the_oracle_case_moves_every_parameter(oracle):
    """Checks that could pass vacuously cannot: every gradient and every 3-step change is nonzero,
    and momentum and weight decay are visible in the change."""
    for name in oracle.grads:
        assert np.abs(oracle.grads[name]).max() > 0 and np.abs(oracle.change[name]).max() > 0, name
    plain = reference.SGD(oracle.train_weights, lr=0.01)
    for x, labels in oracle.batches:
        plain.step(reference.loss_and_grads(oracle.train_spec, plain.weights, x, labels)[1])
    for name in oracle.change:  # plain SGD on the same batches lands far outside the step tolerance
        error = reference.relative_error(plain.weights[name] - oracle.train_weights[name], oracle.change[name])
        assert error > 100 * TOLERANCES.steps, name


def test_dropout_matches_the_oracle_given_the_backends_own_mask(backend, seed):
    """In training mode each layer drops about rate of its units and scales the rest by
    1/(1 - rate): the logits equal the oracle's when it is given the same masks."""
    spec = book_alexnet().with_input(1, 65, 65)
    weights = init_weights(spec, seed)
    x = np.random.default_rng(seed).standard_normal((4, *spec.input_shape)).astype(np.float32)
    model = backend.build(spec, weights=weights, device="cpu")
    x_native = to_backend_layout(x, backend.LAYOUT)
    inference = [backend.forward(model, x_native) for _ in range(2)]
    assert np.array_equal(inference[0], inference[1])
    logits, captured = backend.forward(model, x_native, training=True, capture=True)
    masks = {}
    for drop, before in (("drop6", "relu6"), ("drop7", "relu7")):
        active = captured[before] > 0
        masks[drop] = captured[drop] != 0  # where the input is 0 the mask does not matter
        assert abs(1 - masks[drop][active].mean() - spec.layer(drop).rate) < 0.05, drop
    expected, _ = reference.forward(spec, weights, x, dropout_masks=masks)
    assert reference.relative_error(logits, expected) <= TOLERANCES.forward
    assert reference.relative_error(inference[0], expected) > 0.01  # the masks did change the logits
    assert not np.allclose(backend.forward(model, x_native, training=True), logits)  # a fresh mask each call


def test_weights_round_trip_through_all_frameworks_bit_exactly(all_backends, seed):
    spec = book_alexnet().with_input(1, 65, 65)
    original = init_weights(spec, seed)
    weights = original
    for backend in all_backends + all_backends[:1]:
        model = backend.build(spec, weights=weights, device="cpu")
        weights = backend.export_weights(model)
    assert list(weights) == list(original)
    for name in original:
        assert weights[name].dtype == np.float32 and np.array_equal(weights[name], original[name]), name


@pytest.fixture(scope="module")
def torchvision_cases():
    """The model-zoo AlexNet at 224 and at 256x300 (pool5 7x8: the adaptive pool's bins overlap on both
    axes), batch 1: the float64 reference runs once per size, not once per backend."""
    seed = int(os.environ.get("ALEXNET_TEST_SEED", np.random.default_rng().integers(0, 2**31 - 1)))
    print(f"\ntorchvision parity seed {seed} (replay with ALEXNET_TEST_SEED={seed})")
    return {chw: forward_case(get_spec("torchvision").with_input(*chw), seed, batch=1)
            for chw in [(3, 224, 224), (3, 256, 300)]}


@pytest.mark.parametrize("chw", [(3, 224, 224), (3, 256, 300)], ids=["224", "256x300"])
def test_torchvision_variant_matches_the_float64_reference(backend, torchvision_cases, chw):
    """Every layer's numbers, and (on the same 61M-parameter model, built once) its shape table:
    61,100,840 parameters, and at 256x300 a 7x8 pool5 pooled to 6x6, fc6 still taking 9,216."""
    spec = get_spec("torchvision").with_input(*chw)
    weights, x, expected = torchvision_cases[chw]
    model = backend.build(spec, weights=weights, device="cpu")
    rows = backend.layer_summary(model, shapes.to_layout((1, *chw), backend.LAYOUT), print_table=False)
    inferred = shapes.infer(spec, layout=backend.LAYOUT)
    assert [(r.name, r.shape, r.params) for r in rows] == [(e.name, e.shape, e.params) for e in inferred]
    assert sum(r.params for r in rows) == 61_100_840
    pool5 = {r.name: r.shape for r in rows}["pool5"]
    assert (pool5[2:] if backend.LAYOUT == "NCHW" else pool5[1:3]) == {224: (6, 6), 256: (7, 8)}[chw[1]]
    errors = layer_errors(backend, model, x, expected)
    assert set(errors) == {layer.name for layer in spec.layers} | {"logits"}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOLERANCES.forward, f"{backend.NAME}: {worst} off by {errors[worst]:.2e}: {errors}"
