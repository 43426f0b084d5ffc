"""Spec -> functional keras.Model (NHWC), running it layer by layer, and the conversions
between Keras' parameter layouts and the canonical (PyTorch) layout."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from common import spec as S
from common.weights import first_dense_after_flatten, nhwc_flatten_permutation

from ._framework import keras, tf
from ._layers import AdaptiveAvgPool2d, LocalResponseNorm, SeededDropout

_SPEC_ATTR = "alexnet_spec"
_DEVICE_ATTR = "alexnet_device"
PAD_SUFFIX = "_pad"


def _native_layers(layer: S.Layer, index: int) -> list:
    """The Keras layers that compute one spec layer, in order; the last one is named after it."""
    name = layer.name
    if isinstance(layer, S.Conv2d):
        (ph, pw) = layer.padding
        pad = [keras.layers.ZeroPadding2D(((ph, ph), (pw, pw)), name=name + PAD_SUFFIX)] if ph or pw else []
        return pad + [keras.layers.Conv2D(
            layer.out_channels, layer.kernel_size, strides=layer.stride, padding="valid", groups=layer.groups,
            kernel_initializer="zeros", bias_initializer="zeros", name=name,
        )]
    if isinstance(layer, S.MaxPool2d):
        return [keras.layers.MaxPooling2D(layer.kernel_size, strides=layer.stride, padding="valid", name=name)]
    if isinstance(layer, S.ReLU):
        return [keras.layers.ReLU(name=name)]
    if isinstance(layer, S.LocalResponseNorm):
        return [LocalResponseNorm(layer.size, layer.alpha, layer.beta, layer.k, name=name)]
    if isinstance(layer, S.AdaptiveAvgPool2d):
        return [AdaptiveAvgPool2d(layer.output_size, name=name)]
    if isinstance(layer, S.Flatten):
        return [keras.layers.Flatten(name=name)]
    if isinstance(layer, S.Dense):
        return [keras.layers.Dense(layer.out_features, kernel_initializer="zeros", bias_initializer="zeros", name=name)]
    if isinstance(layer, S.Dropout):
        return [SeededDropout(layer.rate, stream=index, name=name)]
    raise TypeError(f"alexnet_tf has no builder for spec layer kind {type(layer).__name__} ({layer!r})")


def build_keras(spec: S.ModelSpec, device: str) -> "keras.Model":
    """A functional model for ``spec``, its variables created on ``device`` (a tf.device string)."""
    names = {layer.name for layer in spec.layers}
    for layer in spec.layers:
        if isinstance(layer, S.Conv2d) and layer.name + PAD_SUFFIX in names:
            raise ValueError(f"spec layer name {layer.name + PAD_SUFFIX!r} clashes with the padding layer of {layer.name!r}")
    channels, (height, width) = spec.in_channels, spec.input_size
    with tf.device(device):
        inputs = keras.Input(shape=(height, width, channels), name="image")
        x = inputs
        for index, layer in enumerate(spec.layers):
            for native in _native_layers(layer, index):
                x = native(x)
        model = keras.Model(inputs, x, name=f"alexnet_{spec.name}")
    setattr(model, _SPEC_ATTR, spec)
    setattr(model, _DEVICE_ATTR, device)
    return model


def spec_of(model) -> S.ModelSpec:
    spec = getattr(model, _SPEC_ATTR, None)
    if not isinstance(spec, S.ModelSpec):
        raise TypeError(f"{model!r} was not built by alexnet_tf.build (it carries no spec)")
    return spec


def device_of(model) -> str:
    return getattr(model, _DEVICE_ATTR)


def parameter_devices(model) -> set[str]:
    """Where the variables really are: {'cpu'}, {'gpu'}, or both if something went wrong."""
    return {"gpu" if ":GPU:" in v.value.device.upper() else "cpu" for v in model.weights}


# --------------------------------------------------------------------------- running

def cache(model) -> dict:
    """Per-model memo (plan, parameter table, compiled functions), kept in the model's own
    ``__dict__`` past Keras' attribute tracking so it lives and dies with the model."""
    memo = model.__dict__.get("_alexnet_cache")
    if memo is None:
        memo = {}
        object.__setattr__(model, "_alexnet_cache", memo)
    return memo


def plan(model) -> tuple[tuple[S.Layer, tuple], ...]:
    """(spec layer, its Keras layers) in order."""
    memo = cache(model)
    if "plan" not in memo:
        steps = []
        for layer in spec_of(model).layers:
            natives = []
            if isinstance(layer, S.Conv2d) and any(layer.padding):
                natives.append(model.get_layer(layer.name + PAD_SUFFIX))
            natives.append(model.get_layer(layer.name))
            steps.append((layer, tuple(natives)))
        memo["plan"] = tuple(steps)
    return memo["plan"]


def run(model, x, *, training: bool, seed=None, capture: dict | None = None):
    """The spec's layers one after another (eager or inside tf.function).

    ``seed`` (int64 scalar tensor) makes dropout masks a function of it; ``capture``
    receives every spec layer's output by name.
    """
    for layer, natives in plan(model):
        for native in natives:
            x = native(x, training=training, seed=seed) if isinstance(native, SeededDropout) else native(x)
        if capture is not None:
            capture[layer.name] = x
    return x


