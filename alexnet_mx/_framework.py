"""MXNet, imported once for the whole backend, and everything about configuring it.

What must happen before MXNet is imported comes first: one numpy shim and one thread default.

MXNet 1.9.1 still reads ``numpy.bool``, an alias numpy removed in 1.24 (it raises
AttributeError there, and a FutureWarning on 1.20-1.23 when touched with hasattr).
Restore only that alias, and only when it is missing; nothing else in numpy is patched.

MXNet's operators run on OpenMP threads, and on x86 MXNet 1.9 starts from half the CPUs it
sees, assuming every core has two hyper-threads. Where that is not so it leaves cores idle:
on this project's 2-vCPU machine (one thread per core) it used one core of two, and both
halved the measured matmul rate (167 against 324 GFLOP/s) and training throughput
(docs/benchmarks.md). So unless the user chose (``OMP_NUM_THREADS`` or
``MXNET_OMP_MAX_THREADS`` set), MXNet gets one thread per physical core it may run on.

A missing install is an ImportError naming the extra. The rest serves the bench: the matmul
peak, waiting for MXNet's asynchronous engine, memory, and the build's features.
"""
from __future__ import annotations

import os

import numpy

if "bool" not in numpy.__dict__:  # checked this way: hasattr() warns on numpy 1.26
    numpy.bool = bool  # the builtin is what the removed alias pointed to


def physical_cores() -> int:
    """Distinct physical cores among the CPUs this process may use (Linux sysfs); the count of
    usable CPUs where the topology cannot be read."""
    usable = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in usable:
        topology = f"/sys/devices/system/cpu/cpu{cpu}/topology/"
        try:
            with open(topology + "physical_package_id") as package, open(topology + "core_id") as core:
                cores.add((package.read().strip(), core.read().strip()))
        except OSError:
            return len(usable)
    return len(cores) or len(usable)


if "OMP_NUM_THREADS" not in os.environ:
    os.environ.setdefault("MXNET_OMP_MAX_THREADS", str(physical_cores()))


from common.backend import require_framework  # noqa: E402

from . import CAPABILITIES  # noqa: E402

FRAMEWORK = CAPABILITIES.framework
mx = require_framework("mxnet", CAPABILITIES)


def gpu_available() -> bool:
    """True when this MXNet build sees at least one GPU."""
    try:
        return mx.context.num_gpus() > 0
    except mx.base.MXNetError:  # CPU-only builds may raise instead of answering 0
        return False


def disable_tf32() -> None:
    """Ask MXNet's CUDA kernels for full float32: no tensor-core math, no conversions to lower precision."""
    os.environ["MXNET_CUDA_ALLOW_TENSOR_CORE"] = "0"
    os.environ["MXNET_CUDA_TENSOR_OP_MATH_ALLOW_CONVERSION"] = "0"


def context(device: str):
    """'cpu' / 'gpu' (already resolved by common.backend.choose_device) -> an MXNet context."""
    return mx.gpu(0) if device == "gpu" else mx.cpu()


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
