"""AlexNet in JAX with Flax (linen), built from ``common.spec`` (layout NHWC).

The public names are the contract of ``common.backend.Backend``; switching framework is
changing this import for ``alexnet_pt``, ``alexnet_tf`` or ``alexnet_mx``::

    import alexnet_jax as alexnet
    model = alexnet.build()                       # the book's AlexNet, 10 classes
    alexnet.layer_summary(model, (1, 224, 224, 1))

The face only: what this backend can do (``CAPABILITIES``) and the public names. Where each
thing lives: ``_framework`` (importing and configuring JAX: devices, math mode, replicas),
``_model`` (the Flax module, running it, weights in/out, native checkpoints, export),
``_trainer`` (SGD with PyTorch's semantics as one jitted step), ``_layers`` (LRN and adaptive
pooling, which Flax lacks).
"""
from common.backend import CONTRACT as _CONTRACT
from common.backend import Artifact, Capabilities, ReplicaEngine, SpeedUp
from common.backend import bound_layer_summary as _bound_layer_summary
from common.train import bound_fit as _bound_fit

# Read by common without importing JAX: literals, SpeedUp(...), ReplicaEngine(...) and Artifact(...) only.
CAPABILITIES = Capabilities(
    name="jax", framework="JAX", extra="jax", package="jax", layout="NHWC",
    precisions=("fp32", "bf16", "fp16"), math_modes=("fp32", "tf32"), devices=("cpu", "gpu"),
    speed_ups=(
        SpeedUp("donate", "donate", "buffer donation: the jitted step writes the new weights and momentum "
                "into the memory of the old ones instead of allocating a second copy", default_on=("cpu", "gpu")),
    ),
    native_suffixes=(".msgpack",),
    exports=(
        Artifact(".jax_exported", "import jax.export, numpy; exported = jax.export.deserialize("
                 "bytearray(open(path, 'rb').read())); run = lambda x: numpy.asarray(exported.call(x))"),
    ),
    recorded_variables=("XLA_FLAGS", "JAX_PLATFORMS", "JAX_DEFAULT_MATMUL_PRECISION"),
    # Read when JAX is imported: the precision of float32 matrix products and convolutions on a GPU.
    math_variables=(("fp32", "JAX_DEFAULT_MATMUL_PRECISION", "highest"),
                    ("tf32", "JAX_DEFAULT_MATMUL_PRECISION", "tensorfloat32")),
    compile_cache_variable="JAX_COMPILATION_CACHE_DIR",
    replicas=(
        ReplicaEngine("mesh", "jax.sharding Mesh over N local devices (GPUs, or CPU devices), one process, the "
                      "step as shard_map with a psum of the gradients; several machines: jax.distributed.initialize"),
    ),
)
NAME, FRAMEWORK, LAYOUT = CAPABILITIES.name, CAPABILITIES.framework, CAPABILITIES.layout

from ._framework import (  # noqa: E402  (imports JAX: an ImportError names the extra)
    configure_replicas, disable_tf32, gpu_available, gpu_status, matmul_products, peak_device_memory,
    replica_group, runtime_info, set_math_mode, synchronize,
)
from ._model import (  # noqa: E402
    build, export_artifacts, export_weights, forward, load_native, load_weights, loss_and_grads, model_spec,
    param_counts, parameter_devices, save_native,
)
from ._trainer import Trainer, make_trainer  # noqa: E402

layer_summary = _bound_layer_summary(__name__)
fit = _bound_fit(__name__)

__all__ = [*_CONTRACT, "configure_replicas", "export_artifacts", "replica_group"]
