"""PyTorch-specific behaviour of alexnet_pt (the cross-backend parity suite lives elsewhere).

Small on purpose (2 CPU cores): the book's smallest valid input, 1x67x67, and batch 2.
"""
from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

try:
    import torch
except ImportError as error:  # CI (ALEXNET_REQUIRE_ALL_BACKENDS=1) must not skip a backend
    if os.environ.get("ALEXNET_REQUIRE_ALL_BACKENDS") == "1":
        raise
    pytest.skip(f"PyTorch unavailable: {error}", allow_module_level=True)

import alexnet_pt as backend  # noqa: E402
from common import shapes  # noqa: E402
from common.backend import DeviceError  # noqa: E402
from common.spec import book_alexnet, paper_alexnet  # noqa: E402
from common.weights import WeightsError, init_weights, save_weights  # noqa: E402

HAS_GPU = backend.gpu_available()
SMALL = book_alexnet().with_input(1, 67, 67)
BATCH = 2


def batch(spec=SMALL, seed=0, n=BATCH):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, *spec.input_shape)).astype(np.float32), rng.integers(0, spec.num_classes, n)


@pytest.fixture(scope="module")
def _shared():
    """One model for the module (building is the slow part); dropout off."""
    m = backend.build(SMALL.with_dropout(0.0), seed=0, device="cpu")
    return m, backend.export_weights(m)


@pytest.fixture
def model(_shared):
    """The shared model, its weights reset to ``start`` for every test."""
    m, weights = _shared
    backend.load_weights(m, weights)
    return m


@pytest.fixture
def start(_shared):
    return _shared[1]


def rel_err(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / max(np.linalg.norm(np.asarray(b, np.float64)), 1e-30))


# ------------------------------------------------------------------- contract


def test_contract_names():
    assert (backend.NAME, backend.FRAMEWORK, backend.LAYOUT) == ("pt", "PyTorch", "NCHW")
    for name in ("build", "model_spec", "forward", "param_counts", "load_weights", "export_weights",
                 "loss_and_grads", "layer_summary", "make_trainer", "Trainer", "fit", "save_native",
                 "load_native", "gpu_available"):
        assert name in backend.__all__ and callable(getattr(backend, name)), name


def test_missing_torch_names_the_extra():
    code = "import sys; sys.modules['torch'] = None; import alexnet_pt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "ImportError" in proc.stderr and "PyTorch is not installed" in proc.stderr
    assert "alexnet-three[torch]" in proc.stderr


def test_native_modules_named_after_the_spec(model):
    assert [name for name, _ in model.named_children()] == [layer.name for layer in SMALL.layers]
    assert isinstance(model.conv1, torch.nn.Conv2d) and isinstance(model.fc8, torch.nn.Linear)
    assert model.conv1.padding == SMALL.layer("conv1").padding  # explicit, never 'same'
    assert backend.model_spec(model) == SMALL.with_dropout(0.0)
    assert list(model.state_dict()) == list(init_weights(SMALL))  # canonical names, same order


def test_num_classes_and_default_spec():
    m = backend.build(SMALL, num_classes=3, device="cpu")
    assert backend.model_spec(m).num_classes == 3 and m.fc8.out_features == 3
    assert backend.model_spec(m).input_shape == (1, 67, 67)


# --------------------------------------------------------------------- device


@pytest.mark.skipif(HAS_GPU, reason="a GPU is present, so device='gpu' is valid here")
def test_gpu_request_without_gpu_raises():
    with pytest.raises(DeviceError, match=f"PyTorch cannot compute on a GPU here: "):
        backend.build(SMALL, device="gpu")


def test_unknown_device_raises():
    with pytest.raises(DeviceError, match="device must be one of"):
        backend.build(SMALL, device="tpu")


