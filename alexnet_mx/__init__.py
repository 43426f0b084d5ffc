"""AlexNet in MXNet Gluon (1.9), built from ``common.spec``; layout NCHW.

The same public names as ``alexnet_pt`` and ``alexnet_tf`` (see ``common.backend``): a user
switches framework by changing one import.
"""
from . import _compat  # noqa: F401  (first: restores numpy.bool before mxnet is imported)

import common.backend as _backend
from common.backend import CONTRACT as _CONTRACT

from ._framework import mx  # noqa: F401  (ImportError naming the 'mxnet' extra when missing)
from ._net import (
    AlexNet,
    build,
    disable_tf32,
    export_weights,
    forward,
    gpu_available,
    load_native,
    load_weights,
    loss_and_grads,
    model_spec,
    param_counts,
    parameter_devices,
    save_native,
)
from ._trainer import Trainer, make_trainer

NAME = "mx"
FRAMEWORK = "MXNet"
LAYOUT = "NCHW"
layer_summary, fit = _backend.shared_functions(__name__)

__all__ = [*_CONTRACT, "AlexNet"]
