"""Parity is shown to fail: typical porting bugs, planted one at a time in a backend, are each
caught by the comparison with the float64 oracle and named by layer or parameter.

A bug is planted by wrapping the backend's public ``build`` or ``make_trainer`` (monkeypatch,
undone after each test) so that the native model or trainer it returns has the bug, as a
wrong builder would have made it. The network is the paper's AlexNet (LRN, grouped
convolutions) with torchvision's adaptive average pool before the classifier and a narrow
classifier (for speed): with that pool a wrong pooling stride changes no shape downstream,
only numbers, and the flatten sees 2x2 positions, so an NHWC flatten order matters.
"""
import dataclasses
import os

import numpy as np
import pytest

from common.cli import main
from common.parity import build_oracle, compare
from common.spec import AdaptiveAvgPool2d, Dense, ModelSpec, paper_alexnet
from tests.conftest import TRAINING_BACKENDS, get_backend


def mutant_target() -> ModelSpec:
    paper = paper_alexnet(num_classes=10)
    cut = [layer.name for layer in paper.layers].index("pool5") + 1
    classifier = tuple(dataclasses.replace(l, out_features=256) if isinstance(l, Dense) and l.name != "fc8" else l
                       for l in paper.layers[cut:])
    return ModelSpec("paper+avgpool", 3, 99, paper.layers[:cut] + (AdaptiveAvgPool2d("avgpool", 2),) + classifier)


SPEC = mutant_target()


@pytest.fixture(scope="module")
def oracle():
    seed = int(os.environ.get("ALEXNET_TEST_SEED", np.random.default_rng().integers(0, 2**31 - 1)))
    print(f"\nmutation oracle seed {seed} (replay with ALEXNET_TEST_SEED={seed})")
    return build_oracle(SPEC, seed)


def plant_in_model(monkeypatch, backend, mutate):
    """Every model ``backend.build`` returns has ``mutate(model, canonical weights)`` applied."""
    real = backend.build

    def build(spec=None, **kwargs):
        model = real(spec, **kwargs)
        mutate(model, kwargs["weights"])
        return model

    monkeypatch.setattr(backend, "build", build)


def plant_in_trainer(monkeypatch, backend, *, after_step=None, **overrides):
    """``backend.make_trainer`` passes ``overrides`` instead of the caller's hyper-parameters
    and runs ``after_step(model, lr, weight_decay)`` after every train_step."""
    real = backend.make_trainer

    def make_trainer(model, **kwargs):
        trainer = real(model, **{**kwargs, **overrides})
        if after_step is not None:
            step = trainer.train_step

            def train_step(x, labels, *, seed):
                result = step(x, labels, seed=seed)
                after_step(model, kwargs["lr"], kwargs["weight_decay"])
                return result

            trainer.train_step = train_step
        return trainer

    monkeypatch.setattr(backend, "make_trainer", make_trainer)


def check(oracle, backend):
    report = compare(oracle, [backend])
    assert not report.passed and report.text.rstrip().splitlines()[-1].startswith("FAIL")
    return report


def failed(report, check_name: str) -> list[str]:
    """Names that failed ``check_name``, in model order."""
    return [f.name for f in report.failures if f.check == check_name]


# ---------------------------------------------------------------------------- the plain backend
def test_the_backends_pass_before_any_bug_is_planted(oracle):
    report = compare(oracle, [get_backend("pt")])
    assert report.passed, report.text


# ---------------------------------------------------------------------------- model bugs (PyTorch)
def flip_conv2_kernel(model, weights):
    """Convolution instead of cross-correlation (kernel rotated by 180 degrees) in conv2."""
    conv = model.conv2
    conv.forward = lambda x: conv._conv_forward(x, conv.weight.flip((-2, -1)), conv.bias)


def transpose_conv3_kernel(model, weights):
    """conv3's kernel with kH and kW swapped (square, so every shape still fits)."""
    conv = model.conv3
    conv.forward = lambda x: conv._conv_forward(x, conv.weight.transpose(-2, -1), conv.bias)


def drop_fc7_bias(model, weights):
    import torch.nn.functional as F

    fc = model.fc7
    fc.forward = lambda x: F.linear(x, fc.weight)


def lrn_alpha_not_divided(model, weights):
    """The spec's alpha (PyTorch's, divided by size) passed where the undivided one is expected."""
    for norm in (model.norm1, model.norm2):
        norm.alpha = norm.alpha * norm.size


def pool1_stride_3(model, weights):
    """Keras' habit: the pooling stride defaults to the pool size."""
    model.pool1.stride = 3


