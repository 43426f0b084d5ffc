"""Starting the processes of one data-parallel job on this machine, and ending them together.

``alexnet train --replicas N`` with an engine that runs one process per replica (PyTorch's DDP)
starts N copies of itself here, with the variables torchrun would set (``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR=127.0.0.1``,
``MASTER_PORT``): a process started by torchrun itself (several machines) looks the same to the
backend. The tests start MXNet's parameter servers and TensorFlow's workers with it too.

What it guarantees, so that nothing hangs and nothing is left behind:

* A signal that arrives while the children are being started stops the starting: no further
  child starts, and those already started are passed the signal.
* Each child is in its own session: a Ctrl-C at the terminal reaches this process only, and is
  passed on to every child once per press (the first asks the training loop to stop after the
  step every replica agrees on, a second stops at once). SIGTERM is passed on the same way.
* When one child fails, the others get ``grace`` seconds to end by themselves, then SIGTERM, then
  SIGKILL ``grace`` seconds later: a replica waiting in a collective for a dead peer is not left
  waiting. (Not after a signal was
  passed on: then every child is stopping, and rank 0 may still be saving.)
* Children die with this process (Linux ``PR_SET_PDEATHSIG``), even when it is killed with SIGKILL.
* ``timeout`` ends the whole group the same way (exit code 124).
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from .machine import usable_cpus
from .replicas import free_port

EXIT_TIMEOUT = 124
FORWARDED = (signal.SIGINT, signal.SIGTERM)


@dataclass
class Process:
    """One process to start: its command line, extra environment and a name for messages."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    name: str = ""
    log: str | None = None  # its stdout and stderr go to this file (else where run_processes sends them)


def replica_processes(argv: list[str], replicas: int, *, port: int | None = None,
                      threads: int | None = None) -> list[Process]:
    """``replicas`` copies of ``argv``, ranks 0..N-1, with torchrun's variables on 127.0.0.1.

    Each copy gets ``OMP_NUM_THREADS`` = the usable cores shared out (at least 1) unless the
    caller's environment sets it: N processes with a thread per core each would oversubscribe."""
    port = free_port() if port is None else port
    threads = threads or max(1, usable_cpus() // replicas)
    common = {"WORLD_SIZE": str(replicas), "LOCAL_WORLD_SIZE": str(replicas), "MASTER_ADDR": "127.0.0.1",
              "MASTER_PORT": str(port)}
    if "OMP_NUM_THREADS" not in os.environ:
        common["OMP_NUM_THREADS"] = str(threads)
    return [Process(list(argv), {**common, "RANK": str(rank), "LOCAL_RANK": str(rank)}, f"replica {rank}")
            for rank in range(replicas)]


try:  # looked up here, so the child between fork and exec only calls it
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
except (OSError, AttributeError):
    _PRCTL = None
PR_SET_PDEATHSIG = 1
# torchrun's variables: a process that has them was started as one replica of a group.
REPLICA_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def started_as_replica() -> bool:
    """Whether this process is one replica of a group a launcher started (torchrun, or ``replica_processes``)."""
    return all(name in os.environ for name in REPLICA_VARIABLES)


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, int(signal.SIGKILL))  # killed when the launching thread dies


def run_processes(processes: list[Process], *, timeout: float | None = None, grace: float = 10.0,
                  stdout=None, stderr=None, cwd: str | None = None, exit_codes: list[int] | None = None) -> int:
    """Start ``processes``, wait for all, and return 0 if every one succeeded, else the first
    failure's exit code (a child killed by a signal: 128 + signal; the timeout: 124). ``exit_codes``,
    if given, receives every process's exit status in order."""
    children: list[subprocess.Popen] = []
    failure: list[int] = []
    forwarded: list[int] = []
    reached: list[int] = []  # per forwarded signal: how many children had been started when it came
    deadline = None if timeout is None else time.monotonic() + timeout
    previous = {}

    def forward(signum, frame):
        forwarded.append(signum)
        reached.append(len(children))
        for child in children:
            if child.poll() is None:
                _send(child, signum)

    on_main_thread = threading.current_thread() is threading.main_thread()
    try:
        if on_main_thread:
            previous = {s: signal.signal(s, forward) for s in FORWARDED}
        for process in processes:
            if forwarded:  # a signal came while starting: start no more (those started stop with it)
                break
            log = open(process.log, "w") if process.log else None
            try:
                children.append(subprocess.Popen(
                    process.argv, env={**os.environ, **process.env}, cwd=cwd, stdout=log or stdout,
                    stderr=subprocess.STDOUT if log else stderr, start_new_session=True, preexec_fn=_die_with_parent))
            finally:
                if log is not None:
                    log.close()  # the child has its own descriptor
            for index, signum in enumerate(forwarded):  # one that came while this child was being started
                if reached[index] < len(children):
                    reached[index] = len(children)
                    _send(children[-1], signum)
        while True:
            codes = [child.poll() for child in children]
            failed = [code for code in codes if code not in (None, 0)]
            if failed and not failure:
                failure.append(_exit_status(failed[0]))
                failed_at = time.monotonic()
            # After a failure the others get ``grace`` seconds to end by themselves (they usually meet the
            # same error), then are ended; not after a signal was passed on: they are stopping (and saving).
            if failure and not forwarded and time.monotonic() > failed_at + grace:
                _end(children, grace)
            if all(code is not None for code in codes):
                break
            if deadline is not None and time.monotonic() > deadline:
                failure.append(EXIT_TIMEOUT)
                _end(children, grace)
                break
            time.sleep(0.05)
    finally:
        _end(children, grace)  # also on an exception here (e.g. a failed start): nothing outlives us
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if exit_codes is not None:
        exit_codes[:] = [_exit_status(child.returncode) for child in children]
    return failure[0] if failure else 0


def _exit_status(code: int) -> int:
    return 128 - code if code < 0 else code


def _send(child: subprocess.Popen, signum: int) -> None:
    try:
        child.send_signal(signum)
    except ProcessLookupError:
        pass


def _end(children: list[subprocess.Popen], grace: float) -> None:
    """SIGTERM to the children still running, SIGKILL to those still running ``grace`` s later."""
    running = [child for child in children if child.poll() is None]
    for child in running:
        _send(child, signal.SIGTERM)
    end = time.monotonic() + grace
    for child in running:
        try:
            child.wait(timeout=max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def python_command(*args: str) -> list[str]:
    """This interpreter running ``args`` (``-m common train ...``)."""
    return [sys.executable, *args]
