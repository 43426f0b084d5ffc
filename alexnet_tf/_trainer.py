"""SGD with PyTorch's semantics as one compiled TensorFlow step (a ``tf.function``; XLA on a GPU).

``torch.optim.SGD``: g = grad + weight_decay * w (coupled L2, every parameter, biases too);
buf = momentum * buf + g (buf = g on the first step); w -= lr * buf. Keras' own SGD differs
(velocity = momentum * v - lr * g, decoupled weight decay), so the update is written out
here, inside the same ``tf.function`` as the forward and backward pass.

Replicas (``replicas=N``, after ``configure_replicas(N)`` and a model built under it): the step
runs under the model's ``tf.distribute`` strategy, MirroredStrategy in one process or
MultiWorkerMirroredStrategy over processes, as a custom loop (``strategy.run``; Keras ``fit``
under MultiWorkerMirroredStrategy is broken upstream). Each replica takes its slice of the
global batch (``common.replicas.shard``), differentiates ``compute_average_loss(per example,
global_batch_size=B)`` (its examples' loss sum over the global B), and the replicas' gradients
are summed by the strategy's all-reduce: the gradient of the global batch's mean loss. Weight
decay is added once, after the all-reduce (added before it, each replica's ``wd * w`` would be
summed N times), and every replica then applies the same fused update to its own copy of the
variables, so the copies stay equal. The momentum buffers are mirrored variables created inside
the strategy's scope before the first step (created lazily inside a distributed step, they fail).

Mixed precision: the layers compute under a Keras dtype policy (``mixed_bfloat16``, ``mixed_float16``)
inside the compiled step; the variables, the gradients the tape returns and the update stay float32.
fp16 scales the loss dynamically, with ``keras.optimizers.LossScaleOptimizer``'s rule and defaults
(``common.weights``: start at 2**15, double after 2000 finite steps in a row, halve and skip the update
when any gradient is NaN or infinite). ``LossScaleOptimizer`` wraps a Keras optimizer's ``apply``, and
this step's update is not a Keras optimizer but the fused kernel above, so the same algorithm is
written into the graph: the scale and its count of finite steps are non-trainable variables of this
trainer, the gradients are divided by the scale (a power of two: exact), and ``tf.cond`` runs the
update only when they are all finite. Both variables are in ``optimizer_state()``, so a resumed fp16
run equals an uninterrupted one. With replicas every replica decides on the all-reduced gradients,
the same numbers everywhere, and writes its own copy of the two variables, as it does the momentum.
"""
from __future__ import annotations

import contextlib
from typing import Mapping

import numpy as np

from common.backend import TrainerBase
from common.replicas import SINGLE, replica_seed
from common.weights import (LOSS_SCALE_FACTOR, LOSS_SCALE_GROWTH_INTERVAL, LOSS_SCALE_INITIAL, LOSS_SCALED_PRECISIONS,
                            MOMENTUM_PREFIX, loss_scale_entries, momentum_buffers, split_loss_scale)

from . import CAPABILITIES
from ._framework import keras, replica_group, tf
from ._model import (compile_fn, correct_count, cross_entropy, device_of, input_signature, params, plan, run,
                     spec_of, strategy_of, xla_by_default)

# The update is TensorFlow's own fused kernel, ResourceApplyMomentum (accum = accum * m + g;
# var -= lr * accum: PyTorch's rule), because the same update written as three ops differed in
# the last bit between two traces, and a resumed run then did not repeat an uninterrupted one
# (docs/notes.md). XLA: ``_model.xla_by_default``.
JIT_EVAL = False

