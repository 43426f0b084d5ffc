"""Shape inference and accounting for any spec and input size, in NCHW or NHWC.

Per layer: the output shape (batch included, in the requested layout), parameter count,
multiply-accumulates (MACs) for the whole batch, and the bytes its output occupies.
This module is the expected value the backends' shape-parity tests compare against.
"""
from __future__ import annotations

from dataclasses import dataclass

from .spec import (
    AdaptiveAvgPool2d,
    Conv2d,
    Dense,
    Dropout,
    Flatten,
    Layer,
    LocalResponseNorm,
    MaxPool2d,
    ModelSpec,
    ReLU,
)

LAYOUTS = ("NCHW", "NHWC")
_SEARCH_LIMIT = 4096  # no sensible AlexNet-like spec needs a larger minimum input


class InputTooSmallError(ValueError):
    """The input collapses to nothing inside the network."""


@dataclass(frozen=True)
class LayerInfo:
    name: str
    kind: str
    shape: tuple[int, ...]  # output, batch first, in the requested layout
    params: int
    macs: int  # whole batch
    activation_bytes: int  # output of this layer, whole batch


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def to_layout(shape_nchw: tuple[int, ...], layout: str) -> tuple[int, ...]:
    """An NCHW shape (4-D) as it reads in ``layout``; 2-D shapes are the same in both."""
    if len(shape_nchw) == 4 and check_layout(layout) == "NHWC":
        n, c, h, w = shape_nchw
        return (n, h, w, c)
    return tuple(shape_nchw)


def _window_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1 if size + 2 * padding >= kernel else 0


def _spatial(layer: Layer, h: int, w: int) -> tuple[int, int]:
    if isinstance(layer, Conv2d):
        (kh, kw), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, layer.padding
        return _window_out(h, kh, sh, ph), _window_out(w, kw, sw, pw)
    if isinstance(layer, MaxPool2d):
        (kh, kw), (sh, sw) = layer.kernel_size, layer.stride
        return _window_out(h, kh, sh, 0), _window_out(w, kw, sw, 0)
    if isinstance(layer, AdaptiveAvgPool2d):
        return layer.output_size
    return h, w


def _describe(layer: Layer) -> str:
    if isinstance(layer, Conv2d):
        (kh, kw), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, layer.padding
        return f"Conv2d {kh}x{kw} stride {sh}x{sw} padding {ph}x{pw}"
    if isinstance(layer, MaxPool2d):
        (kh, kw), (sh, sw) = layer.kernel_size, layer.stride
        return f"MaxPool2d {kh}x{kw} stride {sh}x{sw}"
    return type(layer).__name__


def _first_collapse(spec: ModelSpec, h: int, w: int) -> tuple[Layer, int, int, int, int] | None:
    """The first layer whose output is empty for an (h, w) input, with its in/out sizes."""
    for layer in spec.layers:
        out_h, out_w = _spatial(layer, h, w)
        if out_h < 1 or out_w < 1:
            return layer, h, w, out_h, out_w
        h, w = out_h, out_w
    return None


def smallest_input(spec: ModelSpec) -> tuple[int, int]:
    """The smallest (height, width) this spec accepts; each dimension collapses on its own."""
    large = _SEARCH_LIMIT

    def smallest(axis: int) -> int:
        for size in range(1, large + 1):
            hw = (size, large) if axis == 0 else (large, size)
            if _first_collapse(spec, *hw) is None:
                return size
        raise InputTooSmallError(f"spec {spec.name!r} accepts no input up to {large} pixels")

    return smallest(0), smallest(1)


