"""The contract every backend module fulfils, and the registry of backends (``BACKENDS``).

A user switches framework by changing one import; these names mean the same in each.
Shared behaviour that needs no framework (the layer-summary table, device choice,
import errors) lives here once and the backends call it. This is the one file of ``common``
that names backends: everything else reads the registry and each backend's ``Capabilities``.
"""
from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Protocol

import numpy as np

from . import shapes
from .replicas import ReplicaEngine, check_replicas
from .report import format_table
from .spec import ModelSpec

BACKENDS = {"pt": "alexnet_pt", "tf": "alexnet_tf", "mx": "alexnet_mx", "jax": "alexnet_jax", "onnx": "alexnet_onnx"}
# The public names of every backend module (its __all__ starts with these): one import switches framework.
# The last four serve the bench: the framework's own matmul peak, waiting for the device, memory, build.
CONTRACT = (
    "CAPABILITIES", "NAME", "FRAMEWORK", "LAYOUT", "Trainer", "build", "disable_tf32", "export_weights", "fit",
    "forward", "gpu_available", "gpu_status", "layer_summary", "load_native", "load_weights", "loss_and_grads",
    "make_trainer", "model_spec", "param_counts", "parameter_devices", "save_native", "set_math_mode",
    "matmul_products", "synchronize", "peak_device_memory", "runtime_info",
)
DEVICES = ("auto", "cpu", "gpu")
# Training precisions: fp32, or mixed precision with float32 master weights. A backend's
# Capabilities.precisions says which of these it has.
PRECISIONS = ("fp32", "bf16", "fp16")
# Float32 math on GPUs: strict fp32, or TF32 tensor cores (10 mantissa bits) where the GPU has them.
MATH_MODES = ("fp32", "tf32")
# The names of an exported artifact's input (float32 NCHW, any batch size) and output (the logits).
ARTIFACT_INPUT, ARTIFACT_OUTPUT = "input", "logits"
# Thread-count variables every framework's math libraries read (OpenMP, MKL, OpenBLAS); a backend's
# ``Capabilities.thread_variables`` adds its framework's own.
THREAD_COUNT_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
# Variables of the OpenMP runtimes that change how any framework threads (recorded by the bench).
OPENMP_VARIABLES = ("KMP_AFFINITY", "KMP_BLOCKTIME")


@dataclass(frozen=True)
class Artifact:
    """A deployable file ``alexnet export`` writes, by the ending of its name. ``consumer`` is how
    anyone runs it with the framework alone: Python statements that, given ``path`` (the file) and
    ``INPUT``/``OUTPUT`` (``ARTIFACT_INPUT``/``ARTIFACT_OUTPUT``), define ``run(x)``: float32 numpy
    in the backend's layout -> logits as numpy. Empty for a file read through another one (MXNet's
    params beside its symbol). ``needs``: modules the consumer imports beyond the framework."""

    ending: str
    consumer: str = ""
    needs: tuple[str, ...] = ()


@dataclass(frozen=True)
class SpeedUp:
    """A framework-specific speed-up: a ``make_trainer`` keyword, named as the Trainer's
    ``options`` names it. ``default_on`` lists the devices where the backend switches it on by
    default (what measured fastest and correct there); ``alexnet train``/``compare``/``bench``
    take ``--on``/``--off``."""

    name: str
    keyword: str
    what: str
    default_on: tuple[str, ...] = ()
    devices: tuple[str, ...] = ("cpu", "gpu")  # where it can act at all (the ablation flips it only there)


