"""JAX/Flax-specific behaviour of alexnet_jax.

The cross-framework suites (shapes, numbers against float64, the contract, training, export,
replicas) run every backend of the registry; this file covers what only the Flax backend does:
NHWC flatten order and kernel transposes (bit-exact round trips), Flax's msgpack checkpoint,
the jitted SGD step against PyTorch's rule, dropout keys from the step seed, fp16's loss scale
inside the step, buffer donation, the on-device input pipeline, the book's own JAX code, and
the import / device errors.

Small inputs keep it fast on a shared 2-core CPU: 1x67x67, batches of 2.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from common import ROOT
from common import shapes
from common import spec as S
from common.backend import DeviceError, load_plain
from common.weights import LOSS_SCALE_INITIAL, WeightsError, init_weights, nhwc_flatten_permutation, save_weights
from tests.conftest import REQUIRE_ALL, assert_same_weights, relative_error, update_error

try:
    import alexnet_jax as A
    from alexnet_jax._framework import jax
except ImportError as error:  # JAX not installed: only the import-error test can run
    if REQUIRE_ALL:  # CI (ALEXNET_REQUIRE_ALL_BACKENDS=1) must not skip a backend
        raise
    A = jax = None
    _MISSING = str(error)
else:
    _MISSING = ""

needs_jax = pytest.mark.skipif(A is None, reason=f"JAX is not installed ({_MISSING})")

BATCH = 2
SMALL = S.book_alexnet().with_input(1, 67, 67)
SMALL_NO_DROPOUT = SMALL.with_dropout(0.0)


def _batch(spec: S.ModelSpec, seed: int = 0, batch: int = BATCH):
    rng = np.random.default_rng(seed)
    c, h, w = spec.input_shape
    return rng.standard_normal((batch, h, w, c)).astype(np.float32), rng.integers(0, spec.num_classes, batch)


@pytest.fixture(scope="module")
def small_model():
    return A.build(SMALL_NO_DROPOUT, seed=0)


@pytest.fixture
def model(small_model):
    A.load_weights(small_model, init_weights(SMALL_NO_DROPOUT, 0))
    return small_model


# ----------------------------------------------------------------------------- import / device

def test_missing_jax_raises_import_error_naming_the_extra():
    code = textwrap.dedent("""
        import sys
        sys.modules["jax"] = None  # what an environment without JAX looks like
        try:
            import alexnet_jax
        except ImportError as error:
            print("IMPORT-ERROR:", error)
        else:
            print("IMPORTED")
        """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert "IMPORT-ERROR:" in result.stdout, result.stdout + result.stderr
    assert "alexnet-three[jax]" in result.stdout and "JAX" in result.stdout


@needs_jax
def test_module_constants():
    assert (A.NAME, A.FRAMEWORK, A.LAYOUT) == ("jax", "JAX", "NHWC")


@needs_jax
def test_device_gpu_without_gpu_raises():
    if A.gpu_available():
        pytest.skip("this machine has a GPU, so device='gpu' is valid here")
    with pytest.raises(DeviceError, match="JAX cannot compute on a GPU here: "):
        A.build(SMALL, device="gpu")


@needs_jax
def test_parameters_live_where_jax_computes(model):
    assert A.parameter_devices(model) == {"gpu" if A.gpu_available() else "cpu"}


@needs_jax
def test_math_mode_sets_jaxs_matmul_precision():
    try:
        A.set_math_mode("tf32")
        assert jax.config.jax_default_matmul_precision == "tensorfloat32"
        A.set_math_mode("fp32")
        assert jax.config.jax_default_matmul_precision == "highest"
        with pytest.raises(ValueError, match="math mode"):
            A.set_math_mode("bf32")
    finally:
        A.set_math_mode("fp32")


# ------------------------------------------------------------------------------- weights

@needs_jax
def test_load_export_round_trip_is_bit_exact(model, tmp_path):
    weights = init_weights(SMALL_NO_DROPOUT, seed=5)
    A.load_weights(model, weights)
    assert_same_weights(A.export_weights(model), weights)
    path = save_weights(tmp_path / "w.npz", init_weights(SMALL_NO_DROPOUT, seed=6))
    A.load_weights(model, path)
    assert_same_weights(A.export_weights(model), init_weights(SMALL_NO_DROPOUT, seed=6))


@needs_jax
def test_round_trip_keeps_the_flatten_permutation_at_a_larger_input():
    """At 115x115 pool5 is 2x2, so fc6's NCHW columns really are permuted for NHWC."""
    spec = S.book_alexnet().with_input(1, 115, 115)
    weights = init_weights(spec, seed=3)
    model = A.build(spec, weights=weights)
    perm = nhwc_flatten_permutation(spec)
    assert not np.array_equal(perm, np.arange(perm.size))
    assert np.array_equal(np.asarray(model.params["fc6"]["kernel"]), weights["fc6.weight"][:, perm].T)
    assert_same_weights(A.export_weights(model), weights)
    x, _ = _batch(spec)
    _, acts = A.forward(model, x, capture=True)
    pool5_nchw = acts["pool5"].transpose(0, 3, 1, 2).reshape(BATCH, -1)
    assert np.array_equal(acts["flatten"], pool5_nchw[:, perm])


