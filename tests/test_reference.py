"""The float64 oracle (common.reference) checked on its own, before anything is compared with it.

Each layer's backward against central finite differences of its forward (float64, every
entry), the whole network's gradients likewise (sampled entries), and the optimizer
against torch.optim.SGD in float64. Seeds are fixed: a finite difference that straddles a
ReLU kink or a max-pool tie would fail for reasons that are not bugs.
"""
import dataclasses

import numpy as np
import pytest

from common import reference as R
from common.spec import (AdaptiveAvgPool2d, Conv2d, Dense, Dropout, Flatten, LocalResponseNorm, MaxPool2d, ModelSpec,
                         ReLU, book_alexnet, paper_alexnet)
from common.weights import expected_shapes, init_weights

EPS = 1e-6
# Central differences in float64 agree with a correct derivative to ~1e-9 here; a wrong
# derivative is off by far more (see test_finite_differences_catch_a_wrong_lrn_backward).
FD_TOLERANCE = 1e-6


def numeric_gradient(f, array: np.ndarray, entries=None) -> np.ndarray:
    """d f() / d array by central differences, at every entry (or the given flat indices)."""
    flat = array.reshape(-1)  # a view: perturbing it perturbs ``array``
    entries = range(flat.size) if entries is None else entries
    grad = []
    for index in entries:
        original = flat[index]
        flat[index] = original + EPS
        up = f()
        flat[index] = original - EPS
        down = f()
        flat[index] = original
        grad.append((up - down) / (2 * EPS))
    return np.array(grad).reshape(array.shape) if len(grad) == flat.size else np.array(grad)


def assert_matches_finite_differences(f, array, analytic, what):
    numeric = numeric_gradient(f, array)
    error = R.relative_error(analytic, numeric)
    assert error <= FD_TOLERANCE, f"{what}: relative error {error:.2e} against finite differences"
    assert np.abs(numeric).max() > 0, f"{what}: the derivative is identically zero, nothing was tested"


@pytest.mark.parametrize("layer, x_shape, in_channels", [
    (Conv2d("conv", 6, (3, 2), stride=(2, 1), padding=(1, 2), groups=2), (2, 4, 7, 6), 4),
    (Conv2d("conv", 4, 5, padding=2), (2, 3, 6, 6), 3),
    (Conv2d("conv", 3, 11, stride=4, padding=1), (1, 1, 23, 23), 1),  # conv1's shape of kernel and stride
], ids=["groups-rect-stride-pad", "5x5-pad2", "11x11-stride4"])
def test_conv2d_backward(layer, x_shape, in_channels):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(x_shape)
    weight = rng.standard_normal((layer.out_channels, in_channels // layer.groups, *layer.kernel_size))
    bias = rng.standard_normal(layer.out_channels)
    upstream = rng.standard_normal(R.conv2d(x, weight, bias, layer).shape)
    dx, dweight, dbias = R.conv2d_backward(upstream, x, weight, layer)

    def f():
        return float(np.sum(R.conv2d(x, weight, bias, layer) * upstream))

    assert_matches_finite_differences(f, x, dx, "d input")
    assert_matches_finite_differences(f, weight, dweight, "d weight")
    assert_matches_finite_differences(f, bias, dbias, "d bias")
    assert R.conv2d_backward(upstream, x, weight, layer, input_grad=False)[0] is None


@pytest.mark.parametrize("layer, x_shape", [
    (MaxPool2d("pool", 3, 2), (2, 3, 9, 9)),  # overlapping windows
    (MaxPool2d("pool", 2, 2), (2, 2, 6, 7)),  # the last column is never read
    (MaxPool2d("pool", (3, 2), (1, 2)), (1, 2, 5, 6)),
])
def test_max_pool2d_backward(layer, x_shape):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(x_shape)
    upstream = rng.standard_normal(R.max_pool2d(x, layer).shape)
    assert_matches_finite_differences(lambda: float(np.sum(R.max_pool2d(x, layer) * upstream)), x,
                                      R.max_pool2d_backward(upstream, x, layer), "d input")


def test_relu_backward():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 4, 5))
    x[np.abs(x) < 1e-3] = 0.5  # keep every input clear of the kink
    upstream = rng.standard_normal(x.shape)
    assert_matches_finite_differences(lambda: float(np.sum(np.maximum(x, 0) * upstream)), x,
                                      R.relu_backward(upstream, x), "d input")
    assert np.array_equal(R.relu_backward(np.ones(3), np.array([-1.0, 0.0, 1.0])), [0.0, 0.0, 1.0])  # PyTorch's 0 at 0


