"""Canonical weights: one naming and one layout for every parameter, in every framework.

Layout (PyTorch's, chosen because MXNet and ONNX store it too, so only the backends of
other layouts transpose):

* ``<conv>.weight``: (out_channels, in_channels / groups, kH, kW); ``<conv>.bias``: (out,)
* ``<dense>.weight``: (out_features, in_features), inputs in the NCHW flatten order
  (channel, row, column); ``<dense>.bias``: (out,)

All float32. Files are ``.npz`` read with ``allow_pickle=False``: a file that holds a
pickled object is refused, never executed.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Mapping

import numpy as np

from .io import atomic_file
from .shapes import conv_in_channels, dense_in_features, infer
from .spec import Conv2d, Dense, Flatten, ModelSpec

DTYPE = np.float32


class WeightsError(ValueError):
    """Weights that do not fit the spec, or a file that is not a canonical weights file."""


def expected_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter of ``spec``, in canonical layout and model order."""
    in_channels = conv_in_channels(spec)
    fan_in = dense_in_features(spec)
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in spec.weighted_layers():
        if isinstance(layer, Conv2d):
            shapes[f"{layer.name}.weight"] = (
                layer.out_channels,
                in_channels[layer.name] // layer.groups,
                *layer.kernel_size,
            )
            shapes[f"{layer.name}.bias"] = (layer.out_channels,)
        else:
            shapes[f"{layer.name}.weight"] = (layer.out_features, fan_in[layer.name])
            shapes[f"{layer.name}.bias"] = (layer.out_features,)
    return shapes


def init_weights(spec: ModelSpec, seed: int = 0) -> dict[str, np.ndarray]:
    """The book's initialisation, in numpy so every backend starts from the same numbers.

    Xavier/Glorot uniform for weights with PyTorch's fans (fan_in = shape[1] * receptive
    field, fan_out = shape[0] * receptive field), zero biases. Each parameter draws from its
    own stream keyed by (seed, parameter index), so adding a layer does not reshuffle others.
    """
    weights: dict[str, np.ndarray] = {}
    for index, (name, shape) in enumerate(expected_shapes(spec).items()):
        if name.endswith(".bias"):
            weights[name] = np.zeros(shape, DTYPE)
            continue
        receptive = int(np.prod(shape[2:])) if len(shape) > 2 else 1
        limit = np.sqrt(6.0 / (shape[1] * receptive + shape[0] * receptive))
        rng = np.random.default_rng([seed, index])
        weights[name] = rng.uniform(-limit, limit, size=shape).astype(DTYPE)
    return weights


def _dtype_name(dtype) -> str:
    try:
        return np.dtype(dtype).name
    except TypeError:  # a framework dtype such as torch.float32
        return str(dtype).rsplit(".", 1)[-1]


def check_arrays(spec: ModelSpec, expected: Mapping[str, tuple[int, ...]], found: Mapping[str, object], *,
                 source: str, dtype: str | None = "float32") -> None:
    """Raise one WeightsError listing every missing, unexpected, mis-shaped or mis-typed entry.

    ``found`` maps names to anything with ``.shape`` (and ``.dtype`` when ``dtype`` is given):
    numpy arrays, framework tensors, or the datasets of a framework's checkpoint file.
    """
    problems = [f"missing {name} {shape}" for name, shape in expected.items() if name not in found]
    problems += [f"unexpected {name}" for name in found if name not in expected]
    for name, shape in expected.items():
        if name not in found:
            continue
        value = found[name]
        if tuple(np.shape(value)) != tuple(shape):
            problems.append(f"{name}: shape {tuple(np.shape(value))}, expected {tuple(shape)}")
        elif dtype is not None and _dtype_name(value.dtype) != dtype:
            problems.append(f"{name}: dtype {_dtype_name(value.dtype)}, expected {dtype}")
    if problems:
        raise WeightsError(
            f"{source} do not fit spec {spec.name!r} with input {'x'.join(map(str, spec.input_shape))} "
            f"({len(problems)} problem(s)):\n  " + "\n  ".join(problems)
        )


