"""SGD with PyTorch's semantics as one jitted JAX step: forward, loss, gradients and update.

``torch.optim.SGD``: g = grad + weight_decay * w (coupled L2, every parameter, biases too);
buf = momentum * buf + g (buf = g on the first step, as from zeros); w -= lr * buf. optax's
``sgd`` with ``add_decayed_weights`` composes to the same rule, but the update is written out
here, three lines over the parameter tree, so that the rule is visible and the learning rate
is an argument of the step (a new lr does not recompile).

The state (parameters, momentum buffers, fp16's loss scale) goes into the step and comes back
new; with ``donate`` (default on) the step writes the new arrays into the old ones' memory
(``jax.jit(donate_argnums=...)``) instead of holding two copies of the weights at the peak.

Dropout masks come from ``jax.random.key(seed)`` given to Flax as its "dropout" stream: a pure
function of the step seed, so a resumed run draws the same masks.

Mixed precision: the module computes in bfloat16 or float16 (Flax's ``dtype``) with float32
parameters (``param_dtype``), so gradients, buffers and the update stay float32. fp16 scales the
loss dynamically by the project's one rule (``common.weights``: start at 2**15, double after 2000
finite steps in a row, halve and skip the update when any gradient is NaN or infinite), inside the
jitted step; the scale and its count are in ``optimizer_state()``.

Replicas (``replicas=N``, after ``configure_replicas(N)`` and a model built under it): the step is
a ``shard_map`` over the replicas' mesh. Replica r takes its slice of the global batch
(``common.replicas.shard``; the slices are padded to one size with examples of weight 0, as
shard_map needs equal blocks), differentiates its examples' summed loss over the global batch
size, and ``psum`` adds the gradients: the gradient of the global batch's mean loss. Every replica
then applies the same update to its copy, so the copies stay equal. Replica r draws its dropout
masks from ``common.replicas.replica_seed(seed, r, N)``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from common.backend import TrainerBase
from common.spec import ModelSpec
from common.replicas import SINGLE, replica_seed, shard_bounds
from common.weights import (LOSS_SCALE_FACTOR, LOSS_SCALE_GROWTH_INTERVAL, LOSS_SCALE_INITIAL, LOSS_SCALED_PRECISIONS,
                            MOMENTUM_PREFIX, loss_scale_entries, momentum_buffers, split_loss_scale)

from . import CAPABILITIES
from ._framework import DTYPES, REPLICA_AXIS, jax, jnp, replica_group, replica_mesh
from ._model import (AlexNetModule, apply, as_labels, canonical_arrays, correct_count, cross_entropy, model_spec,
                     native_tree)


class Trainer(TrainerBase):
    """One model's SGD state and jitted steps (see ``common.backend.Trainer``)."""

    CAPABILITIES = CAPABILITIES

    def __init__(self, model, *, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                 donate: bool | None = None, precision: str = "fp32", replicas: int = 1):
        super().__init__(model, lr=lr, momentum=momentum, weight_decay=weight_decay, precision=precision,
                         replicas=replicas)
        self.spec = model_spec(model)
        self.group = replica_group() if replicas > 1 else SINGLE
        mesh = replica_mesh()
        have = 1 if mesh is None or not hasattr(model.placement, "mesh") else mesh.size
        if have != replicas:
            raise ValueError(f"replicas={replicas}, but the model was built for {have}: call "
                             f"alexnet_jax.configure_replicas({replicas}) before building it")
        self.donate = True if donate is None else bool(donate)
        self._lr = float(lr)
        # The state the step carries: {} where a part is absent (no momentum; no loss scale).
        self._buffers = jax.tree.map(jnp.zeros_like, model.params) if self.momentum else {}
        self._scale = self._scale_state(LOSS_SCALE_INITIAL, 0) if precision in LOSS_SCALED_PRECISIONS else {}
        rule = StepRule(self.spec, precision, self.momentum, self.weight_decay)
        self._train, self._eval, self._prepare = compiled_steps(rule, mesh if replicas > 1 else None, self.donate)
        self._resize: dict[tuple[int, int], tuple] = {}

    def _scale_state(self, scale: float, good_steps: int) -> dict:
        return jax.device_put({"scale": np.float32(scale), "good": np.int32(good_steps)}, self.model.placement)

    # ----------------------------------------------------------------- hyper-parameters
    def _read_lr(self) -> float:
        return self._lr

    def _write_lr(self, value: float) -> None:
        self._lr = value  # an argument of the step: nothing recompiles

    def _any_process(self, flag: bool) -> bool:
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.array(flag))))

    # ------------------------------------------------------------------- the protocol
    def prepare(self, images: np.ndarray):
        """uint8 (N, h, w) -> float32 (N, H, W, C) on the model's device, as common.data.preprocess
        (scale, bilinear resize by matrices, normalise) with XLA's matmul; the grey image fills each
        of the spec's C channels (``common.backend.prepared_reference``)."""
        from common.data import resize_matrix

        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 3:
            raise ValueError(f"expected uint8 images of shape (N, h, w), got {images.dtype} {images.shape}")
        key = images.shape[1:]
        if key not in self._resize:
            height, width = self.spec.input_size
            self._resize[key] = jax.device_put((resize_matrix(key[0], height), resize_matrix(key[1], width)),
                                               self.model.placement)
        return self._prepare(jax.device_put(images, self.model.placement), *self._resize[key],
                             self.spec.in_channels)

    def _input(self, x):
        if isinstance(x, jax.Array):
            return x
        from ._model import as_input

        return jax.device_put(as_input(self.model, x), self.model.placement)

    def train_step(self, x, labels, *, seed: int) -> tuple[float, int]:
        """One SGD step on the global batch (over the replicas, if several); (mean loss, correct)."""
        labels = as_labels(labels, self.spec.num_classes, len(x))
        lr = np.float32(self._lr)
        if self.replicas == 1:
            out = self._train(self.model.params, self._buffers, self._scale, self._input(x), labels,
                              np.int32(seed), lr)
        else:
            rows, weights = _padded_shards(len(labels), self.replicas)
            seeds = np.array([replica_seed(seed, r, self.replicas) for r in range(self.replicas)], np.int32)
            out = self._train(self.model.params, self._buffers, self._scale, self._input(x), labels, rows, weights,
                              seeds, lr)
        self.model.params, self._buffers, self._scale, loss, correct = out
        return float(loss), int(correct)  # read from the device: the step has finished

    def eval_step(self, x, labels) -> tuple[float, int]:
        loss, correct = self._eval(self.model.params, self._input(x), as_labels(labels, self.spec.num_classes, len(x)))
        return float(loss), int(correct)

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """Momentum buffers by canonical name and layout (none without momentum), and with fp16 the
        loss scale (``common.weights.loss_scale_entries``)."""
        state = {MOMENTUM_PREFIX + name: value for name, value in canonical_arrays(self.spec, self._buffers).items()} \
            if self.momentum else {}
        if self._scale:
            state.update(loss_scale_entries(float(self._scale["scale"]), int(self._scale["good"])))
        return state

    def load_optimizer_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Momentum buffers by canonical name and layout, and the loss scale (checked in full first by
        ``common.weights.split_loss_scale`` and ``momentum_buffers``; none given: zeros and the initial
        scale, a fresh start)."""
        state, loss_scale = split_loss_scale(state, scaled=bool(self._scale))
        buffers = momentum_buffers(self.spec, self.momentum, state)
        if self.momentum:
            self._buffers = native_tree(self.spec, buffers, self.model.placement) if buffers \
                else jax.tree.map(jnp.zeros_like, self.model.params)
        if loss_scale is not None:
            self._scale = self._scale_state(*loss_scale)


@dataclass(frozen=True)
class StepRule:
    """What a trainer's jitted functions compute, and all they depend on besides their arguments:
    equal rules share one compilation (``compiled_steps``), so a new trainer for the same network
    and hyper-parameters (a resumed run, the next test) does not compile again."""

    spec: ModelSpec
    precision: str
    momentum: float
    weight_decay: float

    def module(self) -> AlexNetModule:
        return AlexNetModule(self.spec, DTYPES[self.precision])

    def gradients(self, params, scale, x, labels, weights, batch, key):
        """(gradients of the scaled loss, loss, correct): the loss is the weighted examples' summed
        cross entropy over ``batch`` (every weight 1 and ``batch`` the rows: the batch mean)."""

        def loss_fn(params):
            logits = apply(self.module(), params, x, training=True, key=key)
            loss = jnp.sum(cross_entropy(logits, labels) * weights) / batch
            scaled = loss * scale["scale"] if scale else loss
            return scaled, (loss, jnp.sum((jnp.argmax(logits, -1) == labels) * weights.astype(jnp.int32)))

        grads, (loss, correct) = jax.grad(loss_fn, has_aux=True)(params)
        return grads, loss, correct

    def update(self, params, buffers, scale, grads, lr):
        """PyTorch's SGD step of every parameter; with a loss scale, the gradients unscaled, the
        update kept only if they are all finite, and the scale's rule (module docstring)."""
        if scale:
            grads = jax.tree.map(lambda g: g / scale["scale"], grads)
        if self.weight_decay:
            grads = jax.tree.map(lambda g, w: g + self.weight_decay * w, grads, params)
        if self.momentum:
            new_buffers = jax.tree.map(lambda b, g: self.momentum * b + g, buffers, grads)
            new_params = jax.tree.map(lambda w, b: w - lr * b, params, new_buffers)
        else:
            new_buffers, new_params = buffers, jax.tree.map(lambda w, g: w - lr * g, params, grads)
        if not scale:
            return new_params, new_buffers, scale
        finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
        keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        grow = finite & (scale["good"] + 1 >= LOSS_SCALE_GROWTH_INTERVAL)
        new_scale = {"scale": jnp.where(grow, scale["scale"] * LOSS_SCALE_FACTOR,
                                        jnp.where(finite, scale["scale"], scale["scale"] / LOSS_SCALE_FACTOR)),
                     "good": jnp.where(finite & ~grow, scale["good"] + 1, 0).astype(jnp.int32)}
        return jax.tree.map(keep, new_params, params), jax.tree.map(keep, new_buffers, buffers), new_scale

    def single_step(self, params, buffers, scale, x, labels, seed, lr):
        weights = jnp.ones(labels.shape, jnp.float32)
        grads, loss, correct = self.gradients(params, scale, x, labels, weights, labels.shape[0],
                                               jax.random.key(seed))
        return (*self.update(params, buffers, scale, grads, lr), loss, correct)

    def replicated_step(self, mesh):
        from jax.sharding import PartitionSpec as P

        def replica_step(params, buffers, scale, x, labels, weights, seeds, lr, batch):
            grads, loss, correct = self.gradients(params, scale, x, labels, weights, batch, jax.random.key(seeds[0]))
            grads, loss, correct = jax.lax.psum((grads, loss, correct), REPLICA_AXIS)
            return (*self.update(params, buffers, scale, grads, lr), loss, correct)

        whole, split = P(), P(REPLICA_AXIS)
        sharded = jax.shard_map(replica_step, mesh=mesh, in_specs=(whole, whole, whole, split, split, split, split,
                                                                   whole, whole),
                                out_specs=(whole, whole, whole, whole, whole),
                                # untyped replication: the gradient of the replicated parameters is each
                                # replica's own, summed by the psum above (with check_vma JAX would sum it
                                # itself when differentiating, and the psum would count it N times)
                                check_vma=False)

        def step(params, buffers, scale, x, labels, rows, weights, seeds, lr):
            batch = jnp.float32(labels.shape[0])
            return sharded(params, buffers, scale, jnp.take(x, rows, axis=0), jnp.take(labels, rows), weights,
                           seeds, lr, batch)

        return step

    def eval_fn(self, params, x, labels):
        logits = apply(self.module(), params, x, training=False)
        return jnp.sum(cross_entropy(logits, labels)), correct_count(logits, labels)

    def prepare_fn(self, images, rows, cols, channels):
        from common.data import NORMALIZE_MEAN, NORMALIZE_STD

        x = images.astype(jnp.float32) / 255.0
        x = jnp.einsum("Hh,nhw,Ww->nHW", rows, x, cols)
        x = (x - NORMALIZE_MEAN) / NORMALIZE_STD
        return jnp.repeat(x[..., None], channels, axis=-1)