# alpha and k chosen so that the sum term is comparable to k: LRN is then far from linear
@pytest.mark.parametrize("layer", [LocalResponseNorm("norm", size=5, alpha=2.0, beta=0.75, k=1.0),
                                   LocalResponseNorm("norm", size=3, alpha=1.0, beta=0.6, k=0.5)],
                         ids=["size5", "size3"])
def test_local_response_norm_backward(layer):
    rng = np.random.default_rng(3)
    x = 1.5 * rng.standard_normal((2, 7, 3, 4))
    upstream = rng.standard_normal(x.shape)
    assert_matches_finite_differences(lambda: float(np.sum(R.local_response_norm(x, layer) * upstream)), x,
                                      R.local_response_norm_backward(upstream, x, layer), "d input")


def test_finite_differences_catch_a_wrong_lrn_backward():
    """The check can fail: dropping the cross-channel term of LRN's derivative is caught."""
    layer = LocalResponseNorm("norm", size=5, alpha=2.0, beta=0.75, k=1.0)
    rng = np.random.default_rng(3)
    x = 1.5 * rng.standard_normal((2, 7, 3, 4))
    upstream = rng.standard_normal(x.shape)
    wrong = upstream * R._lrn_denominator(x, layer) ** -layer.beta  # as if the denominator were a constant
    numeric = numeric_gradient(lambda: float(np.sum(R.local_response_norm(x, layer) * upstream)), x)
    assert R.relative_error(wrong, numeric) > 1e-2


def test_lrn_uses_pytorchs_alpha_divided_by_size():
    layer = LocalResponseNorm("norm", size=3, alpha=3.0, beta=1.0, k=1.0)
    x = np.zeros((1, 3, 1, 1))
    x[0, :, 0, 0] = [1.0, 2.0, 3.0]
    # channel 1 sees all three: 1 + (3/3) * (1 + 4 + 9) = 15
    assert R.local_response_norm(x, layer)[0, 1, 0, 0] == pytest.approx(2.0 / 15.0, rel=1e-15)


@pytest.mark.parametrize("output_size, x_shape", [((3, 2), (2, 3, 7, 5)), ((2, 3), (1, 2, 5, 5)), ((3, 4), (1, 2, 2, 3))],
                         ids=["overlapping-bins", "uneven", "larger-than-input"])
def test_adaptive_avg_pool2d_backward(output_size, x_shape):
    layer = AdaptiveAvgPool2d("avgpool", output_size)
    rng = np.random.default_rng(4)
    x = rng.standard_normal(x_shape)
    upstream = rng.standard_normal((*x_shape[:2], *output_size))
    assert_matches_finite_differences(lambda: float(np.sum(R.adaptive_avg_pool2d(x, layer) * upstream)), x,
                                      R.adaptive_avg_pool2d_backward(upstream, x, layer), "d input")


def test_adaptive_avg_pool2d_uses_pytorchs_bins():
    x = np.arange(5.0).reshape(1, 1, 1, 5)
    # 5 -> 3: bins [0, 2), [1, 4), [3, 5)
    assert R.adaptive_avg_pool2d(x, AdaptiveAvgPool2d("p", (1, 3)))[0, 0, 0].tolist() == [0.5, 2.0, 3.5]


def test_dense_backward():
    rng = np.random.default_rng(5)
    x, weight, bias = rng.standard_normal((3, 5)), rng.standard_normal((4, 5)), rng.standard_normal(4)
    upstream = rng.standard_normal((3, 4))
    dx, dweight, dbias = R.dense_backward(upstream, x, weight)

    def f():
        return float(np.sum((x @ weight.T + bias) * upstream))

    assert_matches_finite_differences(f, x, dx, "d input")
    assert_matches_finite_differences(f, weight, dweight, "d weight")
    assert_matches_finite_differences(f, bias, dbias, "d bias")


