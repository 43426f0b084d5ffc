"""TensorFlow and Keras 3, imported once for the whole backend.

Environment defaults are set before the first import (a user's own settings win), and a
missing framework becomes an ImportError that names the extra which installs it.
"""
from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import contextlib  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402

from common.backend import GpuStatus, device_helpers, require_framework  # noqa: E402
from common.errors import first_line  # noqa: E402
from common.replicas import SINGLE, ReplicaGroup, check_replicas  # noqa: E402

from . import CAPABILITIES  # noqa: E402

FRAMEWORK = CAPABILITIES.framework
tf = require_framework("tensorflow", CAPABILITIES)
keras = require_framework("keras", CAPABILITIES)

if keras.backend.backend() != "tensorflow":
    raise ImportError(
        f"alexnet_tf builds Keras models on the TensorFlow backend, but Keras was loaded with the "
        f"{keras.backend.backend()!r} backend (KERAS_BACKEND={os.environ.get('KERAS_BACKEND')!r}). "
        "Unset KERAS_BACKEND or set it to 'tensorflow' before anything imports keras."
    )


def _allow_gpu_memory_growth() -> None:
    """Let TensorFlow take GPU memory as it needs it, so the other backends in the same
    process (the parity suite runs them all in one) still find some. Only possible before the
    GPU is initialised; a user who initialised it already keeps their own setting."""
    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except (RuntimeError, ValueError):
            pass


_allow_gpu_memory_growth()


@functools.lru_cache(maxsize=None)
def gpu_status() -> GpuStatus:
    """Proven, not counted: a small convolution forward and backward must run on /GPU:0."""
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        why = ("this TensorFlow build has no CUDA (tensorflow-cpu)" if not tf.test.is_built_with_cuda()
               else "TensorFlow sees no GPU")
        return GpuStatus(False, why)
    name = tf.config.experimental.get_device_details(gpus[0]).get("device_name", gpus[0].name)
    try:
        with tf.device("/GPU:0"):
            x = tf.random.normal((2, 8, 8, 3))
            w = tf.Variable(tf.random.normal((3, 3, 3, 4)))
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(tf.square(tf.nn.conv2d(x, w, 1, "VALID")))
            float(tf.reduce_sum(tape.gradient(loss, w)))
    except Exception as error:  # XLA/CUDA errors differ by version: the message says which
        first = first_line(error)
        return GpuStatus(False, f"{name}: a convolution failed on it ({first})", present=True)
    return GpuStatus(True, name, present=True)


def set_math_mode(math: str) -> None:
    """"fp32": strict float32; "tf32": TF32 tensor cores for float32 convolutions and matmuls (TF's default)."""
    tf.config.experimental.enable_tensor_float_32_execution(CAPABILITIES.check_math_mode(math) == "tf32")


gpu_available, disable_tf32, resolve_device = device_helpers(gpu_status, set_math_mode, FRAMEWORK)


def device_name(device: str) -> str:
    """'cpu' / 'gpu' (already resolved by common.backend.choose_device) -> a tf.device string."""
    return "/GPU:0" if device == "gpu" else "/CPU:0"


# ------------------------------------------------------------------ replicas
# The strategy every model built from now on belongs to (None: plain variables, one replica).
_replicas: dict = {"strategy": None, "group": SINGLE}