def test_auto_device_is_cpu_without_gpu(model):
    expected = "cuda" if HAS_GPU else "cpu"
    m = backend.build(SMALL, device="auto")
    assert {p.device.type for p in m.parameters()} == {expected}


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="no CUDA GPU visible to PyTorch")
def test_gpu_build_puts_parameters_on_gpu(model, start):
    # strict float32 on the GPU (the parity default): PyTorch's own default runs convolutions in TF32,
    # which put one logit 2.3e-3 relative off the CPU's on an H200 (failed here at rtol 1e-4)
    backend.set_math_mode("fp32")
    m = backend.build(SMALL.with_dropout(0.0), weights=start, device="gpu")
    assert all(p.is_cuda for p in m.parameters())
    x, y = batch()
    np.testing.assert_allclose(backend.forward(m, x), backend.forward(model, x), rtol=1e-4, atol=1e-5)
    trainer = backend.make_trainer(m, lr=0.01, momentum=0.9)
    assert trainer.prepare(np.zeros((2, 28, 28), np.uint8)).is_cuda
    trainer.train_step(trainer.prepare(np.zeros((2, 28, 28), np.uint8)), y, seed=0)
    assert all(v.shape == start[k[len("momentum/"):]].shape for k, v in trainer.optimizer_state().items())


# -------------------------------------------------------------------- weights


def test_load_export_round_trip_is_bit_exact(model, tmp_path):
    weights = init_weights(SMALL, seed=7)
    backend.load_weights(model, weights)
    out = backend.export_weights(model)
    assert list(out) == list(weights)
    for name, value in weights.items():
        assert out[name].dtype == np.float32 and np.array_equal(out[name], value), name
    path = save_weights(tmp_path / "w.npz", init_weights(SMALL, seed=8))
    backend.load_weights(model, path)
    assert all(np.array_equal(backend.export_weights(model)[k], v) for k, v in init_weights(SMALL, seed=8).items())
    out["conv1.weight"][...] = 0  # an export is a copy, not a view of the parameters
    assert not np.array_equal(backend.export_weights(model)["conv1.weight"], out["conv1.weight"])


def _broken_weights(tmp_path):
    good = init_weights(SMALL, seed=3)
    missing = {k: v for k, v in good.items() if k != "fc8.bias"}
    shape = {**good, "fc8.weight": np.zeros((11, 4096), np.float32)}
    dtype = {**good, "conv2.weight": good["conv2.weight"].astype(np.float64)}
    extra = {**good, "conv9.weight": np.zeros((1,), np.float32)}
    not_npz = tmp_path / "junk.npz"
    not_npz.write_bytes(b"not a zip file")
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, conv1=np.array([object()], dtype=object))
    return [missing, shape, dtype, extra, not_npz, pickled, tmp_path / "absent.npz"]


def test_bad_weights_change_nothing(model, start, tmp_path):
    for bad in _broken_weights(tmp_path):
        with pytest.raises(WeightsError):
            backend.load_weights(model, bad)
        after = backend.export_weights(model)
        assert all(np.array_equal(after[k], v) for k, v in start.items())


def test_build_with_bad_weights_raises(tmp_path):
    with pytest.raises(WeightsError, match="fc8.weight"):
        backend.build(SMALL, weights={**init_weights(SMALL), "fc8.weight": np.zeros((3, 4096), np.float32)})


def test_native_checkpoint_round_trip(model, start, tmp_path):
    path = backend.save_native(model, tmp_path / "model.pt")
    other = backend.build(SMALL.with_dropout(0.0), seed=99, device="cpu")
    backend.load_native(other, path)
    assert all(np.array_equal(backend.export_weights(other)[k], v) for k, v in start.items())
    assert not list(tmp_path.glob(".*tmp"))


def test_native_checkpoint_mismatch_is_refused(model, start, tmp_path):
    path = backend.save_native(backend.build(SMALL, num_classes=5, device="cpu"), tmp_path / "five.pt")
    with pytest.raises(WeightsError, match=r"five\.pt.*\n.*fc8\.weight: shape \(5, 4096\), expected \(10, 4096\)"):
        backend.load_native(model, path)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(WeightsError, match="garbage.pt"):
        backend.load_native(model, garbage)
    assert all(np.array_equal(backend.export_weights(model)[k], v) for k, v in start.items())


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_native_checkpoint_never_unpickles_code(model, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"conv1.weight": _Exploit(str(marker))}, path)
    with pytest.raises(WeightsError, match="evil.pt"):
        backend.load_native(model, path)
    assert not marker.exists()


