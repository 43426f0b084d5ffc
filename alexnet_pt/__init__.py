"""AlexNet in PyTorch, built from ``common.spec`` (layout NCHW).

The public names are the contract of ``common.backend.Backend``; switching framework is
changing this import for ``alexnet_tf`` or ``alexnet_mx``::

    import alexnet_pt as alexnet
    model = alexnet.build()                       # the book's AlexNet, 10 classes
    alexnet.layer_summary(model, (1, 1, 224, 224))
"""
from __future__ import annotations

from common.backend import shared_functions as _shared_functions
from common.backend import CONTRACT as _CONTRACT
from common.backend import require_framework as _require_framework

_require_framework("torch", "torch", "PyTorch")  # an ImportError that names the extra

from ._model import (  # noqa: E402  (after the framework check on purpose)
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
from ._trainer import Trainer, make_trainer  # noqa: E402

NAME = "pt"
FRAMEWORK = "PyTorch"
LAYOUT = "NCHW"
layer_summary, fit = _shared_functions(__name__)






__all__ = [*_CONTRACT]