@needs_jax
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


@needs_jax
def test_native_checkpoint_round_trip_and_refusal(model, tmp_path):
    path = A.save_native(model, tmp_path / "ckpt.msgpack")
    expected = A.export_weights(model)
    other = A.build(SMALL_NO_DROPOUT, seed=1)
    A.load_native(other, path)
    assert_same_weights(A.export_weights(other), expected)

    mismatched = A.build(SMALL_NO_DROPOUT, num_classes=3, seed=2)
    before = A.export_weights(mismatched)
    with pytest.raises(WeightsError, match="ckpt.msgpack") as info:
        A.load_native(mismatched, path)
    assert "fc8" in str(info.value)
    assert_same_weights(A.export_weights(mismatched), before)
    corrupt = tmp_path / "corrupt.msgpack"
    corrupt.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(WeightsError, match="not a readable Flax msgpack checkpoint"):
        A.load_native(mismatched, corrupt)
    assert_same_weights(A.export_weights(mismatched), before)


@needs_jax
def test_param_counts_come_from_the_parameter_tree_and_match_the_spec(model):
    counts = A.param_counts(model)
    assert list(counts) == [layer.name for layer in SMALL_NO_DROPOUT.layers]
    assert counts == {row.name: row.params for row in shapes.infer(SMALL_NO_DROPOUT)}


# ------------------------------------------------------------------------------- forward

@needs_jax
def test_forward_and_capture_give_identical_logits(model):
    x, _ = _batch(SMALL_NO_DROPOUT)
    logits = A.forward(model, x)
    captured_logits, acts = A.forward(model, x, capture=True)
    assert np.array_equal(logits, captured_logits)
    assert list(acts) == [layer.name for layer in SMALL_NO_DROPOUT.layers]
    assert logits.shape == (BATCH, 10) and logits.dtype == np.float32


@needs_jax
def test_nchw_input_is_refused_with_a_layout_hint(model):
    with pytest.raises(ValueError, match="looks like NCHW"):
        A.forward(model, np.zeros((BATCH, 1, 67, 67), np.float32))


@needs_jax
def test_paper_variant_builds_with_groups_and_lrn_and_shapes_match_common():
    spec = S.paper_alexnet().with_input(3, 67, 67)
    model = A.build(spec, seed=0)
    rows = A.layer_summary(model, (1, 67, 67, 3), print_table=False)
    expected = shapes.infer(spec, layout="NHWC")
    assert [(r.name, r.shape[1:], r.params) for r in rows] == [(e.name, e.shape[1:], e.params) for e in expected]
    assert model.params["conv2"]["kernel"].shape[2] == 96 // 2  # two groups: half the input channels each


