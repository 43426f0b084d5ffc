"""Training with Gluon's own fast path: the hybridized net, per-example loss, ``gluon.Trainer``.

One step equals PyTorch's ``torch.optim.SGD`` on the batch-mean loss:

* Gluon losses are per example and ``Trainer.step(batch_size)`` rescales the summed
  gradient by 1/batch_size, so the gradient is the batch-mean loss's gradient.
* Weight decay is coupled L2 on every parameter, biases too (Gluon parameters have
  wd_mult 1; the symbolic-API default that exempts biases does not apply to Gluon).
* Momentum: Gluon's own SGD keeps ``mom = momentum * mom - lr * (grad + wd * w)`` and does
  ``w += mom``; PyTorch keeps ``buf = momentum * buf + (grad + wd * w)`` and does
  ``w -= lr * buf``. With a constant lr these are the same recursion with ``mom = -lr * buf``,
  but converting a float32 ``mom`` to ``buf`` and back is not exact, so a run resumed from a
  checkpoint would drift from the uninterrupted one by an ulp. :class:`_PyTorchSGD` therefore
  keeps PyTorch's ``buf`` itself, updated with MXNet's fused kernels (two per parameter),
  and the checkpointed state is exactly the optimizer's state.

Replicas (``replicas=N``, a model built after ``configure_replicas(N)``): Gluon's own data
parallelism. The global batch is cut into the replicas' slices (``common.replicas.shard``), each
slice runs on its replica's context (the ``device`` KVStore: N contexts in this process; or
``dist_sync``: this worker's one context, the others in other processes), the per-example
losses are back-propagated, and ``Trainer.step(B)`` with the *global* batch size B rescales the
KVStore's gradient sum to the global batch's mean (the per-replica size would double the step).
The KVStore applies the optimizer (``update_on_kvstore``, Gluon's default; with ``dist_sync``
on the servers, which MXNet sends the optimizer to) and every context pulls the result. With
``dist_sync``, ``update_on_kvstore=False`` gave wrong momentum steps in 2 of 6 repeated runs
here (up to 10.8 absolute, cause unknown), so it is not used.

Precision: float32 only. MXNet's mixed precision is AMP (``mxnet.contrib.amp``: ``amp.init`` wraps
the operators process-wide, ``convert_symbol``/``convert_hybrid_block`` insert ``amp_cast`` nodes into
one graph). Both were tried on this build, the pip wheel (oneDNN, no CUDA), on an AVX2 CPU: with
``target_dtype="bfloat16"`` every Convolution and FullyConnected failed, forward already, with oneDNN's
"could not create a primitive descriptor iterator" (its bfloat16 kernels need AVX-512), and with
oneDNN off (MXNET_MKLDNN_ENABLED=0) MXNet's own kernels know no bfloat16 ("Unknown type enum 12");
with "float16" both paths stop at "FP16 gemm on cpu not implemented" (float16 is for CUDA GPUs). The
record's ``precision_gaps`` gives these reasons in the refusal.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from common.backend import TrainerBase
from common.replicas import SINGLE, replica_seed, shard_bounds
from common.weights import MOMENTUM_PREFIX, momentum_buffers, split_loss_scale

from . import CAPABILITIES
from ._framework import mx, replica_group, replica_kvstore
from ._model import AlexNet, _canonical_params, _check_model, _labels, as_input

gluon = mx.gluon


# A KVStore key outside the parameters' (0..15): with dist_sync, what the workers push there comes
# back summed, which is how they add up loss and accuracy and agree to stop (see _PyTorchSGD.update).
SUM_KEY = 1_000_000


class _PyTorchSGD(mx.optimizer.Optimizer):
    """``torch.optim.SGD`` (no dampening, no Nesterov) as an MXNet optimizer; state: PyTorch's ``buf``."""

    def __init__(self, momentum: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.momentum = momentum
        # Parameter index -> the buf create_state made: the very array the updater keeps and passes back
        # to update(), which changes it in place. Read and set here, the state needs none of Gluon's
        # private attributes; its public route (Trainer.save_states / load_states, the updater's
        # get_states / set_states) is a pickle, which this project never loads.
        self.buffers: dict[int, "mx.nd.NDArray"] = {}
        self.loaded: dict[int, np.ndarray] = {}  # set before the updater made that index's state

    def create_state(self, index, weight):
        if not self.momentum or index == SUM_KEY:
            return None
        # zeros act as PyTorch's missing buffer: momentum * 0 + g == g exactly on the first step
        start = self.loaded.pop(index, None)
        state = (mx.nd.zeros(weight.shape, weight.context, dtype=weight.dtype) if start is None
                 else mx.nd.array(start, ctx=weight.context, dtype=weight.dtype))
        self.buffers[index] = state
        return state

    def update(self, index, weight, grad, state):
        if index == SUM_KEY:  # on a dist_sync server: keep the workers' summed push, to be pulled
            weight[:] = grad
            return
        self._update_count(index)
        lr, wd = self._get_lr(index), self._get_wd(index)
        if state is None:  # w = w - lr * (rescale * grad + wd * w), fused
            mx.nd.sgd_update(weight, grad, lr=lr, wd=wd, rescale_grad=self.rescale_grad, out=weight)
            return
        # buf = momentum * buf + (rescale * grad + wd * w): sgd_mom_update with lr = -1 computes exactly
        # this in place of its momentum argument (mom = momentum * mom - lr * (wd * w + rescale * grad)).
        # Its other output, w + buf, goes over the spent gradient and is not used.
        mx.nd.sgd_mom_update(weight, grad, state, lr=-1.0, momentum=self.momentum, wd=wd,
                             rescale_grad=self.rescale_grad, out=grad)
        # w = w - lr * buf
        mx.nd.sgd_update(weight, state, lr=lr, wd=0.0, rescale_grad=1.0, out=weight)


class Trainer(TrainerBase):
    """One model's gluon.Trainer and steps; semantics of the contract's Trainer protocol."""

    CAPABILITIES = CAPABILITIES

    def __init__(self, model: AlexNet, *, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                 hybridize: bool | None = None, precision: str = "fp32", replicas: int = 1):
        super().__init__(_check_model(model), lr=lr, momentum=momentum, weight_decay=weight_decay,
                         precision=precision, replicas=replicas)
        self.group = replica_group() if replicas > 1 else SINGLE
        self.contexts = model.contexts
        if len(self.contexts) != self.group.local_replicas or self.group.replicas != replicas:
            raise ValueError(f"replicas={replicas}, but the model was built on {len(self.contexts)} context(s) for "
                             f"{self.group.replicas} replica(s): call alexnet_mx.configure_replicas({replicas}) "
                             "before building it")
        # build() hybridizes every model with static memory and shapes (Gluon's fast path); None
        # keeps that, False runs the blocks imperatively (to measure what hybridizing buys).
        if hybridize is not None:
            if hybridize:
                model.hybridize(active=True, static_alloc=True, static_shape=True)
            else:
                model.hybridize(active=False)
        self.hybridize = bool(model._active)
        self._loss = gluon.loss.SoftmaxCrossEntropyLoss()
        self._optimizer = _PyTorchSGD(momentum=self.momentum, learning_rate=float(lr), wd=self.weight_decay)
        # One device: no kvstore, updates run locally through the updater. Replicas: the KVStore sums
        # the gradients and applies the optimizer (update_on_kvstore). Either way the optimizer's
        # buffers are PyTorch's buf (with dist_sync, on the servers: not here).
        kvstore = replica_kvstore() if replicas > 1 else None
        params = list(model.collect_params().values())  # a list, so that the updater's index i is params[i]
        self._trainer = gluon.Trainer(params, self._optimizer, kvstore=kvstore,
                                      update_on_kvstore=True if replicas > 1 else None)
        self._distributed = replicas > 1 and self.group.processes > 1
        self._step_batch: int | None = None  # dist_sync: the batch size the servers' rescale was fixed for
        index = {id(p): i for i, p in enumerate(params)}
        self._index = {name: index[id(p)] for name, p in _canonical_params(model).items()}
        self._resize: dict[tuple[int, int], tuple] = {}

    def _read_lr(self) -> float:
        return float(self._trainer.learning_rate)

    def _write_lr(self, value: float) -> None:
        self._trainer.set_learning_rate(value)

    # ------------------------------------------------------------ data

    def prepare(self, images) -> "mx.nd.NDArray":
        """uint8 (N, h, w) -> float32 (N, C, H, W) on the model's device, as ``common.data.preprocess``:
        x / 255, then ``R_h @ x @ R_w.T`` with common's matrices (cached on the device), then normalise;
        the grey image fills each of the spec's C channels (``common.backend.prepared_reference``)."""
        from common.data import NORMALIZE_MEAN, NORMALIZE_STD, resize_matrix

        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 3:
            raise ValueError(f"expected uint8 images of shape (N, h, w), got {images.dtype} {images.shape}")
        ctx, (height, width) = self.model.ctx, self.model.spec.input_size
        n, src_h, src_w = images.shape
        if (src_h, src_w) not in self._resize:
            self._resize[(src_h, src_w)] = (
                mx.nd.array(resize_matrix(src_h, height), ctx=ctx, dtype="float32"),
                mx.nd.array(resize_matrix(src_w, width).T, ctx=ctx, dtype="float32"),
            )
        r_h, r_w_t = self._resize[(src_h, src_w)]
        x = mx.nd.array(images, ctx=ctx, dtype="uint8").astype("float32") / np.float32(255.0)
        x = mx.nd.batch_dot(r_h.expand_dims(0).broadcast_to((n, height, src_h)), x)  # (N, H, w)
        x = mx.nd.dot(x, r_w_t)  # (N, H, W)
        x = (x - np.float32(NORMALIZE_MEAN)) / np.float32(NORMALIZE_STD)
        return mx.nd.repeat(x.expand_dims(1), repeats=self.model.spec.in_channels, axis=1)

    # ------------------------------------------------------------ steps

    def train_step(self, x, labels, *, seed: int) -> tuple[float, int]:
        """One SGD step on the batch-mean loss; dropout masks are a function of ``seed`` only."""
        data, target = as_input(self.model, x), _labels(labels, self.model.ctx)
        if self.replicas > 1:
            return self._replicated_step(data, target, seed)
        mx.random.seed(int(seed))  # every context: the dropout masks of this step depend on seed alone
        with mx.autograd.record(train_mode=True):
            logits = self.model(data)
            loss = self._loss(logits, target)  # per example
        loss.backward()
        self._trainer.step(data.shape[0])  # rescales the summed gradient by 1/batch
        correct = (logits.argmax(axis=1) == target).sum()
        # asscalar() waits for MXNet's asynchronous engine: the step has finished when this returns
        return float(loss.mean().asscalar()), int(correct.asscalar())

    def _replicated_step(self, data, target, seed: int) -> tuple[float, int]:
        batch = data.shape[0]
        first = self.group.first_replica
        bounds = shard_bounds(batch, self.replicas)[first:first + self.group.local_replicas]
        work = [(ctx, start, stop, first + i) for i, (ctx, (start, stop)) in enumerate(zip(self.contexts, bounds))
                if stop > start]
        if len(work) < len(self.contexts):  # a replica without examples adds a zero gradient, not a stale one
            self.model.collect_params().zero_grad()
        scale = 1.0
        if self._distributed:
            # The servers' optimizer got its 1/batch rescale with the first step and keeps it, so
            # a later batch of another size (an epoch's last) scales its loss to match instead.
            self._step_batch = self._step_batch or batch
            scale = self._step_batch / batch
        losses, corrects = [], []
        for ctx, start, stop, replica in work:
            mx.random.seed(replica_seed(seed, replica, self.replicas), ctx=ctx)
        with mx.autograd.record(train_mode=True):
            for ctx, start, stop, _ in work:
                logits = self.model(data[start:stop].as_in_context(ctx))
                labels = target[start:stop].as_in_context(ctx)
                losses.append(self._loss(logits, labels) * scale if scale != 1.0 else self._loss(logits, labels))
                corrects.append((logits.argmax(axis=1) == labels).sum())
        mx.autograd.backward(losses)
        self._trainer.step(self._step_batch or batch)  # the global batch: the KVStore's sum / B
        loss_sum = sum(float(loss.sum().asscalar()) for loss in losses) / scale
        correct = sum(int(c.asscalar()) for c in corrects)
        loss_sum, correct = self._summed(loss_sum, correct)
        return loss_sum / batch, int(correct)

    def _summed(self, *values: float) -> list[float]:
        """``values`` summed over the processes (dist_sync: through the servers, SUM_KEY)."""
        if not self._distributed:
            return list(values)
        kvstore = replica_kvstore()  # the dist_sync KVStore the gluon.Trainer was given
        if not getattr(self, "_sum_key_ready", False):
            kvstore.init(SUM_KEY, mx.nd.zeros((len(values),), dtype="float64"))
            self._sum_key_ready = True
        kvstore.push(SUM_KEY, mx.nd.array(values, dtype="float64"))
        out = mx.nd.zeros((len(values),), dtype="float64")
        kvstore.pull(SUM_KEY, out=out)
        return out.asnumpy().tolist()

    def _any_process(self, flag: bool) -> bool:
        return self._summed(float(flag), 0.0)[0] > 0

    def eval_step(self, x, labels) -> tuple[float, int]:
        """Inference mode; (summed loss, correct predictions)."""
        data, target = as_input(self.model, x), _labels(labels, self.model.ctx)
        with mx.autograd.predict_mode():
            logits = self.model(data)
            loss = self._loss(logits, target).sum()
        correct = (logits.argmax(axis=1) == target).sum()
        return float(loss.asscalar()), int(correct.asscalar())

    # ------------------------------------------------------------ optimizer state

    def _check_local_momentum(self) -> None:
        if self._distributed:
            raise ValueError("with MXNet's dist_sync the momentum lives on the parameter servers, which MXNet "
                             "cannot save or set: no checkpoint with momentum; train without momentum, or with "
                             "the device engine")

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """``{"momentum/<name>": PyTorch's buf}`` in canonical layout; empty without momentum.

        Before the first step the buffers are zeros (PyTorch has none yet; a zero buffer
        gives the same first step, buf = g)."""
        if self.momentum == 0.0:
            return {}
        self._check_local_momentum()
        optimizer, params = self._optimizer, _canonical_params(self.model)
        result = {}
        for name, i in self._index.items():
            if i in optimizer.buffers:
                result[MOMENTUM_PREFIX + name] = optimizer.buffers[i].asnumpy()
            elif i in optimizer.loaded:
                result[MOMENTUM_PREFIX + name] = optimizer.loaded[i].copy()
            else:
                result[MOMENTUM_PREFIX + name] = np.zeros(params[name].shape, np.float32)
        return result

    def load_optimizer_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Set the momentum buffers from ``optimizer_state()``'s format (checked in full first by
        ``common.weights.momentum_buffers``; none given: zeros, a fresh start)."""
        split_loss_scale(state, scaled=False)  # float32 only: a loss scale (an fp16 run's) is refused
        buffers = momentum_buffers(self.model.spec, self.momentum, state)
        if not buffers:
            return
        self._check_local_momentum()
        optimizer = self._optimizer
        for name, i in self._index.items():
            value = np.array(buffers[name], np.float32)
            if i in optimizer.buffers:  # in place: the updater holds this very array
                optimizer.buffers[i][:] = value
            else:  # create_state starts from it
                optimizer.loaded[i] = value


def make_trainer(model, *, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                 hybridize: bool | None = None, precision: str = "fp32", replicas: int = 1) -> Trainer:
    """SGD with PyTorch's semantics through ``gluon.Trainer``. ``hybridize`` None keeps the model
    as ``build`` made it (hybridized, static_alloc and static_shape); ``precision`` is fp32 only (module docstring);
    ``replicas`` N > 1 trains a model built after ``configure_replicas(N)`` (module docstring)."""
    return Trainer(model, lr=lr, momentum=momentum, weight_decay=weight_decay, hybridize=hybridize,
                   precision=precision, replicas=replicas)