# -------------------------------------------------------------------- forward


def test_forward_and_capture_agree(model):
    x, _ = batch()
    logits = backend.forward(model, x)
    captured, acts = backend.forward(model, x, capture=True)
    assert np.array_equal(logits, captured)
    assert list(acts) == [layer.name for layer in SMALL.layers]
    assert np.array_equal(acts["fc8"], logits)
    assert acts["flatten"].ndim == 2 and acts["fc6"].ndim == 2 and acts["pool5"].ndim == 4
    assert not model.training


def test_forward_rejects_wrong_input(model):
    with pytest.raises(ValueError, match=r"with_input"):
        backend.forward(model, np.zeros((2, 1, 96, 96), np.float32))


def test_training_forward_uses_dropout():
    m = backend.build(SMALL, seed=0, device="cpu")  # dropout 0.5
    x, _ = batch()
    assert np.array_equal(backend.forward(m, x), backend.forward(m, x))
    assert not np.array_equal(backend.forward(m, x, training=True), backend.forward(m, x))


def test_paper_variant_shapes_and_params():
    spec = paper_alexnet().with_input(3, 67, 67)
    m = backend.build(spec, device="cpu")
    assert m.conv2.groups == 2 and isinstance(m.norm1, torch.nn.LocalResponseNorm)
    assert m.norm1.alpha == spec.layer("norm1").alpha  # same convention, no conversion
    rows = backend.layer_summary(m, (BATCH, 3, 67, 67), print_table=False)
    expected = shapes.infer(spec, batch=BATCH, layout="NCHW")
    assert [(r.name, r.shape, r.params) for r in rows] == [(e.name, e.shape, e.params) for e in expected]
    assert backend.param_counts(m) == {e.name: e.params for e in expected}