def check_weights(spec: ModelSpec, weights: Mapping[str, np.ndarray], *, source: str = "weights") -> None:
    """Canonical weights against ``spec``: every name, shape and dtype, all problems at once."""
    check_arrays(spec, expected_shapes(spec), {k: np.asarray(v) for k, v in weights.items()}, source=source)


def non_finite(arrays: Mapping[str, object]) -> list[str]:
    """The names of the floating-point arrays in ``arrays`` that hold a NaN or an infinity."""
    bad = []
    for name, value in arrays.items():
        value = np.asarray(value)
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            bad.append(name)
    return bad


def check_finite(arrays: Mapping[str, object], *, source: str) -> None:
    """Raise a WeightsError naming every array of ``source`` with NaN or infinite values: such
    weights (a diverged run) would compute nothing but NaN."""
    bad = non_finite(arrays)
    if bad:
        raise WeightsError(f"{source}: non-finite values (NaN or infinity) in {', '.join(bad)}")


MOMENTUM_PREFIX = "momentum/"  # optimizer state keys: "momentum/conv1.weight" ...


def momentum_buffers(spec: ModelSpec, momentum: float, state: Mapping[str, object]) -> dict[str, np.ndarray]:
    """The momentum buffers a trainer should hold, by canonical parameter name, from the
    format of ``Trainer.optimizer_state()`` (``{"momentum/<name>": buffer}``, canonical layout).

    Every buffer or none: none means zeros, which is where PyTorch's SGD starts (``buf = g``
    on the first step equals ``momentum * 0 + g``). A trainer without momentum keeps no state.
    Checked in full (names, shapes, float32) before the caller changes anything.
    """
    state = {name: np.asarray(value) for name, value in state.items()}
    if not momentum:
        if state:
            raise WeightsError("this trainer has no momentum, so it keeps no optimizer state: unexpected "
                               + ", ".join(sorted(state)))
        return {}
    shapes = expected_shapes(spec)
    if not state:
        return {name: np.zeros(shape, DTYPE) for name, shape in shapes.items()}
    check_arrays(spec, {MOMENTUM_PREFIX + name: shape for name, shape in shapes.items()}, state,
                 source="momentum buffers")
    return {name: state[MOMENTUM_PREFIX + name] for name in shapes}


# Dynamic loss scaling, for float16 training: float16's largest value is 65504 and its smallest normal
# 6.1e-5, so small gradients vanish unless the loss is scaled up before the backward pass. One rule in
# every backend, Keras' LossScaleOptimizer's defaults (PyTorch's GradScaler is given the same): start at
# 2**15; a step whose gradients are all finite is applied with them divided by the scale and counted,
# and after 2000 such steps in a row the scale doubles; a step with any NaN or infinite gradient is
# skipped (weights and momentum unchanged), halves the scale and restarts the count.
LOSS_SCALED_PRECISIONS = ("fp16",)  # bf16 has float32's range: it needs no loss scale
LOSS_SCALE_INITIAL, LOSS_SCALE_GROWTH_INTERVAL, LOSS_SCALE_FACTOR = 2.0 ** 15, 2000, 2.0
# The loss scale's optimizer state entries: the scale (float32) and the finite steps since it last changed (int64).
LOSS_SCALE_KEY, GOOD_STEPS_KEY = "loss_scale/scale", "loss_scale/good_steps"


def loss_scale_entries(scale: float, good_steps: int) -> dict[str, np.ndarray]:
    """The loss scale's entries of ``Trainer.optimizer_state()`` (0-d arrays): a checkpoint keeps them, so a
    resumed float16 run scales, skips and grows exactly as the uninterrupted one."""
    return {LOSS_SCALE_KEY: np.array(scale, np.float32), GOOD_STEPS_KEY: np.array(good_steps, np.int64)}


