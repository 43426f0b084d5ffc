"""AlexNet as an ONNX graph built from ``common.spec``, run by ONNX Runtime (layout NCHW).

An independent implementation for the parity suite and a deployable artifact: the
graph is written from the spec exactly as the native models are (no framework exporter in
between), with the canonical weights as initializers and a dynamic batch dimension::

    import alexnet_onnx as alexnet
    model = alexnet.build(weights="weights.npz")  # the book's AlexNet
    logits = alexnet.forward(model, x)             # x: float32 (N, 1, 224, 224)
    alexnet.save_native(model, "alexnet.onnx")     # any ONNX Runtime can run this file

Inference only (``trains=False``): the training names of the contract exist and raise
``InferenceOnlyError``. The face only: ``_framework`` (importing ONNX and ONNX Runtime,
providers, bench hooks), ``_model`` (the graph builder, run, weights in/out, .onnx files).
"""
from common.backend import CONTRACT as _CONTRACT
from common.backend import Artifact, Capabilities
from common.backend import bound_layer_summary as _bound_layer_summary

# Read by common without importing ONNX Runtime: literals and Artifact(...) only.
CAPABILITIES = Capabilities(
    name="onnx", framework="ONNX Runtime", extra="onnx", package="onnxruntime", layout="NCHW",
    precisions=("fp32",), math_modes=("fp32",), devices=("cpu", "gpu"), speed_ups=(),
    native_suffixes=(".onnx",), trains=False,
    exports=(
        Artifact(".onnx", "import onnxruntime; session = onnxruntime.InferenceSession(path, providers="
                 "['CPUExecutionProvider']); run = lambda x: session.run([OUTPUT], {INPUT: x})[0]",
                 needs=("onnxruntime",)),
    ),
)
NAME, FRAMEWORK, LAYOUT = CAPABILITIES.name, CAPABILITIES.framework, CAPABILITIES.layout

from ._framework import (  # noqa: E402  (imports ONNX Runtime: an ImportError names the extra)
    disable_tf32, gpu_available, gpu_status, matmul_products, peak_device_memory, runtime_info, set_math_mode,
    synchronize,
)
from ._model import (  # noqa: E402
    OPSET, InferenceOnlyError, Trainer, build, export_artifacts, export_weights, fit, forward, load_native,
    load_weights, loss_and_grads, make_trainer, model_spec, param_counts, parameter_devices, save_native,
)

layer_summary = _bound_layer_summary(__name__)

__all__ = [*_CONTRACT, "export_artifacts", "InferenceOnlyError", "OPSET"]
