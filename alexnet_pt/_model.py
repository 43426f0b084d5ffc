"""The native PyTorch model: a builder that walks ``spec.layers``, plus weights in and out.

Nothing here restates a layer size, padding or channel count: every number comes from the
spec or from ``common.shapes``. Parameter names are the canonical ones (``conv1.weight``
...), and the layouts are PyTorch's, which are the canonical layouts, so moving weights
in and out is a plain copy.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common import spec as S
from common.backend import ARTIFACT_INPUT, ARTIFACT_OUTPUT, TF32_OVERRIDE, check_finite_input, checked_labels
from common.errors import first_line
from common.io import atomic_path, atomic_paths
from common.machine import has_avx512
from common.shapes import conv_in_channels, dense_in_features
from common.weights import DTYPE, WeightsError, build_recipe, check_arrays, resolve_weights

from ._framework import torch_device


class AlexNet(nn.Sequential):
    """``nn.Sequential`` of native modules named after the spec's layers (conv1 ... fc8).

    ``model.spec`` is the :class:`common.spec.ModelSpec` it was built from.
    """

    def __init__(self, spec: S.ModelSpec, modules: "OrderedDict[str, nn.Module]"):
        super().__init__(modules)
        self.spec = spec

    def extra_repr(self) -> str:
        return f"spec={self.spec.name!r}, input={'x'.join(map(str, self.spec.input_shape))}"


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters, same state_dict) that can also run as unfold + one matrix
    product: ``as_matmul`` (the trainer's ``stem_matmul`` speed-up sets it on the first convolution).

    Why: the first convolution has one input channel, and cuDNN has no tensor-core kernel for it
    (the profile in docs/notes.md); as a matrix product of the image patches with the weights,
    forward and weight gradient are two GEMMs on tensor cores. The same sums in another order
    (float32: ~1e-6 relative). Groups and dilation other than 1 keep the convolution."""

    as_matmul = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.as_matmul and self.groups == 1 and self.dilation == (1, 1) and self.padding_mode == "zeros"):
            return super().forward(x)
        return conv2d_as_matmul(x, self.weight, self.bias, self.stride, self.padding)