@pytest.mark.parametrize("mutate, layer", [
    (flip_conv2_kernel, "conv2"),
    (transpose_conv3_kernel, "conv3"),
    (drop_fc7_bias, "fc7"),
    (lrn_alpha_not_divided, "norm1"),
    (pool1_stride_3, "pool1"),
], ids=["flipped-conv-kernel", "transposed-conv-kernel", "missing-bias", "lrn-alpha-convention", "pool-stride"])
def test_a_model_bug_fails_at_its_layer(oracle, monkeypatch, mutate, layer):
    backend = get_backend("pt")
    plant_in_model(monkeypatch, backend, mutate)
    report = check(oracle, backend)
    forward = failed(report, "forward")
    assert forward and forward[0] == layer, report.text  # every layer before it passes
    assert failed(report, "gradients") and failed(report, "steps"), report.text


def test_a_shape_bug_is_named_and_a_crash_is_reported_not_raised(oracle, monkeypatch):
    backend = get_backend("pt")
    plant_in_model(monkeypatch, backend, pool1_stride_3)
    report = check(oracle, backend)
    pool1 = next(f for f in report.failures if f.check == "forward" and f.name == "pool1")
    assert pool1.detail == "shape (2, 96, 7, 7), reference (2, 96, 11, 11)"
    # on the smallest input the wrong stride collapses pool5: the stage that raised is named
    crash = next(f for f in report.failures if f.check == "gradients")
    assert crash.name == "loss_and_grads" and crash.detail.startswith("RuntimeError"), report.text


# ---------------------------------------------------------------------------- optimizer bugs
def decay_again(model, lr, weight_decay):
    """Decoupled weight decay on top of the coupled one (Keras' weight_decay and an L2 term)."""
    import torch

    with torch.no_grad():
        for param in model.parameters():
            param.mul_(1.0 - lr * weight_decay)


# Measured in float64 over seeds 0-4: missing weight decay puts every parameter's change 6.5 to
# 170 times its tolerance away; the decoupled second decay (which momentum does not
# accumulate) 3.9 to 240 times (seeds 0-2).
@pytest.mark.parametrize("overrides, after_step", [
    ({"weight_decay": 0.0}, None),
    ({}, decay_again),
], ids=["weight-decay-missing", "weight-decay-twice"])
def test_a_weight_decay_bug_fails_the_steps_only(oracle, monkeypatch, overrides, after_step):
    backend = get_backend("pt")
    plant_in_trainer(monkeypatch, backend, after_step=after_step, **overrides)
    report = check(oracle, backend)
    assert not failed(report, "forward") and not failed(report, "gradients"), report.text
    assert failed(report, "steps") == list(oracle.grads), report.text


@pytest.mark.parametrize("name", TRAINING_BACKENDS)
def test_momentum_off_fails_every_parameters_step_in_each_backend_alone(oracle, monkeypatch, name):
    backend = get_backend(name)
    plant_in_trainer(monkeypatch, backend, momentum=0.0)
    report = check(oracle, backend)
    assert not failed(report, "forward"), report.text
    assert failed(report, "steps") == list(oracle.grads), report.text
    # the first step is the same either way (PyTorch's buf = g), so only the loss after the second differs
    assert failed(report, "loss") == ["train_step 3"], report.text


# ---------------------------------------------------------------------------- model bugs (TensorFlow, NHWC)
def fc6_without_flatten_permutation(model, weights):
    """fc6's canonical (NCHW-ordered) columns loaded as they are behind an NHWC flatten."""
    model.get_layer("fc6").kernel.assign(np.ascontiguousarray(weights["fc6.weight"].T))


def tf_lrn_alpha_not_divided(model, weights):
    """TensorFlow's LRN takes the undivided alpha: the spec's passed without dividing by size."""
    for name in ("norm1", "norm2"):
        norm = model.get_layer(name)
        norm.alpha = norm.alpha * norm.size


@pytest.mark.parametrize("mutate, layer", [(fc6_without_flatten_permutation, "fc6"), (tf_lrn_alpha_not_divided, "norm1")],
                         ids=["nhwc-flatten-order", "lrn-alpha-convention"])
def test_a_tensorflow_model_bug_fails_at_its_layer(oracle, monkeypatch, mutate, layer):
    backend = get_backend("tf")
    plant_in_model(monkeypatch, backend, mutate)
    report = check(oracle, backend)
    forward = failed(report, "forward")
    assert forward and forward[0] == layer, report.text
    assert failed(report, "gradients"), report.text


# ---------------------------------------------------------------------------- the command
def test_parity_command_with_one_backend_fails_on_a_planted_bug(monkeypatch, capsys):
    """`alexnet parity --backends pt` alone: exit 1, and the table names what failed."""
    backend = get_backend("pt")
    plant_in_trainer(monkeypatch, backend, momentum=0.0)
    assert main(["parity", "--backends", "pt", "--input", "1,65,65", "--seed", "5"]) == 1
    out = capsys.readouterr().out
    assert "pt steps conv1.weight: " in out and "pt forward" not in out
    assert out.rstrip().splitlines()[-1].startswith("FAIL: pt")