@dataclass(frozen=True)
class Capabilities:
    """What one backend is and can do, declared once in its face (``alexnet_xx/__init__.py``).

    ``common`` reads this record instead of branching on backend names: an unsupported
    precision, math mode, device or speed-up is refused from it before any work starts.
    """

    name: str  # "pt": the --backend value
    framework: str  # "PyTorch"
    extra: str  # the pip extra that installs the framework
    package: str  # the framework's top-level module, looked for (importlib.util.find_spec) without importing it
    layout: str  # "NCHW" or "NHWC": activations and inputs
    precisions: tuple[str, ...]  # training precisions (subset of PRECISIONS)
    math_modes: tuple[str, ...]  # float32 math modes it can switch (subset of MATH_MODES)
    devices: tuple[str, ...]  # "cpu", "gpu"
    speed_ups: tuple[SpeedUp, ...]
    native_suffixes: tuple[str, ...]  # the framework's own checkpoint file endings, first is written
    trains: bool = True  # False for inference-only backends
    # Deployable artifacts ``alexnet export`` writes, through the backend's ``export_artifacts(model,
    # folder)``; each runs with its framework's plain loader (``Artifact.consumer``), no project code.
    exports: tuple[Artifact, ...] = ()
    # Environment variables, set before the framework is imported, that take the thread count
    # (``alexnet bench --threads``), beyond THREAD_COUNT_VARIABLES.
    thread_variables: tuple[str, ...] = ()
    # Other variables that change how the framework threads or computes: recorded by the bench when set.
    recorded_variables: tuple[str, ...] = ()
    # (math mode, variable, value): what the framework must find in the environment when it is
    # imported for that float32 math mode (``math_environment``), where a switch after import cannot act.
    math_variables: tuple[tuple[str, str, str], ...] = ()
    # The variable naming a folder where the framework keeps compiled programs across processes (none:
    # it keeps none); the test suite points it at one folder for the whole run.
    compile_cache_variable: str = ""
    # Model-zoo containers (``common.zoo``) this backend reads and writes, through its
    # ``read_container(path)`` and ``write_container(path, arrays)``.
    containers: tuple[str, ...] = ()
    # The smallest input size the book's own code (``_plain.py``) takes: without a padded first
    # convolution some of the book's networks collapse below it.
    plain_min_input: int = 65
    # The framework's own data-parallel engines (``configure_replicas``); the first is what
    # ``alexnet train --replicas N`` uses on one machine. Empty: one replica only.
    replicas: tuple[ReplicaEngine, ...] = ()
    # (precision, why this backend does not train in it) for precisions of PRECISIONS that the framework
    # has but that could not be made to train here: the refusal gives the reason in its one line.
    precision_gaps: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        for what, values, allowed in (("precisions", self.precisions, PRECISIONS),
                                      ("math_modes", self.math_modes, MATH_MODES),
                                      ("devices", self.devices, ("cpu", "gpu")),
                                      ("layout", (self.layout,), shapes.LAYOUTS)):
            unknown = [v for v in values if v not in allowed]
            if unknown:
                raise ValueError(f"backend {self.name}: unknown {what} {unknown}; allowed {allowed}")
        modes = {math for math, _, _ in self.math_variables}
        if modes - set(MATH_MODES):
            raise ValueError(f"backend {self.name}: math_variables name unknown math modes {sorted(modes - set(MATH_MODES))}")
        gaps = [precision for precision, _ in self.precision_gaps]
        if set(gaps) - set(PRECISIONS) or set(gaps) & set(self.precisions):
            raise ValueError(f"backend {self.name}: precision_gaps {gaps} must name precisions of {PRECISIONS} "
                             f"outside precisions {self.precisions}")

    def check_precision(self, precision: str) -> str:
        if precision not in self.precisions:
            verb = "trains" if self.trains else "runs"
            why = dict(self.precision_gaps).get(precision)
            raise ValueError(f"the {self.framework} backend ({self.name}) {verb} in precision "
                             f"{' or '.join(self.precisions)}, not {precision!r}" + (f": {why}" if why else ""))
        return precision

    @property
    def export_endings(self) -> tuple[str, ...]:
        """The endings of the files ``export_artifacts`` writes, in the record's order."""
        return tuple(artifact.ending for artifact in self.exports)

    def check_math_mode(self, math: str) -> str:
        if math not in self.math_modes:
            raise ValueError(f"the {self.framework} backend ({self.name}) has math mode "
                             f"{' or '.join(self.math_modes)}, not {math!r}")
        return math

    def speed_up(self, name: str) -> SpeedUp:
        for speed_up in self.speed_ups:
            if speed_up.name == name:
                return speed_up
        owner = next((b for b, s in all_speed_ups().items() if name in s), None)
        if owner is not None:
            raise ValueError(f"speed-up {name!r} belongs to backend {owner}, not {self.name}")
        raise ValueError(f"unknown speed-up {name!r}; choose from {speed_up_choices()}")

    def trainer_keywords(self, speed_ups: Mapping[str, bool]) -> dict[str, bool]:
        """``make_trainer`` keywords for ``speed_ups`` (speed-up name -> on/off); a name that is
        unknown or belongs to another backend is an error naming it."""
        return {self.speed_up(name).keyword: bool(on) for name, on in speed_ups.items()}


