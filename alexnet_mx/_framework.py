"""MXNet, imported once for the whole backend, and everything about configuring it.

What must happen before MXNet is imported comes first: one numpy shim and one thread default.

MXNet 1.9.1 still reads ``numpy.bool``, an alias numpy removed in 1.24 (it raises
AttributeError there, and a FutureWarning on 1.20-1.23 when touched with hasattr).
Restore only that alias, and only when it is missing; nothing else in numpy is patched.

MXNet's operators run on OpenMP threads, and on x86 MXNet 1.9 starts from half the CPUs it
sees, assuming every core has two hyper-threads; where cores have one thread it leaves half of
them idle (docs/notes.md). So unless the user chose (``OMP_NUM_THREADS`` or
``MXNET_OMP_MAX_THREADS`` set), MXNet gets one thread per physical core it may run on.

A missing install is an ImportError naming the extra. The rest serves the bench: the matmul
peak, waiting for MXNet's asynchronous engine, memory, and the build's features.
"""
from __future__ import annotations

import os

import numpy

from common.machine import physical_cores

if "bool" not in numpy.__dict__:  # checked this way: hasattr() warns on numpy 1.26
    numpy.bool = bool  # the builtin is what the removed alias pointed to


if "OMP_NUM_THREADS" not in os.environ:
    os.environ.setdefault("MXNET_OMP_MAX_THREADS", str(physical_cores()))


import functools  # noqa: E402

from common.backend import GpuStatus, apply_math_environment, device_helpers, math_environment, require_framework  # noqa: E402
from common.errors import first_line  # noqa: E402
from common.replicas import SINGLE, ReplicaGroup, check_replicas  # noqa: E402

from . import CAPABILITIES  # noqa: E402

FRAMEWORK = CAPABILITIES.framework
# A dist_sync server or scheduler (DMLC_ROLE) runs its whole loop inside ``import mxnet`` and exits
# there: before this module is complete, so the server could not unpickle the optimizer the workers
# send it (a class of this package). The role is hidden during the import; ``serve_kvstore`` runs it.
_ROLE = os.environ.pop("DMLC_ROLE") if os.environ.get("DMLC_ROLE") in ("server", "scheduler") else None
try:
    mx = require_framework("mxnet", CAPABILITIES)
finally:
    if _ROLE is not None:
        os.environ["DMLC_ROLE"] = _ROLE


# MXNet 1.9.1's CUDA wheels (the last) carry kernels for compute capabilities up to 8.6 and no PTX.
LAST_WHEEL_COMPUTE_CAPABILITY = 86


@functools.lru_cache(maxsize=None)
def gpu_status() -> GpuStatus:
    """Proven, not counted: a small convolution forward and backward must run on mx.gpu(0).
    MXNet counts a GPU newer than its kernels (compute capability above 8.6) and then cannot run one on it."""
    from mxnet.runtime import Features

    if not Features().is_enabled("CUDA"):
        return GpuStatus(False, "this MXNet build has no CUDA (the pip 'mxnet' package is CPU only)")
    try:
        count = mx.context.num_gpus()
    except mx.base.MXNetError as error:
        return GpuStatus(False, f"MXNet could not count GPUs ({first_line(error)})")
    if count == 0:
        return GpuStatus(False, "MXNet sees no GPU")
    ctx = mx.gpu(0)
    try:
        capability = mx.util.get_cuda_compute_capability(ctx)
    except Exception:  # the driver library could not be asked: the convolution below decides
        capability = None
    try:
        x = mx.nd.random.normal(shape=(2, 3, 8, 8), ctx=ctx)
        w = mx.nd.random.normal(shape=(4, 3, 3, 3), ctx=ctx)
        w.attach_grad()
        with mx.autograd.record():
            loss = mx.nd.Convolution(x, w, kernel=(3, 3), num_filter=4, no_bias=True).square().sum()
        loss.backward()
        w.grad.wait_to_read()
    except mx.base.MXNetError as error:
        if capability is not None and capability > LAST_WHEEL_COMPUTE_CAPABILITY:
            why = (f"this MXNet build has no kernels for compute capability {capability // 10}.{capability % 10} "
                   f"(MXNet 1.9.1's CUDA wheels stop at 8.6, without PTX)")
        else:
            why = f"a convolution failed on GPU 0 ({first_line(error)})"
        return GpuStatus(False, why, present=True)
    return GpuStatus(True, f"GPU 0 (compute capability {capability / 10:.1f})" if capability else "GPU 0", present=True)


def set_math_mode(math: str) -> None:
    """MXNet reads its tensor-core switches when it starts, so the math mode is fixed by the
    environment before import (``common.backend.math_environment``, which the CLI and bench set).
    Here: refuse a change that can no longer act."""
    wanted = math_environment(CAPABILITIES.check_math_mode(math))
    stale = {k: v for k, v in wanted.items() if os.environ.get(k, v) != v}
    if stale and gpu_status().usable:
        raise ValueError(f"MXNet's math mode is fixed when it is imported; start the process with "
                         f"{' '.join(f'{k}={v}' for k, v in wanted.items())} for {math}")
    apply_math_environment(math)  # for child processes


gpu_available, disable_tf32, resolve_device = device_helpers(gpu_status, set_math_mode, FRAMEWORK)


def context(device: str):
    """'cpu' / 'gpu' (already resolved by common.backend.choose_device) -> an MXNet context."""
    return mx.gpu(0) if device == "gpu" else mx.cpu()