def check_input(spec: ModelSpec, input_shape) -> tuple[int, int, int]:
    if len(input_shape) != 3 or not all(isinstance(v, int) and v > 0 for v in input_shape):
        raise ValueError(f"input shape must be three positive ints (C, H, W), got {tuple(input_shape)!r}")
    c, h, w = input_shape
    if c != spec.in_channels:
        raise ValueError(f"spec {spec.name!r} takes {spec.in_channels} input channel(s), got {c} in {input_shape}")
    collapse = _first_collapse(spec, h, w)
    if collapse is not None:
        layer, in_h, in_w, out_h, out_w = collapse
        min_h, min_w = smallest_input(spec)
        raise InputTooSmallError(
            f"input {c}x{h}x{w} is too small: at layer {layer.name!r} ({_describe(layer)}) "
            f"a {in_h}x{in_w} input gives a {max(out_h, 0)}x{max(out_w, 0)} output. "
            f"The smallest input this network accepts is {c}x{min_h}x{min_w}."
        )
    return c, h, w


def infer(
    spec: ModelSpec,
    input_shape: tuple[int, int, int] | None = None,
    *,
    batch: int = 1,
    layout: str = "NCHW",
    dtype_bytes: int = 4,
) -> list[LayerInfo]:
    """Every layer's output shape and cost for ``batch`` inputs of ``input_shape`` (C, H, W)."""
    check_layout(layout)
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    c, h, w = check_input(spec, spec.input_shape if input_shape is None else tuple(input_shape))
    features: int | None = None  # set once flattened
    rows: list[LayerInfo] = []
    for layer in spec.layers:
        params = macs = 0
        if isinstance(layer, Conv2d):
            (kh, kw) = layer.kernel_size
            fan_in = c // layer.groups * kh * kw
            h, w = _spatial(layer, h, w)
            params = layer.out_channels * fan_in + layer.out_channels
            macs = batch * h * w * layer.out_channels * fan_in
            c = layer.out_channels
        elif isinstance(layer, (MaxPool2d, AdaptiveAvgPool2d)):
            h, w = _spatial(layer, h, w)
        elif isinstance(layer, Flatten):
            features = c * h * w
        elif isinstance(layer, Dense):
            params = features * layer.out_features + layer.out_features
            macs = batch * features * layer.out_features
            features = layer.out_features
        elif not isinstance(layer, (ReLU, Dropout, LocalResponseNorm)):  # pragma: no cover - ModelSpec validates
            raise TypeError(f"no shape rule for {type(layer).__name__}")
        shape = (batch, features) if features is not None else to_layout((batch, c, h, w), layout)
        elements = 1
        for dim in shape:
            elements *= dim
        rows.append(LayerInfo(layer.name, type(layer).__name__, shape, params, macs, elements * dtype_bytes))
    return rows


def flatten_features(spec: ModelSpec, input_shape: tuple[int, int, int] | None = None) -> int:
    """Width of the vector the Flatten layer produces (the first dense layer's fan-in)."""
    for row in infer(spec, input_shape):
        if row.kind == "Flatten":
            return row.shape[1]
    raise ValueError(f"spec {spec.name!r} has no Flatten layer")


def dense_in_features(spec: ModelSpec, input_shape: tuple[int, int, int] | None = None) -> dict[str, int]:
    """Fan-in of every Dense layer, by name: what a builder needs to size them."""
    rows = infer(spec, input_shape)
    fan_in: dict[str, int] = {}
    for prev, row in zip(rows, rows[1:]):
        if row.kind == "Dense":
            fan_in[row.name] = prev.shape[1]
    return fan_in


def conv_in_channels(spec: ModelSpec) -> dict[str, int]:
    """Input channels of every Conv2d layer, by name."""
    channels, result = spec.in_channels, {}
    for layer in spec.layers:
        if isinstance(layer, Conv2d):
            result[layer.name] = channels
            channels = layer.out_channels
    return result


def totals(rows: list[LayerInfo]) -> dict[str, int]:
    return {
        "params": sum(r.params for r in rows),
        "macs": sum(r.macs for r in rows),
        "activation_bytes": sum(r.activation_bytes for r in rows),
    }


def training_flops_per_image(spec: ModelSpec, input_shape: tuple[int, int, int] | None = None) -> int:
    """Forward MACs x 2 FLOPs x 3 (forward, input gradient, weight gradient)."""
    return 6 * totals(infer(spec, input_shape))["macs"]