def test_lrn_matches_the_spec_formula():
    spec = paper_alexnet().with_input(3, 67, 67)
    m = backend.build(spec, device="cpu")
    x = np.random.default_rng(1).normal(size=(1, 8, 4, 4)).astype(np.float64)
    lrn = spec.layer("norm1")
    padded = np.pad(x**2, ((0, 0), (lrn.size // 2,) * 2, (0, 0), (0, 0)))
    window = sum(padded[:, i:i + x.shape[1]] for i in range(lrn.size))
    expected = x / (lrn.k + lrn.alpha / lrn.size * window) ** lrn.beta
    got = m.norm1(torch.from_numpy(x.astype(np.float32))).numpy()
    assert rel_err(got, expected) < 1e-6


# ------------------------------------------------------------------- training


def test_one_sgd_step_moves_weights_by_lr_times_grad(model, start):
    lr = 0.01
    x, y = batch(seed=1)
    loss, grads = backend.loss_and_grads(model, x, y)
    trainer = backend.make_trainer(model, lr=lr)
    step_loss, correct = trainer.train_step(torch.from_numpy(x), y, seed=0)
    assert step_loss == pytest.approx(loss, rel=1e-6) and 0 <= correct <= BATCH
    after = backend.export_weights(model)
    for name, w0 in start.items():
        # w0 - lr*g rounded to float32, as the stored weights are: against the float64 value,
        # float32 rounding of w (|w| ~ 1e-2) alone is ~1e-5..1e-4 of a typical update lr*g here.
        step = np.float32(lr) * grads[name]
        expected = w0 - step
        moved_wrong = np.linalg.norm(after[name].astype(np.float64) - expected)
        assert moved_wrong <= 1e-5 * np.linalg.norm(step.astype(np.float64)), name
    assert trainer.optimizer_state() == {}


def _conv_layouts(model) -> set[str]:
    """The memory format of every conv weight with more than one input channel (with one, the
    two formats have the same strides)."""
    return {"channels_last" if p.is_contiguous(memory_format=torch.channels_last) else "nchw"
            for p in model.parameters() if p.ndim == 4 and p.shape[1] > 1}


def test_cpu_models_are_channels_last_where_the_cpu_has_avx512_and_compute_what_nchw_computes():
    from common.machine import cpu_flags

    fast = backend.build(SMALL.with_dropout(0.0), seed=3, device="cpu")
    default = "avx512f" in cpu_flags()  # oneDNN's native layout where it won (AVX-512); NCHW on AVX2-only CPUs
    assert _conv_layouts(fast) == ({"channels_last"} if default else {"nchw"})
    assert backend.make_trainer(fast, lr=0.01).options["channels_last"] is default
    assert backend.make_trainer(fast, lr=0.01, channels_last=True).options["channels_last"] is True
    assert _conv_layouts(fast) == {"channels_last"}
    plain = backend.build(SMALL.with_dropout(0.0), seed=3, device="cpu")
    assert backend.make_trainer(plain, lr=0.01, channels_last=False).options["channels_last"] is False
    assert _conv_layouts(plain) == {"nchw"}  # switched off: the trainer converted the model in place
    x, y = batch(seed=4)  # the same float32 sums in another order: ~1e-6 apart (parity allows 1e-4)
    assert rel_err(backend.forward(fast, x), backend.forward(plain, x).astype(np.float64)) < 1e-5
    _, fast_grads = backend.loss_and_grads(fast, x, y)
    _, plain_grads = backend.loss_and_grads(plain, x, y)
    for name, grad in plain_grads.items():
        assert fast_grads[name].flags.c_contiguous and rel_err(fast_grads[name], grad) < 1e-5, name


@pytest.mark.parametrize("precision, tf32, override, expected", [
    ("fp32", False, None, False),  # strict float32: no tensor cores, NCHW (not measured channels-last)
    ("fp32", True, None, True),  # TF32 convolutions (--math tf32, PyTorch's own default): +5.5% on an H200
    ("fp32", True, "0", False),  # --math fp32's variable refuses TF32 in cuDNN whatever the flag says
    ("bf16", False, None, True), ("fp16", False, "0", True),  # tensor cores whatever the float32 math: +9% bf16
])
def test_gpu_models_are_channels_last_where_the_convolutions_run_on_tensor_cores(monkeypatch, precision, tf32,
                                                                                  override, expected):
    from alexnet_pt._model import prefers_channels_last

    if override is None:
        monkeypatch.delenv("NVIDIA_TF32_OVERRIDE", raising=False)
    else:
        monkeypatch.setenv("NVIDIA_TF32_OVERRIDE", override)
    before = torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = tf32  # what set_math_mode sets; a plain flag, settable without a GPU
        assert prefers_channels_last(torch.device("cuda"), precision) is expected
    finally:
        torch.backends.cudnn.allow_tf32 = before


@pytest.mark.parametrize("spec", [SMALL, paper_alexnet(num_classes=10).with_input(3, 99, 99)], ids=["book", "paper"])
def test_the_first_convolution_as_a_matrix_product_computes_what_the_convolution_computes(spec):
    """stem_matmul (unfold + one matrix product, for tensor cores): the same logits, loss and every
    gradient as cuDNN's/oneDNN's convolution up to float32 rounding, channels-last output, and
    training steps in every precision; off, the module is nn.Conv2d's own forward."""
    from alexnet_pt._model import conv2d_as_matmul, stem

    spec = spec.with_dropout(0.0)
    plain, product = (backend.build(spec, seed=5, device="cpu") for _ in range(2))
    trainer = backend.make_trainer(product, lr=0.01, stem_matmul=True)
    assert trainer.options["stem_matmul"] is True and stem(product).as_matmul and not stem(plain).as_matmul
    x, y = batch(spec, seed=6, n=3)
    assert rel_err(backend.forward(product, x), backend.forward(plain, x).astype(np.float64)) < 1e-5
    plain_loss, plain_grads = backend.loss_and_grads(plain, x, y)
    product_loss, product_grads = backend.loss_and_grads(product, x, y)
    assert abs(product_loss - plain_loss) <= 1e-5 * abs(plain_loss)
    for name, grad in plain_grads.items():
        assert rel_err(product_grads[name], grad) < 1e-5, name
    conv = stem(plain)
    inputs = torch.from_numpy(x)
    out = conv2d_as_matmul(inputs, conv.weight, conv.bias, conv.stride, conv.padding)
    assert out.shape == conv(inputs).shape and out.is_contiguous(memory_format=torch.channels_last)
    for precision in ("bf16", "fp16"):  # autocast: the product in low precision, float32 master weights
        model = backend.build(spec, seed=5, device="cpu")
        low = backend.make_trainer(model, lr=0.01, precision=precision, stem_matmul=True)
        loss, _ = low.train_step(low.prepare(np.full((2, 28, 28), 128, np.uint8)), y[:2], seed=0)
        assert np.isfinite(loss) and stem(model).weight.dtype == torch.float32
    assert not backend.make_trainer(product, lr=0.01).options["stem_matmul"]  # the default: off
    assert not stem(product).as_matmul


PAGE_FAULTS_OF_REUSE = """
import resource
import torch
import alexnet_pt  # noqa: F401  asks malloc to keep freed memory (common.machine.keep_freed_memory)

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

rounds = []
for _ in range(4):  # like training steps: the first one or two grow the heap, the later ones reuse it
    before = faults()
    for value in (1.0, 2.0):  # 64 MiB, above glibc's largest mmap threshold (32 MiB), freed and asked again
        x = torch.empty(16 * 2**20).fill_(value)
        del x
    rounds.append(faults() - before)
print(*rounds)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc's settings are glibc's")
def test_cpu_tensors_reuse_freed_memory_instead_of_page_faulting_through_fresh_blocks():
    """A freed 64 MiB tensor's memory serves the next one: no page faults once the heap has grown
    (16,384 pages of 4 KiB for every such tensor without it: what made ReLU's backward and
    max-pool's zero fill crawl on CPU, docs/benchmarks.md)."""
    def faults(**env):
        result = subprocess.run([sys.executable, "-c", PAGE_FAULTS_OF_REUSE], capture_output=True, text=True,
                                cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **env}, timeout=300)
        assert result.returncode == 0, result.stderr
        return [int(n) for n in result.stdout.split()]

    # the setting is in every bench record (runtime_info), so an A/B of it can be told apart
    assert backend.runtime_info("cpu")["keeps_freed_memory"] is (os.environ.get("ALEXNET_KEEP_FREED_MEMORY") != "0")
    pages = 2 * 64 * 2**20 // resource.getpagesize()  # two fresh 64 MiB blocks a round, every page touched
    kept = faults()
    assert max(kept[2:]) < 0.01 * pages, kept  # measured here: 0 from the second or third round on
    assert min(faults(ALEXNET_KEEP_FREED_MEMORY="0")) > 0.9 * pages  # the switch: glibc's own behaviour


def test_momentum_and_weight_decay_follow_pytorch_sgd(model, start):
    """PyTorch's rule re-implemented in numpy (float32 like the model), over two steps."""
    lr, momentum, wd = np.float32(0.01), np.float32(0.9), np.float32(0.01)
    trainer = backend.make_trainer(model, lr=float(lr), momentum=float(momentum), weight_decay=float(wd))
    assert all(not v.any() for v in trainer.optimizer_state().values())  # zeros before the first step
    w = dict(start)
    buf: dict[str, np.ndarray] = {}
    for step in range(2):
        x, y = batch(seed=10 + step)
        _, grads = backend.loss_and_grads(model, x, y)
        for name in w:
            g = grads[name] + wd * w[name]  # coupled L2, biases included
            buf[name] = g if step == 0 else momentum * buf[name] + g  # buf = g on the first step
            w[name] = w[name] - lr * buf[name]
        trainer.train_step(x, y, seed=step)
    after, state = backend.export_weights(model), trainer.optimizer_state()
    assert set(state) == {f"momentum/{k}" for k in start}
    for name, w0 in start.items():
        moved, expected = after[name].astype(np.float64) - w0, w[name].astype(np.float64) - w0
        assert np.linalg.norm(moved - expected) <= 1e-5 * np.linalg.norm(expected), name
        assert rel_err(state[f"momentum/{name}"], buf[name]) < 1e-5, name


def test_optimizer_state_round_trip_resumes_exactly(model, start):
    x, y = batch(seed=4)
    first = backend.make_trainer(model, lr=0.01, momentum=0.9, weight_decay=5e-4)
    first.train_step(x, y, seed=0)
    mid_weights, mid_state = backend.export_weights(model), first.optimizer_state()
    first.train_step(x, y, seed=1)
    uninterrupted = backend.export_weights(model)

    backend.load_weights(model, mid_weights)
    resumed = backend.make_trainer(model, lr=0.01, momentum=0.9, weight_decay=5e-4)
    with pytest.raises(ValueError, match="momentum/conv1.weight"):
        resumed.load_optimizer_state({k: v for k, v in mid_state.items() if k != "momentum/conv1.weight"})
    resumed.load_optimizer_state(mid_state)
    resumed.train_step(x, y, seed=1)
    assert all(np.array_equal(backend.export_weights(model)[k], v) for k, v in uninterrupted.items())
    with pytest.raises(ValueError, match="no momentum"):
        backend.make_trainer(model, lr=0.01).load_optimizer_state(mid_state)


def test_train_step_dropout_depends_only_on_seed():
    spec = SMALL  # dropout 0.5 on
    x, y = batch(seed=2)
    results = []
    for seed in (5, 5, 6):
        m = backend.build(spec, seed=0, device="cpu")
        rng_before = torch.get_rng_state()
        torch.rand(3)  # whatever the caller did with the global RNG must not matter
        loss, correct = backend.make_trainer(m, lr=0.01).train_step(x, y, seed=seed)
        results.append((loss, correct, backend.export_weights(m)))
        assert not torch.equal(torch.get_rng_state(), rng_before)  # the caller's stream moved on ...
    (l1, c1, w1), (l2, c2, w2), (l3, _, w3) = results
    assert (l1, c1) == (l2, c2) and all(np.array_equal(w1[k], w2[k]) for k in w1)
    assert l1 != l3 and not np.array_equal(w1["fc7.weight"], w3["fc7.weight"])


def test_train_step_restores_callers_rng(model):
    x, y = batch()
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    backend.make_trainer(model, lr=0.01).train_step(x, y, seed=9)
    assert torch.equal(torch.rand(4), expected)


def test_eval_step_sums_loss(model):
    x, y = batch(seed=3)
    trainer = backend.make_trainer(model, lr=0.01)
    total, correct = trainer.eval_step(x, y)
    mean_loss, _ = backend.loss_and_grads(model, x, y)  # dropout is off: same logits
    assert total == pytest.approx(BATCH * mean_loss, rel=1e-5)
    logits = backend.forward(model, x)
    assert correct == int((logits.argmax(1) == y).sum())


def test_prepare_matches_common_preprocess(model):
    from common import data

    images = np.random.default_rng(0).integers(0, 256, size=(BATCH, 28, 28), dtype=np.uint8)
    trainer = backend.make_trainer(model, lr=0.01)
    got = trainer.prepare(images)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32 and got.device == next(model.parameters()).device
    expected = data.preprocess(images, SMALL.input_size)
    assert tuple(got.shape) == expected.shape == (BATCH, 1, 67, 67)
    assert float(np.abs(got.cpu().numpy() - expected).max()) < 1e-5
    assert len(trainer._resize) == 1 and trainer.prepare(images).shape == got.shape  # cached matrices reused
    with pytest.raises(ValueError, match="uint8"):
        trainer.prepare(images.astype(np.float32))


def test_lr_follows_the_one_rule_between_steps(model, start):
    """``Trainer.lr`` takes what ``make_trainer`` and ``fit`` take (common.backend.checked_lr) and keeps
    its value when refused (tests/test_train.py checks that a new lr moves the weights as SGD does)."""
    trainer = backend.make_trainer(model, lr=0.01, momentum=0.9)
    assert trainer.lr == pytest.approx(0.01)
    trainer.lr = 0.5
    assert trainer.lr == 0.5
    for bad in (0.0, -1.0, float("inf"), True):
        with pytest.raises(ValueError, match="^lr must be a positive number, got "):
            trainer.lr = bad
    assert trainer.lr == 0.5


def _train_steps(trainer, steps):
    """Each (images, labels, seed) step through ``trainer``: the losses it returned."""
    return [trainer.train_step(trainer.prepare(images), labels, seed=seed)[0] for images, labels, seed in steps]


def _steps(spec, sizes, seed=11):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, spec.num_classes, n), 100 + i)
            for i, n in enumerate(sizes)]


