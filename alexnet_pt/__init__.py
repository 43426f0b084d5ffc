"""AlexNet in PyTorch, built from ``common.spec`` (layout NCHW).

The public names are the contract of ``common.backend.Backend``; switching framework is
changing this import for another backend's package (``common.backend.BACKENDS``)::

    import alexnet_pt as alexnet
    model = alexnet.build()                       # the book's AlexNet, 10 classes
    alexnet.layer_summary(model, (1, 1, 224, 224))

The face only: what this backend can do (``CAPABILITIES``) and the public names. Where each
thing lives: ``_framework`` (importing and configuring PyTorch), ``_model`` (build, run,
weights in/out, native checkpoints), ``_trainer`` (the optimizer step).
"""
from common.backend import CONTRACT as _CONTRACT
from common.backend import Artifact, Capabilities, ReplicaEngine, SpeedUp
from common.backend import bound_layer_summary as _bound_layer_summary
from common.train import bound_fit as _bound_fit

# Read by common without importing PyTorch: literals, SpeedUp(...), ReplicaEngine(...) and Artifact(...) only.
CAPABILITIES = Capabilities(
    name="pt", framework="PyTorch", extra="torch", package="torch", layout="NCHW",
    precisions=("fp32", "bf16", "fp16"), math_modes=("fp32", "tf32"), devices=("cpu", "gpu"),
    speed_ups=(
        SpeedUp("channels_last", "channels_last", "channels-last memory format (oneDNN / cuDNN NHWC kernels); "
                "default on a CPU with AVX-512, and on a GPU with tensor-core convolutions (TF32 math, bf16, fp16)",
                default_on=("cpu", "gpu")),
        SpeedUp("compile", "compile", "torch.compile of the forward pass"),
        SpeedUp("stem_matmul", "stem_matmul", "the first convolution (one input channel) as unfold + one matrix "
                "product, for tensor cores; off: not yet measured on a GPU"),
        SpeedUp("fused_sgd", "fused_sgd", "torch.optim.SGD(fused=True): the update in one kernel; off: not yet measured"),
        SpeedUp("cuda_graphs", "cuda_graphs", "the whole training step captured once per batch shape as a CUDA graph "
                "and replayed (GPU only); off: not yet measured", devices=("gpu",)),
    ),
    native_suffixes=(".pt", ".pth"),
    exports=(
        Artifact(".pt2", "import torch; program = torch.export.load(path).module(); "
                 "run = lambda x: program(torch.from_numpy(x)).detach().numpy()"),
        Artifact(".onnx", "import onnxruntime; session = onnxruntime.InferenceSession(path, providers="
                 "['CPUExecutionProvider']); run = lambda x: session.run([OUTPUT], {INPUT: x})[0]",
                 needs=("onnxruntime", "onnxscript")),
    ),
    containers=("PyTorch",),  # torchvision's zoo file: a state_dict
    replicas=(
        ReplicaEngine("ddp", "DistributedDataParallel, one process per replica (gloo on CPU, NCCL on GPUs); "
                      "several machines: torchrun --nnodes", processes=True, process_mib=512),
    ),
)
NAME, FRAMEWORK, LAYOUT = CAPABILITIES.name, CAPABILITIES.framework, CAPABILITIES.layout

from ._framework import (  # noqa: E402  (imports PyTorch: an ImportError names the extra)
    configure_replicas, disable_tf32, gpu_available, gpu_status, matmul_products, peak_device_memory,
    replica_group, runtime_info, set_math_mode, synchronize,
)
from ._model import (  # noqa: E402
    build, export_artifacts, export_weights, forward, load_native, load_weights, loss_and_grads, model_spec,
    param_counts, parameter_devices, read_container, save_native, write_container,
)
from ._trainer import Trainer, make_trainer  # noqa: E402

layer_summary = _bound_layer_summary(__name__)
fit = _bound_fit(__name__)

__all__ = [*_CONTRACT, "configure_replicas", "replica_group", "export_artifacts", "read_container", "write_container"]
