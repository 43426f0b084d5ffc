"""What every backend must do identically with the images: batch order, resize, normalise.

The order in which examples are visited is a seeded permutation per epoch; the input
pipeline scales to [0, 1], resizes bilinearly as two matrix products and normalises with
fixed constants.  A backend only moves a uint8 batch to its device and multiplies by the
same matrices, so every backend sees the same numbers.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

__all__ = [
    "NORMALIZE_MEAN",
    "NORMALIZE_STD",
    "batch_indices",
    "epoch_order",
    "num_batches",
    "preprocess",
    "resize_matrix",
]

# Pixel mean and standard deviation of the 60,000 training images on the [0, 1]
# scale (0.28604 and 0.35302 to five digits), computed from the official files;
# tests/test_data.py recomputes them from the real data.
NORMALIZE_MEAN = 0.2860
NORMALIZE_STD = 0.3530


# ------------------------------------------------------------------- batch order


def num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    """Batches per epoch: floor when the last partial batch is dropped, else ceil."""
    if n < 0 or batch_size < 1:
        raise ValueError(f"need n >= 0 and batch_size >= 1, got n={n}, batch_size={batch_size}")
    return n // batch_size if drop_last else -(-n // batch_size)


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of ``range(n)`` visited in ``epoch``: the one shuffle all backends share.

    Seeding with ``[seed, epoch]`` makes each epoch's order a pure function of the
    run seed and the epoch number, so it needs no RNG state to be saved or restored
    when a run resumes, and no backend's own shuffler is involved.
    """
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int64)


def batch_indices(
    n: int,
    batch_size: int,
    seed: int,
    epoch: int,
    *,
    shuffle: bool = True,
    drop_last: bool = False,
    start_batch: int = 0,
) -> Iterator[np.ndarray]:
    """Yield the int64 index array of each batch of ``epoch``, from batch ``start_batch`` on.

    A run resumed after k batches passes ``start_batch=k`` and gets exactly the
    batches it would have seen had it not stopped.  Arguments are checked here,
    eagerly, not at the first ``next()``.
    """
    total = num_batches(n, batch_size, drop_last)
    if not 0 <= start_batch <= total:
        raise ValueError(f"start_batch must be in 0..{total}, got {start_batch}")
    order = epoch_order(n, seed, epoch) if shuffle else np.arange(n, dtype=np.int64)
    return (order[b * batch_size : (b + 1) * batch_size] for b in range(start_batch, total))


# ----------------------------------------------------------------- preprocessing


def resize_matrix(src: int, dst: int) -> np.ndarray:
    """The (dst, src) float32 matrix of 1-D bilinear resampling, half-pixel centres.

    Same sampling as ``torch.nn.functional.interpolate(mode="bilinear",
    align_corners=False)`` without antialiasing: output pixel i samples source
    coordinate (i + 0.5) * src / dst - 0.5, clamped at 0, between its two
    neighbours (the last one repeated at the edge).  ``R_h @ image @ R_w.T`` is the
    2-D resize; every backend applies these same matrices, so resizing is identical
    everywhere instead of depending on each library's resize kernel.
    """
    if src < 1 or dst < 1:
        raise ValueError(f"sizes must be >= 1, got src={src}, dst={dst}")
    x = np.maximum((np.arange(dst, dtype=np.float64) + 0.5) * (src / dst) - 0.5, 0.0)
    lo = np.floor(x).astype(np.int64)  # <= src - 1, since x < src - 0.5
    hi = np.minimum(lo + 1, src - 1)
    frac = x - lo
    matrix = np.zeros((dst, src), dtype=np.float64)
    rows = np.arange(dst)
    np.add.at(matrix, (rows, lo), 1.0 - frac)
    np.add.at(matrix, (rows, hi), frac)
    return matrix.astype(np.float32)


def preprocess(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Reference input pipeline: uint8 (N, h, w) -> normalised float32 (N, 1, H, W).

    Scale to [0, 1], resize with resize_matrix (``R_h @ x @ R_w.T``), then
    ``(x - NORMALIZE_MEAN) / NORMALIZE_STD``.  Backends reproduce this on their
    device, per batch; this numpy version is what their tests compare against.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(
            f"expected uint8 images of shape (N, h, w), got {images.dtype} {images.shape}"
        )
    height, width = size
    r_h = resize_matrix(images.shape[1], height)
    r_w = resize_matrix(images.shape[2], width)
    x = images.astype(np.float32) / np.float32(255.0)
    x = r_h @ x @ r_w.T
    x = (x - np.float32(NORMALIZE_MEAN)) / np.float32(NORMALIZE_STD)
    return np.ascontiguousarray(x[:, None], dtype=np.float32)