def test_fused_sgd_takes_the_step_of_the_default_update():
    """fused_sgd: torch's one-kernel SGD, the same rule (momentum and coupled weight decay) up to float32 rounding."""
    spec = SMALL.with_dropout(0.0)
    plain, fused = (backend.build(spec, seed=4, device="cpu") for _ in range(2))
    settings = dict(lr=0.02, momentum=0.9, weight_decay=5e-4)
    steps = _steps(spec, (4, 4, 3))
    a = _train_steps(backend.make_trainer(plain, **settings), steps)
    fused_trainer = backend.make_trainer(fused, **settings, fused_sgd=True)
    assert fused_trainer.options["fused_sgd"] is True and fused_trainer.optimizer.defaults["fused"] is True
    b = _train_steps(fused_trainer, steps)
    assert np.allclose(a, b, rtol=1e-5)
    for name, value in backend.export_weights(plain).items():
        assert rel_err(backend.export_weights(fused)[name], value) < 1e-5, name


@pytest.mark.parametrize("settings, message", [
    (dict(), r"^cuda_graphs captures the step's CUDA kernels \(torch.cuda.CUDAGraph\): it needs a model on a CUDA "
             r"GPU, and this one is on the CPU$"),
])
def test_cuda_graphs_are_refused_in_one_line_on_a_cpu(model, settings, message):
    with pytest.raises(ValueError, match=message):
        backend.make_trainer(model, lr=0.01, cuda_graphs=True, **settings)
    assert backend.make_trainer(model, lr=0.01).options["cuda_graphs"] is False  # the default: off


