"""The native Flax model: spec -> a ``flax.linen`` module (NHWC) and its parameters on a
device, running it, weights in and out (the conversions between Flax's parameter layouts and
the canonical PyTorch layout), Flax's own checkpoints (msgpack, no pickle) and ``jax.export``.

Flax-specific facts handled here and nowhere else: NHWC activations (the first dense layer's
canonical NCHW columns are permuted on load and back on export), kernels stored (kH, kW,
in/groups, out) and (in, out), the spec's padding given to ``nn.Conv`` explicitly (Flax's
default is "SAME"), and mixed precision as the module's ``dtype`` with float32 parameters."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from common import spec as S
from common.backend import channels_last_input, check_finite_input, checked_labels
from common.io import atomic_path
from common.weights import DTYPE, WeightsError, build_recipe, channels_last_converters, check_arrays, resolve_weights

from . import CAPABILITIES
from ._framework import device_of_kind, flax_serialization, jax, jnp, nn, replica_mesh
from ._layers import adaptive_avg_pool, local_response_norm


def _native_layer(layer: S.Layer, dtype) -> Callable:
    """One spec layer as a function ``(x, training) -> y``; layers with parameters are Flax modules
    named after the spec layer (created inside the parent's compact ``__call__``)."""
    if isinstance(layer, S.Conv2d):
        (ph, pw) = layer.padding
        conv = nn.Conv(layer.out_channels, layer.kernel_size, strides=layer.stride, padding=((ph, ph), (pw, pw)),
                       feature_group_count=layer.groups, dtype=dtype, param_dtype=jnp.float32, name=layer.name)
        return lambda x, training: conv(x)
    if isinstance(layer, S.MaxPool2d):
        return lambda x, training: nn.max_pool(x, layer.kernel_size, strides=layer.stride, padding="VALID")
    if isinstance(layer, S.ReLU):
        return lambda x, training: nn.relu(x)
    if isinstance(layer, S.LocalResponseNorm):
        return lambda x, training: local_response_norm(x, layer.size, layer.alpha, layer.beta, layer.k)
    if isinstance(layer, S.AdaptiveAvgPool2d):
        return lambda x, training: adaptive_avg_pool(x, layer.output_size)
    if isinstance(layer, S.Flatten):
        return lambda x, training: x.reshape(x.shape[0], -1)
    if isinstance(layer, S.Dense):
        dense = nn.Dense(layer.out_features, dtype=dtype, param_dtype=jnp.float32, name=layer.name)
        return lambda x, training: dense(x)
    if isinstance(layer, S.Dropout):
        dropout = nn.Dropout(layer.rate, name=layer.name)
        return lambda x, training: dropout(x, deterministic=not training)
    raise TypeError(f"alexnet_jax has no builder for spec layer kind {type(layer).__name__} ({layer!r})")


class AlexNetModule(nn.Module):
    """The spec's layers in order, computing in ``dtype`` (float32 parameters whatever it is).
    Called with ``capture=True`` it also returns every spec layer's output by name."""

    spec: S.ModelSpec
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, training: bool = False, capture: bool = False):
        captured = {}
        x = x.astype(self.dtype)
        for layer in self.spec.layers:
            x = _native_layer(layer, self.dtype)(x, training)
            captured[layer.name] = x
        return (x, captured) if capture else x


class AlexNet:
    """A Flax AlexNet: the spec, its module, and its parameters (``params``: Flax's tree,
    {layer: {"kernel", "bias"}}) placed on one device, or replicated over the replicas' mesh."""

    def __init__(self, spec: S.ModelSpec, device: str, placement):
        self.spec, self.device, self.placement = spec, device, placement
        self.params: dict | None = None
        self.draws = 0  # training-mode forwards outside a trainer take dropout keys 0, 1, 2 ...

    def __repr__(self) -> str:
        return f"alexnet_jax.AlexNet({self.spec.name!r}, input {self.spec.input_shape}, on {self.device})"


def model_spec(model: AlexNet) -> S.ModelSpec:
    if not isinstance(model, AlexNet):
        raise TypeError(f"{model!r} was not built by alexnet_jax.build")
    return model.spec


def parameter_devices(model: AlexNet) -> set[str]:
    """Where the parameters really are: {'cpu'}, {'gpu'}, or both if something went wrong."""
    return {"cpu" if d.platform == "cpu" else "gpu" for leaf in jax.tree.leaves(model.params) for d in leaf.devices()}


# ----------------------------------------------------------------------- parameters

@dataclass(frozen=True)
class Param:
    """One canonical parameter and where Flax's tree holds it."""

    name: str  # canonical, e.g. "conv1.weight"
    layer: str
    leaf: str  # "kernel" or "bias"
    to_native: Callable[[np.ndarray], np.ndarray]
    to_canonical: Callable[[np.ndarray], np.ndarray]