def _face_path(name: str) -> Path:
    module_name = BACKENDS[name]
    found = importlib.util.find_spec(module_name)  # finds the package without importing it
    if found is None or found.origin is None:
        raise ImportError(f"backend package {module_name} is not on the path")
    return Path(found.origin)


@functools.lru_cache(maxsize=None)
def capabilities(name: str) -> Capabilities:
    """Backend ``name``'s record, as its face declares it, read WITHOUT importing the framework
    (``alexnet --help`` and the bench's parent process never import one). The face's
    ``CAPABILITIES = Capabilities(...)`` is evaluated with only ``Capabilities``, ``SpeedUp``,
    ``ReplicaEngine`` and ``Artifact`` in scope; ``tests/test_layout.py`` checks the result equals the imported module's record."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    path = _face_path(name)
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["CAPABILITIES"]:
            code = compile(ast.Expression(node.value), str(path), "eval")
            return eval(code, {"__builtins__": {}, "Capabilities": Capabilities, "SpeedUp": SpeedUp,
                               "ReplicaEngine": ReplicaEngine, "Artifact": Artifact})
    raise ImportError(f"{path}: declares no CAPABILITIES = Capabilities(...)")


def exporting_backends() -> list[str]:
    """The backends whose record lists deployable artifacts (``Capabilities.exports``)."""
    return [name for name in BACKENDS if capabilities(name).exports]


def training_backends() -> list[str]:
    """The backends whose record says they train (``Capabilities.trains``): what "all" means on the
    command line and in the cross-backend tests, since most commands train or compare training.
    An inference-only backend (onnx) is used where it is named."""
    return [name for name in BACKENDS if capabilities(name).trains]


def all_speed_ups() -> dict[str, dict[str, SpeedUp]]:
    """{backend: {speed-up name: SpeedUp}} for every backend, read from the records."""
    return {name: {s.name: s for s in capabilities(name).speed_ups} for name in BACKENDS}


def speed_up_owner(name: str) -> str:
    """The backend a speed-up name belongs to (names are unique across backends)."""
    for backend, speed_ups in all_speed_ups().items():
        if name in speed_ups:
            return backend
    raise ValueError(f"unknown speed-up {name!r}; choose from {speed_up_choices()}")


def speed_up_choices() -> str:
    """The speed-up names and their backends, for error messages: "channels_last (pt), ..."."""
    return ", ".join(f"{s} ({b})" for b, speed_ups in all_speed_ups().items() for s in speed_ups)


class DeviceError(RuntimeError):
    """A device was asked for that this machine or framework build does not have."""


class Trainer(Protocol):
    """One model's optimizer and compiled steps. Built by ``backend.make_trainer``; everything
    ``common.train`` and the bench call (``TrainerBase`` carries what needs no framework).

    Semantics are PyTorch's SGD in every backend: loss is the batch-mean softmax cross
    entropy; g = grad + weight_decay * w; buf = momentum * buf + g; w -= lr * buf.
    """

    lr: float  # settable between steps (checked_lr's rule)

    @property
    def options(self) -> dict[str, object]:
        """The resolved speed options by speed-up name, and the precision."""

    def agree(self, flag: bool) -> bool:
        """Whether any replica process passes ``flag`` true (all call it at the same step)."""

    def prepare(self, images: np.ndarray) -> Any:
        """uint8 (N, 28, 28) -> normalised float input at the spec's size, on the model's device,
        in the backend's layout (resize and normalisation as ``common.data.preprocess``). The
        images are grey: a spec that takes C channels gets the grey image in each of the C
        (:func:`prepared_reference` states the whole rule in numpy; every backend is tested against it)."""

    def train_step(self, x: Any, labels: np.ndarray, *, seed: int) -> tuple[float, int]:
        """One SGD step; returns (mean loss, correct predictions). Dropout masks depend only on
        ``seed``, so a resumed run repeats an uninterrupted one."""

    def eval_step(self, x: Any, labels: np.ndarray) -> tuple[float, int]:
        """Inference mode; returns (summed loss, correct predictions)."""

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """Momentum buffers by canonical parameter name and layout (empty without momentum)."""

    def load_optimizer_state(self, state: Mapping[str, np.ndarray]) -> None: ...


class Backend(Protocol):
    CAPABILITIES: Capabilities
    NAME: str  # CAPABILITIES.name: the registry's key (BACKENDS)
    FRAMEWORK: str  # CAPABILITIES.framework: the framework's own name
    LAYOUT: str  # CAPABILITIES.layout: "NCHW" or "NHWC"

    def build(self, spec: ModelSpec | None = None, *, num_classes: int | None = None,
              weights: Any = None, seed: int = 0, device: str = "auto") -> Any:
        """A native model for ``spec`` (default: the book's AlexNet), its parameters set to
        ``weights`` (canonical mapping or .npz path) or to ``common.weights.init_weights(spec, seed)``."""

    def model_spec(self, model: Any) -> ModelSpec: ...

    def forward(self, model: Any, x: np.ndarray, *, training: bool = False,
                capture: bool = False) -> Any:
        """Logits as numpy; with capture=True, (logits, {layer name: output}) in the backend's layout."""

    def disable_tf32(self) -> None:
        """Full float32 on GPUs whose default is TF32 (parity needs ~1e-6, TF32 gives ~1e-3): ``set_math_mode("fp32")``."""

    def set_math_mode(self, math: str) -> None:
        """"fp32" (strict) or "tf32" (tensor cores for float32 convolutions and matmuls), on GPUs."""

    def gpu_status(self) -> "GpuStatus":
        """Whether a small convolution forward and backward runs on the GPU (cached per process), and why not."""

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

    # What the bench needs from each framework (in ``_framework.py``):
    def matmul_products(self, n: int, device: str, precision: str) -> dict[str, Any]:
        """{op name: a callable doing one n x n x n product on ``device`` and waiting for it}."""

    def synchronize(self, device: str) -> None:
        """Wait until all work queued on ``device`` so far has finished."""

    def peak_device_memory(self, device: str) -> int | None:
        """Bytes of device memory at the peak (None on CPU)."""

    def runtime_info(self, device: str) -> dict[str, Any]:
        """Framework version, threads, libraries; GPU name and CUDA/cuDNN versions on a GPU."""


def prepared_reference(images: np.ndarray, spec: ModelSpec, layout: str) -> np.ndarray:
    """What ``Trainer.prepare(images)`` returns in every backend, as float32 numpy: the one rule.

    ``common.data.preprocess`` at the spec's input size (scale, bilinear resize, normalise),
    then, the images being grey, that one channel repeated ``spec.in_channels`` times (as
    torchvision's ``Grayscale(num_output_channels=C)``: the paper's 3-channel AlexNet trains
    on Fashion-MNIST too), in ``layout`` ("NCHW" or "NHWC")."""
    from .data import preprocess  # lazily: data is needed only by training

    if layout not in shapes.LAYOUTS:
        raise ValueError(f"layout must be one of {shapes.LAYOUTS}, got {layout!r}")
    x = np.repeat(preprocess(images, spec.input_size), spec.in_channels, axis=1)
    return x if layout == "NCHW" else np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def check_finite_input(x) -> None:
    """Refuse an input holding NaN or infinity, in every backend the same way: some frameworks' pooling
    and ReLU kernels drop a NaN and return plausible logits, which a reference implementation must not.
    ``x``: anything numpy reads (a backend passes its own tensors' values as numpy)."""
    values = np.asarray(x)
    if np.issubdtype(values.dtype, np.inexact):
        bad = int(values.size - np.count_nonzero(np.isfinite(values)))
        if bad:
            raise ValueError(f"the input holds {bad:,} non-finite value(s) (NaN or infinity); every backend "
                             "refuses them (some frameworks' kernels would hide a NaN)")


def checked_labels(labels, num_classes: int, batch: int) -> np.ndarray:
    """Class labels as int64, by one rule in every backend: one per example, whole numbers in
    [0, num_classes) (a framework may otherwise index out of range, truncate 1.7 to 1, or return a
    finite loss for label 10)."""
    values = np.asarray(labels)
    if values.ndim != 1 or len(values) != batch:
        raise ValueError(f"labels must be one per example: expected shape ({batch},), got {values.shape}")
    if not (np.issubdtype(values.dtype, np.integer) or
            (np.issubdtype(values.dtype, np.floating) and np.isfinite(values).all()
             and np.array_equal(values, np.round(values)))):
        raise ValueError(f"labels must be whole class numbers, got dtype {values.dtype} {values[:5].tolist()}")
    if len(values) and (values.min() < 0 or values.max() >= num_classes):
        wrong = sorted({int(v) for v in values if not 0 <= v < num_classes})
        raise ValueError(f"labels must be in 0..{num_classes - 1}, got {wrong[:5]}")
    return values.astype(np.int64)


def channels_last_input(x, spec: ModelSpec, package: str) -> np.ndarray:
    """``x`` as float32 NHWC numpy at ``spec``'s size for a channels-last backend (``package`` names it in
    the error); an array of the NCHW shape is refused with the transpose that fixes it."""
    x = np.asarray(x, dtype=np.float32)
    expected = (*spec.input_size, spec.in_channels)
    if x.ndim != 4 or x.shape[1:] != expected:
        hint = ""
        if x.ndim == 4 and x.shape[1:] == spec.input_shape:
            hint = f" It looks like NCHW: {package} takes NHWC (transpose with x.transpose(0, 2, 3, 1))."
        raise ValueError(f"expected an input of shape (N, {', '.join(map(str, expected))}) in NHWC for spec "
                         f"{spec.name!r}, got {x.shape}.{hint}")
    return x


def _is_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float, np.floating, np.integer))


