"""The ONNX graph built from ``spec.layers``, run by ONNX Runtime; weights in and out; .onnx files.

One node (or a few, for adaptive pooling) per spec layer, every size from the spec or from
``common.shapes``; the parameters are the graph's initializers under their canonical names
and in the canonical layout (ONNX's Conv and Gemm(transB=1) take PyTorch's), so moving
weights in and out is a copy. The batch dimension is symbolic ("batch"): one graph serves
every batch size. Dropout is the identity (inference only).

ONNX has no adaptive average pooling; it is written exactly with PyTorch's bins (row i
averages rows [floor(i*H/out), ceil((i+1)*H/out))): one AveragePool along an axis whose bins
all have one size k and start at multiples of one stride s, and per-bin
Slice + ReduceMean + Concat along an axis whose bins do not (e.g. 5 -> 6: sizes 1,2,2,2,2,1).
A bin is a rectangle, so averaging rows then columns is the rectangle's mean.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common import spec as S
from common.backend import ARTIFACT_INPUT, ARTIFACT_OUTPUT, DeviceError, check_finite_input
from common.errors import first_line
from common.io import atomic_path
from common.shapes import infer
from common.weights import DTYPE, WeightsError, build_recipe, check_arrays, expected_shapes, resolve_weights

from ._framework import (OPSET, TensorProto, helper, make_model, make_session, numpy_helper, onnx, resolve_device,
                         session_device)

INPUT, OUTPUT, BATCH = ARTIFACT_INPUT, ARTIFACT_OUTPUT, "batch"  # graph input, output, batch dimension names


class InferenceOnlyError(NotImplementedError, ValueError):
    """A training name called on this inference-only backend. A NotImplementedError for what it is,
    and a ValueError so that the CLI reports it in one line like any other bad request."""


def _refuse(what: str):
    raise InferenceOnlyError(f"alexnet_onnx is inference only (ONNX Runtime runs the graph, it does not train): "
                             f"it has no {what}; train with alexnet_pt, alexnet_tf or alexnet_mx and load the weights")


@dataclass(eq=False)
class OnnxAlexNet:
    """An ONNX ``ModelProto`` built from ``spec`` (its initializers are the parameters) and the
    ONNX Runtime sessions that run it on ``device``, made when first needed: one returning the
    logits, one ("capture") returning every layer's output too."""

    spec: S.ModelSpec
    proto: Any  # onnx.ModelProto
    device: str  # "cpu" or "gpu": what was asked for; parameter_devices says what the session got
    _sessions: dict = field(default_factory=dict, repr=False)

    def session(self, capture: bool = False):
        if capture not in self._sessions:
            outputs = [layer_output(self.spec, layer.name) for layer in self.spec.layers] if capture else [OUTPUT]
            session = make_session(_serialized(self.proto, outputs, self.spec), self.device)
            if session_device(session) != self.device:
                raise DeviceError(f"ONNX Runtime could not put the graph on the {self.device.upper()} "
                                  f"(providers it got: {', '.join(session.get_providers())})")
            self._sessions[capture] = session
        return self._sessions[capture]

    def __repr__(self) -> str:
        return (f"OnnxAlexNet(spec={self.spec.name!r}, input={'x'.join(map(str, self.spec.input_shape))}, "
                f"opset {OPSET}, device={self.device!r})")


# ------------------------------------------------------------------ the graph
def layer_output(spec: S.ModelSpec, name: str) -> str:
    """The graph tensor holding layer ``name``'s output: the layer's name; the classifier's is "logits"."""
    return OUTPUT if name == spec.layers[-1].name else name


