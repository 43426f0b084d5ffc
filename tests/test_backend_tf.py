"""TensorFlow/Keras-specific behaviour of alexnet_tf.

The cross-framework parity suite (shapes, numbers against float64, the contract) is shared
by all backends; this file covers what only the Keras backend does: NHWC flatten order and
kernel transposes (bit-exact round trips), Keras' own checkpoint format, the compiled SGD
step against PyTorch's rule, stateless dropout seeding, the on-device input pipeline,
grouped convolutions and LRN in Keras, and the import / device errors.

Small inputs keep it fast on a shared 2-core CPU: 1x67x67 is the smallest the book's
AlexNet accepts, and every batch is 2.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from common import ROOT  # noqa: E402

from common import shapes  # noqa: E402
from common import spec as S  # noqa: E402
from common.backend import DeviceError  # noqa: E402
from common.weights import (LOSS_SCALE_GROWTH_INTERVAL, LOSS_SCALE_INITIAL, WeightsError, init_weights,  # noqa: E402
                            nhwc_flatten_permutation, save_weights)
from tests.conftest import REQUIRE_ALL, assert_same_weights, relative_error, update_error  # noqa: E402

try:
    import alexnet_tf as A
    from alexnet_tf._framework import tf
except ImportError as error:  # TensorFlow not installed: only the import-error test can run
    if REQUIRE_ALL:  # CI (ALEXNET_REQUIRE_ALL_BACKENDS=1) must not skip a backend
        raise
    A = tf = None
    _MISSING = str(error)
else:
    _MISSING = ""

needs_tf = pytest.mark.skipif(A is None, reason=f"TensorFlow is not installed ({_MISSING})")

BATCH = 2
SMALL = S.book_alexnet().with_input(1, 67, 67)
SMALL_NO_DROPOUT = SMALL.with_dropout(0.0)


def _batch(spec: S.ModelSpec, seed: int = 0):
    """A random NHWC input and labels for ``spec``."""
    rng = np.random.default_rng(seed)
    c, h, w = spec.input_shape
    x = rng.standard_normal((BATCH, h, w, c)).astype(np.float32)
    labels = rng.integers(0, spec.num_classes, BATCH)
    return x, labels


@pytest.fixture(scope="module")
def small_model():
    """The book's AlexNet at 1x67x67 without dropout, shared by tests that reset its weights."""
    return A.build(SMALL_NO_DROPOUT, seed=0)


@pytest.fixture
def model(small_model):
    A.load_weights(small_model, init_weights(SMALL_NO_DROPOUT, 0))
    return small_model


# ----------------------------------------------------------------------------- import / device


def test_missing_tensorflow_raises_import_error_naming_the_extra():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["tensorflow"] = None  # what an environment without TensorFlow looks like
        try:
            import alexnet_tf
        except ImportError as error:
            print("IMPORT-ERROR:", error)
        else:
            print("IMPORTED")
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert "IMPORT-ERROR:" in result.stdout, result.stdout + result.stderr
    assert "alexnet-three[tensorflow]" in result.stdout
    assert "TensorFlow" in result.stdout


@needs_tf
def test_module_constants():
    assert (A.NAME, A.FRAMEWORK, A.LAYOUT) == ("tf", "TensorFlow", "NHWC")


@needs_tf
def test_device_gpu_without_gpu_raises():
    if A.gpu_available():
        pytest.skip("this machine has a GPU, so device='gpu' is valid here")
    with pytest.raises(DeviceError, match=f"TensorFlow cannot compute on a GPU here: "):
        A.build(SMALL, device="gpu")


@needs_tf
def test_auto_device_places_parameters_where_tensorflow_sees_them(model):
    kind = "GPU" if A.gpu_available() else "CPU"
    assert all(kind in v.value.device for v in model.trainable_weights)


@needs_tf
@pytest.mark.gpu
def test_parameters_live_on_the_gpu():
    if not A.gpu_available():
        pytest.skip("TensorFlow sees no GPU on this machine")
    model = A.build(SMALL, device="gpu")
    devices = {v.path: v.value.device for v in model.trainable_weights}
    assert devices and all("GPU" in d for d in devices.values()), devices
    x, labels = _batch(SMALL)
    trainer = A.make_trainer(model, lr=0.01)
    assert "GPU" in trainer.prepare(np.zeros((BATCH, 28, 28), np.uint8)).device
    trainer.train_step(x, labels, seed=0)


