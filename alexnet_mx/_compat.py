"""What must happen before MXNet is imported: one numpy shim and one thread default.

MXNet 1.9.1 still reads ``numpy.bool``, an alias numpy removed in 1.24 (it raises
AttributeError there, and a FutureWarning on 1.20-1.23 when touched with hasattr).
Restore only that alias, and only when it is missing; nothing else in numpy is patched.

MXNet's operators run on OpenMP threads, and on x86 MXNet 1.9 starts from half the CPUs it
sees, assuming every core has two hyper-threads. Where that is not so it leaves cores idle:
on this project's 2-vCPU machine (one thread per core) it used one core of two, and both
halved the measured matmul rate (167 against 324 GFLOP/s) and training throughput
(docs/benchmarks.md). So unless the user chose (``OMP_NUM_THREADS`` or
``MXNET_OMP_MAX_THREADS`` set), MXNet gets one thread per physical core it may run on.
"""
import os

import numpy

if "bool" not in numpy.__dict__:  # checked this way: hasattr() warns on numpy 1.26
    numpy.bool = bool  # the builtin is what the removed alias pointed to


def physical_cores() -> int:
    """Distinct physical cores among the CPUs this process may use (Linux sysfs); the count of
    usable CPUs where the topology cannot be read."""
    usable = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in usable:
        topology = f"/sys/devices/system/cpu/cpu{cpu}/topology/"
        try:
            with open(topology + "physical_package_id") as package, open(topology + "core_id") as core:
                cores.add((package.read().strip(), core.read().strip()))
        except OSError:
            return len(usable)
    return len(cores) or len(usable)


if "OMP_NUM_THREADS" not in os.environ:
    os.environ.setdefault("MXNET_OMP_MAX_THREADS", str(physical_cores()))
