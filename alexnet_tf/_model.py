"""The native Keras model: spec -> functional keras.Model (NHWC), running it layer by layer,
weights in and out (the conversions between Keras' parameter layouts and the canonical
PyTorch layout), and Keras' own checkpoints.

Keras-specific facts handled here and nowhere else: NHWC activations (the first dense
layer's canonical NCHW columns are permuted on load and back on export), kernels stored
(kH, kW, in/groups, out) and (in, out), the spec's explicit padding as Keras' "same" where
that is exactly the same (``same_padding``) and otherwise a ``ZeroPadding2D`` before a "valid"
convolution (Keras' "same" pads asymmetrically when the stride is above 1)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from common import spec as S
from common.backend import ARTIFACT_INPUT, ARTIFACT_OUTPUT, channels_last_input, check_finite_input, checked_labels
from common.io import atomic_folder, atomic_path
from common.machine import has_avx512
from common.weights import WeightsError, build_recipe, channels_last_converters, check_arrays, resolve_weights

from . import CAPABILITIES
from ._framework import device_name, keras, replica_scope, replica_strategy, resolve_device, tf
from ._layers import AdaptiveAvgPool2d, LocalResponseNorm, SeededDropout

_SPEC_ATTR = "alexnet_spec"
_DEVICE_ATTR = "alexnet_device"
_STRATEGY_ATTR = "alexnet_strategy"
PAD_SUFFIX = "_pad"


def same_padding(layer: S.Conv2d) -> bool:
    """Whether Keras' padding="same" is exactly the spec's explicit zero padding, for every input
    size: stride 1 and an odd kernel padded by (k - 1) / 2 on each side. (With a stride above 1,
    "same" pads by an amount that depends on the input size, and asymmetrically.) Such a
    convolution runs as one op instead of a Pad and a "valid" convolution: oneDNN pads inside
    its kernel, and the backward pass has no Pad gradient to slice."""
    return layer.stride == (1, 1) and all(k % 2 == 1 and p == (k - 1) // 2
                                          for k, p in zip(layer.kernel_size, layer.padding))


def needs_pad_layer(layer: S.Conv2d) -> bool:
    """Whether the convolution is preceded by a ``ZeroPadding2D`` (named ``<conv>_pad``)."""
    return any(layer.padding) and not same_padding(layer)


def _native_layer(layer: S.Layer, index: int) -> list:
    """The Keras layers that compute one spec layer, in order; the last one is named after it."""
    name = layer.name
    if isinstance(layer, S.Conv2d):
        (ph, pw) = layer.padding
        pad = [keras.layers.ZeroPadding2D(((ph, ph), (pw, pw)), name=name + PAD_SUFFIX)] if needs_pad_layer(layer) else []
        return pad + [keras.layers.Conv2D(
            layer.out_channels, layer.kernel_size, strides=layer.stride,
            padding="same" if same_padding(layer) else "valid",
            groups=layer.groups, kernel_initializer="zeros", bias_initializer="zeros", name=name,
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
    """A functional model for ``spec``, its variables created on ``device`` (a tf.device string), or
    mirrored over the replicas when ``configure_replicas`` set up a strategy."""
    names = {layer.name for layer in spec.layers}
    for layer in spec.layers:
        if isinstance(layer, S.Conv2d) and layer.name + PAD_SUFFIX in names:
            raise ValueError(f"spec layer name {layer.name + PAD_SUFFIX!r} clashes with the padding layer of {layer.name!r}")
    channels, (height, width) = spec.in_channels, spec.input_size
    with replica_scope(), tf.device(device):
        inputs = keras.Input(shape=(height, width, channels), name="image")
        x = inputs
        for index, layer in enumerate(spec.layers):
            for native in _native_layer(layer, index):
                x = native(x)
        model = keras.Model(inputs, x, name=f"alexnet_{spec.name}")
    setattr(model, _SPEC_ATTR, spec)
    setattr(model, _DEVICE_ATTR, device)
    setattr(model, _STRATEGY_ATTR, replica_strategy())
    return model


def strategy_of(model):
    """The ``tf.distribute`` strategy the model's variables are mirrored by (None: plain variables)."""
    return getattr(model, _STRATEGY_ATTR, None)


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
            if isinstance(layer, S.Conv2d) and needs_pad_layer(layer):
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


def params(model) -> tuple[Param, ...]:
    """Every parameter in canonical (common.weights.expected_shapes) order."""
    memo = cache(model)
    if "params" not in memo:
        spec = spec_of(model)
        converters = channels_last_converters(spec)
        result = []
        for layer in spec.weighted_layers():
            native = model.get_layer(layer.name)
            for leaf, variable in (("weight", native.kernel), ("bias", native.bias)):
                result.append(Param(f"{layer.name}.{leaf}", variable, *converters[f"{layer.name}.{leaf}"]))
        memo["params"] = tuple(result)
    return memo["params"]


