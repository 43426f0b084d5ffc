"""PyTorch, imported once for the whole backend, and everything about configuring it:
devices, float32 math mode, and what the bench asks of the framework (matmul peak, waiting
for the device, memory, build information). A missing install is an ImportError naming the extra."""
from __future__ import annotations

import atexit
import datetime
import functools
import os

from common.backend import GpuStatus, device_helpers, require_framework
from common.errors import first_line
from common.machine import keep_freed_memory
from common.replicas import SINGLE, ReplicaGroup, check_replicas

from . import CAPABILITIES

FRAMEWORK = CAPABILITIES.framework
torch = require_framework("torch", CAPABILITIES)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# PyTorch's CPU tensors come from malloc: keep freed blocks for reuse rather than page-faulting
# through fresh ones every step (common.machine.keep_freed_memory says why; docs/notes.md the figures).
KEEPS_FREED_MEMORY = keep_freed_memory()


@functools.lru_cache(maxsize=None)
def gpu_status() -> GpuStatus:
    """Proven, not counted: a small convolution forward and backward must run on GPU 0."""
    if not torch.cuda.is_available():
        why = "this PyTorch build has no CUDA" if torch.version.cuda is None else "PyTorch sees no CUDA GPU"
        return GpuStatus(False, why)
    name = torch.cuda.get_device_name(0)
    try:
        x = torch.randn(2, 3, 8, 8, device="cuda", requires_grad=True)
        w = torch.randn(4, 3, 3, 3, device="cuda", requires_grad=True)
        torch.nn.functional.conv2d(x, w).square().sum().backward()
        torch.cuda.synchronize()
    except Exception as error:  # e.g. "no kernel image is available for execution on the device"
        major, minor = torch.cuda.get_device_capability(0)
        return GpuStatus(False, f"{name} (compute capability {major}.{minor}): a convolution failed on it "
                                f"({first_line(error)}); this PyTorch build has kernels for "
                                f"{', '.join(torch.cuda.get_arch_list()) or 'no architecture'}", present=True)
    return GpuStatus(True, name, present=True)


def set_math_mode(math: str) -> None:
    """"fp32": strict float32 convolutions and matmuls; "tf32": TF32 tensor cores for both
    (PyTorch's own default is TF32 for convolutions only, a mix no other framework has)."""
    allow = CAPABILITIES.check_math_mode(math) == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = allow
    torch.backends.cudnn.allow_tf32 = allow


gpu_available, disable_tf32, resolve_device = device_helpers(gpu_status, set_math_mode, FRAMEWORK)


def torch_device(device: str) -> "torch.device":
    """'auto' | 'cpu' | 'gpu' -> the torch.device it resolves to on this machine."""
    return torch.device("cuda" if resolve_device(device) == "gpu" else "cpu")


# ------------------------------------------------------------------ replicas
# The variables torchrun sets in each process it starts (and common.launch, which follows it).
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# How long a collective may wait for a peer before the process fails instead of hanging.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=float(os.environ.get("ALEXNET_COLLECTIVE_TIMEOUT_MIN", "10")))


def configure_replicas(replicas: int, device: str = "auto") -> ReplicaGroup:
    """Join the process group of ``replicas`` processes, one replica each, for
    DistributedDataParallel: gloo on the CPU, NCCL on GPUs (process ``LOCAL_RANK`` on GPU
    ``LOCAL_RANK``). The processes are started by torchrun (one machine or several) or by
    ``alexnet train --replicas N``, which set ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
    ``MASTER_PORT`` (and ``LOCAL_RANK``); call it before building the model."""
    check_replicas(replicas)
    if replicas == 1:
        return SINGLE
    missing = [name for name in LAUNCH_VARIABLES if name not in os.environ]
    if missing:
        raise RuntimeError(f"{replicas} PyTorch replicas run as {replicas} processes, and this one was not started "
                           f"as one of them ({', '.join(missing)} unset): use alexnet train --replicas {replicas}, "
                           f"or torchrun --nproc_per_node {replicas}")
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    if world != replicas:
        raise ValueError(f"{replicas} replicas were asked for, but the launcher started {world} processes "
                         f"(WORLD_SIZE={world}): one replica per process")
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if torch.cuda.is_available() and torch.cuda.device_count() > local_rank:
        torch.cuda.set_device(local_rank)  # before anything touches a GPU: "cuda" is this process's own
    engine = "nccl" if resolve_device(device) == "gpu" else "gloo"
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(engine, init_method="env://", rank=rank, world_size=world,
                                timeout=COLLECTIVE_TIMEOUT)
        atexit.register(_leave_process_group)
    elif dist.get_world_size() != world or dist.get_rank() != rank:
        raise RuntimeError(f"a process group of {dist.get_world_size()} is already set up here, not of {world}")
    return replica_group()


def _leave_process_group() -> None:
    """Tear down the process group this process joined, before the interpreter exits: left to the
    exit, its communication threads can meet a destroyed object and end the process with
    ``terminate called without an active exception`` (exit 134) after a successful run."""
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # a peer gone already: nothing left to tear down cleanly
            pass


def replica_group() -> ReplicaGroup:
    """This process's place in the process group (one replica if there is none)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return SINGLE
    world, rank = dist.get_world_size(), dist.get_rank()
    return ReplicaGroup("ddp", world, rank=rank, processes=world, first_replica=rank)


# ------------------------------------------------------------------ for the bench
def matmul_products(n: int, device: str, precision: str) -> dict:
    dev = torch_device(device)
    a, b = (torch.randn(n, n, device=dev).to(DTYPES[precision]) for _ in range(2))

    def mm():
        torch.mm(a, b)
        synchronize(device)
    return {"torch.mm": mm}


def synchronize(device: str) -> None:
    if device == "gpu":
        torch.cuda.synchronize()


def peak_device_memory(device: str) -> int | None:
    return int(torch.cuda.max_memory_allocated()) if device == "gpu" else None


def runtime_info(device: str) -> dict:
    info = {"framework": f"PyTorch {torch.__version__}", "intra_op_threads": torch.get_num_threads(),
            "inter_op_threads": torch.get_num_interop_threads(),
            "blas": "MKL" if torch.backends.mkl.is_available() else "other",
            "onednn": bool(torch.backends.mkldnn.is_available()),
            "keeps_freed_memory": KEEPS_FREED_MEMORY}  # the glibc malloc setting (ALEXNET_KEEP_FREED_MEMORY)
    if device == "gpu":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    return info