# ------------------------------------------------------------------ replicas
# What configure_replicas set up: the contexts models are built on, and the KVStore that joins them.
_replicas: dict = {"group": SINGLE, "contexts": None, "kvstore": None}


def configure_replicas(replicas: int, device: str = "auto") -> ReplicaGroup:
    """Set up MXNet's KVStore for ``replicas`` replicas; call it before building the model.

    * Started as a ``dist_sync`` worker (``DMLC_ROLE=worker`` with the other ``DMLC_*`` variables
      of a parameter-server job; one worker per replica, on one or several machines): the
      ``dist_sync`` KVStore, one context here (the first GPU it sees, or the CPU). The servers
      apply the optimizer (``update_on_kvstore``), so the momentum lives on them.
    * Otherwise the ``device`` KVStore in this process over ``replicas`` contexts: GPUs 0..N-1,
      or on a CPU N CPU contexts (MXNet runs them on one device: that measures the engine, not
      a speed-up).

    Models built afterwards have a copy of every parameter on each context."""
    check_replicas(replicas)
    if replicas == 1:
        _replicas.update(group=SINGLE, contexts=None, kvstore=None)
        return SINGLE
    where = resolve_device(device)
    if os.environ.get("DMLC_ROLE") == "worker":
        workers = int(os.environ.get("DMLC_NUM_WORKER", "0"))
        if workers != replicas:
            raise ValueError(f"DMLC_NUM_WORKER={workers}, but {replicas} replicas were asked for (one per worker)")
        kvstore = mx.kv.create("dist_sync")
        contexts = [context(where)]  # GPU 0 of those the worker sees: CUDA_VISIBLE_DEVICES picks it
        group = ReplicaGroup("dist_sync", replicas, rank=kvstore.rank, processes=kvstore.num_workers,
                             first_replica=kvstore.rank)
    else:
        if where == "gpu" and mx.context.num_gpus() < replicas:
            raise ValueError(f"{replicas} replicas on GPUs need {replicas} GPUs; MXNet sees {mx.context.num_gpus()}")
        contexts = [mx.gpu(i) if where == "gpu" else mx.cpu(i) for i in range(replicas)]
        kvstore = "device"
        group = ReplicaGroup("device", replicas, local_replicas=replicas)
    _replicas.update(group=group, contexts=contexts, kvstore=kvstore)
    return group


def serve_kvstore() -> None:
    """Run this process as the ``dist_sync`` server or scheduler that ``DMLC_ROLE`` names, until the
    workers finish; then the process exits (MXNet's own server loop). Start one scheduler and one or
    more servers with ``python -c "import alexnet_mx; alexnet_mx.serve_kvstore()"``. The servers
    unpickle the optimizer the workers send (MXNet's protocol): run them on a trusted network only."""
    if os.environ.get("DMLC_ROLE") not in ("server", "scheduler"):
        raise RuntimeError(f"serve_kvstore runs a dist_sync server or scheduler: set DMLC_ROLE to one of them, "
                           f"not {os.environ.get('DMLC_ROLE')!r}")
    from mxnet.kvstore.kvstore_server import _init_kvstore_server_module

    _init_kvstore_server_module()  # runs the role's loop, then sys.exit()


def replica_group() -> ReplicaGroup:
    """The group ``configure_replicas`` set up last (one replica if never called)."""
    return _replicas["group"]


def replica_contexts(device: str) -> list:
    """The contexts a model is built on: the replicas' if configured, else ``device``'s one."""
    return list(_replicas["contexts"] or [context(device)])


def replica_kvstore():
    """The KVStore joining the replicas: "device", a dist_sync KVStore, or None for one replica."""
    return _replicas["kvstore"]


# ------------------------------------------------------------------ for the bench
def matmul_products(n: int, device: str, precision: str) -> dict:
    CAPABILITIES.check_precision(precision)
    ctx = context(device)
    a, b = (mx.nd.random.normal(shape=(n, n), ctx=ctx) for _ in range(2))
    # Two routes to a matrix product: nd.dot goes to the BLAS MXNet was built with (OpenBLAS in
    # the pip wheel), FullyConnected to oneDNN (MKL-DNN), which is what the Dense layers run.
    return {"nd.dot": lambda: mx.nd.dot(a, b).wait_to_read(),
            "nd.FullyConnected": lambda: mx.nd.FullyConnected(a, b, no_bias=True, num_hidden=n).wait_to_read()}


def synchronize(device: str) -> None:
    # MXNet's engine is asynchronous on CPU too: reading the loss waits for the forward pass only,
    # while the backward pass and the update may still be queued
    mx.nd.waitall()


def peak_device_memory(device: str) -> int | None:
    if device != "gpu":
        return None
    free, total = mx.context.gpu_memory_info(0)
    return int(total - free)  # in use now (MXNet reports no peak)


def runtime_info(device: str) -> dict:
    from mxnet.runtime import Features

    features = Features()
    info = {"framework": f"MXNet {mx.__version__}",
            "features": [name for name in ("MKLDNN", "BLAS_OPEN", "BLAS_MKL", "OPENMP", "CUDA", "CUDNN")
                         if features.is_enabled(name)]}
    # The cap MXNet's engine puts on its operators' OpenMP threads (libgomp's own
    # omp_get_max_threads() does not show it: it read 2 while MXNet used 1 core here).
    # The default above sets MXNET_OMP_MAX_THREADS unless the user chose.
    info["operator_threads"] = (os.environ.get("MXNET_OMP_MAX_THREADS") or os.environ.get("OMP_NUM_THREADS")
                                or "MXNet's default: half the CPUs on x86")
    return info