# The largest learning rate: the largest float32, since every framework keeps its lr in float32.
LR_MAX = float(np.finfo(np.float32).max)


def checked_lr(value) -> float:
    """The learning rate, by one rule everywhere (``make_trainer``, ``Trainer.lr``, ``fit``, the CLI):
    a finite number > 0 (NaN or infinity would ruin the weights at the next step) that float32 holds
    (a larger one fails inside a framework's optimizer, after the run has started)."""
    if not (_is_number(value) and np.isfinite(value) and value > 0):
        raise ValueError(f"lr must be a positive number, got {value!r}")
    if value > LR_MAX:
        raise ValueError(f"lr must be at most {LR_MAX:.4g} (float32's largest: every framework keeps it in float32), "
                         f"got {value!r}")
    return float(value)


def checked_momentum(value) -> float:
    """Momentum in [0, 1): 1 or more makes the buffers grow without bound."""
    if not (_is_number(value) and np.isfinite(value) and 0 <= value < 1):
        raise ValueError(f"momentum must be in [0, 1), got {value!r}")
    return float(value)


def checked_weight_decay(value) -> float:
    """Weight decay: a finite number >= 0."""
    if not (_is_number(value) and np.isfinite(value) and value >= 0):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {value!r}")
    return float(value)


class TrainerBase:
    """What every backend's Trainer shares, written once: the hyper-parameters checked by one rule,
    the precision checked against the record, and the protocol's ``options``, ``lr`` and ``agree``
    on top of three small hooks each backend writes in its framework's terms: ``_read_lr``,
    ``_write_lr`` and ``_any_process`` (only called with several processes)."""

    CAPABILITIES: Capabilities  # the backend's record (a class attribute of the subclass)
    group: Any  # the ReplicaGroup the subclass sets up (common.replicas)

    def __init__(self, model: Any, *, lr: float, momentum: float, weight_decay: float, precision: str,
                 replicas: int):
        self.model = model
        checked_lr(lr)
        self.momentum, self.weight_decay = checked_momentum(momentum), checked_weight_decay(weight_decay)
        self.precision = self.CAPABILITIES.check_precision(precision)
        self.replicas = check_replicas(replicas)

    @property
    def options(self) -> dict[str, object]:
        """The speed options in effect (defaults resolved), by speed-up name, and the precision:
        what ``alexnet bench`` records and a resumed run must share."""
        return {**{s.name: getattr(self, s.keyword) for s in self.CAPABILITIES.speed_ups}, "precision": self.precision}

    @property
    def lr(self) -> float:
        return self._read_lr()

    @lr.setter
    def lr(self, value: float) -> None:
        """Change the learning rate of the next steps (a schedule), momentum buffers untouched."""
        self._write_lr(checked_lr(value))

    def agree(self, flag: bool) -> bool:
        """Whether any process of the replica group passes ``flag`` true (every process calls this at
        the same step): one stop decision for all; with one process, ``flag`` itself."""
        return bool(flag) if self.group.processes == 1 else self._any_process(bool(flag))

    def _read_lr(self) -> float:
        raise NotImplementedError

    def _write_lr(self, value: float) -> None:
        raise NotImplementedError

    def _any_process(self, flag: bool) -> bool:
        raise NotImplementedError


