"""AlexNet in TensorFlow / Keras 3, built from ``common.spec`` (layout NHWC).

The public names are the contract of ``common.backend.Backend``; switching framework is
changing this import for another backend's package (``common.backend.BACKENDS``)::

    import alexnet_tf as alexnet
    model = alexnet.build()                       # the book's AlexNet, 10 classes
    alexnet.layer_summary(model, (1, 224, 224, 1))

The face only: what this backend can do (``CAPABILITIES``) and the public names. Where each
thing lives: ``_framework`` (importing and configuring TensorFlow and Keras), ``_model``
(build, run, weights in/out with Keras' layouts, native checkpoints), ``_trainer`` (SGD with
PyTorch's semantics as one compiled step), ``_layers`` (LRN, adaptive pooling and a seeded
dropout, which Keras lacks).
"""
from common.backend import CONTRACT as _CONTRACT
from common.backend import Artifact, Capabilities, ReplicaEngine, SpeedUp
from common.backend import bound_layer_summary as _bound_layer_summary
from common.train import bound_fit as _bound_fit

# Read by common without importing TensorFlow: literals, SpeedUp(...), ReplicaEngine(...) and Artifact(...) only.
CAPABILITIES = Capabilities(
    name="tf", framework="TensorFlow", extra="tensorflow", package="tensorflow", layout="NHWC",
    precisions=("fp32", "bf16", "fp16"), math_modes=("fp32", "tf32"), devices=("cpu", "gpu"),
    speed_ups=(
        SpeedUp("xla", "jit_compile", "XLA-compiled train step (tf.function(jit_compile=True)); default on "
                "a GPU and on a CPU without AVX-512, off on a CPU with it (slower there)", default_on=("cpu", "gpu")),
    ),
    plain_min_input=67,  # the book's network pads no first convolution: 65x65 collapses in it
    native_suffixes=(".weights.h5",),
    exports=(
        Artifact("_savedmodel", "import tensorflow as tf; serve = tf.saved_model.load(path).signatures["
                 "'serving_default']; run = lambda x: serve(**{INPUT: tf.constant(x)})[OUTPUT].numpy()"),
    ),
    thread_variables=("TF_NUM_INTRAOP_THREADS",),
    recorded_variables=("TF_NUM_INTEROP_THREADS", "TF_ENABLE_ONEDNN_OPTS"),
    replicas=(
        ReplicaEngine("mirrored", "MirroredStrategy in one process over N GPUs or N logical CPU devices"),
        ReplicaEngine("multi_worker", "MultiWorkerMirroredStrategy, one process per replica, named by TF_CONFIG "
                      "(one machine or several)", processes=True),
    ),
)
NAME, FRAMEWORK, LAYOUT = CAPABILITIES.name, CAPABILITIES.framework, CAPABILITIES.layout

from ._framework import (  # noqa: E402  (imports TensorFlow first: an ImportError names the extra)
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