# ------------------------------------------------------------------------------- weights


@needs_tf
def test_load_export_round_trip_is_bit_exact(model, tmp_path):
    weights = init_weights(SMALL_NO_DROPOUT, seed=5)
    A.load_weights(model, weights)
    assert_same_weights(A.export_weights(model), weights)
    path = save_weights(tmp_path / "w.npz", init_weights(SMALL_NO_DROPOUT, seed=6))
    A.load_weights(model, path)
    assert_same_weights(A.export_weights(model), init_weights(SMALL_NO_DROPOUT, seed=6))


@needs_tf
def test_round_trip_keeps_the_flatten_permutation_at_a_larger_input():
    """At 115x115 pool5 is 2x2, so fc6's NCHW columns really are permuted for NHWC."""
    spec = S.book_alexnet().with_input(1, 115, 115)
    weights = init_weights(spec, seed=3)
    model = A.build(spec, weights=weights)
    native = model.get_layer("fc6").kernel.numpy()
    perm = nhwc_flatten_permutation(spec)
    assert not np.array_equal(perm, np.arange(perm.size))
    assert np.array_equal(native, weights["fc6.weight"][:, perm].T)
    assert_same_weights(A.export_weights(model), weights)
    # and the captured flatten output is the NHWC flatten: columns permuted the same way
    x, _ = _batch(spec)
    _, acts = A.forward(model, x, capture=True)
    pool5_nchw = acts["pool5"].transpose(0, 3, 1, 2).reshape(BATCH, -1)
    assert np.array_equal(acts["flatten"], pool5_nchw[:, perm])


@needs_tf
def test_bad_weights_change_nothing(model, tmp_path):
    before = A.export_weights(model)
    good = init_weights(SMALL_NO_DROPOUT, seed=9)
    wrong_shape = {**good, "fc6.weight": np.zeros((4096, 9216), np.float32)}
    wrong_dtype = {**good, "conv1.weight": good["conv1.weight"].astype(np.float64)}
    missing = {k: v for k, v in good.items() if k != "fc8.bias"}
    for bad in (wrong_shape, wrong_dtype, missing):
        with pytest.raises(WeightsError):
            A.load_weights(model, bad)
        assert_same_weights(A.export_weights(model), before)
    other = save_weights(tmp_path / "book224.npz", init_weights(S.book_alexnet().with_num_classes(3), seed=0))
    with pytest.raises(WeightsError, match="book224.npz"):
        A.load_weights(model, other)
    assert_same_weights(A.export_weights(model), before)


@needs_tf
def test_native_checkpoint_round_trip_and_refusal(model, tmp_path):
    path = A.save_native(model, tmp_path / "ckpt.weights.h5")
    expected = A.export_weights(model)
    other = A.build(SMALL_NO_DROPOUT, seed=1)
    A.load_native(other, path)
    assert_same_weights(A.export_weights(other), expected)

    mismatched = A.build(SMALL_NO_DROPOUT, num_classes=3, seed=2)
    before = A.export_weights(mismatched)
    with pytest.raises(ValueError, match="ckpt.weights.h5") as info:
        A.load_native(mismatched, path)
    assert "fc8" in str(info.value)
    assert_same_weights(A.export_weights(mismatched), before)
    with pytest.raises(ValueError, match=r"\.weights\.h5"):
        A.save_native(model, tmp_path / "ckpt.h5")


@needs_tf
def test_param_counts_come_from_keras_and_match_the_spec(model):
    counts = A.param_counts(model)
    assert list(counts) == [layer.name for layer in SMALL_NO_DROPOUT.layers]
    assert counts == {row.name: row.params for row in shapes.infer(SMALL_NO_DROPOUT)}
    assert sum(counts.values()) == model.count_params()


# ------------------------------------------------------------------------------- forward