def conv2d_as_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride, padding)`` as unfold + one matrix product; the output is
    NCHW-shaped with channels-last strides (the product's natural layout, pixel-major)."""
    n, _, height, width = x.shape
    out_channels, _, kh, kw = weight.shape
    out_h = (height + 2 * padding[0] - kh) // stride[0] + 1
    out_w = (width + 2 * padding[1] - kw) // stride[1] + 1
    if torch.is_autocast_enabled(x.device.type):  # unfold in the product's precision: half the bytes
        x = x.to(torch.get_autocast_dtype(x.device.type))
    patches = F.unfold(x, (kh, kw), padding=padding, stride=stride)  # (N, C*kh*kw, out_h*out_w)
    rows = patches.transpose(1, 2).reshape(n * out_h * out_w, -1)  # one row per output pixel
    flat = weight.reshape(out_channels, -1).t()
    out = torch.addmm(bias, rows, flat) if bias is not None else rows @ flat  # autocast casts all three
    return out.view(n, out_h, out_w, out_channels).permute(0, 3, 1, 2)


def stem(model: "AlexNet") -> Conv2d:
    """The first convolution: the one with the spec's input channels."""
    return next(m for m in model.children() if isinstance(m, nn.Conv2d))


def parameter_devices(model) -> set[str]:
    """Where the parameters really are: {'cpu'}, {'gpu'}, or both if something went wrong."""
    return {"gpu" if p.is_cuda else "cpu" for p in model.parameters()}


def prefers_channels_last(device: torch.device, precision: str = "fp32") -> bool:
    """Whether a model on ``device`` computing in ``precision`` is fastest channels-last (NHWC).

    On a CPU with AVX-512, where oneDNN runs native NHWC convolutions instead of reordering around
    each call (an AVX2-only CPU gained nothing: NCHW there); on a GPU whenever the convolutions run
    on tensor cores, whose cuDNN kernels are NHWC (bf16/fp16, or float32 in TF32 math); strict
    float32 on a GPU stays NCHW. The figures are in docs/notes.md. The same sums in another order
    (~1e-6 relative). ``build`` and the trainer's default both ask this, so ``forward``,
    ``loss_and_grads`` and ``train_step`` run the same kernels.
    """
    if device.type == "cpu":
        return has_avx512()
    # NVIDIA_TF32_OVERRIDE=0 (--math fp32's variable, set before the import) refuses TF32 in cuDNN
    # whatever PyTorch's flag says: a model built before set_math_mode("fp32") runs is strict float32 too
    tf32 = bool(torch.backends.cudnn.allow_tf32) and os.environ.get(TF32_OVERRIDE) != "0"
    return precision != "fp32" or tf32


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def _native_layer(layer, in_channels: dict[str, int], in_features: dict[str, int], device) -> nn.Module:
    """One spec layer as a PyTorch module (parameters unallocated on ``device='meta'``)."""
    if isinstance(layer, S.Conv2d):
        return Conv2d(in_channels[layer.name], layer.out_channels, layer.kernel_size, stride=layer.stride,
                      padding=layer.padding, groups=layer.groups, bias=True, padding_mode="zeros", device=device)
    if isinstance(layer, S.MaxPool2d):
        return nn.MaxPool2d(layer.kernel_size, stride=layer.stride, padding=0, ceil_mode=False)
    if isinstance(layer, S.ReLU):
        return nn.ReLU()
    if isinstance(layer, S.LocalResponseNorm):
        # PyTorch's alpha is divided by size, the spec's convention: no conversion.
        return nn.LocalResponseNorm(layer.size, alpha=layer.alpha, beta=layer.beta, k=layer.k)
    if isinstance(layer, S.AdaptiveAvgPool2d):
        return nn.AdaptiveAvgPool2d(layer.output_size)
    if isinstance(layer, S.Flatten):
        return nn.Flatten(start_dim=1)  # (C, H, W) order: the canonical one
    if isinstance(layer, S.Dense):
        return nn.Linear(in_features[layer.name], layer.out_features, bias=True, device=device)
    if isinstance(layer, S.Dropout):
        return nn.Dropout(layer.rate)
    raise TypeError(f"alexnet_pt has no builder for layer kind {type(layer).__name__} ({layer!r})")


def build(spec: S.ModelSpec | None = None, *, num_classes: int | None = None, weights: Any = None,
          seed: int = 0, device: str = "auto") -> AlexNet:
    """A native ``nn.Module`` for ``spec`` (default: the book's AlexNet) on ``device``.

    Parameters are set to ``weights`` (canonical mapping or .npz path) or to
    ``common.weights.init_weights(spec, seed)``, so every backend starts from the same numbers.
    """
    # Checked before any tensor is allocated: a wrong file fails fast and cheaply.
    spec, canonical = build_recipe(spec, num_classes=num_classes, weights=weights, seed=seed)
    target = torch_device(device)
    in_channels, in_features = conv_in_channels(spec), dense_in_features(spec)
    modules = OrderedDict((layer.name, _native_layer(layer, in_channels, in_features, "meta")) for layer in spec.layers)
    # Built on the meta device and materialised uninitialised: PyTorch's own random init
    # would be overwritten anyway, and skipping it leaves the global RNG untouched.
    model = AlexNet(spec, modules).to_empty(device=target)
    model.to(memory_format=memory_format(prefers_channels_last(target)))  # values unchanged: layout only
    _copy_in(model, canonical)
    model.eval()
    return model


def model_spec(model: AlexNet) -> S.ModelSpec:
    spec = getattr(model, "spec", None)
    if not isinstance(spec, S.ModelSpec):
        raise TypeError(f"not a model built by alexnet_pt.build: {type(model).__name__}")
    return spec


def model_device(model: AlexNet) -> torch.device:
    return next(model.parameters()).device


def param_counts(model: AlexNet) -> dict[str, int]:
    """Parameters per spec layer, counted from the native modules' own tensors."""
    spec = model_spec(model)
    children = dict(model.named_children())
    return {layer.name: sum(p.numel() for p in children[layer.name].parameters()) for layer in spec.layers}


def _parameters(model: AlexNet) -> dict[str, nn.Parameter]:
    return dict(model.named_parameters())


def _copy_in(model: AlexNet, canonical: dict[str, np.ndarray]) -> None:
    params = _parameters(model)
    if set(params) != set(canonical):  # pragma: no cover - build and check_weights share expected_shapes
        raise WeightsError(f"model parameters {sorted(params)} do not match weights {sorted(canonical)}")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(torch.from_numpy(np.ascontiguousarray(canonical[name])))


def load_weights(model: AlexNet, weights: Any) -> None:
    """Set every parameter from canonical weights (mapping or .npz path), checked first."""
    _copy_in(model, resolve_weights(model_spec(model), weights))


def export_weights(model: AlexNet) -> dict[str, np.ndarray]:
    """Canonical name -> float32 numpy copy (PyTorch's layout is the canonical one)."""
    return {name: _numpy(p).astype(DTYPE, copy=True) for name, p in _parameters(model).items()}


def as_input(model: AlexNet, x: Any) -> torch.Tensor:
    """``x`` (numpy or tensor, NCHW) as a float32 tensor on the model's device, shape checked."""
    spec = model_spec(model)
    tensor = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x, dtype=DTYPE))
    if tensor.ndim != 4 or tuple(tensor.shape[1:]) != spec.input_shape:
        raise ValueError(
            f"this model takes NCHW input (N, {', '.join(map(str, spec.input_shape))}), got {tuple(tensor.shape)}; "
            f"build it with spec.with_input(C, H, W) for another size"
        )
    return tensor.to(device=model_device(model), dtype=torch.float32, non_blocking=True)