def split_loss_scale(state: Mapping[str, object], *,
                     scaled: bool) -> tuple[dict[str, object], tuple[float, int] | None]:
    """(``state`` without the loss-scale entries, (scale, good steps)) for a trainer that scales its loss
    (``scaled``; no entries: the initial scale, a fresh start), or (``state``, None) for one that does
    not. Checked before the caller changes anything: both entries or neither, a finite scale > 0, and
    good steps in [0, LOSS_SCALE_GROWTH_INTERVAL)."""
    rest = {name: value for name, value in state.items() if name not in (LOSS_SCALE_KEY, GOOD_STEPS_KEY)}
    found = {name: np.asarray(state[name]) for name in (LOSS_SCALE_KEY, GOOD_STEPS_KEY) if name in state}
    if not scaled:
        if found:
            raise WeightsError(f"this trainer does not scale its loss (only precision "
                               f"{' or '.join(LOSS_SCALED_PRECISIONS)} does): unexpected {', '.join(sorted(found))}")
        return rest, None
    if not found:
        return rest, (LOSS_SCALE_INITIAL, 0)
    if len(found) == 1:
        raise WeightsError(f"loss scale state: {next(iter(found))} without "
                           f"{({LOSS_SCALE_KEY, GOOD_STEPS_KEY} - set(found)).pop()}")
    scale, good = found[LOSS_SCALE_KEY], found[GOOD_STEPS_KEY]
    if scale.shape or good.shape or not np.issubdtype(scale.dtype, np.floating) \
            or not np.issubdtype(good.dtype, np.integer):
        raise WeightsError(f"loss scale state: expected a float scalar and an integer scalar, got "
                           f"{scale.dtype} {scale.shape} and {good.dtype} {good.shape}")
    if not (np.isfinite(scale) and scale > 0) or not 0 <= good < LOSS_SCALE_GROWTH_INTERVAL:
        raise WeightsError(f"loss scale state: scale {float(scale)!r} must be finite and > 0, good steps {int(good)} "
                           f"in [0, {LOSS_SCALE_GROWTH_INTERVAL})")
    return rest, (float(scale), int(good))


def save_weights(path: str | os.PathLike, weights: Mapping[str, np.ndarray], **extra: np.ndarray) -> Path:
    """Write ``weights`` (and ``extra`` arrays, e.g. optimizer state) to an .npz atomically.

    The file appears under its name only when complete: a crash leaves the old file intact.
    """
    path = Path(path)
    if path.suffix != ".npz":
        raise WeightsError(f"{path}: canonical weights files end in .npz")
    arrays = {name: np.asarray(value) for name, value in {**weights, **extra}.items()}
    for name, value in arrays.items():
        if value.dtype == object:
            raise WeightsError(f"{path}: {name} is an object array; only numeric arrays are saved")
    with atomic_file(path) as handle:
        write_npz(handle, arrays)
    return path


def write_npz(handle, arrays: Mapping[str, np.ndarray]) -> None:
    """``np.savez(handle, **arrays)`` with the zip writer closed on every path: where the write fails
    (a full disk, a second Ctrl-C) the writer is dropped at once instead of being left to the garbage
    collector, which would try to finish the archive on an already closed file and print a traceback."""
    archive = zipfile.ZipFile(handle, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True)
    try:
        for name, value in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)
        archive.close()
    except BaseException:
        archive.fp = None  # nothing left for ZipFile.__del__ to finish: the caller removes the partial file
        raise


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every array in an .npz, refusing pickles and non-npz files with a message naming the file."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    if not zipfile.is_zipfile(path):  # numpy would take any other bytes for a pickle, and say so
        with path.open("rb") as handle:
            if handle.read(1) == b"\x80":  # pickle protocol 2+
                raise WeightsError(f"{path}: refused, the file holds a pickled object (a raw pickle, not an .npz)")
        raise WeightsError(f"{path}: not a readable .npz file (not a zip archive, which an .npz is)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except ValueError as error:  # numpy's answer to an object (pickled) array
        raise WeightsError(f"{path}: refused, the file holds a pickled object ({error})") from None
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise WeightsError(f"{path}: not a readable .npz file ({error})") from None


def load_weights_file(path: str | os.PathLike, spec: ModelSpec) -> dict[str, np.ndarray]:
    """Canonical weights from ``path``, checked against ``spec`` before anything is returned."""
    weights = {name: value for name, value in read_npz(path).items() if "/" not in name}
    check_weights(spec, weights, source=str(path))
    return weights


def resolve_weights(spec: ModelSpec, weights) -> dict[str, np.ndarray]:
    """Accept a mapping or a path; return checked canonical weights, every value finite (what a
    backend's ``load_weights`` and ``build(weights=...)`` take)."""
    if isinstance(weights, (str, os.PathLike)):
        source, weights = str(weights), load_weights_file(weights, spec)
    elif isinstance(weights, Mapping):
        source, weights = "weights", dict(weights)
        check_weights(spec, weights)
    else:
        raise WeightsError(f"weights must be a mapping of canonical arrays or an .npz path, got {type(weights).__name__}")
    check_finite(weights, source=source)
    return weights


def build_recipe(spec: ModelSpec | None = None, *, num_classes: int | None = None, weights=None,
                 seed: int = 0) -> tuple[ModelSpec, dict[str, np.ndarray]]:
    """What every backend's ``build`` starts from: ``spec`` (default: the book's AlexNet) with
    ``num_classes`` applied, and its canonical weights: ``weights`` (mapping or .npz path, checked
    before any framework allocates anything) or ``init_weights(spec, seed)``, so every backend
    starts from the same numbers."""
    from .spec import book_alexnet

    spec = book_alexnet() if spec is None else spec
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"spec must be a common.spec.ModelSpec, got {type(spec).__name__}")
    if num_classes is not None:
        spec = spec.with_num_classes(num_classes)
    return spec, (init_weights(spec, seed) if weights is None else resolve_weights(spec, weights))