def test_dropout_with_a_given_mask():
    rng = np.random.default_rng(6)
    x, upstream = rng.standard_normal((4, 6)), rng.standard_normal((4, 6))
    keep = rng.random((4, 6)) >= 0.3
    out = R.dropout(x, keep, 0.3)
    assert np.array_equal(out == 0, ~keep) and np.allclose(out[keep], x[keep] / 0.7, rtol=1e-15)
    assert_matches_finite_differences(lambda: float(np.sum(R.dropout(x, keep, 0.3) * upstream)), x,
                                      R.dropout(upstream, keep, 0.3), "d input")


def test_softmax_cross_entropy_and_its_gradient():
    rng = np.random.default_rng(7)
    logits, labels = 3 * rng.standard_normal((5, 4)), np.array([0, 3, 1, 1, 2])
    loss, dlogits = R.softmax_cross_entropy(logits, labels)
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert loss == pytest.approx(-np.mean(np.log(probs[np.arange(5), labels])), rel=1e-14)
    assert_matches_finite_differences(lambda: R.softmax_cross_entropy(logits, labels)[0], logits, dlogits, "d logits")
    assert R.cross_entropy(logits, labels) == loss


# Every layer kind, groups, rectangular kernels and an adaptive pool whose bins overlap, small
# enough for finite differences. LRN's alpha and k make it nonlinear at these activations.
TINY = ModelSpec("tiny", 2, (15, 13), (
    Conv2d("conv1", 6, 3, stride=2, padding=1), ReLU("relu1"),
    LocalResponseNorm("norm1", size=3, alpha=1.0, beta=0.75, k=1.0), MaxPool2d("pool1", 3, 2),
    Conv2d("conv2", 4, (3, 2), padding=1, groups=2), ReLU("relu2"), AdaptiveAvgPool2d("avgpool", (2, 3)),
    Flatten("flatten"), Dense("fc1", 10), ReLU("relu3"), Dropout("drop1", 0.5), Dense("fc2", 5),
))


def tiny_problem(seed: int, batch: int = 3):
    rng = np.random.default_rng(seed)
    weights = {name: rng.standard_normal(shape) * (0.2 if name.endswith("bias") else 0.5)
               for name, shape in expected_shapes(TINY).items()}
    x = rng.standard_normal((batch, *TINY.input_shape))
    labels = rng.integers(0, TINY.num_classes, size=batch)
    masks = {"drop1": rng.random((batch, 10)) >= 0.5}
    return weights, x, labels, masks


def test_whole_network_gradients_match_finite_differences():
    weights, x, labels, masks = tiny_problem(8)
    loss, grads = R.loss_and_grads(TINY, weights, x, labels, dropout_masks=masks)
    assert list(grads) == list(expected_shapes(TINY))
    assert loss == pytest.approx(R.cross_entropy(R.forward(TINY, weights, x, dropout_masks=masks)[0], labels), rel=1e-15)
    rng = np.random.default_rng(9)
    for name, value in weights.items():
        entries = rng.choice(value.size, size=min(value.size, 8), replace=False)
        numeric = numeric_gradient(lambda: R.loss_and_grads(TINY, weights, x, labels, dropout_masks=masks)[0],
                                   value, entries)
        analytic = grads[name].reshape(-1)[entries]
        assert grads[name].shape == value.shape
        assert R.relative_error(analytic, numeric) <= FD_TOLERANCE, f"{name}: {analytic} vs {numeric}"
        assert np.abs(numeric).max() > 0, name


def test_training_through_dropout_needs_its_mask():
    weights, x, labels, masks = tiny_problem(8)
    with pytest.raises(ValueError, match=r"needs its mask: none given for \['drop1'\]"):
        R.loss_and_grads(TINY, weights, x, labels)
    with pytest.raises(ValueError, match=r"masks given for \[.fc1.\], which are not Dropout layers"):
        R.loss_and_grads(TINY, weights, x, labels, dropout_masks={**masks, "fc1": masks["drop1"]})
    with pytest.raises(ValueError, match="dropout mask for 'drop1' has shape"):
        R.loss_and_grads(TINY, weights, x, labels, dropout_masks={"drop1": masks["drop1"][:, :3]})
    R.loss_and_grads(TINY.with_dropout(0.0), weights, x, labels)  # dropout off: no mask needed