def as_labels(model: AlexNet, labels: Any) -> torch.Tensor:
    tensor = labels if isinstance(labels, torch.Tensor) else torch.from_numpy(np.asarray(labels).astype(np.int64))
    return tensor.to(device=model_device(model), dtype=torch.int64, non_blocking=True).reshape(-1)


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    """A C-ordered numpy view (or copy) of ``tensor``, whatever its memory format: callers index
    and serialise the canonical NCHW layout, not channels-last strides."""
    return tensor.detach().cpu().contiguous().numpy()


def forward(model: AlexNet, x: Any, *, training: bool = False, capture: bool = False):
    """Logits (numpy); with ``capture``, also every spec layer's output (NCHW, or 2-D once flat)."""
    inputs = as_input(model, x)
    check_finite_input(_numpy(inputs))
    was_training = model.training
    model.train(training)
    try:
        with torch.no_grad():
            if not capture:
                return _numpy(model(inputs))
            activations: dict[str, np.ndarray] = {}
            out = inputs
            for name, module in model.named_children():
                out = module(out)
                activations[name] = _numpy(out)
            return activations[model_spec(model).layers[-1].name].copy(), activations
    finally:
        model.train(was_training)


def loss_and_grads(model: AlexNet, x: Any, labels: Any) -> tuple[float, dict[str, np.ndarray]]:
    """Mean softmax cross-entropy and d loss / d parameter (canonical names), in training mode."""
    inputs = as_input(model, x)
    check_finite_input(_numpy(inputs))
    labels = _numpy(labels) if isinstance(labels, torch.Tensor) else labels
    targets = as_labels(model, checked_labels(labels, model_spec(model).num_classes, len(inputs)))
    params = _parameters(model)
    was_training = model.training
    model.train(True)
    try:
        loss = F.cross_entropy(model(inputs), targets)
        grads = torch.autograd.grad(loss, list(params.values()))
    finally:
        model.train(was_training)
    return float(loss.item()), {name: _numpy(g).astype(DTYPE, copy=False) for name, g in zip(params, grads)}


