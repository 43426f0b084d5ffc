"""Training for the PyTorch backend: a plain module and ``torch.optim.SGD``.

PyTorch's SGD *is* the project's reference rule (coupled L2 on every parameter, biases
included; ``buf = momentum * buf + g``, ``buf = g`` on the first step; ``w -= lr * buf``),
so the fast path and the reference are the same code.

Speed options (``make_trainer`` keywords; ``None`` picks the fastest correct default for
the device, and ``alexnet bench --ablate`` measures each one on and off):

* ``channels_last``: the model's parameters (converted in place) and every input in the
  channels-last (NHWC) memory format. Default: ``_model.prefers_channels_last`` (on a CPU with
  AVX-512, and on a GPU whose convolutions run on tensor cores: TF32, bf16, fp16), the format
  ``build`` already gave a CPU model.
* ``compile``: ``torch.compile`` of the forward pass. Default off: its compile time (training,
  evaluation and an epoch's smaller last batch each compile their own graph) costs more than it
  saves over the book's 10 epochs; a win for long runs (docs/notes.md), so an option (``--on compile``).
* ``stem_matmul``: the first convolution (one input channel) as unfold + one matrix product
  (``_model.Conv2d``). Default off until measured on a GPU; ``scripts/gpu-check.sh``'s ablation flips it.
* ``fused_sgd``: ``torch.optim.SGD(fused=True)``, the whole update in one kernel instead of one
  per tensor group. The same arithmetic (tests hold it to float32 rounding); off until measured.
* ``cuda_graphs``: the whole training step (forward, loss, backward, SGD update) captured once per
  batch shape as a ``torch.cuda.CUDAGraph`` with static input buffers and replayed, so the CPU
  launches one graph instead of hundreds of kernels. The first ``GRAPH_WARMUPS`` steps of each
  shape run eagerly (real steps: cuDNN chooses its algorithms, the momentum buffers appear), then
  the step is captured; an epoch's last, smaller batch gets its own graph once seen as often. Dropout
  draws from the generator seeded before each replay, as before each eager step. A new ``lr`` or
  optimizer state drops the graphs (they hold the old values). GPU only, and not with ``compile``,
  replicas or fp16's loss scale (its skip decision is read on the host); off until measured.
* ``precision``: "fp32" (default, what parity checks), or "bf16"/"fp16" autocast mixed
  precision (float32 master weights and optimizer state; fp16 with ``torch.amp.GradScaler``, set to the
  project's one dynamic loss-scaling rule, ``common.weights``' LOSS_SCALE_*: start at 2**15, double
  after 2000 finite steps, halve and skip the step on a non-finite gradient; its scale and count are
  in ``optimizer_state()``, so a resumed fp16 run equals an uninterrupted one).

Replicas (``replicas=N``, in each of N processes that ``configure_replicas(N)`` joined into a
process group): the model runs wrapped in ``DistributedDataParallel``. Every process is given
the *global* batch and keeps its own slice (``common.replicas.shard``); DDP averages the N
gradients, so each process differentiates its examples' summed loss times N / B (B the global
batch): the average is then the gradient of the global batch's mean loss, also when an epoch's
last batch does not divide evenly. ``torch.optim.SGD`` adds the weight decay and steps after the
average, identically in every process, so the copies stay equal. Loss and accuracy come back
summed over the processes; evaluation is split and summed the same way.
"""
from __future__ import annotations

import contextlib
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from common.backend import TrainerBase
from common.replicas import SINGLE, replica_seed, shard
from common.weights import (DTYPE, LOSS_SCALE_FACTOR, LOSS_SCALE_GROWTH_INTERVAL, LOSS_SCALE_INITIAL,
                            LOSS_SCALED_PRECISIONS, MOMENTUM_PREFIX, loss_scale_entries, momentum_buffers,
                            split_loss_scale)

from . import CAPABILITIES
from ._framework import DTYPES, replica_group
from ._model import (AlexNet, _numpy, _parameters, as_input, as_labels, memory_format, model_device, model_spec,
                     prefers_channels_last, stem)

# Eager steps of a batch shape before its step is captured as a CUDA graph (PyTorch's advice: warm
# up on a side stream first, so cuDNN's autotuning and lazy allocations happen outside the capture).
GRAPH_WARMUPS = 3


class _GraphedStep:
    """One batch shape's captured training step: its static buffers, outputs and eager count."""

    def __init__(self):
        self.eager_steps = 0
        self.graph = self.x = self.labels = self.loss = self.correct = None