@needs_tf
def test_forward_and_capture_give_identical_logits(model):
    x, _ = _batch(SMALL_NO_DROPOUT)
    logits = A.forward(model, x)
    captured_logits, acts = A.forward(model, x, capture=True)
    assert np.array_equal(logits, captured_logits)
    assert list(acts) == [layer.name for layer in SMALL_NO_DROPOUT.layers]
    assert np.array_equal(acts["fc8"], logits)
    assert logits.shape == (BATCH, 10) and logits.dtype == np.float32


@needs_tf
def test_nchw_input_is_refused_with_a_layout_hint(model):
    x, _ = _batch(SMALL_NO_DROPOUT)
    with pytest.raises(ValueError, match="NHWC"):
        A.forward(model, x.transpose(0, 3, 1, 2))


@needs_tf
def test_paper_variant_builds_with_groups_and_lrn_and_shapes_match_common():
    spec = S.paper_alexnet().with_input(3, 67, 67)
    model = A.build(spec)
    rows = A.layer_summary(model, (BATCH, 67, 67, 3), print_table=False)
    expected = shapes.infer(spec, batch=BATCH, layout="NHWC")
    assert [(r.name, r.shape, r.params) for r in rows] == [(e.name, e.shape, e.params) for e in expected]
    assert model.get_layer("conv2").groups == 2
    assert tuple(model.get_layer("conv2").kernel.shape) == (5, 5, 48, 256)


@needs_tf
def test_xla_is_the_default_on_a_gpu_and_on_a_cpu_without_avx512(monkeypatch, model):
    """Chosen by the CPU's features, as measured on both kinds (docs/benchmarks.md)."""
    import common.machine as machine
    from alexnet_tf._model import xla_by_default

    flags = {"avx512": "fpu avx2 avx512f amx_tile", "avx2": "fpu avx2 fma"}
    for kind, expected in (("avx512", False), ("avx2", True)):
        monkeypatch.setattr(machine, "_cpuinfo", lambda: {"flags": flags[kind]})
        assert xla_by_default("/CPU:0") is expected, kind
        assert xla_by_default("/GPU:0") is True
    monkeypatch.undo()
    here = "avx512f" not in machine.cpu_flags()
    assert A.make_trainer(model, lr=0.01).options["xla"] is here
    assert A.make_trainer(model, lr=0.01, jit_compile=not here).options["xla"] is (not here)


@needs_tf
def test_padding_is_keras_same_only_where_that_is_exact():
    """'same' for stride 1 and (k - 1) / 2 on an odd kernel (one op, no Pad); otherwise ZeroPadding2D
    and 'valid': 'same' with stride 4 would pad 224 by 3 + 4, not by the book's 1 + 1."""
    from alexnet_tf._model import same_padding

    conv = lambda k, s, p: S.Conv2d("c", 8, (k, k), stride=(s, s), padding=(p, p))  # noqa: E731
    assert same_padding(conv(3, 1, 1)) and same_padding(conv(5, 1, 2)) and same_padding(conv(1, 1, 0))
    assert not any(same_padding(c) for c in (conv(11, 4, 1), conv(3, 2, 1), conv(5, 1, 1), conv(4, 1, 1), conv(3, 1, 0)))
    model = A.build(S.book_alexnet().with_input(1, 67, 67))
    layers = {layer.name: layer for layer in model.layers}
    assert layers["conv1"].padding == "valid" and "conv1_pad" in layers  # stride 4, padding 1
    assert all(layers[f"conv{i}"].padding == "same" and f"conv{i}_pad" not in layers for i in (2, 3, 4, 5))


@needs_tf
def test_lrn_uses_pytorch_alpha_convention():
    spec = S.paper_alexnet().with_input(3, 67, 67).with_dropout(0.0)
    model = A.build(spec)
    x, _ = _batch(spec)
    _, acts = A.forward(model, x * 40.0, capture=True)  # large activations, so LRN is far from identity
    a = acts["relu1"].astype(np.float64)
    lrn = spec.layer("norm1")
    half = lrn.size // 2
    padded = np.pad(a * a, ((0, 0), (0, 0), (0, 0), (half, half)))
    window = sum(padded[..., i:i + a.shape[-1]] for i in range(lrn.size))
    expected = a / (lrn.k + lrn.alpha / lrn.size * window) ** lrn.beta
    assert np.max(np.abs(expected / a.clip(1e-12) - 1)[a > 0]) > 1e-3  # the check below means something
    assert relative_error(acts["norm1"], expected) < 1e-5


