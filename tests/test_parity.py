"""Numerical parity: same weights in, same outputs, gradients and SGD steps out, in every backend.

Weights and inputs are fresh each run; the seed is printed (replay: ALEXNET_TEST_SEED=N).
Tolerances (relative error ||a-b||/||b||): float32 is expected near 1e-6, asserted at 1e-4.
Gradient checks use inputs with no ReLU or max-pool decision within float32 rounding of a
tie: at such a decision two correct float32 programs may legitimately differ.
"""
import numpy as np
import pytest

from common import reference, shapes
from common.backend import training_backends
from common.parity import layer_errors, make_case, sgd_update, to_backend_layout
from common.spec import book_alexnet, get_spec, paper_alexnet
from common.weights import init_weights, nhwc_flatten_permutation

TOLERANCE = 1e-4
SPEC = book_alexnet()  # the full 224x224 network: the one users train
# Gradients and steps on the smallest input, screened for ReLU/max-pool near-ties (see common.parity).
SMALL = book_alexnet().with_input(1, 65, 65)


@pytest.mark.parametrize("spec", [SPEC, paper_alexnet(num_classes=10).with_input(3, 99, 99)], ids=["book", "paper"])
def test_every_layer_matches_the_float64_reference(backend, seed, spec):
    case = make_case(spec, seed, batch=2)
    weights, x, expected = case.weights, case.x, case.expected
    model = backend.build(spec, weights=weights, device="cpu")
    errors = layer_errors(backend, model, x, expected)
    assert set(errors) == {layer.name for layer in spec.layers} | {"logits"}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOLERANCE, f"{backend.NAME}: {worst} off by {errors[worst]:.2e}: {errors}"


@pytest.fixture(scope="module")
def torchvision_cases():
    """The model-zoo AlexNet at 224 and at 256x300 (pool5 7x8: the adaptive pool's bins overlap on both
    axes), batch 1: the float64 reference runs once per size, not once per backend."""
    import os

    seed = int(os.environ.get("ALEXNET_TEST_SEED", np.random.default_rng().integers(0, 2**31 - 1)))
    print(f"\ntorchvision parity seed {seed} (replay with ALEXNET_TEST_SEED={seed})")
    return {chw: make_case(get_spec("torchvision").with_input(*chw), seed, batch=1)
            for chw in [(3, 224, 224), (3, 256, 300)]}


@pytest.mark.parametrize("chw", [(3, 224, 224), (3, 256, 300)], ids=["224", "256x300"])
def test_torchvision_variant_matches_the_float64_reference(backend, torchvision_cases, chw):
    """Every layer's numbers, and (on the same 61M-parameter model, built once) its shape table:
    61,100,840 parameters, and at 256x300 a 7x8 pool5 pooled to 6x6, fc6 still taking 9,216."""
    spec, case = get_spec("torchvision").with_input(*chw), torchvision_cases[chw]
    model = backend.build(spec, weights=case.weights, device="cpu")
    rows = backend.layer_summary(model, shapes.to_layout((1, *chw), backend.LAYOUT), print_table=False)
    expected = shapes.infer(spec, layout=backend.LAYOUT)
    assert [(r.name, r.shape, r.params) for r in rows] == [(e.name, e.shape, e.params) for e in expected]
    assert sum(r.params for r in rows) == 61_100_840
    pool5 = {r.name: r.shape for r in rows}["pool5"]
    assert (pool5[2:] if backend.LAYOUT == "NCHW" else pool5[1:3]) == {224: (6, 6), 256: (7, 8)}[chw[1]]
    errors = layer_errors(backend, model, case.x, case.expected)
    assert set(errors) == {layer.name for layer in spec.layers} | {"logits"}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOLERANCE, f"{backend.NAME}: {worst} off by {errors[worst]:.2e}: {errors}"


