"""Where the training losses of two backends part, for ``alexnet compare``.

Backends that take the same step from the same weights on the same batches agree to float32
rounding, which differs between frameworks (the order of a sum, a fused kernel). An unstable
recipe (a high lr) amplifies that rounding until the runs go separate ways, often right after a
loss spike; a difference in the step itself shows from the first steps. ``compare`` says which,
per pair of backends, so a parting is not mistaken for a broken backend.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations
from typing import Mapping, Sequence

# Two losses part where they differ by more than this, relative to the larger one.
PART_TOLERANCE = 1e-2
# A loss spike: a step's loss above this multiple of the lowest loss of the steps before it.
SPIKE_FACTOR = 1.5


@dataclass(frozen=True)
class Parting:
    """Two backends' per-step training losses: the first step (1-based) where they part, or None
    where they agree on all ``steps``; the step of the last loss spike at or before it, if any."""

    first: str
    second: str
    steps: int
    part: int | None = None
    losses: tuple[float, float] | None = None  # the two losses at ``part``
    spike: int | None = None

    def describe(self) -> str:
        pair = f"{self.first} vs {self.second}"
        if self.part is None:
            return f"{pair}: agree on all {self.steps} steps"
        a, b = self.losses
        said = f"{pair}: part at step {self.part} of {self.steps} ({self.first} {a:.4g}, {self.second} {b:.4g})"
        return said + (f", after a loss spike at step {self.spike}" if self.spike else ", with no loss spike before")


def _spikes(losses: Sequence[float]) -> list[int]:
    """1-based steps whose loss is not finite or above SPIKE_FACTOR times the lowest loss before them."""
    found, lowest = [], math.inf
    for step, loss in enumerate(losses, 1):
        if not math.isfinite(loss) or loss > SPIKE_FACTOR * lowest:
            found.append(step)
        if math.isfinite(loss):
            lowest = min(lowest, loss)
    return found


def parting(first: str, a: Sequence[float], second: str, b: Sequence[float], *,
            tolerance: float = PART_TOLERANCE) -> Parting:
    """Where losses ``a`` and ``b`` (one per step) first differ by more than ``tolerance`` (relative)."""
    steps = min(len(a), len(b))
    for step in range(steps):
        x, y = float(a[step]), float(b[step])
        scale = max(abs(x), abs(y), 1e-12)
        if not (abs(x - y) <= tolerance * scale):  # NaN parts too
            spikes = _spikes(a[:step + 1]) + _spikes(b[:step + 1])
            return Parting(first, second, steps, step + 1, (x, y), max(spikes) if spikes else None)
    return Parting(first, second, steps)


def partings(losses: Mapping[str, Sequence[float]], *, tolerance: float = PART_TOLERANCE) -> list[Parting]:
    """``parting`` for every pair of backends in ``losses`` ({backend: per-step losses})."""
    return [parting(x, losses[x], y, losses[y], tolerance=tolerance) for x, y in combinations(losses, 2)]


MEANING = ("A parting after a loss spike is float32 rounding, which differs between frameworks, amplified by an "
           "unstable recipe (try a lower --lr); one without a spike, from the first steps, points at the step "
           "itself, which `alexnet parity` checks against float64.")


DROPOUT = ("training losses per step: not compared step by step, since each framework draws its own dropout "
           "masks (--dropout 0 compares them)")


def report(found: Sequence[Parting], *, tolerance: float = PART_TOLERANCE, dropout: bool = False) -> str:
    """The lines ``compare`` prints: one per pair, then what a parting means (where there is one). With
    ``dropout`` on, the backends' masks differ, so their losses differ from the first step: it says so instead."""
    if dropout:
        return DROPOUT
    lines = [f"training losses per step, parted where they differ by more than {tolerance:g} (relative):"]
    lines += [f"  {p.describe()}" for p in found]
    if any(p.part is not None for p in found):
        lines.append(MEANING)
    return "\n".join(lines)