@functools.lru_cache(maxsize=None)
def params_table(spec: S.ModelSpec) -> tuple[Param, ...]:
    """Every parameter in canonical (common.weights.expected_shapes) order."""
    converters = channels_last_converters(spec)
    table = []
    for layer in spec.weighted_layers():
        for canonical, leaf in (("weight", "kernel"), ("bias", "bias")):
            name = f"{layer.name}.{canonical}"
            table.append(Param(name, layer.name, leaf, *converters[name]))
    return tuple(table)


def native_tree(spec: S.ModelSpec, canonical, placement) -> dict:
    """Canonical arrays (by canonical name) -> Flax's parameter tree, placed on ``placement``."""
    tree: dict = {}
    for p in params_table(spec):
        tree.setdefault(p.layer, {})[p.leaf] = p.to_native(np.asarray(canonical[p.name], DTYPE))
    return jax.device_put(tree, placement)


def canonical_arrays(spec: S.ModelSpec, tree) -> dict[str, np.ndarray]:
    """Flax's tree (parameters, gradients or momentum buffers) -> canonical float32 numpy by name."""
    return {p.name: p.to_canonical(np.asarray(tree[p.layer][p.leaf], DTYPE)) for p in params_table(spec)}


def param_counts(model: AlexNet) -> dict[str, int]:
    """Parameters per spec layer, counted from the arrays in Flax's tree."""
    return {layer.name: sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(model.params.get(layer.name, {})))
            for layer in model.spec.layers}


# --------------------------------------------------------------------------- public functions

def _placement(device: str):
    """Where a new model's parameters go: replicated over the replicas' mesh, or one device."""
    mesh = replica_mesh()
    if mesh is not None:
        from jax.sharding import NamedSharding, PartitionSpec

        return NamedSharding(mesh, PartitionSpec())
    return device_of_kind(device)


def build(spec: S.ModelSpec | None = None, *, num_classes: int | None = None, weights=None, seed: int = 0,
          device: str = "auto") -> AlexNet:
    """A Flax AlexNet for ``spec`` (default: the book's AlexNet) on ``device`` ('auto', 'cpu', 'gpu'),
    its parameters set to ``weights`` (canonical mapping or .npz path) or ``init_weights(spec, seed)``."""
    spec, canonical = build_recipe(spec, num_classes=num_classes, weights=weights, seed=seed)
    placement = _placement(device)
    first = next(iter(placement.device_set)) if hasattr(placement, "device_set") else placement
    model = AlexNet(spec, "cpu" if first.platform == "cpu" else "gpu", placement)
    model.params = native_tree(spec, canonical, placement)
    return model


def load_weights(model: AlexNet, weights) -> None:
    """Set every parameter from canonical weights (mapping or .npz path), checked against the
    model's spec first: weights that do not fit raise ``WeightsError`` and change nothing."""
    model.params = native_tree(model.spec, resolve_weights(model_spec(model), weights), model.placement)


def export_weights(model: AlexNet) -> dict[str, np.ndarray]:
    """Canonical weights (PyTorch layout, NCHW flatten order), float32."""
    return canonical_arrays(model_spec(model), model.params)


def as_input(model, x) -> np.ndarray:
    """``x`` as float32 NHWC numpy at the spec's size, shape checked (an NCHW array is named as such)."""
    return channels_last_input(x, model_spec(model), "alexnet_jax")


def as_labels(labels, classes: int, batch: int) -> np.ndarray:
    """Class labels by the one rule (``common.backend.checked_labels``), as the int32 JAX indexes with."""
    return checked_labels(labels, classes, batch).astype(np.int32)


def cross_entropy(logits, labels):
    """Per-example softmax cross entropy in float32 (labels: integer class indices)."""
    logits = logits.astype(jnp.float32)
    return jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]


def correct_count(logits, labels):
    return jnp.sum(jnp.argmax(logits, axis=-1) == labels)


def apply(module: AlexNetModule, params, x, *, training: bool, key=None, capture: bool = False):
    """The module on ``x`` with parameters ``params``; ``key`` draws the dropout masks in training mode."""
    rngs = {"dropout": key} if training and key is not None else None
    return module.apply({"params": params}, x, training=training, capture=capture, rngs=rngs)


@functools.lru_cache(maxsize=64)
def _jitted(spec: S.ModelSpec, what: str, training: bool = False, capture: bool = False) -> Callable:
    """One jitted function per network and kind, shared by every model of that network (no
    recompilation for a new model of the same spec): "forward" or "loss_and_grads"."""
    module = AlexNetModule(spec)
    if what == "forward":
        return jax.jit(lambda params, x, key: apply(module, params, x, training=training, key=key, capture=capture))

    def loss(params, x, labels, key):
        return jnp.mean(cross_entropy(apply(module, params, x, training=True, key=key), labels))
    return jax.jit(jax.value_and_grad(loss))