class Trainer(TrainerBase):
    """One model's ``torch.optim.SGD`` and its train / eval steps (see ``common.backend.Trainer``)."""

    CAPABILITIES = CAPABILITIES

    def __init__(self, model: AlexNet, *, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                 channels_last: bool | None = None, compile: bool | None = None, stem_matmul: bool | None = None,
                 fused_sgd: bool | None = None, cuda_graphs: bool | None = None, precision: str = "fp32",
                 replicas: int = 1):
        super().__init__(model, lr=lr, momentum=momentum, weight_decay=weight_decay, precision=precision,
                         replicas=replicas)
        self.group = replica_group() if replicas > 1 else SINGLE
        if replicas > 1 and self.group.replicas != replicas:
            raise ValueError(f"replicas={replicas} needs a process group of {replicas} processes "
                             f"(alexnet_pt.configure_replicas({replicas}) in each); this process is in "
                             f"{'none' if self.group.replicas == 1 else f'one of {self.group.replicas}'}")
        self.spec = model_spec(model)
        self.device = model_device(model)
        self.channels_last = prefers_channels_last(self.device, precision) if channels_last is None else bool(channels_last)
        self.compile = bool(compile)
        self.stem_matmul = bool(stem_matmul)
        self.fused_sgd = bool(fused_sgd)
        self.cuda_graphs = bool(cuda_graphs)
        if self.cuda_graphs:
            _check_graphable(self.device, self.compile, self.replicas, self.precision)
        stem(model).as_matmul = self.stem_matmul  # on the module: forward and loss_and_grads run it too
        # The parameters move to the chosen memory format in place (same Parameter objects, same
        # values); a channels-last model still computes the same function on NCHW-shaped inputs.
        model.to(memory_format=memory_format(self.channels_last))
        if self.device.type == "cuda":  # fixed shapes: let cuDNN time its algorithms once and keep the fastest
            torch.backends.cudnn.benchmark = True
        self._forward = model
        if replicas > 1:
            from torch.nn.parallel import DistributedDataParallel

            self._forward = DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self._forward = torch.compile(self._forward) if self.compile else self._forward
        self._autocast_dtype = None if precision == "fp32" else DTYPES[precision]
        self._scaler = torch.amp.GradScaler(
            self.device.type, init_scale=LOSS_SCALE_INITIAL, growth_factor=LOSS_SCALE_FACTOR,
            backoff_factor=1 / LOSS_SCALE_FACTOR, growth_interval=LOSS_SCALE_GROWTH_INTERVAL,
        ) if precision in LOSS_SCALED_PRECISIONS else None
        self._params = _parameters(model)
        self.optimizer = torch.optim.SGD(
            list(self._params.values()), lr=float(lr), momentum=self.momentum, weight_decay=self.weight_decay,
            dampening=0.0, nesterov=False, **({"fused": True} if self.fused_sgd else {}),
        )
        self._graphs: dict[tuple, _GraphedStep] = {}  # batch shape -> its captured step (cuda_graphs)
        self._side_stream = torch.cuda.Stream(self.device) if self.cuda_graphs else None
        self._resize: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def _read_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _write_lr(self, value: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = value
        self._graphs.clear()  # a captured update holds the old lr

    # ------------------------------------------------------------------ data
    def prepare(self, images: Any) -> torch.Tensor:
        """uint8 (N, h, w) -> normalised float32 (N, C, H, W) on the model's device.

        The same arithmetic as ``common.data.preprocess`` (x / 255, ``R_h @ x @ R_w.T`` with
        ``common.data.resize_matrix``, then ``(x - mean) / std``), done with torch's matmul
        where the model lives; the resize matrices are cached as device tensors. The grey
        image fills each of the spec's C channels (``common.backend.prepared_reference``).
        """
        from common import data  # lazily: the data module is optional for inference-only use

        images = torch.as_tensor(images)
        if images.dtype != torch.uint8 or images.ndim != 3:
            raise ValueError(f"expected uint8 images of shape (N, h, w), got {images.dtype} {tuple(images.shape)}")
        images = images[self._shard(len(images))]  # with replicas: this process's slice of the global batch
        src = (int(images.shape[1]), int(images.shape[2]))
        if src not in self._resize:
            (height, width) = self.spec.input_size
            self._resize[src] = tuple(
                torch.from_numpy(data.resize_matrix(s, d)).to(self.device) for s, d in ((src[0], height), (src[1], width))
            )
        r_h, r_w = self._resize[src]
        mean, std = float(data.NORMALIZE_MEAN), float(data.NORMALIZE_STD)
        x = images.to(self.device, non_blocking=True).to(torch.float32) / 255.0
        x = torch.matmul(torch.matmul(r_h, x), r_w.T)
        x = ((x - mean) / std).unsqueeze(1)
        return self._layout(x.expand(-1, self.spec.in_channels, -1, -1))

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=memory_format(self.channels_last))

    def _autocast(self):
        if self._autocast_dtype is None:
            return contextlib.nullcontext()
        # no cast cache with graphs: a cached cast made in one replay would be stale in the next
        return torch.autocast(self.device.type, dtype=self._autocast_dtype, cache_enabled=not self.cuda_graphs)

    # ----------------------------------------------------------------- steps
    @contextlib.contextmanager
    def _seeded(self, seed: int):
        """Dropout draws inside depend only on ``seed``; the caller's RNG state is restored after."""
        cuda = [self.device.index if self.device.index is not None else torch.cuda.current_device()] \
            if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda, device_type="cuda"):
            torch.random.default_generator.manual_seed(int(seed))
            for index in cuda:
                torch.cuda.default_generators[index].manual_seed(int(seed))
            yield

    # ------------------------------------------------------------- replicas
    def _shard(self, batch: int) -> slice:
        return shard(batch, self.replicas, self.group.rank) if self.replicas > 1 else slice(None)

    def _local(self, x: Any, labels: Any) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(this process's inputs, its labels, the global batch size) from the global labels and
        either the global inputs or those ``prepare`` already cut to this process's slice."""
        batch = len(labels)
        part = self._shard(batch)
        if self.replicas > 1 and len(x) == batch:
            x = x[part]
        return self._layout(as_input(self.model, x)), as_labels(self.model, labels[part]), batch

    def _summed(self, *values: float) -> list[float]:
        """``values`` summed over the processes (as they are, with one)."""
        if self.replicas == 1:
            return list(values)
        import torch.distributed as dist

        device = self.device if self.device.type == "cuda" else torch.device("cpu")
        totals = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(totals)
        return totals.tolist()

    def _any_process(self, flag: bool) -> bool:
        return self._summed(float(flag))[0] > 0

    def _step(self, inputs: torch.Tensor, targets: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward, loss, backward and update, all on the device: (loss, correct) as device tensors."""
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            logits = self._forward(inputs)
            if self.replicas == 1:
                loss = F.cross_entropy(logits.float(), targets)
            else:  # DDP averages over the N processes: N / B * (sum here) averages to the global mean
                loss = F.cross_entropy(logits.float(), targets, reduction="sum") * (self.replicas / batch)
        if self._scaler is None:
            loss.backward()
            self.optimizer.step()
        else:
            self._scaler.scale(loss).backward()
            self._scaler.step(self.optimizer)
            self._scaler.update()
        return loss.detach(), (logits.detach().argmax(dim=1) == targets).sum()

    def _graphed(self, inputs: torch.Tensor, targets: torch.Tensor, batch: int, seed: int):
        """``_step`` through the batch shape's CUDA graph: eager while warming up, then captured once
        (the capture computes nothing) and replayed for this step and every later one."""
        entry = self._graphs.setdefault(tuple(inputs.shape), _GraphedStep())
        if entry.graph is None and entry.eager_steps < GRAPH_WARMUPS:
            entry.eager_steps += 1
            self._side_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._side_stream), self._seeded(seed):
                result = self._step(inputs, targets, batch)
            torch.cuda.current_stream(self.device).wait_stream(self._side_stream)
            return result
        if entry.graph is None:
            entry.x, entry.labels = inputs.clone(), targets.clone()
            entry.graph = torch.cuda.CUDAGraph()
            self.optimizer.zero_grad(set_to_none=True)  # the graph's backward writes its own gradients
            with self._seeded(seed), torch.cuda.graph(entry.graph):
                entry.loss, entry.correct = self._step(entry.x, entry.labels, batch)
        entry.x.copy_(inputs)
        entry.labels.copy_(targets)
        with self._seeded(seed):  # the replay's dropout draws from the generator as seeded now
            entry.graph.replay()
        return entry.loss, entry.correct

    def train_step(self, x: Any, labels: Any, *, seed: int) -> tuple[float, int]:
        """One SGD step on the (global) batch; returns (mean loss, correct predictions before the step)."""
        inputs, targets, batch = self._local(x, labels)
        self.model.train(True)
        seed = replica_seed(seed, self.group.rank, self.replicas)
        if self.cuda_graphs:
            loss, correct = self._graphed(inputs, targets, batch, seed)
        else:
            with self._seeded(seed):
                loss, correct = self._step(inputs, targets, batch)
        # .item() waits for the device: the step is finished when this returns (timing relies on it)
        if self.replicas == 1:
            return float(loss.item()), int(correct.item())
        loss_sum, correct = self._summed(loss.item() * batch / self.replicas, correct.item())
        return loss_sum / batch, int(correct)

    def eval_step(self, x: Any, labels: Any) -> tuple[float, int]:
        """Inference mode; returns (summed cross-entropy, correct predictions), over all processes."""
        inputs, targets, _ = self._local(x, labels)
        self.model.train(False)
        with torch.no_grad(), self._autocast():
            logits = self._forward(inputs).float()
            loss = F.cross_entropy(logits, targets, reduction="sum")
            correct = (logits.argmax(dim=1) == targets).sum()
        loss_sum, correct = self._summed(loss.item(), correct.item())
        return float(loss_sum), int(correct)

    # ------------------------------------------------------- optimizer state
    def optimizer_state(self) -> dict[str, np.ndarray]:
        """``{"momentum/<param>": buffer}`` in canonical layout (none when momentum is 0), and with fp16
        the GradScaler's scale and count (``common.weights.loss_scale_entries``).

        Before the first step the buffers are zeros, which is the same thing: PyTorch's
        ``buf = g`` on the first step equals ``momentum * 0 + g``.
        """
        state: dict[str, np.ndarray] = {}
        if self._scaler is not None:
            scaler = self._scaler.state_dict()
            state.update(loss_scale_entries(scaler["scale"], scaler["_growth_tracker"]))
        if self.momentum == 0.0:
            return state
        for name, param in self._params.items():
            buf = self.optimizer.state.get(param, {}).get("momentum_buffer")
            state[MOMENTUM_PREFIX + name] = (np.zeros(tuple(param.shape), DTYPE) if buf is None  # C order, whatever the memory format
                                       else _numpy(buf).astype(DTYPE, copy=True))
        return state

    def load_optimizer_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Set the momentum buffers from ``optimizer_state()`` output (checked in full first by
        ``common.weights.split_loss_scale`` and ``momentum_buffers``; none given: zeros and the initial
        loss scale, a fresh start)."""
        state, loss_scale = split_loss_scale(state, scaled=self._scaler is not None)
        buffers = momentum_buffers(self.spec, self.momentum, state)
        self._graphs.clear()  # the captured update reads the buffers it was captured with
        if loss_scale is not None:
            scale, good_steps = loss_scale
            self._scaler.load_state_dict({**self._scaler.state_dict(), "scale": scale, "_growth_tracker": good_steps})
        for name, param in self._params.items():
            if name in buffers:
                buf = torch.from_numpy(np.array(buffers[name], dtype=DTYPE)).to(self.device)
                # in the parameter's memory format (channels-last or not), as SGD would have made it
                self.optimizer.state[param]["momentum_buffer"] = torch.empty_like(param).copy_(buf)


def _check_graphable(device: torch.device, compile: bool, replicas: int, precision: str) -> None:
    """``cuda_graphs``' conditions, refused in one line each before any work."""
    if device.type != "cuda":
        raise ValueError("cuda_graphs captures the step's CUDA kernels (torch.cuda.CUDAGraph): it needs a model "
                         f"on a CUDA GPU, and this one is on the {device.type.upper()}")
    if compile:
        raise ValueError("cuda_graphs and compile exclude each other: choose one (--off compile or --off cuda_graphs)")
    if replicas > 1:
        raise ValueError("cuda_graphs is not used with replicas: DistributedDataParallel's all-reduce is not captured")
    if precision in LOSS_SCALED_PRECISIONS:
        raise ValueError(f"cuda_graphs is not used with {precision}: the dynamic loss scale decides on the host "
                         "whether to skip each step")


def make_trainer(model: AlexNet, *, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                 channels_last: bool | None = None, compile: bool | None = None, stem_matmul: bool | None = None,
                 fused_sgd: bool | None = None, cuda_graphs: bool | None = None, precision: str = "fp32",
                 replicas: int = 1) -> Trainer:
    """SGD with PyTorch's semantics; the speed options and ``replicas`` are described in the module docstring."""
    return Trainer(model, lr=lr, momentum=momentum, weight_decay=weight_decay,
                   channels_last=channels_last, compile=compile, stem_matmul=stem_matmul, fused_sgd=fused_sgd,
                   cuda_graphs=cuda_graphs, precision=precision, replicas=replicas)