def test_sgd_matches_torch_optim_sgd_in_float64():
    """PyTorch's rule on every parameter, biases included, over 4 steps, with and without momentum."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(10)
    shapes = {"a.weight": (3, 4), "a.bias": (3,), "b.weight": (2, 3, 2, 2)}
    start = {name: rng.standard_normal(shape) for name, shape in shapes.items()}
    grads = [{name: rng.standard_normal(shape) for name, shape in shapes.items()} for _ in range(4)]
    for momentum, weight_decay in ((0.9, 5e-4), (0.0, 5e-4), (0.9, 0.0)):
        params = [torch.nn.Parameter(torch.from_numpy(start[name].copy())) for name in shapes]
        optimizer = torch.optim.SGD(params, lr=0.1, momentum=momentum, weight_decay=weight_decay)
        ours = R.SGD(start, lr=0.1, momentum=momentum, weight_decay=weight_decay)
        for step in grads:
            for param, name in zip(params, shapes):
                param.grad = torch.from_numpy(step[name].copy())
            optimizer.step()
            ours.step(step)
        for param, name in zip(params, shapes):
            assert R.relative_error(ours.weights[name], param.detach().numpy()) <= 1e-15, (momentum, weight_decay, name)
        assert start["a.bias"][0] != ours.weights["a.bias"][0]  # the start was copied, not stepped in place


@pytest.fixture(scope="module")
def torch_float64():
    from tests.conftest import get_backend

    backend = get_backend("pt")
    import torch

    def train(spec, weights, batches, **sgd):
        model = backend.build(spec, weights={k: v.astype(np.float32) for k, v in weights.items()}, device="cpu")
        model = model.double()
        with torch.no_grad():  # the float64 start itself, not its float32 rounding
            for name, param in model.named_parameters():
                param.copy_(torch.from_numpy(weights[name]))
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), **sgd) if sgd else None
        losses, grads = [], None
        for x, labels in batches:
            loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(labels))
            if optimizer is None:
                grads = torch.autograd.grad(loss, list(model.parameters()))
                grads = {name: g.detach().numpy() for (name, _), g in zip(model.named_parameters(), grads)}
            else:
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            losses.append(loss.item())
        return losses, grads, {name: p.detach().numpy() for name, p in model.named_parameters()}

    return train


def test_sgd_steps_match_pytorch_training_in_float64(torch_float64):
    """Three steps of the whole tiny network (momentum 0.9, weight decay 5e-4) against PyTorch's
    autograd and torch.optim.SGD, both in float64."""
    spec = TINY.with_dropout(0.0)
    weights, _, _, _ = tiny_problem(11)
    rng = np.random.default_rng(12)
    batches = [(rng.standard_normal((4, *spec.input_shape)), rng.integers(0, 5, size=4)) for _ in range(3)]
    sgd = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
    after, losses = R.sgd_steps(spec, weights, batches, **sgd)
    torch_losses, _, torch_after = torch_float64(spec, weights, batches, **sgd)
    assert np.allclose(losses, torch_losses, rtol=1e-13, atol=0)
    for name in weights:
        change = after[name] - weights[name]
        assert R.relative_error(change, torch_after[name] - weights[name]) <= 1e-11, name
        assert np.abs(change).max() > 0, name


@pytest.mark.parametrize("spec", [book_alexnet().with_input(1, 65, 65).with_dropout(0.0),
                                  paper_alexnet(num_classes=10).with_input(3, 67, 67).with_dropout(0.0)],
                         ids=["book", "paper"])
def test_alexnet_gradients_match_pytorch_autograd_in_float64(spec, torch_float64):
    """The real networks (groups and LRN in the paper's) at their smallest inputs."""
    weights = {k: v.astype(np.float64) for k, v in init_weights(spec, 13).items()}
    rng = np.random.default_rng(14)
    for name in weights:
        if name.endswith(".bias"):
            weights[name] = 0.1 * rng.standard_normal(weights[name].shape)
    # alpha large enough that LRN is far from a constant factor at these activations
    spec = dataclasses.replace(spec, layers=tuple(dataclasses.replace(l, alpha=1.0) if isinstance(l, LocalResponseNorm)
                                                  else l for l in spec.layers))
    x, labels = 10 * rng.standard_normal((4, *spec.input_shape)), rng.integers(0, 10, size=4)
    loss, grads = R.loss_and_grads(spec, weights, x, labels)
    (torch_loss,), torch_grads, _ = torch_float64(spec, weights, [(x, labels)])
    assert loss == pytest.approx(torch_loss, rel=1e-13)
    for name in weights:
        assert R.relative_error(grads[name], torch_grads[name]) <= 1e-11, name
