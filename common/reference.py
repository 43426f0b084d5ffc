"""The spec executed in float64 numpy: the oracle the backends are checked against.

Forward (inference, or training with given dropout masks), the backward pass of every layer
kind, batch-mean softmax cross-entropy, and ``torch.optim.SGD``'s update rule. Written for
clarity: each layer's backward is the transpose of its forward, vectorised with
``sliding_window_view`` and ``tensordot``. Inputs and activations are NCHW; weights are the
canonical (PyTorch) layout and may be any float dtype (they are used in float64).

Conventions, all PyTorch's: LRN divides alpha by ``size``; adaptive average pooling uses
bins [floor(i*H/out), ceil((i+1)*H/out)); a ReLU at exactly 0 passes no gradient; max-pool
sends a window's gradient to its first largest element; dropout keeps with probability
1 - rate and scales kept values by 1/(1 - rate); weight decay is coupled L2 on every
parameter, biases included.
"""
from __future__ import annotations

from typing import Iterable, Mapping

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
from .weights import check_arrays, expected_shapes

Arrays = Mapping[str, np.ndarray]


# ------------------------------------------------------------------------------ layers
def _windows(x: np.ndarray, kernel: tuple[int, int], stride: tuple[int, int]) -> np.ndarray:
    """(N, C, OH, OW, kH, kW) view of every window of ``x`` the layer reads."""
    return sliding_window_view(x, kernel, axis=(2, 3))[:, :, ::stride[0], ::stride[1]]


def _window_slice(i: int, j: int, out_hw: tuple[int, int], stride: tuple[int, int]):
    """The input positions that kernel offset (i, j) touches, one per output position."""
    (oh, ow), (sh, sw) = out_hw, stride
    return np.s_[:, :, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw]


def _group_slices(layer: Conv2d, in_channels: int):
    g = layer.groups
    for index in range(g):
        yield (slice(index * in_channels // g, (index + 1) * in_channels // g),
               slice(index * layer.out_channels // g, (index + 1) * layer.out_channels // g))


def conv2d(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, layer: Conv2d) -> np.ndarray:
    (ph, pw) = layer.padding
    windows = _windows(np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw))), layer.kernel_size, layer.stride)
    out = np.empty((x.shape[0], weight.shape[0], *windows.shape[2:4]), np.float64)
    for cin, cout in _group_slices(layer, x.shape[1]):
        # (N, c, OH, OW, kH, kW) . (o, c, kH, kW) -> (N, OH, OW, o)
        out[:, cout] = np.tensordot(windows[:, cin], weight[cout], axes=([1, 4, 5], [1, 2, 3])).transpose(0, 3, 1, 2)
    return out + bias[None, :, None, None]


def conv2d_backward(dout: np.ndarray, x: np.ndarray, weight: np.ndarray, layer: Conv2d, *,
                    input_grad: bool = True) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """(d input or None, d weight, d bias) for upstream gradient ``dout`` (N, O, OH, OW)."""
    (ph, pw), (kh, kw) = layer.padding, layer.kernel_size
    padded = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    windows = _windows(padded, layer.kernel_size, layer.stride)
    dweight = np.empty_like(weight, dtype=np.float64)
    for cin, cout in _group_slices(layer, x.shape[1]):
        # sum over batch and output positions of dout * the window it saw: (o, c, kH, kW)
        dweight[cout] = np.tensordot(dout[:, cout], windows[:, cin], axes=([0, 2, 3], [0, 2, 3]))
    dbias = dout.sum(axis=(0, 2, 3))
    if not input_grad:
        return None, dweight, dbias
    dpadded = np.zeros_like(padded, dtype=np.float64)
    for i in range(kh):
        for j in range(kw):
            target = _window_slice(i, j, dout.shape[2:], layer.stride)
            for cin, cout in _group_slices(layer, x.shape[1]):
                # each output position sends dout * w[:, :, i, j] back to the input it read at offset (i, j)
                contribution = np.tensordot(dout[:, cout], weight[cout, :, i, j], axes=([1], [0]))  # (N, OH, OW, c)
                dpadded[target][:, cin] += contribution.transpose(0, 3, 1, 2)
    return dpadded[:, :, ph:ph + x.shape[2], pw:pw + x.shape[3]], dweight, dbias


