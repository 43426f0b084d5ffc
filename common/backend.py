"""The contract every backend module (alexnet_pt, alexnet_tf, alexnet_mx) fulfils.

A user switches framework by changing one import; these names mean the same in each.
Shared behaviour that needs no framework (the layer-summary table, device choice,
import errors) lives here once and the backends call it.
"""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from typing import Any, Mapping, Protocol

import numpy as np

from . import shapes
from .report import format_table
from .spec import ModelSpec

BACKENDS = {"pt": "alexnet_pt", "tf": "alexnet_tf", "mx": "alexnet_mx"}
# The public names of every backend module (its __all__ starts with these): one import switches framework.
CONTRACT = (
    "NAME", "FRAMEWORK", "LAYOUT", "Trainer", "build", "disable_tf32", "export_weights", "fit", "forward",
    "gpu_available", "layer_summary", "load_native", "load_weights", "loss_and_grads", "make_trainer",
    "model_spec", "param_counts", "parameter_devices", "save_native",
)
DEVICES = ("auto", "cpu", "gpu")


@dataclass(frozen=True)
class SpeedUp:
    """A framework-specific speed-up: a ``make_trainer`` keyword of one backend, named as its
    Trainer's ``options`` name it. Each backend switches on by default what is fastest and
    correct on the device; ``alexnet train``/``compare``/``bench`` take ``--on``/``--off``."""

    name: str
    backend: str
    keyword: str
    what: str


SPEED_UPS = {s.name: s for s in (
    SpeedUp("channels_last", "pt", "channels_last", "channels-last memory format (oneDNN / cuDNN NHWC kernels)"),
    SpeedUp("compile", "pt", "compile", "torch.compile of the forward pass"),
    SpeedUp("xla", "tf", "jit_compile", "XLA-compiled train step (tf.function(jit_compile=True)); default on "
                                        "a GPU, off on CPU (slower there)"),
    SpeedUp("hybridize", "mx", "hybridize", "hybridize(static_alloc=True, static_shape=True)"),
)}


def speed_up_choices() -> str:
    """The speed-up names and their backends, for error messages: "channels_last (pt), ..."."""
    return ", ".join(f"{s.name} ({s.backend})" for s in SPEED_UPS.values())


def trainer_keywords(backend: str, speed_ups: Mapping[str, bool]) -> dict[str, bool]:
    """``make_trainer`` keywords of ``backend`` for ``speed_ups`` (speed-up name -> on/off);
    a name that is unknown or belongs to another backend is an error naming it."""
    keywords = {}
    for name, on in speed_ups.items():
        speed_up = SPEED_UPS.get(name)
        if speed_up is None:
            raise ValueError(f"unknown speed-up {name!r}; choose from {speed_up_choices()}")
        if speed_up.backend != backend:
            raise ValueError(f"speed-up {name!r} belongs to backend {speed_up.backend}, not {backend}")
        keywords[speed_up.keyword] = bool(on)
    return keywords


class DeviceError(RuntimeError):
    """A device was asked for that this machine or framework build does not have."""


class Trainer(Protocol):
    """One model's optimizer and compiled steps. Built by ``backend.make_trainer``.

    Semantics are PyTorch's SGD in every backend: loss is the batch-mean softmax cross
    entropy; g = grad + weight_decay * w; buf = momentum * buf + g; w -= lr * buf.
    """

    def prepare(self, images: np.ndarray) -> Any:
        """uint8 (N, 28, 28) -> normalised float input at the spec's size, on the model's device,
        in the backend's layout (resize and normalisation as ``common.data.preprocess``)."""

    def train_step(self, x: Any, labels: np.ndarray, *, seed: int) -> tuple[float, int]:
        """One SGD step; returns (mean loss, correct predictions). Dropout masks depend only on
        ``seed``, so a resumed run repeats an uninterrupted one."""

    def eval_step(self, x: Any, labels: np.ndarray) -> tuple[float, int]:
        """Inference mode; returns (summed loss, correct predictions)."""

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """Momentum buffers by canonical parameter name and layout (empty without momentum)."""

    def load_optimizer_state(self, state: Mapping[str, np.ndarray]) -> None: ...


class Backend(Protocol):
    NAME: str  # "pt", "tf" or "mx"
    FRAMEWORK: str  # "PyTorch", "TensorFlow", "MXNet"
    LAYOUT: str  # "NCHW" or "NHWC"

    def build(self, spec: ModelSpec | None = None, *, num_classes: int | None = None,
              weights: Any = None, seed: int = 0, device: str = "auto") -> Any:
        """A native model for ``spec`` (default: the book's AlexNet), its parameters set to
        ``weights`` (canonical mapping or .npz path) or to ``common.weights.init_weights(spec, seed)``."""

    def model_spec(self, model: Any) -> ModelSpec: ...

    def forward(self, model: Any, x: np.ndarray, *, training: bool = False,
                capture: bool = False) -> Any:
        """Logits as numpy; with capture=True, (logits, {layer name: output}) in the backend's layout."""

    def disable_tf32(self) -> None:
        """Full float32 on GPUs whose default is TF32 (parity needs ~1e-6, TF32 gives ~1e-3)."""

    def parameter_devices(self, model: Any) -> set[str]:
        """{'cpu'} or {'gpu'}: read from the native parameters themselves, not from a setting."""

    def param_counts(self, model: Any) -> dict[str, int]:
        """Parameters per spec layer name, counted from the native model's own tensors."""

    def load_weights(self, model: Any, weights: Any) -> None:
        """Set every parameter from canonical weights (mapping or .npz path); checked first, so a
        bad file changes nothing."""

    def export_weights(self, model: Any) -> dict[str, np.ndarray]: ...

    def loss_and_grads(self, model: Any, x: np.ndarray, labels: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
        """Mean cross-entropy and its gradient per parameter (canonical names and layout), in
        training mode (dropout as the spec says: build with ``spec.with_dropout(0)`` to compare)."""

    def layer_summary(self, model: Any, input_shape: tuple[int, ...], *, print_table: bool = True) -> list["LayerRow"]: ...

    def make_trainer(self, model: Any, *, lr: float, momentum: float = 0.0, weight_decay: float = 0.0) -> Trainer: ...


def load_backend(name: str) -> Backend:
    """``"pt"`` -> the alexnet_pt module, with an error that names the choices."""
    try:
        module_name = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}") from None
    return importlib.import_module(module_name)  # type: ignore[return-value]