@needs_tf
def test_adaptive_avg_pool_matches_pytorch_windows():
    layers = list(S.book_alexnet().layers)
    at = [layer.name for layer in layers].index("relu5") + 1
    layers.insert(at, S.AdaptiveAvgPool2d("avgpool", (5, 4)))  # 7x7 -> 5x4: overlapping, uneven windows
    spec = S.ModelSpec("adaptive", 1, 131, tuple(layers))
    model = A.build(spec)
    x, _ = _batch(spec)
    _, acts = A.forward(model, x, capture=True)
    a = acts["relu5"].astype(np.float64)
    (height, width), (out_h, out_w) = a.shape[1:3], (5, 4)
    expected = np.zeros((BATCH, out_h, out_w, a.shape[3]))
    for i in range(out_h):
        for j in range(out_w):
            h0, h1 = i * height // out_h, -(-(i + 1) * height // out_h)
            w0, w1 = j * width // out_w, -(-(j + 1) * width // out_w)
            expected[:, i, j] = a[:, h0:h1, w0:w1].mean(axis=(1, 2))
    assert acts["avgpool"].shape == expected.shape
    assert relative_error(acts["avgpool"], expected) < 1e-6


# ------------------------------------------------------------------------------ training


@needs_tf
def test_one_sgd_step_moves_each_weight_by_lr_times_grad(model):
    x, labels = _batch(SMALL_NO_DROPOUT)
    lr = 0.01
    loss, grads = A.loss_and_grads(model, x, labels)
    before = A.export_weights(model)
    trainer = A.make_trainer(model, lr=lr)
    step_loss, correct = trainer.train_step(x, labels, seed=0)
    after = A.export_weights(model)
    assert step_loss == pytest.approx(loss, rel=1e-6)
    assert 0 <= correct <= BATCH
    for name, grad in grads.items():
        assert update_error(before[name], after[name], lr * grad.astype(np.float64)) < 1e-5, name
    assert trainer.optimizer_state() == {}


@needs_tf
def test_fp16_uses_keras_float16_policy_and_loss_scale_optimizers_numbers():
    """The loss scale's rule is written into the step (alexnet_tf._trainer); its numbers are Keras' own
    LossScaleOptimizer defaults, and the step computes under the mixed_float16 policy."""
    import inspect

    from alexnet_tf._framework import keras
    from alexnet_tf._trainer import POLICIES

    keras_defaults = inspect.signature(keras.optimizers.LossScaleOptimizer.__init__).parameters
    assert keras_defaults["initial_scale"].default == LOSS_SCALE_INITIAL
    assert keras_defaults["dynamic_growth_steps"].default == LOSS_SCALE_GROWTH_INTERVAL
    assert keras.DTypePolicy(POLICIES["fp16"]).compute_dtype == "float16"


@needs_tf
def test_momentum_and_weight_decay_follow_pytorch_sgd_over_two_steps(model):
    x, labels = _batch(SMALL_NO_DROPOUT, seed=1)
    lr, momentum, wd = 0.05, 0.9, 0.01
    # non-zero biases, so that weight decay on biases is tested too
    A.load_weights(model, {k: v + np.float32(0.01) if k.endswith(".bias") else v
                           for k, v in init_weights(SMALL_NO_DROPOUT, 0).items()})
    trainer = A.make_trainer(model, lr=lr, momentum=momentum, weight_decay=wd)
    w = A.export_weights(model)
    buf: dict[str, np.ndarray] = {}
    for step in range(2):
        _, grads = A.loss_and_grads(model, x, labels)
        for name, grad in grads.items():
            g = grad.astype(np.float64) + wd * w[name].astype(np.float64)
            buf[name] = g if step == 0 else momentum * buf[name] + g
        trainer.train_step(x, labels, seed=step)
        got = A.export_weights(model)
        for name in grads:
            assert update_error(w[name], got[name], lr * buf[name]) < 1e-5, (step, name)
        w = got
    state = trainer.optimizer_state()
    assert sorted(state) == sorted(f"momentum/{name}" for name in grads)
    for name in grads:
        assert state[f"momentum/{name}"].shape == grads[name].shape
        assert relative_error(state[f"momentum/{name}"], buf[name]) < 1e-5
    # the state goes into a fresh trainer unchanged (canonical layout both ways)
    fresh = A.make_trainer(model, lr=lr, momentum=momentum, weight_decay=wd)
    fresh.load_optimizer_state(state)
    for name, value in fresh.optimizer_state().items():
        assert np.array_equal(value, state[name])
    with pytest.raises(ValueError, match="missing"):
        fresh.load_optimizer_state({k: v for k, v in state.items() if "fc8" not in k})


