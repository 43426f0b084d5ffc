"""Numerical parity of every backend against the float64 oracle, ``common.reference``: the
comparisons behind ``alexnet parity`` and the tests.

No backend is compared with another, so one backend alone is checked for real and a bug every
backend shares still fails. Four checks, each with its own tolerance on the relative error
||a - b|| / ||b|| (``TOLERANCES``; the measurements behind them are in docs/parity.md):

* forward: every layer's output in inference mode, at the spec's input size;
* loss: the batch-mean cross-entropy from ``loss_and_grads`` and from each ``train_step``;
* gradients: every parameter's gradient from ``loss_and_grads``;
* steps: every parameter's change after ``STEPS`` steps of the backend's own Trainer (lr
  0.01, momentum 0.9, weight decay 5e-4), against ``torch.optim.SGD``'s rule in float64.
  The change, not the weights: a wrong step hides under the initial weights. A float32
  program stores its weights rounded after every step, which no float64 change can match
  when a parameter barely moves, so this tolerance is per parameter: the base plus that
  rounding's bound, ``storage_floor`` (a weight-decay bug stays ~150 times above it).

Training checks run with dropout off (``spec.with_dropout(0)``), on the spec's smallest input.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from . import reference
from .backend import choose_device, load_backend
from .errors import first_line
from .report import format_table
from .shapes import smallest_input
from .spec import Dense, Flatten, MaxPool2d, ModelSpec, ReLU
from .weights import init_weights, nhwc_flatten_permutation

TRAIN_BATCH = 8
STEPS = 3
SGD_LR = 0.01
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4

# Inputs are drawn N(0, INPUT_STD^2). At unit scale LRN's sum term is ~1e-6 of k at
# initialisation: LRN is then a constant factor and LRN with the wrong alpha convention would
# pass unseen. At 10 that bug moves norm1 by 2e-4 (alpha/5) to 1e-3 (alpha*5); at 50 (the
# 2012 paper's pixel scale) lr 0.01 overshoots (loss 2.8 -> 10.7 after one step).
INPUT_STD = 10.0
# Biases are drawn N(0, BIAS_STD^2) rather than left at their zero initialisation, so that a
# bias that is dropped, broadcast over the wrong axis or not trained changes the numbers.
BIAS_STD = 0.1

# A ReLU input this close to zero, or a max-pool window whose two largest values are this
# close (relative to the layer's largest value), can go either way in float32: one flipped
# decision moves gradients by ~1e-4 to 1e-3. Training checks redraw such inputs (at every
# step, under that step's weights) rather than loosen the tolerance. At 224x224 some of the
# ~10^6 pre-activations always lie that close, so training checks use the smallest input.
NEAR_TIE = 1e-6
MAX_REDRAWS = 100


@dataclass(frozen=True)
class Tolerances:
    """Largest relative error each check accepts (float32 against float64); for ``steps`` the
    base, to which each parameter's ``storage_floor`` is added."""

    forward: float
    loss: float
    gradients: float
    steps: float

    def scaled(self, factor: float) -> "Tolerances":
        return Tolerances(*(factor * value for value in (self.forward, self.loss, self.gradients, self.steps)))


TOLERANCES = Tolerances(forward=2e-5, loss=1e-5, gradients=2e-5, steps=1e-4)
CHECKS = ("forward", "loss", "gradients", "steps")


# --------------------------------------------------------------------------- the oracle's cases
def parity_weights(spec: ModelSpec, seed: int) -> dict[str, np.ndarray]:
    """``init_weights(spec, seed)`` with nonzero biases (float32, drawn from ``seed`` too)."""
    weights = init_weights(spec, seed)
    rng = np.random.default_rng([seed, 1 << 20])
    for name, value in weights.items():
        if name.endswith(".bias"):
            weights[name] = (BIAS_STD * rng.standard_normal(value.shape)).astype(np.float32)
    return weights