# ------------------------------------------------------------------------------- training

@needs_jax
def test_one_sgd_step_moves_each_weight_by_lr_times_grad(model):
    x, labels = _batch(SMALL_NO_DROPOUT)
    lr = 0.01
    loss, grads = A.loss_and_grads(model, x, labels)
    before = A.export_weights(model)
    trainer = A.make_trainer(model, lr=lr)
    step_loss, correct = trainer.train_step(x, labels, seed=0)
    after = A.export_weights(model)
    assert step_loss == pytest.approx(loss, rel=1e-6) and 0 <= correct <= BATCH
    for name, grad in grads.items():
        assert update_error(before[name], after[name], lr * grad.astype(np.float64)) < 1e-5, name
    assert trainer.optimizer_state() == {}


@needs_jax
def test_momentum_and_weight_decay_follow_pytorch_sgd_over_two_steps(model):
    x, labels = _batch(SMALL_NO_DROPOUT, seed=1)
    lr, momentum, wd = 0.05, 0.9, 0.01
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
        assert relative_error(state[f"momentum/{name}"], buf[name]) < 1e-5
    fresh = A.make_trainer(model, lr=lr, momentum=momentum, weight_decay=wd)
    fresh.load_optimizer_state(state)
    for name, value in fresh.optimizer_state().items():
        assert np.array_equal(value, state[name])
    with pytest.raises(ValueError, match="missing"):
        fresh.load_optimizer_state({k: v for k, v in state.items() if "fc8" not in k})


@needs_jax
def test_a_new_lr_acts_on_the_next_step(model):
    x, labels = _batch(SMALL_NO_DROPOUT)
    weights = A.export_weights(model)
    trainer = A.make_trainer(model, lr=0.01)
    _, grads = A.loss_and_grads(model, x, labels)
    trainer.lr = 0.1
    trainer.train_step(x, labels, seed=0)
    after = A.export_weights(model)
    assert trainer.lr == 0.1
    step = 0.1 * grads["fc8.weight"].astype(np.float64)
    assert update_error(weights["fc8.weight"], after["fc8.weight"], step) < 1e-5


@needs_jax
def test_train_step_dropout_is_a_function_of_the_seed():
    weights = init_weights(SMALL, 4)  # dropout 0.5
    model = A.build(SMALL, weights=weights)
    x, labels = _batch(SMALL)
    trainer = A.make_trainer(model, lr=0.01)

    def step(seed, trainer=trainer):
        A.load_weights(model, weights)
        loss, _ = trainer.train_step(x, labels, seed=seed)
        return loss, A.export_weights(model)

    loss_a, after_a = step(7)
    loss_b, after_b = step(7)
    assert loss_a == loss_b
    assert_same_weights(after_b, after_a)
    _, after_c = step(8)
    assert not np.array_equal(after_c["fc7.weight"], after_a["fc7.weight"])
    loss_d, _ = step(7, A.make_trainer(model, lr=0.01))  # a new trainer, as after a resume
    assert loss_d == loss_a
    assert np.array_equal(A.forward(model, x), A.forward(model, x))  # inference ignores dropout


@needs_jax
@pytest.mark.parametrize("donate", [True, False])
def test_resumed_training_repeats_an_uninterrupted_run_bit_for_bit(donate):
    """Weights and momentum exported after two steps, loaded into a fresh model and trainer,
    then two more steps: bit-identical to four uninterrupted steps, with and without donation."""
    weights = init_weights(SMALL, 2)
    rng = np.random.default_rng(2)
    batches = [(rng.standard_normal((8, 67, 67, 1)).astype(np.float32), rng.integers(0, 10, 8)) for _ in range(4)]
    settings = dict(lr=0.05, momentum=0.9, weight_decay=5e-4, donate=donate)

    def run(trainer, steps):
        for step in steps:
            trainer.train_step(*batches[step], seed=100 + step)

    full = A.build(SMALL, weights=weights)
    run(A.make_trainer(full, **settings), range(4))
    first = A.build(SMALL, weights=weights)
    trainer = A.make_trainer(first, **settings)
    run(trainer, range(2))
    resumed = A.build(SMALL, seed=99)
    A.load_weights(resumed, A.export_weights(first))
    again = A.make_trainer(resumed, **settings)
    again.load_optimizer_state(trainer.optimizer_state())
    run(again, range(2, 4))
    assert_same_weights(A.export_weights(resumed), A.export_weights(full))
    assert again.options == {"donate": donate, "precision": "fp32"}


