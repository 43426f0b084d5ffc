"""The native Gluon model: the spec turned into a HybridBlock, running it, everything that reads
or writes its weights, and Gluon's own checkpoints."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from common.backend import ARTIFACT_INPUT, check_finite_input, checked_labels
from common.errors import first_line
from common.io import atomic_path, atomic_paths
from common.shapes import conv_in_channels, dense_in_features
from common.spec import (
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
from common.weights import WeightsError, build_recipe, check_arrays, resolve_weights

from . import CAPABILITIES
from ._framework import mx, replica_contexts, resolve_device

gluon = mx.gluon
nn = mx.gluon.nn


def parameter_devices(model) -> set[str]:
    """Where the parameters really are: {'cpu'}, {'gpu'}, or both if something went wrong."""
    return {ctx.device_type for p in model.collect_params().values() for ctx in p.list_ctx()}


# ------------------------------------------------------------------ blocks


class _LocalResponseNorm(gluon.HybridBlock):
    """Across-channel LRN, PyTorch's definition: b = a / (k + alpha/n * sum over the window of a^2)^beta,
    the window running from c - n//2 to c + (n-1)//2 with zeros beyond the edges.

    Written from primitives (square, zero padding across channels, a sum of ``size`` shifted
    slices, power), not with MXNet's own ``LRN`` operator: on oneDNN (the pip wheel's CPU path),
    ``LRN``'s backward behind a oneDNN convolution gives input gradients about 1e-4 off, which left
    conv1's and conv2's gradients of the paper's network up to 6.4e-4 from the float64 oracle
    (found by the parity suite; every layer alone, and the whole net with MXNET_MKLDNN_ENABLED=0,
    agree to ~4e-7). The window sum was first an average ``Pooling`` over the channels reshaped
    into rows; behind the oneDNN convolution, in the whole hybridized graph at batch >= 2, oneDNN
    then refused it ("could not create a descriptor for a pooling forward propagation
    primitive"): the paper's network ran layer by layer (the parity suite's forward) and at batch
    1 only, and its exported symbol failed at batch 2."""

    def __init__(self, layer: LocalResponseNorm, **kwargs):
        super().__init__(**kwargs)
        self._size, self._alpha, self._beta, self._k = layer.size, float(layer.alpha), float(layer.beta), float(layer.k)

    def hybrid_forward(self, F, x):
        before, after, last = self._size // 2, (self._size - 1) // 2, self._size - 1
        squares = F.square(x)
        zeros = F.zeros_like(F.slice_axis(squares, axis=1, begin=0, end=1))
        padded = F.concat(*([zeros] * before + [squares] + [zeros] * after), dim=1)  # (N, C + size - 1, H, W)
        # channel c's window is padded[c : c + size]: the sum of the size slices padded[j : j + C]
        window_sum = F.add_n(*[F.slice_axis(padded, axis=1, begin=j, end=(j - last) or None)
                               for j in range(self._size)])
        scale = window_sum * (self._alpha / self._size) + self._k
        return x / (scale ** self._beta)


class _AdaptiveAvgPool2d(gluon.HybridBlock):
    def __init__(self, layer: AdaptiveAvgPool2d, **kwargs):
        super().__init__(**kwargs)
        self._output_size = tuple(layer.output_size)

    def hybrid_forward(self, F, x):
        return F.contrib.AdaptiveAvgPooling2D(x, output_size=self._output_size)


def _native_layer(layer, in_channels: dict[str, int], fan_in: dict[str, int]):
    """One Gluon block for one spec layer; every size comes from the spec or common.shapes."""
    prefix = f"{layer.name}_"
    if isinstance(layer, Conv2d):
        return nn.Conv2D(
            layer.out_channels, layer.kernel_size, strides=layer.stride, padding=layer.padding,
            groups=layer.groups, in_channels=in_channels[layer.name], layout="NCHW", prefix=prefix,
        )
    if isinstance(layer, MaxPool2d):
        return nn.MaxPool2D(pool_size=layer.kernel_size, strides=layer.stride, padding=0, prefix=prefix)
    if isinstance(layer, ReLU):
        return nn.Activation("relu", prefix=prefix)
    if isinstance(layer, LocalResponseNorm):
        return _LocalResponseNorm(layer, prefix=prefix)
    if isinstance(layer, AdaptiveAvgPool2d):
        return _AdaptiveAvgPool2d(layer, prefix=prefix)
    if isinstance(layer, Flatten):  # (C, H, W) order: Gluon's Flatten is NCHW, as the spec's
        return nn.Flatten(prefix=prefix)
    if isinstance(layer, Dense):  # the input is already 2-D: the spec's Flatten is the only flatten
        return nn.Dense(layer.out_features, in_units=fan_in[layer.name], flatten=False, prefix=prefix)
    if isinstance(layer, Dropout):
        return nn.Dropout(layer.rate, prefix=prefix)
    raise TypeError(f"alexnet_mx has no block for spec layer {type(layer).__name__} ({layer!r})")


class AlexNet(gluon.HybridBlock):
    """A spec's layers as named children (``conv1`` ... ``fc8``), applied in order.

    Children are registered under the spec's layer names, so the Gluon parameter names are
    ``conv1_weight`` and the structural names in a ``.params`` file are ``conv1.weight``.
    """

    def __init__(self, spec: ModelSpec):
        super().__init__(prefix="")
        self.spec = spec
        in_channels, fan_in = conv_in_channels(spec), dense_in_features(spec)
        self.layer_blocks: list[tuple[str, gluon.HybridBlock]] = []
        with self.name_scope():
            for layer in spec.layers:
                block = _native_layer(layer, in_channels, fan_in)
                self.register_child(block, layer.name)
                self.layer_blocks.append((layer.name, block))

    @property
    def ctx(self):
        """The first context holding the parameters (the first replica's, with several)."""
        return self.contexts[0]

    @property
    def contexts(self) -> list:
        """Every context holding a copy of the parameters (one per replica)."""
        return next(iter(self.collect_params().values())).list_ctx()

    def hybrid_forward(self, F, x):
        for _, block in self.layer_blocks:
            x = block(x)
        return x

    def weighted(self):
        """(spec layer name, block) of every layer that holds parameters, in model order."""
        weighted = {layer.name for layer in self.spec.weighted_layers()}
        return [(name, block) for name, block in self.layer_blocks if name in weighted]


def _check_model(model) -> AlexNet:
    if not isinstance(model, AlexNet):
        raise TypeError(f"expected a model from alexnet_mx.build(), got {type(model).__name__}")
    return model


# ------------------------------------------------------------------ public functions


def build(spec: ModelSpec | None = None, *, num_classes: int | None = None, weights=None, seed: int = 0,
          device: str = "auto") -> AlexNet:
    """A hybridized Gluon AlexNet for ``spec`` on ``device``, set to ``weights`` or ``init_weights(spec, seed)``;
    after ``configure_replicas(N)``, with a copy of every parameter on each replica's context."""
    spec, canonical = build_recipe(spec, num_classes=num_classes, weights=weights, seed=seed)
    contexts = replica_contexts(resolve_device(device))
    model = AlexNet(spec)
    model.initialize(mx.init.Zero(), ctx=contexts)  # every shape is known: nothing is deferred
    _set_weights(model, canonical)
    model.hybridize(static_alloc=True, static_shape=True)
    return model


def model_spec(model) -> ModelSpec:
    return _check_model(model).spec


def as_input(model: AlexNet, x) -> "mx.nd.NDArray":
    if isinstance(x, mx.nd.NDArray):
        x = x.as_in_context(model.ctx)
        return x if x.dtype == np.float32 else x.astype("float32")
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 4 or tuple(x.shape[1:]) != model.spec.input_shape:
        raise ValueError(
            f"this model takes NCHW input (N, {', '.join(map(str, model.spec.input_shape))}), got {tuple(x.shape)}; "
            f"build it with spec.with_input(...) for another size"
        )
    return mx.nd.array(x, ctx=model.ctx, dtype="float32")


def forward(model, x, *, training: bool = False, capture: bool = False):
    """Logits as numpy; with capture=True, (logits, {layer name: NCHW or 2-D output}).

    capture runs the layers one by one, and the logits are the last layer's output, so both
    paths agree exactly with the whole hybridized graph (checked in tests).
    """
    model = _check_model(model)
    data = as_input(model, x)
    check_finite_input(data.asnumpy())
    scope = mx.autograd.train_mode() if training else mx.autograd.predict_mode()
    with scope:
        if not capture:
            return model(data).asnumpy()
        activations = {}
        for name, block in model.layer_blocks:
            data = block(data)
            activations[name] = data.asnumpy()
    return activations[model.layer_blocks[-1][0]], activations


def param_counts(model) -> dict[str, int]:
    """Parameters per spec layer (0 for layers without any), counted from the Gluon parameters."""
    model = _check_model(model)
    return {
        name: int(sum(int(np.prod(p.shape)) for p in block.collect_params().values()))
        for name, block in model.layer_blocks
    }


def _canonical_params(model: AlexNet) -> dict[str, "gluon.Parameter"]:
    """Canonical name -> Gluon parameter. Gluon's layouts are the canonical ones: conv (O, I/g, kH, kW),
    dense (out, in) with NCHW-flattened input columns, so no transposes or permutations."""
    params = {}
    for name, block in model.weighted():
        params[f"{name}.weight"] = block.weight
        params[f"{name}.bias"] = block.bias
    return params


def _set_weights(model: AlexNet, canonical: dict[str, np.ndarray]) -> None:
    ctx = model.ctx
    for name, param in _canonical_params(model).items():
        param.set_data(mx.nd.array(canonical[name], ctx=ctx, dtype="float32"))


def load_weights(model, weights) -> None:
    """Set every parameter from canonical weights (mapping or .npz path), checked before anything changes."""
    model = _check_model(model)
    canonical = resolve_weights(model.spec, weights)
    _set_weights(model, canonical)


def export_weights(model) -> dict[str, np.ndarray]:
    model = _check_model(model)
    return {name: param.data(model.ctx).asnumpy().astype(np.float32, copy=False)
            for name, param in _canonical_params(model).items()}


def _labels(labels, ctx) -> "mx.nd.NDArray":
    if isinstance(labels, mx.nd.NDArray):
        return labels.as_in_context(ctx).astype("float32")
    return mx.nd.array(np.asarray(labels), ctx=ctx, dtype="float32")


def loss_and_grads(model, x, labels) -> tuple[float, dict[str, np.ndarray]]:
    """Mean softmax cross-entropy and its gradients (canonical names and layout), in training mode."""
    model = _check_model(model)
    data = as_input(model, x)
    check_finite_input(data.asnumpy())
    labels = labels.asnumpy() if isinstance(labels, mx.nd.NDArray) else labels
    target = _labels(checked_labels(labels, model.spec.num_classes, data.shape[0]), model.ctx)
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    with mx.autograd.record(train_mode=True):
        loss = loss_fn(model(data), target).mean()
    loss.backward()
    grads = {name: param.grad(model.ctx).asnumpy() for name, param in _canonical_params(model).items()}
    return float(loss.asscalar()), grads


# ------------------------------------------------------------------ native checkpoints


def save_native(model, path) -> Path:
    """Gluon's own ``.params`` format (``save_parameters``), written atomically."""
    model = _check_model(model)
    path = Path(path)
    with atomic_path(path) as tmp:
        model.save_parameters(str(tmp))
    return path


# HybridBlock.export's .params keys (export_artifacts writes them too): "arg:" or "aux:" + a parameter's name
EXPORT_ARG, EXPORT_AUX = "arg:", "aux:"


def read_params(path, *, named: str = "named parameters") -> dict[str, "mx.nd.NDArray"]:
    """Every array of an MXNet ``.params`` file (``mx.nd.save``'s format: ``save_parameters``,
    ``HybridBlock.export``, the Gluon model zoo) by name, as NDArrays. A file MXNet cannot
    read, or one of unnamed arrays, is one WeightsError naming the file (``named``: what was wanted)."""
    try:
        loaded = mx.nd.load(str(path))
    except mx.base.MXNetError as error:
        raise WeightsError(f"{path}: not a readable MXNet .params file ({first_line(error)})") from None
    if not isinstance(loaded, dict):
        raise WeightsError(f"{path}: holds unnamed arrays, not {named}")
    return loaded


def write_params(path, arrays) -> Path:
    """Named numpy ``arrays`` as an MXNet ``.params`` file (``mx.nd.save``), written atomically."""
    path = Path(path)
    native = {name: mx.nd.array(value, dtype=np.asarray(value).dtype) for name, value in arrays.items()}
    with atomic_path(path) as tmp:
        mx.nd.save(str(tmp), native)
    return path


read_container, write_container = read_params, write_params  # the Gluon zoo's container (common.zoo)


def load_native(model, path) -> None:
    """Read a ``.params`` file from ``save_native`` (``save_parameters``' names, ``conv1.weight``) or
    from ``export_artifacts`` / ``HybridBlock.export`` (``arg:`` + each parameter's name,
    ``arg:conv1_weight``); every name and shape is checked before any is set."""
    model = _check_model(model)
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such Gluon .params file")
    loaded = read_params(path, named="a Gluon .params file from save_parameters")
    expected, source = model._collect_params_with_prefix(), str(path)
    if any(key.startswith((EXPORT_ARG, EXPORT_AUX)) for key in loaded):  # an export's: the graph's arguments
        expected = {f"{EXPORT_ARG}{param.name}": param for param in expected.values()}
        source = f"{path} (the parameters of an MXNet export)"
    check_arrays(model.spec, {name: tuple(p.shape) for name, p in expected.items()}, loaded, source=source)
    ctx = model.ctx
    for name, param in expected.items():
        param.set_data(loaded[name].as_in_context(ctx))


# ------------------------------------------------------------------ deployable artifacts

SYMBOL_ENDING, PARAMS_ENDING = CAPABILITIES.export_endings  # "-symbol.json", "-0000.params": HybridBlock.export's names


def inference_symbol(model, input_name: str = ARTIFACT_INPUT) -> "mx.sym.Symbol":
    """The network as an MXNet symbol on an input variable named ``input_name``, with no Dropout
    node at all: inference is the only mode it has, whatever ``autograd`` mode a consumer is in."""
    model = _check_model(model)
    x = mx.sym.var(input_name)
    for _, block in model.layer_blocks:
        if not isinstance(block, nn.Dropout):
            x = block(x)
    return x


def export_artifacts(model, folder) -> list[Path]:
    """The deployable artifacts: ``folder/alexnet-symbol.json`` (the graph) and
    ``folder/alexnet-0000.params`` (its weights), the two files ``HybridBlock.export`` writes and
    ``SymbolBlock.imports`` reads, for any batch size::

        mx.gluon.SymbolBlock.imports("alexnet-symbol.json", ["input"], "alexnet-0000.params")

    Written from ``inference_symbol`` rather than by ``HybridBlock.export``, which names the
    input ``data`` and keeps the Dropout nodes (off only while autograd is not recording): here
    the input is ``input``, as in every artifact of this project, and dropout is not in the
    graph. Input float32 NCHW (batch, C, H, W) at the spec's size; one output, the logits.
    Both files are written to temporaries first and renamed together at the end
    (``common.io.atomic_paths``): both appear, or neither.
    """
    model = _check_model(model)
    symbol = inference_symbol(model)
    arguments = set(symbol.list_arguments()) - {ARTIFACT_INPUT}
    params = {name: param for name, param in model.collect_params().items() if name in arguments}
    if set(params) != arguments:  # pragma: no cover - every argument but the input is a parameter
        raise RuntimeError(f"graph arguments without parameters: {sorted(arguments - set(params))}")
    folder = Path(folder)
    symbol_path, params_path = folder / ("alexnet" + SYMBOL_ENDING), folder / ("alexnet" + PARAMS_ENDING)
    with atomic_paths(symbol_path, params_path) as (symbol_tmp, params_tmp):
        symbol.save(str(symbol_tmp))
        mx.nd.save(str(params_tmp), {f"arg:{name}": param.data(model.ctx).copyto(mx.cpu())
                                      for name, param in params.items()})
    return [symbol_path, params_path]
