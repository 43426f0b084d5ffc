"""TensorFlow and Keras 3, imported once for the whole backend.

Environment defaults are set before the first import (a user's own settings win), and a
missing framework becomes an ImportError that names the extra which installs it.
"""
from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import functools  # noqa: E402

from common.backend import GpuStatus, choose_device, require_framework  # noqa: E402

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
    process (the parity suite runs all three) still find some. Only possible before the
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
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return GpuStatus(False, f"{name}: a convolution failed on it ({first})", present=True)
    return GpuStatus(True, name, present=True)


def gpu_available() -> bool:
    """Whether TensorFlow can compute on a GPU here (``gpu_status`` says why not)."""
    return gpu_status().usable


def set_math_mode(math: str) -> None:
    """"fp32": strict float32; "tf32": TF32 tensor cores for float32 convolutions and matmuls (TF's default)."""
    tf.config.experimental.enable_tensor_float_32_execution(CAPABILITIES.check_math_mode(math) == "tf32")


def disable_tf32() -> None:
    """Full float32 matmuls and convolutions on Ampere+ GPUs (TF32 keeps 10 mantissa bits: ~1e-3)."""
    set_math_mode("fp32")


def resolve_device(device: str) -> str:
    """'auto' | 'cpu' | 'gpu' -> 'cpu' or 'gpu' on this machine (common.backend.choose_device's rule)."""
    return choose_device(device, gpu_status(), FRAMEWORK)


def device_name(device: str) -> str:
    """'cpu' / 'gpu' (already resolved by common.backend.choose_device) -> a tf.device string."""
    return "/GPU:0" if device == "gpu" else "/CPU:0"


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