@needs_jax
def test_fp16_skips_a_step_with_non_finite_gradients_and_halves_the_scale(model):
    x, labels = _batch(SMALL_NO_DROPOUT)
    trainer = A.make_trainer(model, lr=0.01, momentum=0.9, precision="fp16")
    state = trainer.optimizer_state()
    assert float(state["loss_scale/scale"]) == LOSS_SCALE_INITIAL
    trainer.train_step(x, labels, seed=0)
    assert int(trainer.optimizer_state()["loss_scale/good_steps"]) == 1
    before = A.export_weights(model)
    x_bad = x.copy()
    x_bad[0, 0, 0, 0] = np.float32(6e4)  # float16 overflows to infinity in the first convolution
    x_bad *= 1e3
    trainer.train_step(x_bad, labels, seed=1)
    after = trainer.optimizer_state()
    assert float(after["loss_scale/scale"]) == LOSS_SCALE_INITIAL / 2 and int(after["loss_scale/good_steps"]) == 0
    assert_same_weights(A.export_weights(model), before)


@needs_jax
def test_eval_step_sums_the_loss(model):
    x, labels = _batch(SMALL_NO_DROPOUT)
    logits = A.forward(model, x).astype(np.float64)
    shifted = logits - logits.max(1, keepdims=True)
    expected = -(shifted - np.log(np.exp(shifted).sum(1, keepdims=True)))[np.arange(BATCH), labels].sum()
    loss, correct = A.make_trainer(model, lr=0.01).eval_step(x, labels)
    assert loss == pytest.approx(expected, rel=1e-5)
    assert correct == int((logits.argmax(1) == labels).sum())


@needs_jax
def test_prepare_matches_common_preprocess(model):
    from common import data

    images = np.random.default_rng(0).integers(0, 256, (BATCH, 28, 28), dtype=np.uint8)
    trainer = A.make_trainer(model, lr=0.01)
    x = trainer.prepare(images)
    assert isinstance(x, jax.Array) and x.dtype == np.float32
    expected = data.preprocess(images, SMALL_NO_DROPOUT.input_size).transpose(0, 2, 3, 1)
    assert x.shape == expected.shape and np.max(np.abs(np.asarray(x) - expected)) < 1e-5
    trainer.eval_step(x, np.zeros(BATCH, np.int64))  # the prepared array feeds the steps as is


@needs_jax
def test_labels_outside_the_classes_are_refused(model):
    x, _ = _batch(SMALL_NO_DROPOUT)
    for labels in (np.array([0, 10]), np.array([-1, 0])):
        # the one rule of every backend, common.backend.checked_labels
        with pytest.raises(ValueError, match=r"labels must be in 0\.\.9, got \[(10|-1)\]"):
            A.loss_and_grads(model, x, labels)


@needs_jax
def test_the_books_jax_code_trains():
    """The baseline of bench --baseline: the book's Flax network with optax SGD, loaded by path."""
    batch, train_step, eval_step = load_plain("jax").make(batch_size=4, input_size=(67, 67), lr=0.01)
    x, y = batch()
    before = eval_step(x, y)
    assert eval_step(x, y) == before  # inference: no dropout, the same number
    losses = [train_step(x, y) for _ in range(2)]
    after = eval_step(x, y)
    assert np.all(np.isfinite([before, *losses, after])) and after != before  # the steps changed the weights