def draw_batch(spec: ModelSpec, rng: np.random.Generator, batch: int) -> tuple[np.ndarray, np.ndarray]:
    x = (INPUT_STD * rng.standard_normal((batch, *spec.input_shape))).astype(np.float32)
    return x, rng.integers(0, spec.num_classes, size=batch)


def near_tie_margins(spec: ModelSpec, activations: dict[str, np.ndarray]) -> np.ndarray:
    """Per example: the smallest distance of any ReLU or max-pool decision from a tie, relative to
    the largest value that example has at that layer."""
    margins = np.ones(len(activations[spec.layers[0].name]))
    for prev, layer in zip(spec.layers, spec.layers[1:]):
        inputs = activations[prev.name]
        flat = inputs.reshape(len(inputs), -1)
        scale = np.abs(flat).max(axis=1)
        scale[scale == 0] = 1.0
        if isinstance(layer, ReLU):
            margins = np.minimum(margins, np.abs(flat).min(axis=1) / scale)
        elif isinstance(layer, MaxPool2d):
            (kh, kw), (sh, sw) = layer.kernel_size, layer.stride
            windows = sliding_window_view(inputs, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]
            top2 = np.partition(windows.reshape(len(inputs), -1, kh * kw), -2, axis=-1)[..., -2:]
            gap = top2[..., 1] - top2[..., 0]
            gap[top2[..., 1] <= 0] = np.inf  # an all-zero window routes into a ReLU whose gradient is 0 anyway
            margins = np.minimum(margins, gap.min(axis=1) / scale)
    return margins


