"""The spec executed in float64 numpy: the oracle the backends are checked against.

Written for clarity over speed (im2col convolutions); inference semantics only (dropout
is the identity). Inputs and activations are NCHW.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .shapes import check_input
from .spec import (
    AdaptiveAvgPool2d,
    Conv2d,
    Dense,
    Dropout,
    Flatten,
    LocalResponseNorm,
    MaxPool2d,
    ModelSpec,
    ReLU,
)
from .weights import check_weights


def conv2d(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, layer: Conv2d) -> np.ndarray:
    (ph, pw), (sh, sw), g = layer.padding, layer.stride, layer.groups
    x = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    kh, kw = weight.shape[2:]
    # windows: (N, C, OH, OW, kH, kW) as a view, strided by the convolution's stride
    windows = sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]
    n, c, oh, ow = windows.shape[:4]
    out_per_group = weight.shape[0] // g
    groups = []
    for index in range(g):
        cin = slice(index * c // g, (index + 1) * c // g)
        cout = slice(index * out_per_group, (index + 1) * out_per_group)
        groups.append(np.einsum("nchwij,ocij->nohw", windows[:, cin], weight[cout], optimize=True))
    return np.concatenate(groups, axis=1) + bias[None, :, None, None]


def max_pool2d(x: np.ndarray, layer: MaxPool2d) -> np.ndarray:
    (kh, kw), (sh, sw) = layer.kernel_size, layer.stride
    return sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw].max(axis=(4, 5))


def local_response_norm(x: np.ndarray, layer: LocalResponseNorm) -> np.ndarray:
    """PyTorch's definition: the window of ``size`` channels is centred, zero padded."""
    half = layer.size // 2
    squared = np.pad(x * x, ((0, 0), (half, layer.size - 1 - half), (0, 0), (0, 0)))
    window_sum = sliding_window_view(squared, layer.size, axis=1).sum(axis=-1)
    return x / (layer.k + layer.alpha / layer.size * window_sum) ** layer.beta


def adaptive_avg_pool2d(x: np.ndarray, layer: AdaptiveAvgPool2d) -> np.ndarray:
    """PyTorch's bins: row i averages [floor(i*H/out), ceil((i+1)*H/out))."""
    (out_h, out_w), (h, w) = layer.output_size, x.shape[2:]
    out = np.empty(x.shape[:2] + (out_h, out_w), x.dtype)
    for i in range(out_h):
        r0, r1 = (i * h) // out_h, -((-(i + 1) * h) // out_h)
        for j in range(out_w):
            c0, c1 = (j * w) // out_w, -((-(j + 1) * w) // out_w)
            out[:, :, i, j] = x[:, :, r0:r1, c0:c1].mean(axis=(2, 3))
    return out


def forward(
    spec: ModelSpec, weights: Mapping[str, np.ndarray], x: np.ndarray
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(logits, {layer name: activation}) in float64 for an NCHW batch ``x``."""
    check_weights(spec, weights)
    check_input(spec, tuple(x.shape[1:]))
    w = {name: np.asarray(value, np.float64) for name, value in weights.items()}
    x = np.asarray(x, np.float64)
    activations: dict[str, np.ndarray] = {}
    for layer in spec.layers:
        if isinstance(layer, Conv2d):
            x = conv2d(x, w[f"{layer.name}.weight"], w[f"{layer.name}.bias"], layer)
        elif isinstance(layer, MaxPool2d):
            x = max_pool2d(x, layer)
        elif isinstance(layer, ReLU):
            x = np.maximum(x, 0.0)
        elif isinstance(layer, LocalResponseNorm):
            x = local_response_norm(x, layer)
        elif isinstance(layer, AdaptiveAvgPool2d):
            x = adaptive_avg_pool2d(x, layer)
        elif isinstance(layer, Flatten):
            x = x.reshape(x.shape[0], -1)
        elif isinstance(layer, Dense):
            x = x @ w[f"{layer.name}.weight"].T + w[f"{layer.name}.bias"]
        elif not isinstance(layer, Dropout):  # pragma: no cover - ModelSpec validates kinds
            raise TypeError(f"reference has no rule for {type(layer).__name__}")
        activations[layer.name] = x
    return x, activations


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Batch-mean softmax cross-entropy, computed stably in float64."""
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(labels)), labels].mean())


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """||a - b|| / ||b|| (0 when both are zero): the parity suite's one measure."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    if actual.shape != expected.shape:
        raise ValueError(f"shapes differ: {actual.shape} vs {expected.shape}")
    scale = np.linalg.norm(expected)
    diff = np.linalg.norm(actual - expected)
    return float(diff / scale) if scale else float(diff)


def nhwc_to_nchw(x: np.ndarray) -> np.ndarray:
    return np.transpose(x, (0, 3, 1, 2)) if x.ndim == 4 else x


def nchw_to_nhwc(x: np.ndarray) -> np.ndarray:
    return np.transpose(x, (0, 2, 3, 1)) if x.ndim == 4 else x
