"""MXNet-specific behaviour of alexnet_mx (the cross-framework parity suite covers the shared contract).

Small inputs throughout (1x67x67 is the smallest the book's AlexNet accepts, batch 2) so the
file runs in well under a minute on two CPU cores.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REQUIRE_ALL

try:
    import alexnet_mx as mx_backend
except ImportError as error:
    if REQUIRE_ALL:  # CI (ALEXNET_REQUIRE_ALL_BACKENDS=1) must not skip a backend
        raise
    pytest.skip(f"MXNet is not installed: {error}", allow_module_level=True)

from common.backend import DeviceError  # noqa: E402
from common.shapes import infer  # noqa: E402
from common.spec import AdaptiveAvgPool2d, book_alexnet, paper_alexnet  # noqa: E402
from common.weights import WeightsError, init_weights, save_weights  # noqa: E402

from alexnet_mx._framework import mx  # noqa: E402
from common import ROOT  # noqa: E402
SMALL = book_alexnet().with_input(1, 67, 67).with_dropout(0.0)
LABELS = np.array([3, 7])


def _input(spec=SMALL, batch=2, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, *spec.input_shape)).astype(np.float32)


def _random_weights(spec, seed):
    """Canonical-shaped weights unlike init_weights (non-zero biases too)."""
    rng = np.random.default_rng(seed)
    return {k: (rng.standard_normal(v.shape) * 0.05).astype(np.float32) for k, v in init_weights(spec, 0).items()}


def _same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def model():
    return mx_backend.build(SMALL, seed=1, device="cpu")


# ------------------------------------------------------------------ import and device


def _python(code: str, *flags: str, unset: tuple[str, ...] = (), **variables: str) -> subprocess.CompletedProcess:
    env = {name: value for name, value in os.environ.items() if name not in unset}
    env.update(PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **variables)
    return subprocess.run([sys.executable, *flags, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_missing_mxnet_raises_import_error_naming_the_extra():
    result = _python(
        "import sys\n"
        "sys.modules['mxnet'] = None  # what an environment without MXNet looks like to import\n"
        "try:\n"
        "    import alexnet_mx\n"
        "except ImportError as error:\n"
        "    print('IMPORT ERROR:', error)\n"
    )
    assert result.returncode == 0, result.stderr
    assert "IMPORT ERROR:" in result.stdout
    assert "MXNet is not installed" in result.stdout and "alexnet-three[mxnet]" in result.stdout


def test_numpy_bool_alias_restored_without_future_warning():
    # numpy >= 1.24 removed numpy.bool, which MXNet 1.9.1 still reads; alexnet_mx._framework restores only that, before importing MXNet.
    result = _python("import alexnet_mx, numpy; assert numpy.bool is bool", "-W", "error::FutureWarning")
    assert result.returncode == 0, result.stderr


THREAD_CODE = (
    "import os, alexnet_mx\n"
    "from common.machine import physical_cores\n"
    "print(os.environ.get('MXNET_OMP_MAX_THREADS'), physical_cores(), len(os.sched_getaffinity(0)))\n"
)


def test_mxnet_gets_one_thread_per_physical_core_by_default():
    result = _python(THREAD_CODE, unset=("OMP_NUM_THREADS", "MXNET_OMP_MAX_THREADS"))
    assert result.returncode == 0, result.stderr
    chosen, cores, usable = result.stdout.split()
    assert chosen == cores and 1 <= int(cores) <= int(usable)


@pytest.mark.parametrize("variables, expected", [
    ({"OMP_NUM_THREADS": "1"}, "None"),  # the user's OpenMP choice: MXNet reads it itself
    ({"MXNET_OMP_MAX_THREADS": "3"}, "3"),
])
def test_mxnet_thread_choice_of_the_user_is_kept(variables, expected):
    result = _python(THREAD_CODE, unset=("OMP_NUM_THREADS", "MXNET_OMP_MAX_THREADS"), **variables)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] == expected


def test_device_gpu_without_gpu_is_an_error():
    if mx_backend.gpu_available():
        pytest.skip("this machine has a GPU that MXNet sees, so device='gpu' is valid here")
    with pytest.raises(DeviceError, match=f"MXNet cannot compute on a GPU here: "):
        mx_backend.build(SMALL, device="gpu")


@pytest.mark.gpu
def test_gpu_parameters_live_on_the_gpu():
    if not mx_backend.gpu_available():
        pytest.skip("MXNet sees no GPU on this machine (or this MXNet build has no CUDA)")
    net = mx_backend.build(SMALL, device="gpu")
    assert all(p.list_ctx() == [mx.gpu(0)] for p in net.collect_params().values())
    assert mx_backend.forward(net, _input()).shape == (2, SMALL.num_classes)


def test_auto_device_is_cpu_without_gpu(model):
    expected = mx.gpu(0) if mx_backend.gpu_available() else mx.cpu()
    net = mx_backend.build(SMALL)
    assert all(p.list_ctx() == [expected] for p in net.collect_params().values())
    assert all(p.list_ctx() == [mx.cpu()] for p in model.collect_params().values())


# ------------------------------------------------------------------ the native model


def test_gluon_parameter_names_follow_the_spec(model):
    names = set(model.collect_params().keys())
    assert names == {f"{layer.name}_{kind}" for layer in SMALL.weighted_layers() for kind in ("weight", "bias")}
    assert mx_backend.model_spec(model) == SMALL


def test_forward_and_capture_give_identical_logits(model):
    x = _input()
    logits = mx_backend.forward(model, x)
    captured, activations = mx_backend.forward(model, x, capture=True)
    assert np.array_equal(logits, captured)
    assert list(activations) == [layer.name for layer in SMALL.layers]
    expected = {row.name: row.shape for row in infer(SMALL, batch=2, layout="NCHW")}
    assert {name: a.shape for name, a in activations.items()} == expected
    assert activations["fc8"].ndim == 2 and activations["conv1"].ndim == 4


def test_paper_variant_builds_with_groups_and_lrn():
    spec = paper_alexnet(num_classes=10).with_input(3, 67, 67)
    net = mx_backend.build(spec, device="cpu")
    rows = mx_backend.layer_summary(net, (2, 3, 67, 67), print_table=False)
    expected = infer(spec, batch=2, layout="NCHW")
    assert [(r.name, r.kind, r.shape, r.params) for r in rows] == [
        (e.name, e.kind, e.shape, e.params) for e in expected
    ]
    assert net.layer_blocks[[l.name for l in spec.layers].index("conv2")][1].weight.shape == (256, 48, 5, 5)


@pytest.mark.parametrize("size", [5, 3])
def test_lrn_alpha_convention_is_pytorchs(size):
    """b = a / (k + alpha/n * sum over n channels of a^2)^beta, with the spec's (PyTorch's) alpha,
    over the window c - n//2 .. c + n//2 (zeros beyond the edges)."""
    from alexnet_mx._model import _LocalResponseNorm
    from common.spec import LocalResponseNorm

    layer = LocalResponseNorm("norm", size=size, alpha=0.5, beta=0.75, k=1.5)
    x = np.random.default_rng(0).standard_normal((2, 7, 3, 4)) * 2
    block = _LocalResponseNorm(layer)
    got = block(mx.nd.array(x, dtype="float32")).asnumpy()
    padded = np.pad(x**2, ((0, 0), (size // 2, (size - 1) // 2), (0, 0), (0, 0)))
    window = sum(padded[:, i:i + 7] for i in range(size))
    want = x / (layer.k + layer.alpha / layer.size * window) ** layer.beta
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-6


def test_adaptive_avg_pool_uses_pytorch_bins():
    """Bin i of n over a size-s axis covers [floor(i*s/n), ceil((i+1)*s/n)): overlapping when s % n != 0."""
    from alexnet_mx._model import _AdaptiveAvgPool2d

    x = np.random.default_rng(0).standard_normal((2, 3, 5, 7))
    got = _AdaptiveAvgPool2d(AdaptiveAvgPool2d("pool", (3, 2)))(mx.nd.array(x, dtype="float32")).asnumpy()

    def bins(s, n):
        return [(i * s // n, -(-(i + 1) * s // n)) for i in range(n)]

    want = np.array([[[[x[b, c, h0:h1, w0:w1].mean() for (w0, w1) in bins(7, 2)] for (h0, h1) in bins(5, 3)]
                      for c in range(3)] for b in range(2)])
    assert np.abs(got - want).max() < 1e-6


# ------------------------------------------------------------------ weights and checkpoints


def test_load_export_round_trip_is_bit_exact(model, tmp_path):
    weights = _random_weights(SMALL, 11)
    mx_backend.load_weights(model, weights)
    assert _same(mx_backend.export_weights(model), weights)
    path = save_weights(tmp_path / "w.npz", _random_weights(SMALL, 12))
    mx_backend.load_weights(model, path)
    assert _same(mx_backend.export_weights(model), _random_weights(SMALL, 12))


def test_wrong_weights_change_nothing(model, tmp_path):
    before = mx_backend.export_weights(model)
    bad = dict(before)
    bad["conv1.weight"] = np.zeros((96, 1, 11, 11), np.float32) + 1  # fine
    bad["fc8.weight"] = np.zeros((5, 4096), np.float32)  # wrong shape, checked after conv1 in model order
    with pytest.raises(WeightsError, match="fc8.weight"):
        mx_backend.load_weights(model, bad)
    missing = {k: v for k, v in before.items() if k != "fc7.bias"}
    with pytest.raises(WeightsError, match="missing fc7.bias"):
        mx_backend.load_weights(model, missing)
    path = save_weights(tmp_path / "other.npz", init_weights(SMALL.with_num_classes(5)))
    with pytest.raises(WeightsError, match="other.npz"):
        mx_backend.load_weights(model, path)
    assert _same(mx_backend.export_weights(model), before)


def test_native_checkpoint_round_trip_and_refusal(tmp_path):
    source = mx_backend.build(SMALL, weights=_random_weights(SMALL, 21), device="cpu")
    path = mx_backend.save_native(source, tmp_path / "net.params")
    assert sorted(mx.nd.load(str(path))) == sorted(
        f"{layer.name}.{kind}" for layer in SMALL.weighted_layers() for kind in ("weight", "bias")
    )
    target = mx_backend.build(SMALL, seed=5, device="cpu")
    mx_backend.load_native(target, path)
    assert _same(mx_backend.export_weights(target), mx_backend.export_weights(source))

    other = mx_backend.build(SMALL.with_num_classes(5), seed=5, device="cpu")
    before = mx_backend.export_weights(other)
    with pytest.raises(WeightsError, match=r"net\.params.*\n(.|\n)*fc8\.weight: shape \(10, 4096\), expected \(5, 4096\)"):
        mx_backend.load_native(other, path)
    garbage = tmp_path / "garbage.params"
    garbage.write_bytes(b"not an mxnet file")
    with pytest.raises(WeightsError, match="garbage.params"):
        mx_backend.load_native(other, garbage)
    with pytest.raises(WeightsError, match="absent.params"):
        mx_backend.load_native(other, tmp_path / "absent.params")
    assert _same(mx_backend.export_weights(other), before)


# ------------------------------------------------------------------ training


def _delta_error(after, before, step):
    """||(after - before) - (-step)|| / ||step||, not counting float32 rounding of the weights themselves.

    A float32 weight w moved by d lands on the nearest float32 to w - d, up to one ulp of w
    away; for lr = 0.01 that rounding is ~1e-4 of d, so it is allowed for explicitly."""
    error = np.abs(after.astype(np.float64) - (before.astype(np.float64) - step))
    error = np.maximum(error - np.spacing(np.maximum(np.abs(before), np.abs(after))).astype(np.float64), 0.0)
    return float(np.linalg.norm(error) / np.linalg.norm(step))


def test_one_step_moves_weights_by_lr_times_grad():
    net = mx_backend.build(SMALL, seed=2, device="cpu")
    x, lr = _input(), 0.01
    before = mx_backend.export_weights(net)
    _, grads = mx_backend.loss_and_grads(net, x, LABELS)
    trainer = mx_backend.make_trainer(net, lr=lr)
    trainer.train_step(x, LABELS, seed=0)
    after = mx_backend.export_weights(net)
    for name in before:
        assert _delta_error(after[name], before[name], lr * grads[name].astype(np.float64)) < 1e-5, name
    assert trainer.optimizer_state() == {}


def test_momentum_and_weight_decay_follow_pytorch_sgd():
    """Two steps against numpy's re-implementation of torch.optim.SGD (coupled L2 on every parameter)."""
    lr, momentum, wd = 0.01, 0.9, 0.05
    net = mx_backend.build(SMALL, seed=3, device="cpu")
    trainer = mx_backend.make_trainer(net, lr=lr, momentum=momentum, weight_decay=wd)
    x = _input()
    assert all(not v.any() for v in trainer.optimizer_state().values())  # zeros: the same first step as none
    buf = None
    for step in range(2):
        before = mx_backend.export_weights(net)
        _, grads = mx_backend.loss_and_grads(net, x, LABELS)
        d = {k: grads[k].astype(np.float64) + wd * before[k] for k in before}
        buf = d if buf is None else {k: momentum * buf[k] + d[k] for k in before}
        trainer.train_step(x, LABELS, seed=step)
        after = mx_backend.export_weights(net)
        for name in before:
            assert _delta_error(after[name], before[name], lr * buf[name]) < 1e-5, (step, name)
    state = trainer.optimizer_state()
    assert set(state) == {f"momentum/{k}" for k in buf}
    for name in buf:
        got = state[f"momentum/{name}"]
        assert got.dtype == np.float32 and got.shape == buf[name].shape
        assert np.linalg.norm(got - buf[name]) / np.linalg.norm(buf[name]) < 1e-5, name


def test_optimizer_state_load_and_refusal():
    net = mx_backend.build(SMALL, seed=4, device="cpu")
    trainer = mx_backend.make_trainer(net, lr=0.05, momentum=0.9)
    state = {f"momentum/{k}": v for k, v in _random_weights(SMALL, 31).items()}
    trainer.load_optimizer_state(state)
    assert _same(trainer.optimizer_state(), state)  # the optimizer keeps PyTorch's buf itself: exact
    with pytest.raises(ValueError, match="missing momentum/fc8.bias"):
        trainer.load_optimizer_state({k: v for k, v in state.items() if k != "momentum/fc8.bias"})
    with pytest.raises(ValueError, match="no momentum.*unexpected .*momentum/conv1.weight"):
        mx_backend.make_trainer(net, lr=0.05).load_optimizer_state(state)
    assert mx_backend.make_trainer(net, lr=0.05).optimizer_state() == {}


def test_train_step_dropout_is_a_function_of_the_seed():
    spec = SMALL.with_dropout(0.5)
    weights = init_weights(spec, 6)
    x = _input(spec)

    def run(seed):
        net = mx_backend.build(spec, weights=weights, device="cpu")
        trainer = mx_backend.make_trainer(net, lr=0.05, momentum=0.9)
        results = [trainer.train_step(x, LABELS, seed=seed + i) for i in range(2)]
        return results, mx_backend.export_weights(net)

    first, again, other = run(7), run(7), run(8)
    assert first[0] == again[0] and _same(first[1], again[1])
    assert not np.array_equal(first[1]["fc7.weight"], other[1]["fc7.weight"])  # dropout is really on


def test_eval_step_sums_the_loss(model):
    trainer = mx_backend.make_trainer(model, lr=0.01)
    x = _input()
    logits = mx_backend.forward(model, x).astype(np.float64)
    log_softmax = logits - logits.max(1, keepdims=True)
    log_softmax -= np.log(np.exp(log_softmax).sum(1, keepdims=True))
    summed, correct = trainer.eval_step(x, LABELS)
    assert summed == pytest.approx(-log_softmax[np.arange(2), LABELS].sum(), rel=1e-5)
    assert correct == int((logits.argmax(1) == LABELS).sum())


def test_prepare_matches_common_preprocess(model):
    from common import data

    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    prepared = mx_backend.make_trainer(model, lr=0.01).prepare(images)
    assert isinstance(prepared, mx.nd.NDArray) and prepared.context == model.ctx
    got, want = prepared.asnumpy(), data.preprocess(images, SMALL.input_size)
    assert got.shape == want.shape == (3, 1, 67, 67)
    assert np.abs(got - want).max() < 1e-5


def test_resumed_training_equals_an_uninterrupted_run_bit_for_bit():
    """The optimizer keeps PyTorch's buf (not Gluon's -lr * buf), so exporting and loading it is exact."""
    spec, x = SMALL.with_dropout(0.5), _input()
    settings = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
    net = mx_backend.build(spec, seed=8, device="cpu")
    trainer = mx_backend.make_trainer(net, **settings)
    expected = [trainer.train_step(x, LABELS, seed=s) for s in (0, 1)]

    first = mx_backend.build(spec, seed=8, device="cpu")
    first_trainer = mx_backend.make_trainer(first, **settings)
    results = [first_trainer.train_step(x, LABELS, seed=0)]
    resumed = mx_backend.build(spec, weights=mx_backend.export_weights(first), device="cpu")
    resumed_trainer = mx_backend.make_trainer(resumed, **settings)
    resumed_trainer.load_optimizer_state(first_trainer.optimizer_state())
    results.append(resumed_trainer.train_step(x, LABELS, seed=1))
    assert results == expected
    assert _same(mx_backend.export_weights(resumed), mx_backend.export_weights(net))
    assert _same(resumed_trainer.optimizer_state(), trainer.optimizer_state())