def nhwc_flatten_permutation(spec: ModelSpec) -> np.ndarray:
    """Index array p such that ``x_nhwc_flat == x_nchw_flat[p]`` at the Flatten layer.

    The first dense layer's canonical weight W (NCHW columns) becomes ``W[:, p]`` for a
    backend that flattens NHWC; the inverse permutation takes it back.
    """
    rows = infer(spec)
    for prev, row in zip(rows, rows[1:]):
        if row.kind == "Flatten":
            _, c, h, w = prev.shape
            return np.arange(c * h * w).reshape(c, h, w).transpose(1, 2, 0).reshape(-1)
    raise WeightsError(f"spec {spec.name!r} has no Flatten layer")


def _same(array: np.ndarray) -> np.ndarray:
    return array


def _conv_to_hwio(w: np.ndarray) -> np.ndarray:  # (O, I/g, kH, kW) -> (kH, kW, I/g, O)
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def _conv_from_hwio(k: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(k.transpose(3, 2, 0, 1))


def _transposed(w: np.ndarray) -> np.ndarray:  # dense (out, in) <-> (in, out)
    return np.ascontiguousarray(w.T)


def _first_dense_converters(perm: np.ndarray):
    """The first dense layer after Flatten: canonical columns in NCHW flatten order, the native
    (in, out) kernel's rows in NHWC order (row j is canonical column perm[j])."""

    def to_native(w: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(w[:, perm].T)

    def to_canonical(k: np.ndarray) -> np.ndarray:
        w = np.empty((k.shape[1], k.shape[0]), k.dtype)
        w[:, perm] = k.T
        return w

    return to_native, to_canonical


def channels_last_converters(spec: ModelSpec) -> dict[str, tuple]:
    """Canonical parameter name -> (to_native, to_canonical) for a framework that runs NHWC and keeps
    convolution kernels as (kH, kW, in/groups, out) and dense kernels as (in, out) (Keras and Flax do):
    the canonical layout is PyTorch's, and the first dense layer's rows follow the NHWC flatten order."""
    first_dense = first_dense_after_flatten(spec)
    converters = {}
    for layer in spec.weighted_layers():
        if isinstance(layer, Conv2d):
            kernel = (_conv_to_hwio, _conv_from_hwio)
        elif layer.name == first_dense:
            kernel = _first_dense_converters(nhwc_flatten_permutation(spec))
        else:
            kernel = (_transposed, _transposed)
        converters[f"{layer.name}.weight"], converters[f"{layer.name}.bias"] = kernel, (_same, _same)
    return converters


def first_dense_after_flatten(spec: ModelSpec) -> str:
    """The dense layer whose input columns follow the flatten order (fc6 in AlexNet)."""
    flattened = False
    for layer in spec.layers:
        flattened = flattened or isinstance(layer, Flatten)
        if flattened and isinstance(layer, Dense):
            return layer.name
    raise WeightsError(f"spec {spec.name!r} has no Dense layer after Flatten")