def configure_replicas(replicas: int, device: str = "auto") -> ReplicaGroup:
    """Set up ``tf.distribute`` for ``replicas`` replicas; call it before building the model and
    before anything else computes with TensorFlow (devices are fixed when TensorFlow starts them).

    * With ``TF_CONFIG`` naming a cluster of workers (one or several machines):
      ``MultiWorkerMirroredStrategy``, this process being worker ``task.index``, with the GPUs it
      sees (the same number in each worker) or, on CPUs, one replica per worker (ring all-reduce
      on CPU, NCCL on GPUs).
    * Otherwise ``MirroredStrategy`` in this process over the first ``replicas`` GPUs, or on a
      CPU over ``replicas`` logical CPU devices split from the one physical CPU device.

    Models built afterwards have mirrored variables; ``make_trainer(model, replicas=N)`` then
    trains them with the strategy. ``replicas=1`` goes back to plain variables."""
    check_replicas(replicas)
    if replicas == 1:
        _replicas.update(strategy=None, group=SINGLE)
        return SINGLE
    config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    workers = config.get("cluster", {}).get("worker") or []
    where = resolve_device(device)
    if workers:
        if replicas % len(workers):
            raise ValueError(f"TF_CONFIG names {len(workers)} workers, which cannot share {replicas} replicas evenly")
        rank, local = int(config.get("task", {}).get("index", 0)), replicas // len(workers)
        if where == "cpu" and local != 1:
            raise ValueError(f"TF_CONFIG names {len(workers)} workers for {replicas} replicas: on a CPU each worker "
                             "process is one replica")
        implementation = (tf.distribute.experimental.CommunicationImplementation.NCCL if where == "gpu"
                          else tf.distribute.experimental.CommunicationImplementation.RING)
        # every GPU a worker sees is one of its replicas (CUDA_VISIBLE_DEVICES chooses them)
        strategy = tf.distribute.MultiWorkerMirroredStrategy(
            communication_options=tf.distribute.experimental.CommunicationOptions(implementation=implementation))
        group = ReplicaGroup("multi_worker", replicas, rank=rank, processes=len(workers), first_replica=rank * local,
                             local_replicas=local)
    else:
        devices = _gpu_devices(replicas) if where == "gpu" else _cpu_devices(replicas)
        strategy = tf.distribute.MirroredStrategy(devices)
        group = ReplicaGroup("mirrored", replicas, local_replicas=replicas)
    if strategy.num_replicas_in_sync != replicas:
        raise RuntimeError(f"tf.distribute set up {strategy.num_replicas_in_sync} replicas, not {replicas}")
    _replicas.update(strategy=strategy, group=group)
    return group


def _cpu_devices(replicas: int) -> list[str]:
    """``replicas`` logical CPU devices: split now, or already split (e.g. by an earlier call)."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    if len(tf.config.get_logical_device_configuration(cpu) or ()) < replicas:
        try:
            tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)
        except RuntimeError:
            raise RuntimeError(f"{replicas} TensorFlow replicas on the CPU need {replicas} logical CPU devices, and "
                               "TensorFlow's devices were already started in this process: call configure_replicas "
                               "before anything else runs TensorFlow (a new process)") from None
    return [device.name for device in tf.config.list_logical_devices("CPU")[:replicas]]


def _gpu_devices(replicas: int) -> list[str]:
    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) < replicas:
        raise ValueError(f"{replicas} replicas on GPUs need {replicas} GPUs; TensorFlow sees {len(gpus)}")
    return [device.name for device in gpus[:replicas]]


def replica_group() -> ReplicaGroup:
    """The group ``configure_replicas`` set up last (one replica if never called)."""
    return _replicas["group"]


def replica_strategy():
    """The ``tf.distribute`` strategy models are built under now (None: one replica)."""
    return _replicas["strategy"]


def replica_scope():
    """The strategy's scope, or nothing: variables created inside are mirrored over the replicas."""
    strategy = _replicas["strategy"]
    return strategy.scope() if strategy is not None else contextlib.nullcontext()


# ------------------------------------------------------------------ for the bench
_DTYPES = {"fp32": tf.float32, "bf16": tf.bfloat16, "fp16": tf.float16}


def matmul_products(n: int, device: str, precision: str) -> dict:
    where = device_name(device)
    with tf.device(where):
        a, b = (tf.cast(tf.random.normal((n, n)), _DTYPES[precision]) for _ in range(2))

    @tf.function
    def product():
        with tf.device(where):
            return tf.matmul(a, b)[0, 0]  # one element back to the host: waits for the product

    return {"tf.matmul": lambda: product().numpy()}


def synchronize(device: str) -> None:
    if device == "gpu":  # on CPU a tf.function call has finished when it returns
        tf.test.experimental.sync_devices()


def peak_device_memory(device: str) -> int | None:
    return int(tf.config.experimental.get_memory_info("GPU:0")["peak"]) if device == "gpu" else None


def runtime_info(device: str) -> dict:
    info = {"framework": f"TensorFlow {tf.__version__}, Keras {keras.__version__}",
            "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads() or "default (all cores)",
            "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads() or "default",
            "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1") != "0"}
    if device == "gpu":
        gpu = tf.config.list_physical_devices("GPU")[0]
        details = tf.config.experimental.get_device_details(gpu)
        info["gpu"] = details.get("device_name", gpu.name)
        build = tf.sysconfig.get_build_info()
        info["cuda"], info["cudnn"] = build.get("cuda_version"), build.get("cudnn_version")
    return info
