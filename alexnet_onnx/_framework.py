"""ONNX and ONNX Runtime, imported once for the whole backend, and everything about running
them: execution providers (CPU; CUDA where the onnxruntime-gpu build and a GPU are present),
session options, and what the bench asks of a framework. A missing install is an ImportError
naming the extra."""
from __future__ import annotations

import functools
import os

import numpy as np

from common.backend import GpuStatus, device_helpers, require_framework
from common.errors import first_line

from . import CAPABILITIES

FRAMEWORK = CAPABILITIES.framework
onnx = require_framework("onnx", CAPABILITIES)
ort = require_framework("onnxruntime", CAPABILITIES)
from onnx import TensorProto, helper, numpy_helper  # noqa: E402  (after the check that names the extra)

OPSET = 17  # LRN, grouped Conv, AveragePool, ReduceMean with axes as an attribute: all in opset 17
# The file format version written: onnx 1.23 would default to IR 14, which ONNX Runtime 1.31 cannot
# read (it reads up to 13); IR 8 is opset 17's and loads in ONNX Runtime 1.14 and later.
IR_VERSION = 8
CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
# Strict float32 on the GPU: ONNX Runtime's CUDA provider uses TF32 tensor cores by default
# (use_tf32=1), which keeps 10 mantissa bits (~1e-3); this backend's only math mode is fp32.
CUDA_OPTIONS = {"use_tf32": "0"}


def providers(device: str) -> list:
    """The execution providers for ``device`` ('cpu' or 'gpu'), most preferred first."""
    return [(CUDA, CUDA_OPTIONS), CPU] if device == "gpu" else [CPU]


def intra_op_threads() -> int:
    """ONNX Runtime's own thread pool ignores OMP_NUM_THREADS (it is not an OpenMP build), so the
    variable the bench sets for every framework is passed on here; 0: ONNX Runtime's default
    (one thread per physical core)."""
    text = os.environ.get("OMP_NUM_THREADS", "")
    return int(text) if text.isdigit() else 0


def session_options() -> "ort.SessionOptions":
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads()
    options.log_severity_level = 3  # errors only: a CUDA provider that cannot load is reported by gpu_available
    return options


def make_session(model_bytes: bytes, device: str) -> "ort.InferenceSession":
    """An InferenceSession for a serialized ModelProto on ``device`` (already resolved)."""
    return ort.InferenceSession(model_bytes, sess_options=session_options(), providers=providers(device))


def session_device(session: "ort.InferenceSession") -> str:
    """'gpu' when the session really got the CUDA provider (ONNX Runtime falls back to the CPU
    silently when it cannot load it), else 'cpu'."""
    return "gpu" if session.get_providers()[0] == CUDA else "cpu"


def make_model(graph):
    """A ModelProto of ``graph`` at this backend's opset and IR version."""
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
                             producer_name="alexnet_onnx")


def _relu_model() -> bytes:
    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph([node], "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    return make_model(graph).SerializeToString()


@functools.lru_cache(maxsize=None)
def gpu_status() -> GpuStatus:
    """Whether ONNX Runtime has the CUDA provider AND a tiny graph really runs on it (the provider is
    listed by the onnxruntime-gpu build even where its CUDA libraries or the GPU are missing)."""
    if CUDA not in ort.get_available_providers():
        return GpuStatus(False, "this ONNX Runtime build has no CUDA provider (onnxruntime, not onnxruntime-gpu)")
    try:
        session = make_session(_relu_model(), "gpu")
        if session_device(session) != "gpu":
            return GpuStatus(False, "ONNX Runtime's CUDA provider did not take the graph", present=True)
        (out,) = session.run(None, {"x": np.array([-1.0, 2.0], np.float32)})
    except Exception as error:  # any failure to load or run the provider means: no usable GPU
        first = first_line(error)
        return GpuStatus(False, f"ONNX Runtime's CUDA provider failed ({first})", present=True)
    if not np.array_equal(out, [0.0, 2.0]):
        return GpuStatus(False, "ONNX Runtime's CUDA provider computed a wrong result", present=True)
    return GpuStatus(True, "CUDA provider, GPU 0", present=True)


def set_math_mode(math: str) -> None:
    """Strict float32 only: every session this backend makes passes ``use_tf32=0`` to the CUDA
    provider (``CUDA_OPTIONS``); "tf32" is refused from the record."""
    CAPABILITIES.check_math_mode(math)


gpu_available, disable_tf32, resolve_device = device_helpers(gpu_status, set_math_mode, FRAMEWORK)


# ------------------------------------------------------------------ for the bench
def matmul_products(n: int, device: str, precision: str) -> dict:
    """One n x n x n MatMul through ONNX Runtime, inputs and output kept on ``device`` (IO binding),
    so the figure is the kernel's rate, not host-device copies."""
    CAPABILITIES.check_precision(precision)
    node = helper.make_node("MatMul", ["a", "b"], ["c"])
    value = functools.partial(helper.make_tensor_value_info, elem_type=TensorProto.FLOAT, shape=[n, n])
    graph = helper.make_graph([node], "matmul", [value("a"), value("b")], [value("c")])
    session = make_session(make_model(graph).SerializeToString(), resolve_device(device))
    where = ("cuda", 0) if session_device(session) == "gpu" else ("cpu", 0)
    rng = np.random.default_rng(0)
    binding = session.io_binding()
    for name in ("a", "b"):
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(
            rng.standard_normal((n, n)).astype(np.float32), *where))
    binding.bind_output("c", where[0], where[1])

    def matmul():
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()
    return {"onnxruntime MatMul": matmul}


def synchronize(device: str) -> None:
    """Nothing queued to wait for: ``InferenceSession.run`` returns after the device work is done and
    its outputs are copied to the host."""


def peak_device_memory(device: str) -> int | None:
    """None: ONNX Runtime's Python API has no peak-memory counter for its CUDA arena."""
    return None


def runtime_info(device: str) -> dict:
    info = {"framework": f"ONNX Runtime {ort.__version__} (onnx {onnx.__version__}, opset {OPSET})",
            "intra_op_threads": intra_op_threads() or "default (one per physical core)",
            "providers": ", ".join(ort.get_available_providers()),
            "build": getattr(ort, "get_build_info", lambda: ort.get_device())()}
    if device == "gpu":
        info["cuda_options"] = ", ".join(f"{k}={v}" for k, v in CUDA_OPTIONS.items())
    return info


__all__ = ["CPU", "CUDA", "IR_VERSION", "OPSET", "TensorProto", "disable_tf32", "gpu_available", "helper",
           "make_model", "make_session", "matmul_products", "numpy_helper", "onnx",
           "ort", "peak_device_memory", "resolve_device", "runtime_info", "session_device", "synchronize"]