def xla_by_default(device: str) -> bool:
    """Whether training-mode functions (the train step, ``loss_and_grads``) are XLA-compiled by
    default on ``device`` (a tf.device string). On a CPU by its features: with AVX-512 oneDNN's
    plain graph trains faster, on an AVX2-only CPU XLA does (docs/notes.md); both are reproducible
    run to run. On a GPU, where XLA usually pays by fusing the elementwise work."""
    return "GPU" in device.upper() or not has_avx512()


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


# --------------------------------------------------------------------------- public functions

def build(spec: S.ModelSpec | None = None, *, num_classes: int | None = None, weights=None, seed: int = 0,
          device: str = "auto"):
    """A ``keras.Model`` for ``spec`` (default: the book's AlexNet) on ``device`` ('auto', 'cpu', 'gpu'),
    its parameters set to ``weights`` (canonical mapping or .npz path) or ``init_weights(spec, seed)``."""
    # Check the weights before building anything: a bad file fails fast and cheaply.
    spec, canonical = build_recipe(spec, num_classes=num_classes, weights=weights, seed=seed)
    resolved = resolve_device(device)
    model = build_keras(spec, device_name(resolved))
    _assign(model, canonical)
    return model


def model_spec(model) -> S.ModelSpec:
    return spec_of(model)


def as_input(model, x) -> np.ndarray:
    """``x`` as float32 NHWC numpy at the spec's size, shape checked (an NCHW array is named as such)."""
    return channels_last_input(x, spec_of(model), "alexnet_tf")


def forward(model, x, *, training: bool = False, capture: bool = False):
    """Logits as numpy for NHWC float32 ``x``; with ``capture``, also every spec layer's output
    by name (NHWC for images; 2-D after Flatten, whose columns are in (H, W, C) order:
    ``flatten_tf == flatten_nchw[:, common.weights.nhwc_flatten_permutation(spec)]``)."""
    x = as_input(model, x)
    check_finite_input(x)
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
    x = as_input(model, x)
    check_finite_input(x)
    labels = checked_labels(labels, spec_of(model).num_classes, len(x))
    with tf.device(device_of(model)):
        loss, grads = compiled_loss_and_grads(model)(tf.convert_to_tensor(x), tf.convert_to_tensor(labels))
    return float(loss), {p.name: p.to_canonical(g.numpy()) for p, g in zip(params(model), grads)}


# ------------------------------------------------------------------ native checkpoints

NATIVE_SUFFIX = CAPABILITIES.native_suffixes[0]  # Keras insists on it


def save_native(model, path) -> Path:
    """Keras' own weights file (``model.save_weights``); the name must end in .weights.h5."""
    path = Path(path)
    if not path.name.endswith(NATIVE_SUFFIX):
        raise ValueError(f"{path}: Keras weights files end in {NATIVE_SUFFIX}")
    with atomic_path(path) as tmp:  # the temporary name keeps the .weights.h5 ending Keras insists on
        model.save_weights(str(tmp))
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


# ------------------------------------------------------------------ deployable artifacts

SAVED_MODEL = "alexnet" + CAPABILITIES.export_endings[0]  # a folder: alexnet_savedmodel


def export_artifacts(model, folder) -> list[Path]:
    """The deployable artifact: ``folder/alexnet_savedmodel``, a TensorFlow SavedModel (a folder,
    TF Serving's format) for any batch size, in inference mode (dropout off), on any device.

    Its ``serving_default`` signature takes ``input``: float32 NHWC (batch, H, W, C) at the spec's
    size, TensorFlow's own layout (as ``tf.image`` decodes images), and returns ``{"logits": ...}``::

        tf.saved_model.load(path).signatures["serving_default"](input=tf.constant(x))["logits"]

    Only the inference graph and the variables are saved, in a plain ``tf.Module``: no Keras
    object or layer class of this project, so loading needs TensorFlow alone. Written beside the
    target and renamed (``common.io.atomic_folder``).
    """
    spec = spec_of(model)
    signature = tf.TensorSpec((None, *spec.input_size, spec.in_channels), tf.float32, name=ARTIFACT_INPUT)

    @tf.function(input_signature=[signature])
    def serve(x):
        return {ARTIFACT_OUTPUT: run(model, x, training=False)}

    module = tf.Module()
    module.weights = [v.value for v in model.weights]  # tracked, so the SavedModel holds them
    module.serve = serve
    path = Path(folder) / SAVED_MODEL
    with atomic_folder(path) as tmp:
        tf.saved_model.save(module, str(tmp), signatures={"serving_default": serve})
    return [path]
