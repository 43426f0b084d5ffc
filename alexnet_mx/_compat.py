"""The one numpy shim this backend needs, applied before MXNet is imported.

MXNet 1.9.1 still reads ``numpy.bool``, an alias numpy removed in 1.24 (it raises
AttributeError there, and a FutureWarning on 1.20-1.23 when touched with hasattr).
Restore only that alias, and only when it is missing; nothing else is patched.
"""
import numpy

if "bool" not in numpy.__dict__:  # checked this way: hasattr() warns on numpy 1.26
    numpy.bool = bool  # the builtin is what the removed alias pointed to