# Mixed precision: the Keras layers compute in the policy's dtype (variables stay float32).
POLICIES = {"fp32": None, "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}


@contextlib.contextmanager
def _compute_policy(model, policy: str | None):
    """Every layer of ``model`` under the dtype policy ``policy`` while the block runs, then as before.

    Used around ``run`` inside the compiled steps, whose Python body runs only while TensorFlow
    traces it: the traced graph computes in the policy's dtype, and the model itself (and
    ``forward`` on it) is left as it was."""
    if policy is None:
        yield
        return
    layers = [native for _, natives in plan(model) for native in natives]
    before = [layer.dtype_policy for layer in layers]
    try:
        for layer in layers:
            layer.dtype_policy = keras.DTypePolicy(policy)
        yield
    finally:
        for layer, old in zip(layers, before):
            layer.dtype_policy = old


class Trainer(TrainerBase):
    """One model's SGD state and compiled steps (see ``common.backend.Trainer``)."""

    CAPABILITIES = CAPABILITIES

    def __init__(self, model, *, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                 jit_compile: bool | None = None, precision: str = "fp32", replicas: int = 1):
        super().__init__(model, lr=lr, momentum=momentum, weight_decay=weight_decay, precision=precision,
                         replicas=replicas)
        self.spec = spec_of(model)
        self.device = device_of(model)
        self._strategy = strategy_of(model)
        if replicas > 1 and (self._strategy is None or self._strategy.num_replicas_in_sync != replicas):
            have = 1 if self._strategy is None else self._strategy.num_replicas_in_sync
            raise ValueError(f"replicas={replicas}, but the model was built for {have}: call "
                             f"alexnet_tf.configure_replicas({replicas}) before building it")
        if replicas == 1 and self._strategy is not None:
            raise ValueError("the model's variables are mirrored over replicas: train it with replicas="
                             f"{self._strategy.num_replicas_in_sync}")
        self.group = replica_group() if replicas > 1 else SINGLE
        if replicas > 1 and jit_compile:
            raise ValueError("XLA (jit_compile) is not used with replicas: tf.distribute's custom loop runs uncompiled")
        self.jit_compile = (xla_by_default(self.device) if jit_compile is None else bool(jit_compile)) and replicas == 1
        self._params = params(model)
        self._variables = [p.variable for p in self._params]
        with self._scope(), tf.device(self.device):
            self._lr = tf.Variable(float(lr), dtype=tf.float32, trainable=False, name="lr")
            self._buffers = [
                tf.Variable(tf.zeros(p.variable.shape, tf.float32), trainable=False, name=f"momentum_{i}")
                for i, p in enumerate(self._params)
            ] if self.momentum else []
            # float16's dynamic loss scale (module docstring); None where the precision needs none
            self._loss_scale = self._good_steps = None
            if self.precision in LOSS_SCALED_PRECISIONS:
                self._loss_scale = tf.Variable(LOSS_SCALE_INITIAL, dtype=tf.float32, trainable=False, name="loss_scale")
                self._good_steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="loss_scale_good_steps")
        self._resize_cache: dict[tuple[int, int], tuple] = {}
        x_spec = input_signature(self.spec)
        y_spec = tf.TensorSpec((None,), tf.int64)
        if replicas == 1:
            self._train = compile_fn(self._train_fn, input_signature=[x_spec, y_spec, tf.TensorSpec((), tf.int64)],
                                     jit_compile=self.jit_compile)
        else:
            self._train = compile_fn(self._distributed_train_fn,
                                     input_signature=[x_spec, y_spec, tf.TensorSpec((replicas,), tf.int64)])
            self._any = compile_fn(self._any_fn, input_signature=[tf.TensorSpec((), tf.int32)])
        self._eval = compile_fn(self._eval_fn, input_signature=[x_spec, y_spec], jit_compile=JIT_EVAL)

    def _scope(self):
        return self._strategy.scope() if self._strategy is not None else contextlib.nullcontext()

    # ----------------------------------------------------------------- hyper-parameters
    def _read_lr(self) -> float:
        return float(self._lr.numpy())

    def _write_lr(self, value: float) -> None:
        self._lr.assign(value)  # a variable: the compiled step is not traced again

    # ---------------------------------------------------------------- compiled bodies
    def _train_fn(self, x, labels, seed):
        with tf.device(self.device):
            with tf.GradientTape() as tape:
                with _compute_policy(self.model, POLICIES[self.precision]):
                    logits = tf.cast(run(self.model, x, training=True, seed=seed), tf.float32)
                loss = tf.reduce_mean(cross_entropy(logits, labels))
                scaled = loss if self._loss_scale is None else loss * self._loss_scale
            self._unscaled_update(tape.gradient(scaled, self._variables), self._apply)
            return loss, correct_count(logits, labels)

    def _apply(self, grads) -> None:
        """PyTorch's SGD update of every variable, inside a compiled step. Each variable is updated in
        place by one fused kernel: ResourceApplyMomentum with momentum (reproducible, see the note at
        the top), ResourceApplyGradientDescent without (var -= lr * grad, without the copy of every
        weight that a read, a subtraction and an assignment make)."""
        lr, momentum = self._lr, tf.constant(self.momentum, tf.float32)
        for index, (variable, grad) in enumerate(zip(self._variables, grads)):
            if self.weight_decay:
                grad = grad + self.weight_decay * variable.value
            if self.momentum:
                tf.raw_ops.ResourceApplyMomentum(var=variable.value.handle, accum=self._buffers[index].handle, lr=lr,
                                                 grad=grad, momentum=momentum)
            else:
                tf.raw_ops.ResourceApplyGradientDescent(var=variable.value.handle, alpha=lr, delta=grad)

    def _distributed_train_fn(self, x, labels, seeds):
        """One step of every replica: each its slice of the global batch, gradients all-reduced."""
        replicas = self.replicas
        batch = tf.shape(labels, out_type=tf.int64)[0]

        def replica_step(x, labels, seeds):
            context = tf.distribute.get_replica_context()
            replica = tf.cast(context.replica_id_in_sync_group, tf.int64)
            # common.replicas.shard_bounds in the graph: sizes differ by one at most, the larger first
            size, extra = batch // replicas, batch % replicas
            start = replica * size + tf.minimum(replica, extra)
            stop = start + size + tf.cast(replica < extra, tf.int64)
            x, labels = x[start:stop], labels[start:stop]
            with tf.GradientTape() as tape:
                with _compute_policy(self.model, POLICIES[self.precision]):
                    logits = tf.cast(run(self.model, x, training=True, seed=seeds[replica]), tf.float32)
                loss = tf.nn.compute_average_loss(cross_entropy(logits, labels), global_batch_size=batch)
                scaled = loss if self._loss_scale is None else loss * self._loss_scale
            # After the all-reduce, so weight decay is added once, not once per replica. In the replica
            # context a mirrored variable's handle is this replica's own copy: every replica applies the
            # same all-reduced step to its copy.
            self._unscaled_update(context.all_reduce(tf.distribute.ReduceOp.SUM, tape.gradient(scaled, self._variables)),
                                  self._apply)
            return loss, correct_count(logits, labels)

        loss, correct = self._strategy.run(replica_step, args=(x, labels, seeds))
        total = tf.distribute.ReduceOp.SUM
        return self._strategy.reduce(total, loss, axis=None), self._strategy.reduce(total, correct, axis=None)

    def _unscaled_update(self, grads, update) -> None:
        """``update(grads)``, or with a loss scale: the gradients divided by it, the update only if they
        are all finite, and the scale's rule (module docstring). Written to the variables' handles, so
        in a replica context each replica sets its own copy (all to the same values)."""
        if self._loss_scale is None:
            update(grads)
            return
        scale, good = self._loss_scale.read_value(), self._good_steps.read_value()
        grads = [grad / scale for grad in grads]
        finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(grad)) for grad in grads])

        def apply():
            update(grads)
            return tf.constant(True)

        tf.cond(finite, apply, lambda: tf.constant(False))
        grow = tf.logical_and(finite, good + 1 >= LOSS_SCALE_GROWTH_INTERVAL)
        new_scale = tf.where(grow, scale * LOSS_SCALE_FACTOR, tf.where(finite, scale, scale / LOSS_SCALE_FACTOR))
        new_good = tf.where(tf.logical_and(finite, tf.logical_not(grow)), good + 1, tf.zeros_like(good))
        tf.raw_ops.AssignVariableOp(resource=self._loss_scale.handle, value=new_scale)
        tf.raw_ops.AssignVariableOp(resource=self._good_steps.handle, value=new_good)

    def _any_fn(self, flag):
        """How many replicas were given a true ``flag`` (ReduceOp has no MAX: a sum does)."""
        return self._strategy.reduce(tf.distribute.ReduceOp.SUM, self._strategy.run(lambda: flag), axis=None)

    def _any_process(self, flag: bool) -> bool:
        return int(self._any(tf.constant(int(flag), tf.int32))) > 0

    def _eval_fn(self, x, labels):
        with tf.device(self.device):
            with _compute_policy(self.model, POLICIES[self.precision]):
                logits = tf.cast(run(self.model, x, training=False), tf.float32)
            return tf.reduce_sum(cross_entropy(logits, labels)), correct_count(logits, labels)

    # ------------------------------------------------------------------- the protocol
    def _labels(self, labels):
        with tf.device(self.device):
            return tf.convert_to_tensor(np.asarray(labels, dtype=np.int64))

    def _input(self, x):
        if isinstance(x, tf.Tensor) and x.dtype == tf.float32:
            return x
        with tf.device(self.device):
            return tf.convert_to_tensor(np.asarray(x, dtype=np.float32))

    def _resize_matrices(self, src_h: int, src_w: int):
        key = (src_h, src_w)
        if key not in self._resize_cache:
            from common.data import resize_matrix

            height, width = self.spec.input_size
            with tf.device(self.device):
                self._resize_cache[key] = (
                    tf.constant(resize_matrix(src_h, height)),
                    tf.constant(resize_matrix(src_w, width)),
                )
        return self._resize_cache[key]

    def prepare(self, images: np.ndarray):
        """uint8 (N, h, w) -> float32 (N, H, W, C) on the model's device, as common.data.preprocess
        (scale, bilinear resize by matrices, normalise) but with TensorFlow's matmul; the grey
        image fills each of the spec's C channels (``common.backend.prepared_reference``)."""
        from common.data import NORMALIZE_MEAN, NORMALIZE_STD

        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 3:
            raise ValueError(f"expected uint8 images of shape (N, h, w), got {images.dtype} {images.shape}")
        rows, cols = self._resize_matrices(images.shape[1], images.shape[2])
        with tf.device(self.device):
            x = tf.cast(tf.convert_to_tensor(images), tf.float32) / tf.constant(255.0, tf.float32)
            x = tf.einsum("Hh,nhw->nHw", rows, x)
            x = tf.einsum("nHw,Ww->nHW", x, cols)
            x = (x - tf.constant(NORMALIZE_MEAN, tf.float32)) / tf.constant(NORMALIZE_STD, tf.float32)
            return tf.tile(x[..., None], (1, 1, 1, self.spec.in_channels))

    def train_step(self, x, labels, *, seed: int) -> tuple[float, int]:
        """One SGD step on the global batch (over the replicas, if several); (mean loss, correct)."""
        if self.replicas == 1:
            seeds = tf.constant(int(seed), tf.int64)
        else:  # replica r draws its dropout masks from common.replicas.replica_seed(seed, r)
            seeds = tf.constant([replica_seed(seed, r, self.replicas) for r in range(self.replicas)], tf.int64)
        # float() copies the result to the host, so the step has finished when this returns
        loss, correct = self._train(self._input(x), self._labels(labels), seeds)
        return float(loss), int(correct)

    def eval_step(self, x, labels) -> tuple[float, int]:
        loss, correct = self._eval(self._input(x), self._labels(labels))
        return float(loss), int(correct)

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """Momentum buffers by canonical name and layout (none without momentum), and with fp16 the
        loss scale (``common.weights.loss_scale_entries``)."""
        state = {MOMENTUM_PREFIX + p.name: p.to_canonical(buffer.numpy())
                 for p, buffer in zip(self._params, self._buffers)}
        if self._loss_scale is not None:
            state.update(loss_scale_entries(self._loss_scale.numpy(), self._good_steps.numpy()))
        return state

    def load_optimizer_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Momentum buffers by canonical name and layout, and the loss scale (checked in full first by
        ``common.weights.split_loss_scale`` and ``momentum_buffers``; none given: zeros and the initial
        scale, a fresh start)."""
        state, loss_scale = split_loss_scale(state, scaled=self._loss_scale is not None)
        buffers = momentum_buffers(self.spec, self.momentum, state)
        native = [p.to_native(np.asarray(buffers[p.name], np.float32)) for p in self._params] if buffers else []
        for buffer, value in zip(self._buffers, native):
            buffer.assign(value)
        if loss_scale is not None:
            self._loss_scale.assign(loss_scale[0])
            self._good_steps.assign(loss_scale[1])


def make_trainer(model, *, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                 jit_compile: bool | None = None, precision: str = "fp32", replicas: int = 1) -> Trainer:
    """SGD with PyTorch's semantics in one compiled step. ``jit_compile`` (default: on a GPU only,
    see ``_model.xla_by_default``) compiles the train step with XLA; ``precision`` "bf16" or "fp16" computes
    in bfloat16 or float16 with float32 weights, fp16 with a dynamic loss scale (module docstring; default
    "fp32", what the parity suite checks). ``replicas`` N > 1
    trains a model built after ``configure_replicas(N)`` with its strategy (module docstring)."""
    return Trainer(model, lr=lr, momentum=momentum, weight_decay=weight_decay, jit_compile=jit_compile,
                   precision=precision, replicas=replicas)
