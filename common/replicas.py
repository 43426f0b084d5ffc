"""Data parallelism, the framework-free part: how a global batch is split over N replicas,
how each replica seeds its dropout, and the record of a replica group.

Each backend runs its framework's own engine, named in its record (``Capabilities.replicas``);
what they must agree on to take the same step as one
replica on the whole batch is here, once:

* **Shards.** Replica ``r`` of ``n`` takes a contiguous slice of the global batch (the first
  ``batch % n`` replicas one example more when the batch does not divide, as an epoch's last
  batch may not). The loss each replica differentiates is its examples' summed loss divided
  by the *global* batch size, so the engine's gradient sum is the gradient of the global
  batch's mean loss, whatever the shard sizes.
* **Dropout.** Replica ``r`` of ``n > 1`` draws its masks from ``replica_seed(step seed, r)``,
  where the step seed is ``common.train.step_seed(seed, epoch, batch)``: a function of
  (seed, rank, step) only, so a resumed run draws the same masks, and two replicas never
  draw the same ones. One replica keeps the step seed itself (the single-replica path is
  unchanged).
"""
from __future__ import annotations

import socket
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ReplicaEngine:
    """A framework's own data-parallel engine, as a backend's ``Capabilities.replicas`` lists it.

    ``processes``: one process per replica (``alexnet train --replicas N`` starts them on this
    machine through ``common.launch``); otherwise one process drives every replica."""

    name: str
    what: str
    processes: bool = False
    # Memory one replica process takes before its model: the interpreter, the framework, the data.
    process_mib: int = 0


@dataclass(frozen=True)
class ReplicaGroup:
    """The replicas one run is split over, as a backend's ``configure_replicas`` set them up."""

    engine: str  # a ReplicaEngine name: "ddp", "mirrored", "multi_worker", "device", "dist_sync"
    replicas: int  # N: replicas taking part in every step, over all processes
    rank: int = 0  # this process among the processes (rank 0 writes the run's records)
    processes: int = 1
    first_replica: int = 0  # the global index of this process's first replica
    local_replicas: int = 1  # how many replicas this process drives (N in one process, 1 per process)

    def __post_init__(self):
        if self.replicas < 1 or self.processes < 1 or not 0 <= self.rank < self.processes:
            raise ValueError(f"inconsistent replica group {self}")
        if not 0 <= self.first_replica <= self.first_replica + self.local_replicas <= self.replicas:
            raise ValueError(f"inconsistent replica group {self}")

    @property
    def writer(self) -> bool:
        """Whether this process writes the records (metrics, curves, checkpoints) and shows progress."""
        return self.rank == 0


SINGLE = ReplicaGroup("none", 1)


def check_replicas(replicas: int, batch_size: int | None = None) -> int:
    """``replicas`` as a positive int; with ``batch_size``, a global batch that splits evenly."""
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise ValueError(f"replicas must be a positive int, got {replicas!r}")
    if batch_size is not None and batch_size % replicas:
        raise ValueError(f"the batch size {batch_size} does not split evenly over {replicas} replicas; "
                         f"choose a multiple of {replicas}")
    return replicas


def replica_bytes(spec, engine: ReplicaEngine, batch_per_replica: int) -> int:
    """About how much memory one replica process needs to train ``spec`` on a CPU: ``engine``'s
    own (``process_mib``), four copies of the parameters (weights, gradients, momentum, a spare)
    and three of its batch's activations (outputs, their gradients, what the backward pass keeps)."""
    from .shapes import infer, totals

    total = totals(infer(spec, batch=max(1, batch_per_replica)))
    return (engine.process_mib << 20) + 16 * total["params"] + 3 * total["activation_bytes"]


def check_replicas_fit(replicas: int, one_replica: int, *, cpus: int, available: int | None) -> None:
    """Refuse, before any process starts, more replica processes than this machine can run: each
    needs a CPU of its own (``cpus``: those this process may use) and ``one_replica`` bytes of the
    ``available`` memory (None: unknown, not checked). Too many would only thrash, or wake the
    kernel's out-of-memory killer for the whole machine."""
    if replicas > cpus:
        raise ValueError(f"--replicas {replicas}: each replica process needs a CPU of its own and this process may "
                         f"use {cpus}; use --replicas {cpus} or fewer")
    if available is not None and replicas * one_replica > available:
        fit = max(1, available // one_replica)
        raise ValueError(f"--replicas {replicas}: each replica process needs about {one_replica / 2**30:.1f} GiB "
                         f"of memory, {replicas} need {replicas * one_replica / 2**30:.1f} GiB and "
                         f"{available / 2**30:.1f} GiB is available; use --replicas {fit} or fewer, or a "
                         "smaller --batch-size")


def shard_bounds(batch: int, replicas: int) -> list[tuple[int, int]]:
    """(start, stop) of each replica's contiguous slice of a global batch of ``batch`` examples;
    sizes differ by at most one, the larger first (a replica may get none when batch < replicas)."""
    check_replicas(replicas)
    size, extra = divmod(int(batch), replicas)
    bounds, start = [], 0
    for replica in range(replicas):
        stop = start + size + (replica < extra)
        bounds.append((start, stop))
        start = stop
    return bounds


def shard(batch: int, replicas: int, replica: int) -> slice:
    """Replica ``replica``'s slice of a global batch of ``batch`` examples (``shard_bounds``)."""
    return slice(*shard_bounds(batch, replicas)[replica])


def replica_seed(step_seed: int, replica: int, replicas: int) -> int:
    """The dropout seed of one replica in one step: the step seed itself for a single replica,
    else a function of (step seed, replica) drawn like ``common.train.step_seed``."""
    if replicas == 1:
        return int(step_seed)
    return int(np.random.default_rng([int(step_seed), int(replica), 0x5EED]).integers(0, 2**31 - 1))


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now (the OS picks it; a race with another program is possible
    but harmless: the engine then fails to bind and says so)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])