def test_cuda_graphs_conditions_are_each_one_line():
    from alexnet_pt._trainer import _check_graphable

    gpu = torch.device("cuda", 0)
    for args, message in (((gpu, True, 1, "fp32"), "cuda_graphs and compile exclude each other"),
                          ((gpu, False, 2, "fp32"), "not used with replicas"),
                          ((gpu, False, 1, "fp16"), "not used with fp16: the dynamic loss scale")):
        with pytest.raises(ValueError, match=message):
            _check_graphable(*args)
    _check_graphable(gpu, False, 1, "bf16")  # bf16 needs no loss scale: graphed


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="no CUDA GPU visible to PyTorch")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_graphs_take_the_eager_steps_on_a_gpu(precision):
    """Warm-up, capture and replay, an epoch's smaller last batch with its own graph, dropout on and a
    new lr half way: the same losses and weights as the eager steps, within float32 rounding."""
    from alexnet_pt._trainer import GRAPH_WARMUPS

    backend.set_math_mode("fp32")
    sizes = (4,) * (GRAPH_WARMUPS + 3) + (3,) * (GRAPH_WARMUPS + 2)
    steps = _steps(SMALL, sizes)
    models = [backend.build(SMALL, seed=8, device="gpu") for _ in range(2)]
    trainers = [backend.make_trainer(m, lr=0.02, momentum=0.9, weight_decay=5e-4, precision=precision,
                                     cuda_graphs=graphs) for m, graphs in zip(models, (False, True))]
    half = len(steps) // 2
    losses = [_train_steps(t, steps[:half]) for t in trainers]
    for t in trainers:
        t.lr = 0.01
    losses = [before + _train_steps(t, steps[half:]) for before, t in zip(losses, trainers)]
    tolerance = 1e-4 if precision == "fp32" else 2e-2
    assert np.allclose(losses[0], losses[1], rtol=tolerance), (losses[0], losses[1])
    # after the new lr (which drops the graphs): the smaller batch warmed up, was captured and replayed
    assert trainers[1]._graphs[(3, *SMALL.input_shape)].graph is not None
    eager, graphed = (backend.export_weights(m) for m in models)
    for name, value in eager.items():
        assert rel_err(graphed[name], value) < tolerance, name