def max_pool2d(x: np.ndarray, layer: MaxPool2d) -> np.ndarray:
    return _windows(x, layer.kernel_size, layer.stride).max(axis=(4, 5))


def max_pool2d_backward(dout: np.ndarray, x: np.ndarray, layer: MaxPool2d) -> np.ndarray:
    (kh, kw) = layer.kernel_size
    windows = _windows(x, layer.kernel_size, layer.stride)
    winner = windows.reshape(*windows.shape[:4], kh * kw).argmax(axis=-1)  # first largest, row-major
    dx = np.zeros_like(x, dtype=np.float64)
    for i in range(kh):
        for j in range(kw):
            dx[_window_slice(i, j, dout.shape[2:], layer.stride)] += np.where(winner == i * kw + j, dout, 0.0)
    return dx


def relu_backward(dout: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.where(x > 0, dout, 0.0)


def _channel_window_sum(v: np.ndarray, before: int, after: int) -> np.ndarray:
    """out[:, c] = sum of v[:, c - before : c + after + 1] (zero outside the channels)."""
    padded = np.pad(v, ((0, 0), (before, after), (0, 0), (0, 0)))
    return sliding_window_view(padded, before + after + 1, axis=1).sum(axis=-1)


def _lrn_denominator(x: np.ndarray, layer: LocalResponseNorm) -> np.ndarray:
    """k + alpha/size * (sum of x^2 over the centred window of ``size`` channels)."""
    half = layer.size // 2
    return layer.k + layer.alpha / layer.size * _channel_window_sum(x * x, half, layer.size - 1 - half)


def local_response_norm(x: np.ndarray, layer: LocalResponseNorm) -> np.ndarray:
    """PyTorch's definition: the window of ``size`` channels is centred, zero padded."""
    return x * _lrn_denominator(x, layer) ** -layer.beta


def local_response_norm_backward(dout: np.ndarray, x: np.ndarray, layer: LocalResponseNorm) -> np.ndarray:
    """y_c = x_c D_c^-beta, D_c = k + a S_c, S_c = sum_{m in window(c)} x_m^2, a = alpha/size:
    dx_m = dout_m D_m^-beta - 2 a beta x_m sum_{c: m in window(c)} dout_c x_c D_c^(-beta-1)."""
    half = layer.size // 2
    denominator = _lrn_denominator(x, layer)
    through = dout * x * denominator ** (-layer.beta - 1)
    # m lies in window(c) for c in [m - (size-1-half), m + half]: the transposed window
    spread = _channel_window_sum(through, layer.size - 1 - half, half)
    return dout * denominator ** -layer.beta - 2 * layer.alpha / layer.size * layer.beta * x * spread


def _adaptive_bins(size: int, out: int) -> list[tuple[int, int]]:
    """PyTorch's bins: bin i covers [floor(i*size/out), ceil((i+1)*size/out))."""
    return [((i * size) // out, -((-(i + 1) * size) // out)) for i in range(out)]


def adaptive_avg_pool2d(x: np.ndarray, layer: AdaptiveAvgPool2d) -> np.ndarray:
    rows, cols = (_adaptive_bins(size, out) for size, out in zip(x.shape[2:], layer.output_size))
    out = np.empty(x.shape[:2] + tuple(layer.output_size), np.float64)
    for i, (r0, r1) in enumerate(rows):
        for j, (c0, c1) in enumerate(cols):
            out[:, :, i, j] = x[:, :, r0:r1, c0:c1].mean(axis=(2, 3))
    return out


def adaptive_avg_pool2d_backward(dout: np.ndarray, x: np.ndarray, layer: AdaptiveAvgPool2d) -> np.ndarray:
    rows, cols = (_adaptive_bins(size, out) for size, out in zip(x.shape[2:], layer.output_size))
    dx = np.zeros_like(x, dtype=np.float64)
    for i, (r0, r1) in enumerate(rows):
        for j, (c0, c1) in enumerate(cols):  # bins may overlap: contributions add
            dx[:, :, r0:r1, c0:c1] += dout[:, :, i, j, None, None] / ((r1 - r0) * (c1 - c0))
    return dx


def dense_backward(dout: np.ndarray, x: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(d input, d weight, d bias) of ``x @ weight.T + bias``."""
    return dout @ weight, dout.T @ x, dout.sum(axis=0)


def dropout(x: np.ndarray, keep: np.ndarray, rate: float) -> np.ndarray:
    """Inverted dropout with a given keep mask (1 keep, 0 drop): x * keep / (1 - rate)."""
    return x * keep / (1.0 - rate)


# ------------------------------------------------------------------------------ network
def _as_float64(spec: ModelSpec, weights: Arrays) -> dict[str, np.ndarray]:
    """Weights checked by name and shape (any float dtype: the oracle's own steps are float64)."""
    check_arrays(spec, expected_shapes(spec), {k: np.asarray(v) for k, v in weights.items()}, source="weights",
                 dtype=None)
    return {name: np.asarray(value, np.float64) for name, value in weights.items()}


def _keep_masks(spec: ModelSpec, masks: Arrays | None, *, training: bool) -> dict[str, np.ndarray]:
    """Dropout keep masks by layer name. Training through a dropout with rate > 0 needs its mask."""
    masks = dict(masks or {})
    names = {layer.name: layer for layer in spec.layers if isinstance(layer, Dropout)}
    unknown = sorted(set(masks) - set(names))
    if unknown:
        raise ValueError(f"dropout masks given for {unknown}, which are not Dropout layers of spec {spec.name!r}; "
                         f"its Dropout layers: {sorted(names)}")
    if training:
        missing = [name for name, layer in names.items() if layer.rate > 0 and name not in masks]
        if missing:
            raise ValueError(f"training through dropout needs its mask: none given for {missing} "
                             f"(pass dropout_masks, or use spec.with_dropout(0))")
    return {name: np.asarray(mask, np.float64) for name, mask in masks.items()}


def _forward(spec: ModelSpec, w: dict[str, np.ndarray], x: np.ndarray,
             masks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
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
        elif isinstance(layer, Dropout):
            if layer.name in masks:
                if masks[layer.name].shape != x.shape:
                    raise ValueError(f"dropout mask for {layer.name!r} has shape {masks[layer.name].shape}, "
                                     f"its input {x.shape}")
                x = dropout(x, masks[layer.name], layer.rate)
        else:  # pragma: no cover - ModelSpec validates kinds
            raise TypeError(f"reference has no rule for {type(layer).__name__}")
        activations[layer.name] = x
    return activations


def forward(spec: ModelSpec, weights: Arrays, x: np.ndarray, *,
            dropout_masks: Arrays | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(logits, {layer name: activation}) in float64 for an NCHW batch ``x``.

    Inference mode (dropout is the identity) unless ``dropout_masks`` gives a keep mask for a
    Dropout layer, which is then applied as in training.
    """
    check_input(spec, tuple(x.shape[1:]))
    activations = _forward(spec, _as_float64(spec, weights), np.asarray(x, np.float64),
                           _keep_masks(spec, dropout_masks, training=False))
    return activations[spec.layers[-1].name], activations


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Batch-mean softmax cross-entropy and its gradient with respect to the logits."""
    logits, labels = np.asarray(logits, np.float64), np.asarray(labels, np.int64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    rows = np.arange(len(labels))
    dlogits = np.exp(log_probs)
    dlogits[rows, labels] -= 1.0
    return float(-log_probs[rows, labels].mean()), dlogits / len(labels)


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Batch-mean softmax cross-entropy, computed stably in float64."""
    return softmax_cross_entropy(logits, labels)[0]


def loss_and_grads(spec: ModelSpec, weights: Arrays, x: np.ndarray, labels: np.ndarray, *,
                   dropout_masks: Arrays | None = None) -> tuple[float, dict[str, np.ndarray]]:
    """Training-mode batch-mean cross-entropy and its float64 gradient per parameter
    (canonical names, layout and order). Every Dropout with rate > 0 needs a keep mask."""
    check_input(spec, tuple(x.shape[1:]))
    w = _as_float64(spec, weights)
    masks = _keep_masks(spec, dropout_masks, training=True)
    x = np.asarray(x, np.float64)
    activations = _forward(spec, w, x, masks)
    loss, grad = softmax_cross_entropy(activations[spec.layers[-1].name], labels)
    grads: dict[str, np.ndarray] = {}
    for index in range(len(spec.layers) - 1, -1, -1):
        layer = spec.layers[index]
        inputs = activations[spec.layers[index - 1].name] if index else x
        if isinstance(layer, Conv2d):
            grad, grads[f"{layer.name}.weight"], grads[f"{layer.name}.bias"] = conv2d_backward(
                grad, inputs, w[f"{layer.name}.weight"], layer, input_grad=index > 0)
        elif isinstance(layer, MaxPool2d):
            grad = max_pool2d_backward(grad, inputs, layer)
        elif isinstance(layer, ReLU):
            grad = relu_backward(grad, inputs)
        elif isinstance(layer, LocalResponseNorm):
            grad = local_response_norm_backward(grad, inputs, layer)
        elif isinstance(layer, AdaptiveAvgPool2d):
            grad = adaptive_avg_pool2d_backward(grad, inputs, layer)
        elif isinstance(layer, Flatten):
            grad = grad.reshape(inputs.shape)
        elif isinstance(layer, Dense):
            grad, grads[f"{layer.name}.weight"], grads[f"{layer.name}.bias"] = dense_backward(
                grad, inputs, w[f"{layer.name}.weight"])
        elif isinstance(layer, Dropout) and layer.name in masks:
            grad = dropout(grad, masks[layer.name], layer.rate)
    return loss, {name: grads[name] for name in w}


# ------------------------------------------------------------------------------ optimizer
class SGD:
    """``torch.optim.SGD`` in float64 (dampening 0, nesterov off): g = grad + weight_decay * w on
    every parameter; buf = g on the first step, then buf = momentum * buf + g; w -= lr * buf.
    Without momentum there is no buffer: w -= lr * g."""

    def __init__(self, weights: Mapping[str, np.ndarray], *, lr: float, momentum: float = 0.0,
                 weight_decay: float = 0.0):
        self.weights = {name: np.array(value, np.float64) for name, value in weights.items()}
        self.lr, self.momentum, self.weight_decay = float(lr), float(momentum), float(weight_decay)
        self.buffers: dict[str, np.ndarray] = {}

    def step(self, grads: Mapping[str, np.ndarray]) -> None:
        for name, w in self.weights.items():
            g = self.weight_decay * w
            g += grads[name]
            if self.momentum:
                buf = self.buffers.get(name)
                if buf is None:
                    buf = self.buffers[name] = g
                else:
                    buf *= self.momentum
                    buf += g
                g = buf
            w -= self.lr * g


def sgd_steps(spec: ModelSpec, weights: Arrays, batches: Iterable[tuple], *, lr: float, momentum: float = 0.0,
              weight_decay: float = 0.0) -> tuple[dict[str, np.ndarray], list[float]]:
    """Train a copy of ``weights`` with ``SGD``, one step per batch; (float64 weights after the
    last step, the loss of each step before its update: what a Trainer's ``train_step`` returns).

    Each batch is ``(x, labels)`` or ``(x, labels, dropout_masks)``.
    """
    optimizer = SGD(_as_float64(spec, weights), lr=lr, momentum=momentum, weight_decay=weight_decay)
    losses = []
    for x, labels, *masks in batches:
        loss, grads = loss_and_grads(spec, optimizer.weights, x, labels, dropout_masks=masks[0] if masks else None)
        optimizer.step(grads)
        losses.append(loss)
    return optimizer.weights, losses


# ------------------------------------------------------------------------------ measures
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