def cross_entropy(logits, labels):
    """Per-example softmax cross entropy (labels: integer class indices)."""
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)


def correct_count(logits, labels):
    return tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, axis=-1, output_type=labels.dtype), labels), tf.int64))


# ----------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class Param:
    """One canonical parameter and the Keras variable that holds it."""

    name: str  # canonical, e.g. "conv1.weight"
    variable: object  # keras.Variable
    to_native: Callable[[np.ndarray], np.ndarray]
    to_canonical: Callable[[np.ndarray], np.ndarray]


def _identity(array: np.ndarray) -> np.ndarray:
    return array


def _conv_to_native(w: np.ndarray) -> np.ndarray:  # (O, I/g, kH, kW) -> (kH, kW, I/g, O)
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def _conv_to_canonical(k: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(k.transpose(3, 2, 0, 1))


def _dense_to_native(w: np.ndarray) -> np.ndarray:  # (out, in) -> (in, out)
    return np.ascontiguousarray(w.T)


def _dense_to_canonical(k: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(k.T)


def _first_dense_converters(perm: np.ndarray):
    """fc6: canonical columns are in NCHW flatten order, Keras' rows in NHWC order.
    Keras row j is canonical column perm[j]."""

    def to_native(w: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(w[:, perm].T)

    def to_canonical(k: np.ndarray) -> np.ndarray:
        w = np.empty((k.shape[1], k.shape[0]), k.dtype)
        w[:, perm] = k.T
        return w

    return to_native, to_canonical


def params(model) -> tuple[Param, ...]:
    """Every parameter in canonical (common.weights.expected_shapes) order."""
    memo = cache(model)
    if "params" not in memo:
        spec = spec_of(model)
        first_dense = first_dense_after_flatten(spec)
        result = []
        for layer in spec.weighted_layers():
            native = model.get_layer(layer.name)
            if isinstance(layer, S.Conv2d):
                to_native, to_canonical = _conv_to_native, _conv_to_canonical
            elif layer.name == first_dense:
                to_native, to_canonical = _first_dense_converters(nhwc_flatten_permutation(spec))
            else:
                to_native, to_canonical = _dense_to_native, _dense_to_canonical
            result.append(Param(f"{layer.name}.weight", native.kernel, to_native, to_canonical))
            result.append(Param(f"{layer.name}.bias", native.bias, _identity, _identity))
        memo["params"] = tuple(result)
    return memo["params"]


def xla_by_default(device: str) -> bool:
    """Whether training-mode functions (the train step, ``loss_and_grads``) are XLA-compiled by
    default on ``device`` (a tf.device string). Not on CPU: oneDNN's plain graph trained 1.4x
    faster there (docs/benchmarks.md) and is just as reproducible. On a GPU, where XLA
    usually pays by fusing the elementwise work (not measured by this project: no GPU here;
    ``alexnet bench --device gpu --ablate`` shows it)."""
    return "GPU" in device.upper()


def compile_fn(fn, **kwargs):
    """``tf.function(fn, **kwargs)``, one per model or trainer by design. TensorFlow counts traces
    by code object across instances and would warn about "retracing" once a process has
    built five models; each instance here traces once per input signature, so that warning
    is switched off for these instances only (best effort: a private attribute)."""
    compiled = tf.function(fn, **kwargs)
    if hasattr(compiled, "_omit_frequent_tracing_warning"):
        compiled._omit_frequent_tracing_warning = True
    return compiled


def input_signature(spec: S.ModelSpec) -> "tf.TensorSpec":
    """Any batch size, the spec's image in NHWC: one trace serves every batch."""
    return tf.TensorSpec((None, *spec.input_size, spec.in_channels), tf.float32)


def compiled_forward(model, training: bool):
    """``x -> (logits, {layer name: output})`` as one tf.function per model and mode. Plain and
    captured forwards share it, so their logits are the same numbers."""
    memo = cache(model)
    key = ("forward", bool(training))
    if key not in memo:
        device = device_of(model)

        def forward(x):
            with tf.device(device):
                captured: dict = {}
                logits = run(model, x, training=training, capture=captured)
                return logits, captured

        memo[key] = compile_fn(forward, input_signature=[input_signature(spec_of(model))])
    return memo[key]


def compiled_loss_and_grads(model):
    """``(x, labels) -> (mean loss, [grad per parameter])`` in training mode, one tf.function per model."""
    memo = cache(model)
    if "loss_and_grads" not in memo:
        device = device_of(model)
        variables = [p.variable for p in params(model)]

        def loss_and_grads(x, labels):
            with tf.device(device):
                with tf.GradientTape() as tape:
                    logits = run(model, x, training=True)
                    loss = tf.reduce_mean(cross_entropy(logits, labels))
                return loss, tape.gradient(loss, variables)

        # compiled as the train step is by default: the same kernels, so the gradients a step applies
        memo["loss_and_grads"] = compile_fn(
            loss_and_grads, input_signature=[input_signature(spec_of(model)), tf.TensorSpec((None,), tf.int64)],
            jit_compile=xla_by_default(device),
        )
    return memo["loss_and_grads"]
