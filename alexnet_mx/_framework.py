"""MXNet, imported once through the contract's helper (a missing install names the extra)."""
from . import _compat  # noqa: F401  (must run before mxnet is imported)
from common.backend import require_framework

mx = require_framework("mxnet", "mxnet", "MXNet")