def load_backend(name: str) -> Backend:
    """``"pt"`` -> the alexnet_pt module, with an error that names the choices."""
    try:
        module_name = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}") from None
    return importlib.import_module(module_name)  # type: ignore[return-value]


def require_framework(module: str, capabilities: Capabilities):
    """Import a backend's framework module, or raise an ImportError that says which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"{capabilities.framework} is not installed, so this backend cannot load ({error}). "
            f"Install it with: pip install 'alexnet-three[{capabilities.extra}]'"
        ) from error


@dataclass(frozen=True)
class GpuStatus:
    """Whether a framework can really compute on a GPU here, proven by running a small
    convolution forward and backward on it (a device count alone says nothing about kernels:
    MXNet 1.9.1's CUDA wheels count a GPU newer than their kernels and cannot run a single kernel on it)."""

    usable: bool
    detail: str  # the GPU's name when usable, else the reason it is not
    present: bool = False  # the framework sees a GPU device, usable or not


_fallback_warned: set[str] = set()


def choose_device(requested: str, status: GpuStatus, framework: str) -> str:
    """'auto' -> 'gpu' when the framework can compute on one, else 'cpu' ('auto' with a GPU present
    but unusable says why, once, on stderr); 'gpu' without a usable one is a DeviceError with the reason."""
    if requested not in DEVICES:
        raise DeviceError(f"device must be one of {', '.join(DEVICES)}, got {requested!r}")
    if requested == "gpu" and not status.usable:
        raise DeviceError(f"--device gpu was asked for, but {framework} cannot compute on a GPU here: "
                          f"{status.detail}; use --device cpu or auto")
    if requested == "auto":
        if status.usable:
            return "gpu"
        if status.present and framework not in _fallback_warned:
            _fallback_warned.add(framework)
            print(f"warning: {framework} runs on the CPU: {status.detail}", file=sys.stderr)
        return "cpu"
    return requested


def device_helpers(gpu_status, set_math_mode, framework: str):
    """A backend's ``gpu_available``, ``disable_tf32`` and ``resolve_device``, made from its own
    ``gpu_status`` and ``set_math_mode``: the same three in every backend, written once."""

    def gpu_available() -> bool:
        """Whether the framework can compute on a GPU here (``gpu_status`` says why not)."""
        return gpu_status().usable

    def disable_tf32() -> None:
        """Full float32 on GPUs whose default is TF32 (parity needs ~1e-6; TF32 keeps 10 mantissa bits)."""
        set_math_mode("fp32")

    def resolve_device(device: str) -> str:
        """'auto' | 'cpu' | 'gpu' -> 'cpu' or 'gpu' on this machine (``choose_device``'s rule)."""
        return choose_device(device, gpu_status(), framework)

    return gpu_available, disable_tf32, resolve_device


TF32_OVERRIDE = "NVIDIA_TF32_OVERRIDE"  # "0": cuBLAS and cuDNN refuse TF32, whatever a framework asks


def math_environment(math: str) -> dict[str, str]:
    """Environment variables that fix the float32 math mode in a process about to import a
    framework (they act only when set before the import): CUDA's TF32 override for "fp32", and
    every backend's ``Capabilities.math_variables`` for ``math``. For "tf32",
    ``NVIDIA_TF32_OVERRIDE`` must also be absent (``apply_math_environment`` removes it)."""
    if math not in MATH_MODES:
        raise ValueError(f"math mode must be one of {', '.join(MATH_MODES)}, got {math!r}")
    variables = {TF32_OVERRIDE: "0"} if math == "fp32" else {}
    for name in BACKENDS:
        variables.update({variable: value for mode, variable, value in capabilities(name).math_variables
                          if mode == math})
    return variables


def thread_variables() -> tuple[str, ...]:
    """The variables the frameworks take their thread counts from, read when they are imported:
    THREAD_COUNT_VARIABLES and every backend's own (``Capabilities.thread_variables``)."""
    names = list(THREAD_COUNT_VARIABLES)
    for backend in BACKENDS:
        names += [n for n in capabilities(backend).thread_variables if n not in names]
    return tuple(names)


def recorded_variables() -> tuple[str, ...]:
    """Every variable that changes how some framework threads or computes (the bench records them)."""
    names = list(thread_variables() + OPENMP_VARIABLES)
    for backend in BACKENDS:
        names += [n for n in capabilities(backend).recorded_variables if n not in names]
    return tuple(names)


PLAIN_MODULE = "_plain"  # the book's own code for a backend's framework, inside its package


def load_plain(name: str):
    """Backend ``name``'s ``_plain`` module (the book's code, the baseline of ``bench --baseline``),
    loaded from its file WITHOUT importing the backend's package: the baseline runs with nothing of
    this project configured (no thread, memory or math setting of the backend's own)."""
    path = _face_path(name).with_name(PLAIN_MODULE + ".py")
    if not path.is_file():
        raise ImportError(f"{path}: backend {name} has no plain baseline")
    found = importlib.util.spec_from_file_location(f"{BACKENDS[name]}_plain", path)
    module = importlib.util.module_from_spec(found)
    found.loader.exec_module(module)
    return module


def container_backend(container: str) -> "Backend":
    """The backend that reads and writes the model-zoo ``container`` (its record's ``containers``)."""
    for name in BACKENDS:
        if container in capabilities(name).containers:
            return load_backend(name)
    raise ValueError(f"no backend reads {container} files")  # pragma: no cover - a test holds the records


def apply_math_environment(math: str, environ: dict | None = None) -> dict:
    """Put ``math``'s variables into ``environ`` (default: this process's, before any framework
    import) and drop a TF32 override that would contradict "tf32". Returns ``environ``."""
    environ = os.environ if environ is None else environ
    environ.update(math_environment(math))
    if math == "tf32":
        environ.pop(TF32_OVERRIDE, None)
    return environ


def effective_math(math: str, device: str) -> str:
    """The math mode a record states: TF32 exists on GPUs only; a CPU computes float32 as float32."""
    return math if device == "gpu" else "fp32"


@dataclass(frozen=True)
class LayerRow:
    name: str
    kind: str
    shape: tuple[int, ...]  # measured on the native model, in the backend's layout
    params: int  # counted from the native model's tensors


def bound_layer_summary(module_name: str):
    """``layer_summary`` bound to the backend module ``module_name``: written once, here, and
    offered on each backend module so users call it there."""

    def layer_summary_of_backend(model, input_shape, *, print_table: bool = True) -> list[LayerRow]:
        """Per-layer output shapes (in this backend's layout) and parameter counts, measured on the native model."""
        return layer_summary(sys.modules[module_name], model, input_shape, print_table=print_table)

    layer_summary_of_backend.__name__ = "layer_summary"
    return layer_summary_of_backend


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
    "ARTIFACT_INPUT", "ARTIFACT_OUTPUT", "Artifact", "BACKENDS", "CONTRACT", "DEVICES", "MATH_MODES", "PRECISIONS", "Backend",
    "Capabilities", "DeviceError", "GpuStatus", "LayerRow", "ReplicaEngine", "SpeedUp", "Trainer", "all_speed_ups",
    "TrainerBase", "apply_math_environment", "channels_last_input", "bound_layer_summary", "capabilities",
    "check_finite_input",
    "checked_labels", "checked_lr",
    "checked_momentum", "checked_weight_decay", "choose_device",
    "effective_math", "exporting_backends", "layer_summary", "load_backend",
    "container_backend", "device_helpers", "load_plain", "math_environment", "prepared_reference", "recorded_variables",
    "require_framework", "speed_up_choices", "speed_up_owner", "thread_variables",
    "to_spec_input", "training_backends",
]