def test_transposed_dense_kernel_is_caught(backend, seed):
    """fc7 is square, so a transposed kernel passes every shape check: only numbers catch it."""
    case = make_case(SPEC, seed, batch=2)
    weights, x, expected = case.weights, case.x, case.expected
    wrong = dict(weights, **{"fc7.weight": np.ascontiguousarray(weights["fc7.weight"].T)})
    errors = layer_errors(backend, backend.build(SPEC, weights=wrong, device="cpu"), x, expected)
    assert errors["fc6"] <= TOLERANCE and errors["fc7"] > 0.1


def test_forgetting_the_flatten_order_is_caught(backend, seed):
    """Loading fc6 with its columns in NHWC order (the classic porting bug) breaks fc6 loudly."""
    case = make_case(SPEC, seed, batch=2)
    weights, x, expected = case.weights, case.x, case.expected
    wrong = dict(weights, **{"fc6.weight": np.ascontiguousarray(weights["fc6.weight"][:, nhwc_flatten_permutation(SPEC)])})
    errors = layer_errors(backend, backend.build(SPEC, weights=wrong, device="cpu"), x, expected)
    assert errors["flatten"] <= TOLERANCE and errors["fc6"] > 0.1


@pytest.fixture(scope="module")
def training_results():
    """Loss, gradients and one SGD step (lr 0.01, batch 8, dropout off) from every backend on one case."""
    import os

    seed = int(os.environ.get("ALEXNET_TEST_SEED", np.random.default_rng().integers(0, 2**31 - 1)))
    print(f"\ntraining parity seed {seed} (replay with ALEXNET_TEST_SEED={seed})")
    spec = SMALL.with_dropout(0.0)
    case = make_case(spec, seed, batch=8, screen=True)
    weights, x, labels = case.weights, case.x, case.labels
    from tests.conftest import get_backend

    results = {}
    for name in training_backends():
        backend = get_backend(name)
        model = backend.build(spec, weights=weights, device="cpu")
        loss, grads = backend.loss_and_grads(model, to_backend_layout(x, backend.LAYOUT), labels)
        results[name] = (loss, grads, sgd_update(backend, model, x, labels))
    return results, reference.cross_entropy(case.expected["fc8"], labels)


def test_losses_match_the_reference(training_results):
    results, expected = training_results
    for name, (loss, _, _) in results.items():
        assert abs(loss - expected) / expected <= TOLERANCE, f"{name}: loss {loss} vs reference {expected}"


@pytest.mark.parametrize("other", ["tf", "mx"])
def test_gradients_match_across_backends(training_results, other):
    results, _ = training_results
    _, base, _ = results["pt"]
    _, grads, _ = results[other]
    assert list(grads) == list(base)
    errors = {p: reference.relative_error(grads[p], base[p]) for p in base}
    assert max(errors.values()) <= TOLERANCE, f"pt vs {other}: {errors}"
    assert all(np.abs(base[p]).max() > 0 for p in base)  # every parameter really receives a gradient


@pytest.mark.parametrize("other", ["tf", "mx"])
def test_one_sgd_step_moves_weights_identically(training_results, other):
    results, _ = training_results
    _, base_grads, base_step = results["pt"]
    _, _, step = results[other]
    errors = {p: reference.relative_error(step[p], base_step[p]) for p in base_step}
    assert max(errors.values()) <= TOLERANCE, f"pt vs {other}: {errors}"
    # plain SGD: the step is -lr * grad
    assert reference.relative_error(base_step["fc8.weight"], -0.01 * base_grads["fc8.weight"]) <= TOLERANCE


def test_dropout_active_in_training_only(backend, seed):
    spec = SMALL
    case = make_case(spec, seed, batch=4)
    weights, x = case.weights, case.x
    model = backend.build(spec, weights=weights, device="cpu")
    x = to_backend_layout(x, backend.LAYOUT)
    inference = [backend.forward(model, x, training=False) for _ in range(2)]
    training = [backend.forward(model, x, training=True) for _ in range(2)]
    assert np.array_equal(inference[0], inference[1])
    assert not np.allclose(training[0], training[1])
    assert not np.allclose(training[0], inference[0])
    off = backend.build(spec.with_dropout(0.0), weights=weights, device="cpu")
    assert reference.relative_error(backend.forward(off, x, training=True), inference[0]) <= TOLERANCE


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