def screened_batch(spec: ModelSpec, weights, seed: int, step: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """(x, labels) from (seed, step) alone; each example is redrawn until none of its ReLU or
    max-pool decisions under ``weights`` is within NEAR_TIE of a tie."""
    rng = np.random.default_rng([seed, step])
    x, labels = draw_batch(spec, rng, batch)
    redraw = np.arange(batch)
    for _ in range(MAX_REDRAWS):
        redraw = redraw[near_tie_margins(spec, reference.forward(spec, weights, x[redraw])[1]) <= NEAR_TIE]
        if not redraw.size:
            return x, labels
        x[redraw] = draw_batch(spec, rng, len(redraw))[0]
    raise RuntimeError(f"no input without ReLU/max-pool near-ties in {MAX_REDRAWS} draws for seed {seed}, "
                       f"step {step + 1}; use a smaller input")


@dataclass(frozen=True)
class Oracle:
    """Everything the backends are compared with, from (spec, seed) alone: a printed seed replays it."""

    seed: int
    spec: ModelSpec  # the forward check's network, at the spec's input size
    weights: dict[str, np.ndarray]
    x: np.ndarray  # NCHW float32
    activations: dict[str, np.ndarray]  # float64, by layer name
    train_spec: ModelSpec  # the smallest input, dropout off
    train_weights: dict[str, np.ndarray]
    batches: tuple[tuple[np.ndarray, np.ndarray], ...]  # one per step, screened under that step's weights
    loss: float  # loss_and_grads on batches[0] with train_weights
    grads: dict[str, np.ndarray]
    step_losses: tuple[float, ...]
    change: dict[str, np.ndarray]  # weights after the steps minus train_weights, float64
    storage_floor: dict[str, float]  # per parameter, added to the steps tolerance


def storage_floor(start: np.ndarray, change: np.ndarray, steps: int) -> float:
    """Bound on the relative error of a parameter's change that float32 storage alone causes:
    each step rounds every weight by at most half an ulp (eps/2 of its size), so after ``steps``
    steps ||rounding|| <= steps * eps/2 * ||w||, relative to ||change||. A weight-decay bug moves
    the change by about lr * wd * (1 + 1.9 + 2.71) * ||w|| = 2.8e-5 ||w||: 150 times more."""
    scale = np.linalg.norm(change)
    final = np.linalg.norm(start + change)
    return float(steps * np.finfo(np.float32).eps / 2 * final / scale) if scale else np.inf


def forward_case(spec: ModelSpec, seed: int, batch: int = 2) -> tuple[dict[str, np.ndarray], np.ndarray, dict]:
    """(weights, NCHW input, float64 activations by layer name) of the forward check, from (spec, seed)."""
    weights = parity_weights(spec, seed)
    x, _ = draw_batch(spec, np.random.default_rng([seed, 1 << 21]), batch)
    return weights, x, reference.forward(spec, weights, x)[1]


def build_oracle(spec: ModelSpec, seed: int, *, batch: int = 2, steps: int = STEPS) -> Oracle:
    """The float64 answers for ``spec``: forward at its input size (batch ``batch``), training on
    its smallest input (batch TRAIN_BATCH, ``steps`` SGD steps, each batch screened for near-ties)."""
    weights, x, activations = forward_case(spec, seed, batch)

    train_spec = spec.with_input(spec.in_channels, *smallest_input(spec)).with_dropout(0.0)
    train_weights = parity_weights(train_spec, seed)
    optimizer = reference.SGD(train_weights, lr=SGD_LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    batches, losses, first = [], [], None
    for step in range(steps):
        xs, labels = screened_batch(train_spec, optimizer.weights, seed, step, TRAIN_BATCH)
        loss, grads = reference.loss_and_grads(train_spec, optimizer.weights, xs, labels)
        first = first or (loss, grads)
        optimizer.step(grads)
        batches.append((xs, labels))
        losses.append(loss)
    change = {name: optimizer.weights[name] - train_weights[name] for name in train_weights}
    floors = {name: storage_floor(train_weights[name], change[name], steps) for name in train_weights}
    return Oracle(seed, spec, weights, x, activations, train_spec, train_weights, tuple(batches), first[0], first[1],
                  tuple(losses), change, floors)


# --------------------------------------------------------------------------- one backend
def to_backend_layout(x_nchw: np.ndarray, layout: str) -> np.ndarray:
    return np.ascontiguousarray(reference.nchw_to_nhwc(x_nchw)) if layout == "NHWC" else x_nchw


def _flatten_ordered(spec: ModelSpec) -> set[str]:
    """Layers whose output is the flattened image itself: Flatten and what follows it up to the
    first Dense (torchvision's dropout sits there). In NHWC these are (H, W, C) ordered."""
    names, inside = set(), False
    for layer in spec.layers:
        if isinstance(layer, Dense) and inside:
            break
        inside = inside or isinstance(layer, Flatten)
        if inside:
            names.add(layer.name)
    return names


def to_nchw_activation(spec: ModelSpec, name: str, value: np.ndarray, layout: str) -> np.ndarray:
    """A backend's activation in the reference's layout; an NHWC flattened image is (H, W, C) ordered."""
    if layout != "NHWC":
        return value
    if name in _flatten_ordered(spec):
        return value[:, np.argsort(nhwc_flatten_permutation(spec))]
    return reference.nhwc_to_nchw(value)


@dataclass
class BackendResult:
    """One backend's relative errors by check, then by layer, step or parameter name.

    ``problems`` holds what has no number: a stage that raised, a shape or a name that does
    not match the reference (the entry's error is then inf)."""

    name: str
    forward: dict[str, float] = field(default_factory=dict)
    loss: dict[str, float] = field(default_factory=dict)
    gradients: dict[str, float] = field(default_factory=dict)
    steps: dict[str, float] = field(default_factory=dict)
    problems: dict[tuple[str, str], str] = field(default_factory=dict)  # (check, name) -> what went wrong

    def compare(self, check: str, name: str, actual, expected) -> None:
        """Record the relative error of ``actual``; a missing value or a shape mismatch is a problem."""
        errors = getattr(self, check)
        if actual is None:
            errors[name], self.problems[(check, name)] = np.inf, "missing"
        elif np.shape(actual) != np.shape(expected):
            errors[name] = np.inf
            self.problems[(check, name)] = f"shape {np.shape(actual)}, reference {np.shape(expected)}"
        else:
            errors[name] = reference.relative_error(actual, expected)

    def worst(self, check: str) -> float:
        return max(getattr(self, check).values(), default=np.nan)


def _first_line(error: Exception) -> str:
    """A stage's failure in a table cell: the exception's class and its first meaningful line."""
    return f"{type(error).__name__}: {first_line(error)}"[:200]


def _record_forward(result: BackendResult, backend, model, x_nchw: np.ndarray, expected: dict) -> None:
    """Every layer's output (and the logits) of ``model`` against the float64 ``expected``."""
    spec, layout = backend.model_spec(model), backend.LAYOUT
    logits, activations = backend.forward(model, to_backend_layout(x_nchw, layout), capture=True)
    for layer in spec.layers:
        value = activations.get(layer.name)
        value = None if value is None else to_nchw_activation(spec, layer.name, value, layout)
        result.compare("forward", layer.name, value, expected[layer.name])
    result.compare("forward", "logits", logits, expected[spec.layers[-1].name])


def layer_errors(backend, model, x_nchw: np.ndarray, expected: dict) -> dict[str, float]:
    """Relative error of every layer (and the logits) of a built model against float64 activations
    (``forward_case``): the forward check alone, for tests of one layer kind or one variant."""
    result = BackendResult(backend.NAME)
    _record_forward(result, backend, model, x_nchw, expected)
    return result.forward


def check_backend(backend, oracle: Oracle, *, device: str = "cpu") -> BackendResult:
    """Every check of one backend against ``oracle``. A stage that raises is recorded, not raised."""
    result = BackendResult(backend.NAME)
    if device != "cpu":
        backend.disable_tf32()  # the tolerances are float32's; TF32 would need ~1e-2
    layout = backend.LAYOUT
    try:
        model = backend.build(oracle.spec, weights=oracle.weights, device=device)
        _record_forward(result, backend, model, oracle.x, oracle.activations)
        del model
    except Exception as error:  # a backend bug must fail the check with its message, not end the run
        result.problems[("forward", "forward")] = _first_line(error)
    if not backend.CAPABILITIES.trains:  # an inference-only backend (ONNX Runtime): forward only, "-" below
        return result

    spec, (x0, labels0) = oracle.train_spec, oracle.batches[0]
    try:
        model = backend.build(spec, weights=oracle.train_weights, device=device)
    except Exception as error:
        result.problems[("gradients", "build")] = _first_line(error)
        return result
    try:
        loss, grads = backend.loss_and_grads(model, to_backend_layout(x0, layout), labels0)
        result.compare("loss", "loss_and_grads", loss, oracle.loss)
        for name in oracle.grads:
            result.compare("gradients", name, grads.get(name), oracle.grads[name])
        for name in sorted(set(grads) - set(oracle.grads)):
            result.problems[("gradients", name)] = "unexpected parameter"
    except Exception as error:  # the steps are still checked: they do not depend on this stage
        result.problems[("gradients", "loss_and_grads")] = _first_line(error)
    try:
        trainer = backend.make_trainer(model, lr=SGD_LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        for step, ((x, labels), expected) in enumerate(zip(oracle.batches, oracle.step_losses)):
            loss, _ = trainer.train_step(to_backend_layout(x, layout), labels, seed=step)
            result.compare("loss", f"train_step {step + 1}", loss, expected)
        after = backend.export_weights(model)
        for name, start in oracle.train_weights.items():
            change = None if name not in after else after[name].astype(np.float64) - start
            result.compare("steps", name, change, oracle.change[name])
    except Exception as error:
        result.problems[("steps", "train_step")] = _first_line(error)
    return result


# --------------------------------------------------------------------------- mixed precision
@dataclass(frozen=True)
class LowPrecisionResult:
    """STEPS train steps of one backend in a mixed precision against the float64 oracle: the worst relative
    error of a step's loss and of a parameter's change (``steps``' comparison without a storage floor:
    these errors are the precision's, far above float32 storage)."""

    backend: str
    precision: str
    loss: float
    steps: float


def low_precision_errors(backend, oracle: Oracle, precision: str, *, device: str = "cpu") -> LowPrecisionResult:
    """The training checks of ``check_backend`` for ``backend``'s own ``precision`` ("bf16", "fp16": its
    ``CAPABILITIES.precisions``), on the oracle's batches, weights and SGD settings."""
    model = backend.build(oracle.train_spec, weights=oracle.train_weights, device=device)
    trainer = backend.make_trainer(model, lr=SGD_LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, precision=precision)
    losses = [trainer.train_step(to_backend_layout(x, backend.LAYOUT), labels, seed=step)[0]
              for step, (x, labels) in enumerate(oracle.batches)]
    after = backend.export_weights(model)
    # np.max, not max(): a NaN (a step that diverged) must come out as the worst, not be compared away
    loss = float(np.max([reference.relative_error(np.array(a), np.array(b))
                         for a, b in zip(losses, oracle.step_losses)]))
    steps = float(np.max([reference.relative_error(after[name].astype(np.float64) - start, oracle.change[name])
                          for name, start in oracle.train_weights.items()]))
    return LowPrecisionResult(backend.NAME, precision, loss, steps)


# --------------------------------------------------------------------------- the report
@dataclass(frozen=True)
class Failure:
    backend: str
    check: str  # one of CHECKS
    name: str  # the layer, parameter or stage
    error: float
    tolerance: float
    detail: str = ""

    def __str__(self) -> str:
        what = self.detail or f"{self.error:.2e} > {self.tolerance:.2g}"
        return f"{self.backend} {self.check} {self.name}: {what}"


@dataclass
class ParityReport:
    oracle: Oracle
    tolerances: Tolerances
    results: dict[str, BackendResult]
    device: str = "cpu"
    text: str = ""

    @property
    def seed(self) -> int:
        return self.oracle.seed

    def tolerance(self, check: str, name: str) -> float:
        """The tolerance of one entry: the check's, plus the storage floor for a parameter's steps."""
        base = getattr(self.tolerances, check)
        return base + self.oracle.storage_floor.get(name, 0.0) if check == "steps" else base

    @property
    def failures(self) -> list[Failure]:
        """Every entry above its tolerance (or not finite) and every problem, in check and model order."""
        failures = []
        for result in self.results.values():
            for check in CHECKS:
                for name, error in getattr(result, check).items():
                    tolerance = self.tolerance(check, name)
                    if not (np.isfinite(error) and error <= tolerance):
                        failures.append(Failure(result.name, check, name, error, tolerance,
                                                result.problems.get((check, name), "")))
                failures += [Failure(result.name, check, name, np.inf, getattr(self.tolerances, check), detail)
                             for (where, name), detail in result.problems.items()
                             if where == check and name not in getattr(result, check)]
        return failures

    @property
    def passed(self) -> bool:
        return not self.failures


def compare(oracle: Oracle, backends: list, *, device: str = "cpu", tolerances: Tolerances = TOLERANCES) -> ParityReport:
    """Check each backend module in ``backends`` against ``oracle``."""
    report = ParityReport(oracle, tolerances, {b.NAME: check_backend(b, oracle, device=device) for b in backends},
                          device)
    report.text = render(report)
    return report


def run_parity(spec: ModelSpec, backend_names: list[str], *, batch: int = 2, seed: int | None = None,
               device: str = "cpu", tolerances: Tolerances = TOLERANCES, steps: int = STEPS) -> ParityReport:
    """Check every named backend against the float64 oracle for ``spec`` (seed: random if None, printed)."""
    seed = int(np.random.default_rng().integers(0, 2**31 - 1)) if seed is None else seed
    backends = [load_backend(name) for name in backend_names]
    for backend in backends if device == "gpu" else ():  # no usable GPU: a DeviceError with the reason, first
        choose_device(device, backend.gpu_status(), backend.FRAMEWORK)
    oracle = build_oracle(spec, seed, batch=batch, steps=steps)
    return compare(oracle, backends, device=device, tolerances=tolerances)


def render(report: ParityReport) -> str:
    oracle, tol, names = report.oracle, report.tolerances, list(report.results)
    results = [report.results[n] for n in names]
    c, h, w = oracle.spec.input_shape
    steps = len(oracle.batches)

    def cells(check: str, key: str) -> list[str]:
        tolerance = report.tolerance(check, key)
        out = []
        for result in results:
            error = getattr(result, check).get(key)
            out.append("-" if error is None else f"{error:.2e}" + ("" if np.isfinite(error) and error <= tolerance
                                                                   else " FAIL"))
        return out

    lines = [f"parity: AlexNet ({oracle.spec.name}), seed {oracle.seed} (replay with --seed {oracle.seed}), "
             f"device {report.device}{'' if report.device == 'cpu' else ' (TF32 off)'}; every backend against the "
             f"float64 numpy oracle (common/reference.py); relative error ||a-b||/||b||; inputs N(0, {INPUT_STD:g}^2), "
             f"biases N(0, {BIAS_STD:g}^2)", "",
             f"forward, inference mode, input {len(oracle.x)}x{c}x{h}x{w} (tolerance {tol.forward:g}):"]
    layers = [layer.name for layer in oracle.spec.layers] + ["logits"]
    lines.append(format_table(["layer"] + names, [[layer] + cells("forward", layer) for layer in layers]))
    ts = oracle.train_spec
    lines += ["", f"training, dropout off, input {TRAIN_BATCH}x{'x'.join(map(str, ts.input_shape))} (the smallest; each "
                  f"step's batch screened for ReLU/max-pool near-ties), {steps} SGD steps with lr {SGD_LR:g}, momentum "
                  f"{MOMENTUM:g}, weight decay {WEIGHT_DECAY:g}:",
              f"loss (tolerance {tol.loss:g}); float64 values: loss_and_grads {oracle.loss:.6f}, train_steps "
              + ", ".join(f"{v:.6f}" for v in oracle.step_losses)]
    keys = ["loss_and_grads"] + [f"train_step {i + 1}" for i in range(steps)]
    lines.append(format_table(["loss"] + names, [[key] + cells("loss", key) for key in keys]))
    lines += ["", f"gradients of loss_and_grads (tolerance {tol.gradients:g}) and the change of every parameter after "
                  f"{steps} train_steps (tolerance {tol.steps:g} + the parameter's float32 storage floor = steps tol):"]
    rows = [[p] + cells("gradients", p) + cells("steps", p) + [f"{report.tolerance('steps', p):.1e}"]
            for p in oracle.grads]
    lines.append(format_table(["parameter"] + [f"grad {n}" for n in names] + [f"steps {n}" for n in names]
                              + ["steps tol"], rows))

    def worst(result: BackendResult, check: str) -> str:
        if not getattr(result, check):
            return "-"  # not checked: an inference-only backend's training checks
        if check != "steps":
            return f"{result.worst(check):.2e}"
        ratios = {n: e / report.tolerance(check, n) for n, e in result.steps.items()}
        return f"{max(ratios.values()):.2f} of tol" if ratios else "-"

    lines += ["", "worst of each check, and its tolerance:"]
    lines.append(format_table(["check"] + names + ["tolerance"],
                              [[check] + [worst(r, check) for r in results]
                               + [f"{getattr(tol, check):g}" + (" + floor" if check == "steps" else "")]
                               for check in CHECKS]))
    failures = report.failures
    if failures:
        lines += ["", f"{len(failures)} failure(s):"] + [f"  {failure}" for failure in failures[:30]]
        if len(failures) > 30:
            lines.append(f"  ... and {len(failures) - 30} more")
        lines.append(f"FAIL: {', '.join(sorted({f.backend for f in failures}))} outside the tolerances above")
    else:
        lines.append(f"PASS: {', '.join(names)} within every tolerance")
    return "\n".join(lines)


__all__ = ["BackendResult", "Failure", "LowPrecisionResult", "Oracle", "ParityReport", "TOLERANCES", "Tolerances",
           "build_oracle", "check_backend", "compare", "forward_case", "layer_errors", "low_precision_errors",
           "run_parity", "to_backend_layout"]