def save_native(model: AlexNet, path: str | os.PathLike) -> Path:
    """PyTorch's own checkpoint: the state_dict via ``torch.save``, written atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp)
    return path


def read_container(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a PyTorch state_dict file by key (``weights_only=True``: no pickled code runs),
    for ``load_native`` and the torchvision zoo (``common.zoo``). A file that is none is one
    ``WeightsError`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle.UnpicklingError, RuntimeError (not a zip), EOFError, ...
        raise WeightsError(f"{path}: not a loadable PyTorch state_dict ({type(error).__name__}: "
                           f"{first_line(error)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: expected a state_dict (a dict of tensors), got {type(state).__name__}")
    return dict(state)


def write_container(path: str | os.PathLike, arrays) -> Path:
    """Named numpy ``arrays`` as a PyTorch state_dict file (``torch.save``), written atomically."""
    path = Path(path)
    state = OrderedDict((key, torch.from_numpy(np.array(value))) for key, value in arrays.items())
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def load_native(model: AlexNet, path: str | os.PathLike) -> None:
    """Load a ``save_native`` checkpoint (``read_container``: no pickled code runs).

    Every name and shape is checked before the model is touched; a mismatch raises
    ``WeightsError`` naming the file and each problem.
    """
    state = read_container(path)
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    check_arrays(model_spec(model), expected, state, source=str(path))
    model.load_state_dict(state, strict=True)


# The largest batch the exported programs promise to take (torch.export needs a bound; any will do).
EXPORT_MAX_BATCH = 65536


def export_artifacts(model: AlexNet, folder: str | os.PathLike) -> list[Path]:
    """The deployable artifacts, each for any batch size, on the CPU, in inference mode (dropout off):

    * ``folder/alexnet.pt2``: a ``torch.export`` program; ``torch.export.load(path).module()(x)``.
    * ``folder/alexnet.onnx``: ONNX through ``torch.onnx.export`` (the dynamo exporter; it needs
      onnxscript, in the ``onnx`` extra); ``onnxruntime.InferenceSession(path)``.

    Input ``input`` float32 NCHW (batch, C, H, W) at the spec's size; output ``logits``.
    """
    try:  # checked first, so that a missing exporter leaves no half of the artifacts behind
        import onnxscript  # noqa: F401  (what torch.onnx's exporter runs on)
    except ImportError as error:
        raise ImportError(f"exporting ONNX from PyTorch needs onnxscript ({error}); "
                          f"install it with: pip install 'alexnet-three[onnx]'") from error
    folder = Path(folder)
    spec = model_spec(model)
    cpu = build(spec, weights=export_weights(model), device="cpu").to(memory_format=torch.contiguous_format)
    example = (torch.zeros(2, *spec.input_shape),)  # batch 2: torch.export specialises a dimension seen as 1
    batch = {0: torch.export.Dim("batch", min=1, max=EXPORT_MAX_BATCH)}
    program = torch.export.export(cpu.eval(), example, dynamic_shapes=(batch,))
    pt2, onnx_path = folder / "alexnet.pt2", folder / "alexnet.onnx"
    with atomic_paths(pt2, onnx_path) as (pt2_tmp, onnx_tmp):  # both files appear, or neither
        torch.export.save(program, pt2_tmp)
        onnx_program = torch.onnx.export(cpu, example, dynamo=True, dynamic_shapes=(batch,), verbose=False,
                                         input_names=[ARTIFACT_INPUT], output_names=[ARTIFACT_OUTPUT])
        onnx_program.save(onnx_tmp, external_data=False)
    return [pt2, onnx_path]
