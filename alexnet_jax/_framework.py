"""JAX and Flax, imported once for the whole backend, and everything about configuring them:
devices, the float32 math mode, replicas over local devices, and what the bench asks of the
framework (matmul peak, waiting for the device, memory, build information). A missing install
is an ImportError naming the extra."""
from __future__ import annotations

import functools
import os

from common.backend import GpuStatus, device_helpers, require_framework
from common.errors import first_line
from common.replicas import SINGLE, ReplicaGroup, check_replicas

from . import CAPABILITIES

FRAMEWORK = CAPABILITIES.framework
jax = require_framework("jax", CAPABILITIES)
jnp = require_framework("jax.numpy", CAPABILITIES)
nn = require_framework("flax.linen", CAPABILITIES)
flax_serialization = require_framework("flax.serialization", CAPABILITIES)
import flax  # noqa: E402  (present: flax.linen imported)

DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}
# jax_default_matmul_precision by math mode: strict float32, or TF32 tensor cores on NVIDIA GPUs
# (JAX's own GPU default is neither: it lets XLA pick a faster, less precise algorithm).
MATMUL_PRECISION = {"fp32": "highest", "tf32": "tensorfloat32"}
PLATFORMS = {"cpu": "cpu", "gpu": "gpu"}


def devices(kind: str) -> list:
    """The local devices of ``kind`` ('cpu' or 'gpu'); none when JAX has no such backend."""
    try:
        return jax.local_devices(backend=PLATFORMS[kind])
    except RuntimeError:  # "Unknown backend gpu" / "no visible devices"
        return []


@functools.lru_cache(maxsize=None)
def gpu_status() -> GpuStatus:
    """Proven, not counted: a small convolution forward and backward must run on GPU 0."""
    gpus = devices("gpu")
    if not gpus:
        return GpuStatus(False, "this JAX install has no CUDA plugin or sees no GPU (jax[cuda] installs one)")
    name = getattr(gpus[0], "device_kind", str(gpus[0]))
    try:
        x = jax.device_put(jnp.ones((2, 8, 8, 3)), gpus[0])
        w = jax.device_put(jnp.ones((3, 3, 3, 4)), gpus[0])
        conv = lambda w: jnp.sum(jax.lax.conv_general_dilated(  # noqa: E731
            x, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")) ** 2)
        jax.grad(conv)(w).block_until_ready()
    except Exception as error:  # XLA/CUDA errors differ by version: the message says which
        return GpuStatus(False, f"{name}: a convolution failed on it ({first_line(error)})", present=True)
    return GpuStatus(True, name, present=True)


def set_math_mode(math: str) -> None:
    """"fp32": strict float32 products and convolutions (``jax_default_matmul_precision`` "highest");
    "tf32": TF32 tensor cores on NVIDIA GPUs. A CPU computes float32 as float32 either way."""
    jax.config.update("jax_default_matmul_precision", MATMUL_PRECISION[CAPABILITIES.check_math_mode(math)])


gpu_available, disable_tf32, resolve_device = device_helpers(gpu_status, set_math_mode, FRAMEWORK)


def device_of_kind(device: str):
    """'auto' | 'cpu' | 'gpu' -> the first JAX device it resolves to on this machine."""
    return devices(resolve_device(device))[0]


# ------------------------------------------------------------------ replicas
_replicas: dict = {"group": SINGLE, "mesh": None}
REPLICA_AXIS = "replica"


def _backend_started() -> bool:
    """Whether JAX has created its device clients (after which the CPU device count is fixed)."""
    try:
        from jax._src import xla_bridge
        return bool(xla_bridge._backends)
    except (ImportError, AttributeError):  # pragma: no cover - private API moved: assume started
        return True


def configure_replicas(replicas: int, device: str = "auto") -> ReplicaGroup:
    """N replicas in this process, one per local device: GPUs 0..N-1, or on a CPU N XLA CPU devices
    (``jax_num_cpu_devices``, which must be set before JAX first touches a device; on a CPU they
    share the cores, which measures the engine, not a speed-up). Models built afterwards hold their
    parameters replicated over a ``jax.sharding.Mesh`` of those devices, and the trainer's step is a
    ``shard_map`` over it. Several machines: ``jax.distributed.initialize()`` in each process first
    (docs/design.md); the mesh then spans every process's devices."""
    check_replicas(replicas)
    if replicas == 1:
        _replicas.update(group=SINGLE, mesh=None)
        return SINGLE
    if not _backend_started() and jax.config.jax_num_cpu_devices < replicas:
        jax.config.update("jax_num_cpu_devices", replicas)  # acts on the CPU only; GPUs are what they are
    where = resolve_device(device)
    found = jax.devices(PLATFORMS[where])  # every process's devices after jax.distributed.initialize()
    if len(found) < replicas:
        hint = (f"set XLA_FLAGS=--xla_force_host_platform_device_count={replicas} before JAX starts"
                if where == "cpu" else "")
        raise ValueError(f"{replicas} replicas need {replicas} {where.upper()} devices; JAX has {len(found)}"
                         + (f": {hint}" if hint else ""))
    import numpy as np
    from jax.sharding import Mesh

    mesh = Mesh(np.array(found[:replicas]), (REPLICA_AXIS,))
    group = ReplicaGroup("mesh", replicas, local_replicas=replicas)
    _replicas.update(group=group, mesh=mesh)
    return group


def replica_group() -> ReplicaGroup:
    """The replicas ``configure_replicas`` set up in this process (one if none)."""
    return _replicas["group"]


def replica_mesh():
    """The ``jax.sharding.Mesh`` of the replicas (None for one replica)."""
    return _replicas["mesh"]


# ------------------------------------------------------------------ for the bench
def matmul_products(n: int, device: str, precision: str) -> dict:
    where = device_of_kind(device)
    a, b = (jax.device_put(jax.random.normal(jax.random.key(i), (n, n)).astype(DTYPES[precision]), where)
            for i in range(2))
    product = jax.jit(jnp.dot)
    product(a, b).block_until_ready()  # compiled before it is timed

    def dot():
        product(a, b).block_until_ready()
    return {"jnp.dot": dot}


def synchronize(device: str) -> None:
    """JAX dispatches asynchronously; results are waited for where they are read (``block_until_ready``)."""
    for where in devices(device):
        jax.device_put(0, where).block_until_ready()


def peak_device_memory(device: str) -> int | None:
    if device != "gpu":
        return None
    stats = devices("gpu")[0].memory_stats() or {}
    return int(stats["peak_bytes_in_use"]) if "peak_bytes_in_use" in stats else None


def runtime_info(device: str) -> dict:
    import jaxlib

    info = {"framework": f"JAX {jax.__version__}", "jaxlib": jaxlib.__version__, "flax": flax.__version__,
            "devices": len(devices(device)),
            "matmul_precision": str(jax.config.jax_default_matmul_precision),
            "xla_flags": os.environ.get("XLA_FLAGS", "")}
    if device == "gpu":
        info["gpu"] = gpu_status().detail
    return info