def _next_key(model: AlexNet):
    model.draws += 1
    return jax.random.key(model.draws - 1)


def forward(model: AlexNet, x, *, training: bool = False, capture: bool = False):
    """Logits as numpy for NHWC float32 ``x``; with ``capture``, also every spec layer's output
    by name (NHWC for images; 2-D after Flatten, whose columns are in (H, W, C) order:
    ``flatten_jax == flatten_nchw[:, common.weights.nhwc_flatten_permutation(spec)]``)."""
    x = as_input(model, x)
    check_finite_input(x)
    out = _jitted(model_spec(model), "forward", training, capture)(model.params, x,
                                                                   _next_key(model) if training else None)
    if capture:
        logits, captured = out  # a dict comes back from jit with its keys sorted: the spec's order again
        return np.asarray(logits), {layer.name: np.asarray(captured[layer.name]) for layer in model.spec.layers}
    return np.asarray(out)


def loss_and_grads(model: AlexNet, x, labels) -> tuple[float, dict[str, np.ndarray]]:
    """Mean softmax cross entropy and its gradients in canonical names and layout, in training
    mode (dropout as the spec says)."""
    x = as_input(model, x)
    check_finite_input(x)
    labels = as_labels(labels, model.spec.num_classes, len(x))
    value, grads = _jitted(model.spec, "loss_and_grads")(model.params, x, labels, _next_key(model))
    return float(value), canonical_arrays(model.spec, grads)


# ------------------------------------------------------------------ native checkpoints

NATIVE_SUFFIX = CAPABILITIES.native_suffixes[0]


def save_native(model: AlexNet, path) -> Path:
    """Flax's own checkpoint: the parameter tree as msgpack (``flax.serialization.to_bytes``), written atomically."""
    path = Path(path)
    data = flax_serialization.to_bytes(jax.tree.map(np.asarray, model.params))
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def _flat(tree, prefix: str = "") -> dict[str, Any]:
    """A nested msgpack tree -> {"layer/leaf": value}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        flat.update(_flat(value, name + "/") if isinstance(value, dict) else {name: value})
    return flat


def load_native(model: AlexNet, path) -> None:
    """Load a file written by ``save_native`` (msgpack: no code runs). Every name, shape and dtype
    is checked against the model before anything is loaded; a mismatch raises naming the file."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such Flax checkpoint file")
    try:
        tree = flax_serialization.msgpack_restore(path.read_bytes())
        if not isinstance(tree, dict):
            raise ValueError(f"expected a tree of arrays, got {type(tree).__name__}")
        stored = _flat(tree)
    except Exception as error:  # msgpack's own errors: ExtraData, UnpackValueError, ValueError ...
        raise WeightsError(f"{path}: not a readable Flax msgpack checkpoint ({type(error).__name__})") from None
    expected = {f"{layer}/{leaf}": tuple(value.shape) for layer, leaves in model.params.items()
                for leaf, value in leaves.items()}
    check_arrays(model.spec, expected, {k: np.asarray(v) for k, v in stored.items()}, source=str(path))
    model.params = jax.device_put(jax.tree.map(np.asarray, tree), model.placement)


# ------------------------------------------------------------------ deployable artifacts

EXPORTED = "alexnet" + CAPABILITIES.export_endings[0]


def export_artifacts(model: AlexNet, folder) -> list[Path]:
    """The deployable artifact: ``folder/alexnet.jax_exported``, a serialized ``jax.export`` program
    (StableHLO, the weights inside as constants) for any batch size, in inference mode, on the CPU
    (and CUDA GPUs where this JAX can lower for them)::

        jax.export.deserialize(bytearray(open(path, "rb").read())).call(x)   # x: float32 NHWC

    Loading needs JAX alone, no Flax and no project code."""
    import jax.export  # a submodule JAX does not import by itself

    spec = model_spec(model)
    module, params = AlexNetModule(spec), jax.tree.map(np.asarray, model.params)
    batch = jax.export.symbolic_shape("batch")
    signature = jax.ShapeDtypeStruct((*batch, *spec.input_size, spec.in_channels), jnp.float32)
    serve = jax.jit(lambda x: apply(module, params, x, training=False))
    try:
        exported = jax.export.export(serve, platforms=("cpu", "cuda"))(signature)
    except Exception:  # a JAX without CUDA lowering rules: the CPU alone
        exported = jax.export.export(serve, platforms=("cpu",))(signature)
    data = exported.serialize()
    path = Path(folder) / EXPORTED
    with atomic_path(path) as tmp:
        tmp.write_bytes(bytes(data))
    return [path]
