"""What machine this is: CPU model and features, usable and physical cores. Standard library
only, so a backend can ask before its framework is imported (MXNet's thread default)."""
from __future__ import annotations

import functools
import os
import platform
import time
from pathlib import Path

_IMPORTED = time.time()


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
    """The CPU's model name as the kernel reports it: written next to every CPU figure."""
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_flags() -> frozenset[str]:
    return frozenset(_cpuinfo().get("flags", "").split())


def has_avx512() -> bool:
    """Whether the CPU has AVX-512, where oneDNN's fastest CPU kernels run. Two CPU defaults
    follow it, each measured on both kinds of CPU (docs/benchmarks.md): PyTorch's channels-last
    layout and TensorFlow's plain oneDNN graph (XLA instead on an AVX2-only CPU). An unknown CPU
    (no /proc/cpuinfo) counts as one: the defaults first measured were on such a CPU."""
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


def available_memory() -> int | None:
    """Bytes of memory new processes can take without swapping or the out-of-memory killer: the
    kernel's MemAvailable, or less where this process's control group has a lower limit; None where
    neither can be read."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return max(0, min(found)) if found else None


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


# glibc's mallopt parameters (malloc.h) and the switch that leaves malloc as glibc set it.
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
KEEP_FREED_MEMORY_VARIABLE = "ALEXNET_KEEP_FREED_MEMORY"


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for the next allocation instead of handing every
    large block back to the kernel. By default glibc maps each block over 32 MiB afresh (mmap) and
    unmaps it when freed, so a CPU training step that allocates large activations page-faults
    through all of them again every step. With mmap off and the trim threshold at its largest,
    freed blocks stay in the heap and are reused (docs/notes.md has the figures).

    Process-wide and for later allocations only; PyTorch's backend asks for it when imported (the
    others did not gain). Linux with glibc only; ``ALEXNET_KEEP_FREED_MEMORY=0`` leaves malloc alone.
    Returns whether it was applied."""
    if os.environ.get(KEEP_FREED_MEMORY_VARIABLE, "1") == "0" or platform.libc_ver()[0] != "glibc":
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) & bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def process_seconds() -> float:
    """Seconds since this process started, as a user waiting for a command counts them (the
    interpreter's start and every import included): Linux's /proc; elsewhere since this module's import."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rpartition(")")[2].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.time() - _IMPORTED
