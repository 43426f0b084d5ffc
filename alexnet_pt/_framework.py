"""PyTorch, imported once for the whole backend, and everything about configuring it:
devices, float32 math mode, and what the bench asks of the framework (matmul peak, waiting
for the device, memory, build information). A missing install is an ImportError naming the extra."""
from __future__ import annotations

from common.backend import choose_device, require_framework

from . import CAPABILITIES

FRAMEWORK = CAPABILITIES.framework
torch = require_framework("torch", CAPABILITIES)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def gpu_available() -> bool:
    """Whether this PyTorch build sees a CUDA GPU."""
    return bool(torch.cuda.is_available())


def disable_tf32() -> None:
    """Full float32 matmuls and convolutions on Ampere+ GPUs (TF32 keeps 10 mantissa bits: ~1e-3)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def torch_device(device: str) -> "torch.device":
    """'auto' | 'cpu' | 'gpu' -> the torch.device it resolves to on this machine."""
    return torch.device("cuda" if choose_device(device, gpu_available(), FRAMEWORK) == "gpu" else "cpu")


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
            "onednn": bool(torch.backends.mkldnn.is_available())}
    if device == "gpu":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    return info
