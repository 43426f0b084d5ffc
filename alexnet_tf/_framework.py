"""TensorFlow and Keras 3, imported once for the whole backend.

Environment defaults are set before the first import (a user's own settings win), and a
missing framework becomes an ImportError that names the extra which installs it.
"""
from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from common.backend import require_framework  # noqa: E402

FRAMEWORK = "TensorFlow"
EXTRA = "tensorflow"

tf = require_framework("tensorflow", EXTRA, FRAMEWORK)
keras = require_framework("keras", EXTRA, FRAMEWORK)

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


def gpu_available() -> bool:
    """Whether this TensorFlow build sees a GPU."""
    return bool(tf.config.list_physical_devices("GPU"))


def disable_tf32() -> None:
    """Full float32 matmuls and convolutions on Ampere+ GPUs (TF32 keeps 10 mantissa bits: ~1e-3)."""
    tf.config.experimental.enable_tensor_float_32_execution(False)


def device_name(device: str) -> str:
    """'cpu' / 'gpu' (already resolved by common.backend.choose_device) -> a tf.device string."""
    return "/GPU:0" if device == "gpu" else "/CPU:0"