@functools.lru_cache(maxsize=32)
def compiled_steps(rule: StepRule, mesh, donate: bool):
    """(train step, eval step, prepare) jitted for ``rule``: one replica, or a shard_map over ``mesh``.
    With ``donate`` the train step's state arguments (parameters, buffers, loss scale) are donated."""
    train = rule.single_step if mesh is None else rule.replicated_step(mesh)
    return (jax.jit(train, donate_argnums=(0, 1, 2) if donate else ()), jax.jit(rule.eval_fn),
            jax.jit(rule.prepare_fn, static_argnums=3))


def _padded_shards(batch: int, replicas: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, weights) laying a global batch out as ``replicas`` equal blocks: block r holds replica
    r's slice (``common.replicas.shard_bounds``), then rows of weight 0 up to the largest slice."""
    size = -(-batch // replicas)
    rows, weights = np.zeros(size * replicas, np.int32), np.zeros(size * replicas, np.float32)
    for replica, (start, stop) in enumerate(shard_bounds(batch, replicas)):
        rows[replica * size:replica * size + stop - start] = np.arange(start, stop)
        weights[replica * size:replica * size + stop - start] = 1.0
    return rows, weights


def make_trainer(model, *, lr: float, momentum: float = 0.0, weight_decay: float = 0.0, donate: bool | None = None,
                 precision: str = "fp32", replicas: int = 1) -> Trainer:
    """SGD with PyTorch's semantics in one jitted step. ``donate`` (default on) lets the step reuse the
    old state's memory; ``precision`` "bf16" or "fp16" computes in bfloat16 or float16 with float32
    weights, fp16 with a dynamic loss scale; ``replicas`` N > 1 trains a model built after
    ``configure_replicas(N)`` over its mesh (module docstring)."""
    return Trainer(model, lr=lr, momentum=momentum, weight_decay=weight_decay, donate=donate, precision=precision,
                   replicas=replicas)
