"""The two spec layers Flax has no exact built-in for, as functions on NHWC arrays:
across-channel LRN and PyTorch's adaptive average pooling."""
from __future__ import annotations

from ._framework import jnp


def local_response_norm(x, size: int, alpha: float, beta: float, k: float):
    """b = a / (k + alpha/size * sum over the window of a^2)^beta, the window ``size`` channels
    centred on each channel, zero beyond the edges (PyTorch's convention: alpha divided by size)."""
    radius, channels = (size - 1) // 2, x.shape[-1]
    padded = jnp.pad(x * x, ((0, 0), (0, 0), (0, 0), (radius, radius)))
    squares = sum(padded[..., i:i + channels] for i in range(size))  # the window's sum, as shifted slices
    return x / (k + (alpha / size) * squares) ** beta


def _bins(size: int, out: int) -> list[tuple[int, int]]:
    """PyTorch's adaptive windows: bin i covers [floor(i*size/out), ceil((i+1)*size/out))."""
    return [((i * size) // out, -((-(i + 1) * size) // out)) for i in range(out)]


def adaptive_avg_pool(x, output_size: tuple[int, int]):
    """PyTorch's AdaptiveAvgPool2d on NHWC: the mean of each (possibly overlapping) window."""
    rows, cols = (_bins(size, out) for size, out in zip(x.shape[1:3], output_size))
    return jnp.stack([jnp.stack([x[:, r0:r1, c0:c1, :].mean(axis=(1, 2)) for c0, c1 in cols], axis=1)
                      for r0, r1 in rows], axis=1)
