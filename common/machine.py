"""What machine this is: CPU model and features, usable and physical cores. Standard library
only, so a backend can ask before its framework is imported (MXNet's thread default)."""
from __future__ import annotations

import functools
import os
import platform
from pathlib import Path


@functools.lru_cache(maxsize=None)
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def cpu_model() -> str:
    """E.g. "Intel(R) Xeon(R) Processor" or "AMD EPYC 7R13 Processor": written next to every CPU figure."""
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_flags() -> frozenset[str]:
    return frozenset(_cpuinfo().get("flags", "").split())


def has_avx512() -> bool:
    """Whether the CPU has AVX-512, where oneDNN's fastest CPU kernels run. Two CPU defaults
    follow it, each measured on both kinds of CPU (docs/benchmarks.md): PyTorch's channels-last
    layout and TensorFlow's plain oneDNN graph (XLA instead on an AVX2-only CPU). An unknown CPU
    (no /proc/cpuinfo) counts as one: the defaults first measured, on an Intel Xeon."""
    flags = cpu_flags()
    return "avx512f" in flags or not flags


def cpu_features() -> str:
    """The vector and matrix units that decide CPU kernels: "AMX, AVX-512", "AVX-512", "AVX2" ..."""
    flags = cpu_flags()
    named = [("AMX", "amx_tile"), ("AVX-512", "avx512f"), ("AVX2", "avx2")]
    found = [name for name, flag in named if flag in flags]
    return ", ".join(found[:2]) if found else "baseline x86-64" if flags else platform.machine()


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity), not all the machine has."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


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


def describe_cpu() -> str:
    """One line for records: model, features, usable CPUs."""
    return f"{cpu_model()} ({cpu_features()}; {usable_cpus()} usable CPUs)"