def require_framework(module: str, extra: str, framework: str):
    """Import a framework, or raise an ImportError that says which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"{framework} is not installed, so this backend cannot load ({error}). "
            f"Install it with: pip install 'alexnet-three[{extra}]'"
        ) from error


def choose_device(requested: str, gpu_available: bool, framework: str) -> str:
    """'auto' -> 'gpu' when the framework sees one, else 'cpu'; 'gpu' without one is an error."""
    if requested not in DEVICES:
        raise DeviceError(f"device must be one of {', '.join(DEVICES)}, got {requested!r}")
    if requested == "gpu" and not gpu_available:
        raise DeviceError(
            f"--device gpu was asked for, but {framework} sees no GPU on this machine "
            f"(or this {framework} build has no GPU support); use --device cpu or auto"
        )
    if requested == "auto":
        return "gpu" if gpu_available else "cpu"
    return requested


@dataclass(frozen=True)
class LayerRow:
    name: str
    kind: str
    shape: tuple[int, ...]  # measured on the native model, in the backend's layout
    params: int  # counted from the native model's tensors


def shared_functions(module_name: str):
    """``layer_summary`` and ``fit`` for the backend module ``module_name``: written once, here
    and in ``common.train``, and bound to each backend so users call them on the module."""

    def bound_layer_summary(model, input_shape, *, print_table: bool = True) -> list[LayerRow]:
        """Per-layer output shapes (in this backend's layout) and parameter counts, measured on the native model."""
        return layer_summary(sys.modules[module_name], model, input_shape, print_table=print_table)

    def fit(model, data=None, **options):
        """Train ``model`` with the shared loop, ``common.train.fit`` (same batches and records in every backend)."""
        from .train import fit as shared_fit

        return shared_fit(sys.modules[module_name], model, data, **options)

    bound_layer_summary.__name__ = "layer_summary"
    return bound_layer_summary, fit


def to_spec_input(input_shape: tuple[int, ...], layout: str) -> tuple[int, tuple[int, int, int]]:
    """(batch, (C, H, W)) from a 4-D shape given in ``layout``."""
    if len(input_shape) != 4:
        raise ValueError(f"input shape must have 4 dims in {layout} order (batch first), got {tuple(input_shape)}")
    n, *rest = input_shape
    c, h, w = rest if layout == "NCHW" else (rest[2], rest[0], rest[1])
    return n, (c, h, w)


def layer_summary(backend: Backend, model: Any, input_shape: tuple[int, ...], *, print_table: bool = True) -> list[LayerRow]:
    """Run zeros of ``input_shape`` (the backend's layout) through the native model layer by layer.

    Shapes and parameter counts come from the framework itself, not from ``common.shapes``:
    that is what makes comparing them with ``common.shapes`` a test.
    """
    spec = backend.model_spec(model)
    batch, chw = to_spec_input(tuple(input_shape), backend.LAYOUT)
    if chw != spec.input_shape:
        shapes.infer(spec, chw)  # a clear error first if the input cannot pass at all
        raise ValueError(
            f"this model was built for inputs {'x'.join(map(str, spec.input_shape))} (C x H x W); "
            f"build it with spec.with_input({', '.join(map(str, chw))}) for {'x'.join(map(str, chw))}"
        )
    _, activations = backend.forward(model, np.zeros(input_shape, np.float32), capture=True)
    counts = backend.param_counts(model)
    rows = [
        LayerRow(layer.name, type(layer).__name__, tuple(activations[layer.name].shape), counts.get(layer.name, 0))
        for layer in spec.layers
    ]
    if print_table:
        print(f"{backend.FRAMEWORK} AlexNet ({spec.name}), input {'x'.join(map(str, input_shape))} {backend.LAYOUT}")
        print(format_table(
            ["layer", "kind", f"output ({backend.LAYOUT})", "params"],
            [(r.name, r.kind, r.shape, r.params) for r in rows],
            footer=("total", "", "", sum(r.params for r in rows)),
        ))
    return rows


__all__ = [
    "BACKENDS", "CONTRACT", "DEVICES", "Backend", "DeviceError", "LayerRow", "Trainer", "choose_device",
    "layer_summary", "load_backend", "require_framework", "shared_functions", "to_spec_input",
]