@needs_tf
def test_train_step_dropout_is_a_function_of_the_seed():
    spec = SMALL  # dropout 0.5
    weights = init_weights(spec, 4)
    model = A.build(spec, weights=weights)
    x, labels = _batch(spec)
    trainer = A.make_trainer(model, lr=0.01)

    def step(seed):
        A.load_weights(model, weights)
        loss, _ = trainer.train_step(x, labels, seed=seed)
        return loss, A.export_weights(model)

    loss_a, after_a = step(7)
    loss_b, after_b = step(7)
    assert loss_a == loss_b
    assert_same_weights(after_b, after_a)
    loss_c, after_c = step(8)
    assert not np.array_equal(after_c["fc7.weight"], after_a["fc7.weight"])
    # the same seed in a new trainer (as after a resume) repeats it too
    A.load_weights(model, weights)
    loss_d, _ = A.make_trainer(model, lr=0.01).train_step(x, labels, seed=7)
    assert loss_d == loss_a
    # inference ignores dropout
    assert np.array_equal(A.forward(model, x), A.forward(model, x))


@needs_tf
def test_resumed_training_repeats_an_uninterrupted_run_bit_for_bit():
    """Weights and momentum exported after two steps, loaded into a fresh model and trainer,
    then two more steps: bit-identical to four uninterrupted steps. With momentum and weight
    decay both on, an update written as separate ops was not (see ``alexnet_tf._trainer``)."""
    weights = init_weights(SMALL, 2)
    rng = np.random.default_rng(2)
    batches = [(rng.standard_normal((8, 67, 67, 1)).astype(np.float32), rng.integers(0, 10, 8)) for _ in range(4)]
    settings = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)

    def run(model, trainer, steps):
        for step in steps:
            trainer.train_step(*batches[step], seed=100 + step)

    full = A.build(SMALL, weights=weights)
    run(full, A.make_trainer(full, **settings), range(4))
    first = A.build(SMALL, weights=weights)
    trainer = A.make_trainer(first, **settings)
    run(first, trainer, range(2))
    resumed = A.build(SMALL, seed=99)
    A.load_weights(resumed, A.export_weights(first))
    again = A.make_trainer(resumed, **settings)
    again.load_optimizer_state(trainer.optimizer_state())
    run(resumed, again, range(2, 4))
    assert_same_weights(A.export_weights(resumed), A.export_weights(full))


@needs_tf
def test_eval_step_sums_the_loss(model):
    x, labels = _batch(SMALL_NO_DROPOUT)
    logits = A.forward(model, x).astype(np.float64)
    log_probs = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) \
        - logits.max(1, keepdims=True)
    expected = -log_probs[np.arange(BATCH), labels].sum()
    loss, correct = A.make_trainer(model, lr=0.01).eval_step(x, labels)
    assert loss == pytest.approx(expected, rel=1e-5)
    assert correct == int((logits.argmax(1) == labels).sum())


@needs_tf
def test_prepare_matches_common_preprocess(model):
    from common import data

    images = np.random.default_rng(0).integers(0, 256, (BATCH, 28, 28), dtype=np.uint8)
    trainer = A.make_trainer(model, lr=0.01)
    x = trainer.prepare(images)
    assert isinstance(x, tf.Tensor) and x.dtype == tf.float32
    assert ("GPU" if A.gpu_available() else "CPU") in x.device
    expected = data.preprocess(images, SMALL_NO_DROPOUT.input_size).transpose(0, 2, 3, 1)
    assert x.shape == expected.shape
    assert np.max(np.abs(x.numpy() - expected)) < 1e-5
    trainer.eval_step(x, np.zeros(BATCH, np.int64))  # the prepared tensor feeds the steps as is