def adaptive_bins(size: int, out: int) -> list[tuple[int, int]]:
    """PyTorch's adaptive-pooling bins along one axis: [floor(i*size/out), ceil((i+1)*size/out))."""
    return [((i * size) // out, -((-(i + 1) * size) // out)) for i in range(out)]


def uniform_window(bins: list[tuple[int, int]]) -> tuple[int, int] | None:
    """(kernel, stride) of a plain pooling window giving exactly ``bins``, or None where there is none."""
    kernel = bins[0][1] - bins[0][0]
    stride = bins[1][0] - bins[0][0] if len(bins) > 1 else 1
    if stride < 1 or any((end - start, start) != (kernel, i * stride) for i, (start, end) in enumerate(bins)):
        return None
    return kernel, stride


def _constant(name: str, values) -> Any:
    return helper.make_node("Constant", [], [name], name=name,
                            value=helper.make_tensor(name, TensorProto.INT64, [len(values)], list(values)))


def _adaptive_avg_pool(layer: S.AdaptiveAvgPool2d, x: str, out: str, in_hw: tuple[int, int]) -> list:
    """Nodes computing PyTorch's AdaptiveAvgPool2d exactly for a fixed input size ``in_hw``."""
    bins = [adaptive_bins(size, n) for size, n in zip(in_hw, layer.output_size)]
    windows = [uniform_window(b) for b in bins]
    if all(windows):  # one window fits both axes (e.g. 12x12 -> 6x6: 2x2, stride 2; 7 -> 6: 2, stride 1)
        (kh, sh), (kw, sw) = windows
        return [helper.make_node("AveragePool", [x], [out], name=layer.name, kernel_shape=[kh, kw],
                                 strides=[sh, sw], pads=[0, 0, 0, 0], ceil_mode=0)]
    nodes, current = [], x
    for axis, (axis_bins, window) in enumerate(zip(bins, windows)):
        target = out if axis == 1 else f"{layer.name}/rows"
        prefix = f"{layer.name}/{'rows' if axis == 0 else 'cols'}"
        if window is not None:  # this axis alone is uniform: a window one pixel wide along the other
            kernel, stride = [1, 1], [1, 1]
            kernel[axis], stride[axis] = window
            nodes.append(helper.make_node("AveragePool", [current], [target], name=prefix, kernel_shape=kernel,
                                          strides=stride, pads=[0, 0, 0, 0], ceil_mode=0))
        else:
            means = []
            for i, (start, end) in enumerate(axis_bins):
                ends, starts, axes = f"{prefix}{i}/ends", f"{prefix}{i}/starts", f"{prefix}{i}/axes"
                nodes += [_constant(starts, [start]), _constant(ends, [end]), _constant(axes, [2 + axis]),
                          helper.make_node("Slice", [current, starts, ends, axes], [f"{prefix}{i}/bin"],
                                           name=f"{prefix}{i}/slice"),
                          helper.make_node("ReduceMean", [f"{prefix}{i}/bin"], [f"{prefix}{i}/mean"],
                                           name=f"{prefix}{i}/mean", axes=[2 + axis], keepdims=1)]
                means.append(f"{prefix}{i}/mean")
            nodes.append(helper.make_node("Concat", means, [target], name=f"{prefix}/concat", axis=2 + axis))
        current = target
    return nodes


def _native_layer(layer, x: str, out: str, in_shape: tuple[int, ...]) -> list:
    """The ONNX nodes of one spec layer, reading tensor ``x`` (NCHW) and writing ``out``."""
    if isinstance(layer, S.Conv2d):
        (ph, pw) = layer.padding
        return [helper.make_node("Conv", [x, f"{layer.name}.weight", f"{layer.name}.bias"], [out], name=layer.name,
                                 kernel_shape=list(layer.kernel_size), strides=list(layer.stride),
                                 pads=[ph, pw, ph, pw], group=layer.groups, dilations=[1, 1])]
    if isinstance(layer, S.MaxPool2d):
        return [helper.make_node("MaxPool", [x], [out], name=layer.name, kernel_shape=list(layer.kernel_size),
                                 strides=list(layer.stride), pads=[0, 0, 0, 0], ceil_mode=0)]
    if isinstance(layer, S.ReLU):
        return [helper.make_node("Relu", [x], [out], name=layer.name)]
    if isinstance(layer, S.LocalResponseNorm):
        # ONNX divides alpha by size inside the sum, as PyTorch and the spec do: no conversion
        # (tests/test_backend_onnx.py checks it at an alpha where a factor of size would show).
        return [helper.make_node("LRN", [x], [out], name=layer.name, size=layer.size, alpha=float(layer.alpha),
                                 beta=float(layer.beta), bias=float(layer.k))]
    if isinstance(layer, S.AdaptiveAvgPool2d):
        return _adaptive_avg_pool(layer, x, out, in_shape[2:])
    if isinstance(layer, S.Flatten):
        return [helper.make_node("Flatten", [x], [out], name=layer.name, axis=1)]  # (C, H, W) order: canonical
    if isinstance(layer, S.Dense):
        return [helper.make_node("Gemm", [x, f"{layer.name}.weight", f"{layer.name}.bias"], [out], name=layer.name,
                                 transB=1)]  # canonical (out, in) weight: y = x W^T + b
    if isinstance(layer, S.Dropout):
        return [helper.make_node("Identity", [x], [out], name=layer.name)]  # inference: dropout is the identity
    raise TypeError(f"alexnet_onnx has no builder for layer kind {type(layer).__name__} ({layer!r})")


def _value_info(name: str, shape: tuple[int, ...]):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [BATCH, *shape[1:]])


def build_proto(spec: S.ModelSpec, weights: dict[str, np.ndarray]):
    """The ONNX model of ``spec`` with ``weights`` (canonical, already checked) as initializers."""
    rows = infer(spec)  # output shapes of every layer, batch 1, NCHW
    nodes, x = [], INPUT
    in_shape = (1, *spec.input_shape)
    for layer, row in zip(spec.layers, rows):
        out = layer_output(spec, layer.name)
        nodes += _native_layer(layer, x, out, in_shape)
        x, in_shape = out, row.shape
    initializers = [numpy_helper.from_array(np.ascontiguousarray(weights[name], DTYPE), name)
                    for name in expected_shapes(spec)]
    hidden = [_value_info(layer_output(spec, layer.name), row.shape) for layer, row in zip(spec.layers[:-1], rows)]
    graph = helper.make_graph(
        nodes, f"alexnet_{spec.name}", [_value_info(INPUT, (1, *spec.input_shape))],
        [_value_info(OUTPUT, rows[-1].shape)], initializer=initializers, value_info=hidden,
        doc_string=f"AlexNet ({spec.name}) built from common.spec; input {INPUT} float32 NCHW "
                   f"({BATCH}, {', '.join(map(str, spec.input_shape))}); output {OUTPUT} ({BATCH}, {spec.num_classes})")
    return make_model(graph)


def _serialized(proto, outputs: list[str], spec: S.ModelSpec) -> bytes:
    """``proto`` as bytes with ``outputs`` as the graph's outputs (their types from the value infos):
    the capture session sees every layer; the ModelProto itself is left as it was, and its
    weights are not copied twice in memory."""
    if outputs == [OUTPUT]:
        return proto.SerializeToString()
    graph = proto.graph
    infos = {info.name: info for info in [*graph.value_info, *graph.output]}
    saved = list(graph.output)
    try:
        del graph.output[:]
        graph.output.extend(infos[name] for name in outputs)
        return proto.SerializeToString()
    finally:
        del graph.output[:]
        graph.output.extend(saved)


# ------------------------------------------------------------------ the contract
def build(spec: S.ModelSpec | None = None, *, num_classes: int | None = None, weights: Any = None,
          seed: int = 0, device: str = "auto") -> OnnxAlexNet:
    """The ONNX graph of ``spec`` (default: the book's AlexNet), to run on ``device``.

    Its initializers are ``weights`` (canonical mapping or .npz path, checked first) or
    ``common.weights.init_weights(spec, seed)``: the numbers every backend starts from.
    """
    spec, canonical = build_recipe(spec, num_classes=num_classes, weights=weights, seed=seed)
    target = resolve_device(device)
    return OnnxAlexNet(spec, build_proto(spec, canonical), target)


def model_spec(model: OnnxAlexNet) -> S.ModelSpec:
    if not isinstance(model, OnnxAlexNet):
        raise TypeError(f"not a model built by alexnet_onnx.build: {type(model).__name__}")
    return model.spec


def parameter_devices(model: OnnxAlexNet) -> set[str]:
    """{'cpu'} or {'gpu'}: the execution provider ONNX Runtime really gave the session (it keeps
    the initializers where the nodes using them run), not the device that was asked for."""
    return {session_device(model.session())}


def param_counts(model: OnnxAlexNet) -> dict[str, int]:
    """Parameters per spec layer, counted from the graph's initializers (their declared dims)."""
    spec = model_spec(model)
    counts = {layer.name: 0 for layer in spec.layers}
    for initializer in model.proto.graph.initializer:
        counts[initializer.name.rpartition(".")[0]] += int(np.prod(initializer.dims, dtype=np.int64))
    return counts


def export_weights(model: OnnxAlexNet) -> dict[str, np.ndarray]:
    """Canonical name -> float32 numpy copy of each initializer (the layout is the canonical one)."""
    return {init.name: numpy_helper.to_array(init).astype(DTYPE, copy=True) for init in model.proto.graph.initializer}


def load_weights(model: OnnxAlexNet, weights: Any) -> None:
    """Replace every initializer with canonical weights (mapping or .npz path), checked first."""
    spec = model_spec(model)
    model.proto = build_proto(spec, resolve_weights(spec, weights))
    model._sessions.clear()


def as_input(model: OnnxAlexNet, x: Any) -> np.ndarray:
    spec = model_spec(model)
    array = np.ascontiguousarray(x, dtype=DTYPE)
    if array.ndim != 4 or tuple(array.shape[1:]) != spec.input_shape:
        raise ValueError(
            f"this model takes NCHW input (N, {', '.join(map(str, spec.input_shape))}), got {tuple(array.shape)}; "
            f"build it with spec.with_input(C, H, W) for another size"
        )
    return array


def forward(model: OnnxAlexNet, x: Any, *, training: bool = False, capture: bool = False):
    """Logits (numpy); with ``capture``, also every spec layer's output (NCHW, or 2-D once flat),
    each a graph output of the capture session."""
    if training:
        _refuse("training mode (dropout is the identity in this graph)")
    inputs = as_input(model, x)
    check_finite_input(inputs)
    spec = model_spec(model)
    if not capture:
        return model.session().run([OUTPUT], {INPUT: inputs})[0]
    names = [layer.name for layer in spec.layers]
    values = model.session(capture=True).run([layer_output(spec, name) for name in names], {INPUT: inputs})
    activations = dict(zip(names, values))
    return activations[names[-1]].copy(), activations


def save_native(model: OnnxAlexNet, path: str | os.PathLike) -> Path:
    """The .onnx file: the whole graph with its weights, runnable by any ONNX Runtime (no project
    code needed), written atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        onnx.save_model(model.proto, str(tmp))
    return path


def export_artifacts(model: OnnxAlexNet, folder: str | os.PathLike) -> list[Path]:
    """The deployable artifact: ``folder/alexnet.onnx``, this graph (``save_native``'s file)."""
    return [save_native(model, Path(folder) / "alexnet.onnx")]


def load_native(model: OnnxAlexNet, path: str | os.PathLike) -> None:
    """Set the weights from an .onnx file's initializers (``save_native``'s format).

    Every name, shape and dtype is checked before the model is touched; a mismatch raises
    ``WeightsError`` naming the file and each problem. External-data files are refused: this
    reads one self-contained file and nothing beside it.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such ONNX file")
    try:
        proto = onnx.load_model(str(path), load_external_data=False)
    except Exception as error:  # DecodeError and friends: not a protobuf ModelProto
        raise WeightsError(f"{path}: not a loadable ONNX model ({type(error).__name__}: {first_line(error)})") from None
    external = [init.name for init in proto.graph.initializer if init.data_location == TensorProto.EXTERNAL]
    if external:
        raise WeightsError(f"{path}: {', '.join(external)} stored in external data files; "
                           f"only self-contained .onnx files are read")
    spec = model_spec(model)
    arrays = {init.name: numpy_helper.to_array(init) for init in proto.graph.initializer}
    check_arrays(spec, expected_shapes(spec), arrays, source=str(path))
    load_weights(model, arrays)


# ------------------------------------------------------------------ training: not here
class Trainer:
    """Present for the contract; this backend does not train."""

    def __init__(self, *args, **kwargs):
        _refuse("Trainer")


def make_trainer(model, *, lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
    _refuse("make_trainer")


def loss_and_grads(model, x, labels):
    _refuse("loss_and_grads (no gradients)")


def fit(model, *args, **kwargs):
    _refuse("fit")
