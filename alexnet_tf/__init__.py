"""AlexNet in TensorFlow / Keras 3, built from ``common.spec`` (layout NHWC).

The public names are the contract of ``common.backend``: switching framework is changing
the import. Keras-specific facts handled here and nowhere else: NHWC activations (the
first dense layer's canonical NCHW columns are permuted on load and back on export),
kernels stored (kH, kW, in/groups, out) and (in, out), explicit ``ZeroPadding2D`` before
every 'valid' convolution, and SGD with PyTorch's semantics in one ``tf.function`` step,
reproducible bit for bit on CPU (see ``_trainer``), XLA-compiled by default on a GPU only.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ._framework import FRAMEWORK, device_name, disable_tf32, gpu_available, keras, tf  # noqa: F401  (imports TF first)

import common.backend as _backend
from common.backend import CONTRACT as _CONTRACT  # noqa: E402
from common.spec import ModelSpec, book_alexnet  # noqa: E402
from common.weights import WeightsError, check_arrays, init_weights, resolve_weights  # noqa: E402

from ._model import (  # noqa: E402
    build_keras, compiled_forward, compiled_loss_and_grads, device_of, parameter_devices, params, plan, spec_of,
)
from ._trainer import Trainer  # noqa: E402

NAME = "tf"
LAYOUT = "NHWC"
layer_summary, fit = _backend.shared_functions(__name__)

__all__ = [*_CONTRACT]


def build(spec: ModelSpec | None = None, *, num_classes: int | None = None, weights=None, seed: int = 0,
          device: str = "auto"):
    """A ``keras.Model`` for ``spec`` (default: the book's AlexNet) on ``device`` ('auto', 'cpu', 'gpu'),
    its parameters set to ``weights`` (canonical mapping or .npz path) or ``init_weights(spec, seed)``."""
    spec = book_alexnet() if spec is None else spec
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"spec must be a common.spec.ModelSpec, got {type(spec).__name__}")
    if num_classes is not None:
        spec = spec.with_num_classes(num_classes)
    resolved = _backend.choose_device(device, gpu_available(), FRAMEWORK)
    # Check the weights before building anything: a bad file fails fast and cheaply.
    canonical = init_weights(spec, seed) if weights is None else resolve_weights(spec, weights)
    model = build_keras(spec, device_name(resolved))
    _assign(model, canonical)
    return model


def model_spec(model) -> ModelSpec:
    return spec_of(model)


def _as_input(model, x) -> np.ndarray:
    spec = spec_of(model)
    x = np.asarray(x, dtype=np.float32)
    expected = (*spec.input_size, spec.in_channels)
    if x.ndim != 4 or x.shape[1:] != expected:
        hint = ""
        if x.ndim == 4 and x.shape[1:] == spec.input_shape:
            hint = " It looks like NCHW: alexnet_tf takes NHWC (transpose with x.transpose(0, 2, 3, 1))."
        raise ValueError(f"expected an input of shape (N, {', '.join(map(str, expected))}) in NHWC for spec "
                         f"{spec.name!r}, got {x.shape}.{hint}")
    return x


def forward(model, x, *, training: bool = False, capture: bool = False):
    """Logits as numpy for NHWC float32 ``x``; with ``capture``, also every spec layer's output
    by name (NHWC for images; 2-D after Flatten, whose columns are in (H, W, C) order:
    ``flatten_tf == flatten_nchw[:, common.weights.nhwc_flatten_permutation(spec)]``)."""
    x = _as_input(model, x)
    with tf.device(device_of(model)):
        logits, captured = compiled_forward(model, training)(tf.convert_to_tensor(x))
    if capture:
        return logits.numpy(), {layer.name: captured[layer.name].numpy() for layer in spec_of(model).layers}
    return logits.numpy()


def param_counts(model) -> dict[str, int]:
    """Parameters per spec layer, counted from the Keras layers' own trainable variables."""
    return {
        layer.name: sum(int(np.prod(v.shape)) for native in natives for v in native.trainable_weights)
        for layer, natives in plan(model)
    }


def _assign(model, canonical: dict[str, np.ndarray]) -> None:
    table = params(model)
    native = [p.to_native(np.asarray(canonical[p.name])) for p in table]  # convert everything first
    for p, value in zip(table, native):
        p.variable.assign(value)


def load_weights(model, weights) -> None:
    """Set every parameter from canonical weights (mapping or .npz path), checked against the
    model's spec first: weights that do not fit raise ``WeightsError`` and change nothing."""
    _assign(model, resolve_weights(spec_of(model), weights))


def export_weights(model) -> dict[str, np.ndarray]:
    """Canonical weights (PyTorch layout, NCHW flatten order), float32."""
    return {p.name: p.to_canonical(np.asarray(p.variable.numpy(), dtype=np.float32)) for p in params(model)}


def loss_and_grads(model, x, labels) -> tuple[float, dict[str, np.ndarray]]:
    """Mean softmax cross entropy and its gradients in canonical names and layout, in training
    mode (dropout as the spec says)."""
    x = _as_input(model, x)
    with tf.device(device_of(model)):
        loss, grads = compiled_loss_and_grads(model)(
            tf.convert_to_tensor(x), tf.convert_to_tensor(np.asarray(labels, dtype=np.int64))
        )
    return float(loss), {p.name: p.to_canonical(g.numpy()) for p, g in zip(params(model), grads)}


def make_trainer(model, *, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                 jit_compile: bool | None = None, precision: str = "fp32") -> Trainer:
    """SGD with PyTorch's semantics in one compiled step. ``jit_compile`` (default: on a GPU only,
    see ``_model.xla_by_default``) compiles the train step with XLA; ``precision`` "bf16" computes in
    bfloat16 with float32 weights (default "fp32", what the parity suite checks)."""
    return Trainer(model, lr=lr, momentum=momentum, weight_decay=weight_decay, jit_compile=jit_compile,
                   precision=precision)


# ------------------------------------------------------------------ native checkpoints

NATIVE_SUFFIX = ".weights.h5"


def save_native(model, path) -> Path:
    """Keras' own weights file (``model.save_weights``); the name must end in .weights.h5."""
    path = Path(path)
    if not path.name.endswith(NATIVE_SUFFIX):
        raise ValueError(f"{path}: Keras weights files end in {NATIVE_SUFFIX}")
    path.parent.mkdir(parents=True, exist_ok=True)
    # written next to its final name, then renamed: a crash never leaves a half-written file there
    tmp = path.with_name(f".{path.name[:-len(NATIVE_SUFFIX)]}.{os.getpid()}.tmp{NATIVE_SUFFIX}")
    try:
        model.save_weights(str(tmp))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


class _Stored:
    """A variable in a Keras .weights.h5, known by its shape."""

    def __init__(self, shape):
        self.shape = tuple(shape)


def _native_shapes(path: Path) -> dict[str, _Stored]:
    """``layer[index]`` -> stored variable, read from a Keras .weights.h5 without loading it."""
    import h5py

    found: dict[str, _Stored] = {}
    try:
        with h5py.File(path, "r") as handle:
            layers = handle.get("layers")
            if not isinstance(layers, h5py.Group):
                raise ValueError("it has no 'layers' group")
            for group in layers.values():
                variables = group.get("vars") if isinstance(group, h5py.Group) else None
                if not isinstance(variables, h5py.Group):
                    continue
                name = variables.attrs.get("name", "")
                name = name.decode() if isinstance(name, bytes) else str(name)
                for index, key in enumerate(sorted(variables, key=int)):
                    found[f"{name}[{index}]"] = _Stored(variables[key].shape)
    except (OSError, ValueError, KeyError) as error:
        raise WeightsError(f"{path}: not a readable Keras weights file ({error})") from None
    return found


def load_native(model, path) -> None:
    """Load a file written by ``save_native``; every layer and shape is checked against the
    model before anything is loaded, and a mismatch raises naming the file."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such Keras weights file")
    stored = _native_shapes(path)
    expected = {f"{layer.name}[{i}]": tuple(v.shape) for layer in model.layers for i, v in enumerate(layer.weights)}
    check_arrays(spec_of(model), expected, stored, source=str(path), dtype=None)
    try:
        model.load_weights(str(path))
    except Exception as error:  # Keras' own checks, as a last line
        raise WeightsError(f"{path}: Keras could not load it into this model ({error})") from error
