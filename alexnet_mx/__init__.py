"""AlexNet in MXNet Gluon (1.9), built from ``common.spec`` (layout NCHW).

The public names are the contract of ``common.backend.Backend``; switching framework is
changing this import for another backend's package (``common.backend.BACKENDS``)::

    import alexnet_mx as alexnet
    model = alexnet.build()                       # the book's AlexNet, 10 classes
    alexnet.layer_summary(model, (1, 1, 224, 224))

The face only: what this backend can do (``CAPABILITIES``) and the public names. Where each
thing lives: ``_framework`` (the numpy shim and thread default MXNet needs before import,
importing and configuring MXNet), ``_model`` (build, run, weights in/out, native
checkpoints), ``_trainer`` (the optimizer step through ``gluon.Trainer``).
"""
from common.backend import CONTRACT as _CONTRACT
from common.backend import Artifact, Capabilities, ReplicaEngine, SpeedUp
from common.backend import bound_layer_summary as _bound_layer_summary
from common.train import bound_fit as _bound_fit

# Read by common without importing MXNet: literals, SpeedUp(...), ReplicaEngine(...) and Artifact(...) only.
CAPABILITIES = Capabilities(
    name="mx", framework="MXNet", extra="mxnet", package="mxnet", layout="NCHW",
    precisions=("fp32",), math_modes=("fp32", "tf32"), devices=("cpu", "gpu"),
    speed_ups=(
        SpeedUp("hybridize", "hybridize", "hybridize(static_alloc=True, static_shape=True)",
                default_on=("cpu", "gpu")),
    ),
    plain_min_input=67,  # the book's network pads no first convolution: 65x65 collapses in it
    native_suffixes=(".params",),
    exports=(
        Artifact("-symbol.json", "import numpy; numpy.bool = bool; import mxnet as mx; "  # MXNet 1.9.1 reads numpy.bool
                 "net = mx.gluon.SymbolBlock.imports(path, [INPUT], path[:-len('-symbol.json')] + '-0000.params'); "
                 "run = lambda x: net(mx.nd.array(x)).asnumpy()"),
        Artifact("-0000.params"),  # the weights, read through the -symbol.json beside them
    ),
    thread_variables=("MXNET_OMP_MAX_THREADS",),
    recorded_variables=("MXNET_CPU_WORKER_NTHREADS", "MXNET_ENGINE_TYPE"),
    # MXNet reads its tensor-core switches when it starts: the math mode is fixed before import
    math_variables=(("fp32", "MXNET_CUDA_ALLOW_TENSOR_CORE", "0"),
                    ("fp32", "MXNET_CUDA_TENSOR_OP_MATH_ALLOW_CONVERSION", "0"),
                    ("tf32", "MXNET_CUDA_ALLOW_TENSOR_CORE", "1")),
    containers=("MXNet",),  # the Gluon zoo's .params
    replicas=(
        ReplicaEngine("device", "KVStore 'device' in one process over N GPU or CPU contexts"),
        ReplicaEngine("dist_sync", "KVStore 'dist_sync', one worker process per replica with parameter servers, "
                      "roles set by DMLC_* (one machine or several); momentum lives on the servers", processes=True),
    ),
    # MXNet's AMP (mxnet.contrib.amp), tried in this build (the pip wheel: oneDNN, no CUDA); _trainer.py has the details
    precision_gaps=(
        ("bf16", "MXNet 1.9.1's AMP computes bfloat16 only in oneDNN kernels that need AVX-512 (on an AVX2 CPU not "
                 "one bfloat16 convolution or dense layer runs: oneDNN could not create a primitive descriptor), "
                 "and this backend has no bfloat16 training path checked against the float64 oracle on any CPU"),
        ("fp16", "MXNet 1.9.1's AMP computes float16 on CUDA GPUs only (on a CPU: FP16 gemm on cpu not "
                 "implemented), and no GPU that MXNet 1.9.1 runs on was at hand to test it"),
    ),
)
NAME, FRAMEWORK, LAYOUT = CAPABILITIES.name, CAPABILITIES.framework, CAPABILITIES.layout

from ._framework import (  # noqa: E402  (the numpy shim, then MXNet: an ImportError names the extra)
    configure_replicas, disable_tf32, gpu_available, gpu_status, matmul_products, peak_device_memory,
    replica_group, runtime_info, serve_kvstore, set_math_mode, synchronize,
)
from ._model import (  # noqa: E402
    AlexNet, build, export_artifacts, export_weights, forward, load_native, load_weights, loss_and_grads, model_spec,
    param_counts, parameter_devices, read_container, read_params, save_native, write_container, write_params,
)
from ._trainer import Trainer, make_trainer  # noqa: E402

layer_summary = _bound_layer_summary(__name__)
fit = _bound_fit(__name__)

__all__ = [*_CONTRACT, "AlexNet", "configure_replicas", "export_artifacts", "read_params", "replica_group",
           "read_container", "serve_kvstore", "write_container", "write_params"]
