"""One ``alexnet bench`` configuration, alone in its own process.

``python -m common.bench_worker JOB.json`` reads the job that ``common.bench`` wrote, runs it
and writes the measurements (or a one-line error) to the job's ``result`` path. One process
per backend and configuration, because frameworks in one process fight over threads, memory
pools and GPU memory, and a framework's first import sets thread pools for good.

What is timed is the code users train with: ``backend.build``, ``backend.make_trainer`` and
the Trainer's ``prepare`` / ``train_step`` / ``eval_step``, as ``common.train.fit`` calls
them. A backend that does not train (``CAPABILITIES.trains`` False: ONNX Runtime) gets an
inference-only job: ``backend.build`` and ``backend.forward`` on the same synthetic batch,
prepared in its layout by ``common.backend.prepared_reference`` (what every Trainer's
``prepare`` returns), timed by the same code as the training rows' inference, and the matmul
peak measured the same number of times in the same place, only with no training steps
between; its result has no training figures (``train_s`` empty). Synchronisation: device work is asynchronous (CUDA streams; MXNet's engine, on CPU
too). A Trainer step returns Python numbers (``loss.item()``, ``asscalar()``,
``float(tensor)``), but those wait only for the work they read: in MXNet the backward pass
and the update are still queued when the loss is known, and a harness that stopped the
clock there would time them inside the next thing it measures. So every timed step ends
with the framework's own "wait for everything" (``mx.nd.waitall()``,
``torch.cuda.synchronize()``, ``tf.test.experimental.sync_devices()`` on a GPU), for the
library's steps and the book's plain baselines (each backend package's ``_plain.py``) alike.

Data: "synthetic" prepares one random uint8 batch once and trains on it again and again (no
input pipeline at all); "real" takes each step's batch of Fashion-MNIST in the training
loop's order and runs the whole input pipeline (index, ``prepare``: copy to the device,
resize, normalise) inside the timed step. With both, the two alternate step by step, so a
change in the machine's background load hits both alike.

Replicas (``job["replicas"]`` N > 1): the framework's engine is set up first
(``configure_replicas``), the batch is the global one, and with one process per replica every
process runs this module (``common.launch``) while only rank 0 writes the result.

Only this module imports a framework; ``common.bench`` (the parent) never does.
"""
from __future__ import annotations

import functools
import json
import os
import platform
import resource
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from common.backend import load_plain, recorded_variables
from common.errors import first_line
from common.io import write_text_atomic

MATMUL_SECONDS = 1.0  # time spent measuring the matmul rate (at least 3 products)


# ------------------------------------------------------------------ measuring
def matmul_rates(products: dict, n: int, budget_s: float = MATMUL_SECONDS) -> dict[str, list[float]]:
    """GFLOP/s of each of the framework's n x n matrix products, one figure per call (warm-up run)."""
    rates = {}
    for op, product in products.items():
        product()  # first call: allocation, kernel choice
        values, start = [], time.perf_counter()
        while len(values) < 3 or (time.perf_counter() - start < budget_s and len(values) < 50):
            values.append(2.0 * n ** 3 / _timed(product) / 1e9)
        rates[op] = values
    return rates


def _timed(call) -> float:
    begin = time.perf_counter()
    call()
    return time.perf_counter() - begin


def time_inference(evaluate, sync, warmup: int, steps: int) -> tuple[float, list[float]]:
    """Seconds of the first inference call (session creation, tracing), then of each of ``steps``
    calls after ``warmup`` more untimed ones; every timed call ends with the framework's own wait.
    The one way every row's inference is timed."""
    first = _timed(lambda: (evaluate(), sync()))
    for _ in range(warmup):
        evaluate()
    sync()
    return first, [_timed(lambda: (evaluate(), sync())) for _ in range(steps)]


def synthetic_batch(batch: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The random uint8 Fashion-MNIST-sized images and labels every row is timed on (seed 0)."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (batch, 28, 28), dtype=np.uint8), rng.integers(0, num_classes, batch)


def run(job: dict) -> dict:
    from common.backend import choose_device, effective_math, load_backend, prepared_reference
    from common.machine import cpu_model
    from common.spec import get_spec

    load_before = os.getloadavg()[0]  # the machine's background load (it may be shared)
    name, batch, steps, warmup = job["backend"], job["batch_size"], job["steps"], job["warmup"]
    backend = load_backend(name)  # imports the framework (an ImportError names the extra)
    device = choose_device(job["device"], backend.gpu_status(), backend.FRAMEWORK)
    backend.set_math_mode(job["math"])  # before the peak and the steps: both in the same math mode
    sync = functools.partial(backend.synchronize, device)
    if job["impl"] != "plain":
        backend.CAPABILITIES.check_precision(job["precision"])  # before any work
    size = job["input_size"]
    modes = job["data"]

    if job["impl"] == "plain":
        make_batch, train_step, eval_step = load_plain(name).make(batch_size=batch, input_size=(size, size),
                                                                  device=device)
        x, labels = make_batch()
        steppers = {"synthetic": lambda i: train_step(x, labels)}
        evaluate = lambda: eval_step(x, labels)  # noqa: E731
        options = {"precision": "fp32"}
    elif not backend.CAPABILITIES.trains:  # inference only: the model on a prepared batch, no trainer
        spec = get_spec("book").with_input(1, size)
        model = backend.build(spec, seed=0, device=device)
        x = prepared_reference(synthetic_batch(batch, spec.num_classes)[0], spec, backend.LAYOUT)
        steppers = {}
        evaluate = lambda: backend.forward(model, x)  # noqa: E731
        options = {"precision": job["precision"]}
    else:
        spec = get_spec("book").with_input(1, size)
        replicas = {"replicas": job["replicas"]} if job.get("replicas", 1) > 1 else {}
        if replicas:
            backend.configure_replicas(job["replicas"], device)  # before the model: the engine decides its copies
        model = backend.build(spec, seed=0, device=device)
        trainer = backend.make_trainer(model, lr=0.01, precision=job["precision"], **job["options"], **replicas)
        options = dict(getattr(trainer, "options", {}))
        images, labels = synthetic_batch(batch, spec.num_classes)
        x = trainer.prepare(images)
        steppers = {"synthetic": lambda i: trainer.train_step(x, labels, seed=i)}
        if "real" in modes:
            steppers["real"] = _real_stepper(trainer, job, batch)
        evaluate = lambda: trainer.eval_step(x, labels)  # noqa: E731
    steppers = {mode: steppers[mode] for mode in modes if mode in steppers}

    matmul_n = job["matmul_size"] or (8192 if device == "gpu" else 2048)
    products = backend.matmul_products(matmul_n, device, job["precision"])
    warm_rates = matmul_rates(products, matmul_n)
    first_step_s = None  # an inference-only job has no training step
    if steppers:
        first_step_s = _timed(lambda: (next(iter(steppers.values()))(0), sync()))  # tracing, compiling
    for step in range(warmup):
        for stepper in steppers.values():
            stepper(1 + step)
    # The timed loop: before each step, one product per matmul op, so the peak the steps are
    # compared with is measured under the same background load (this machine may be shared).
    # Without training steps (inference only) it measures the products alone, as many times.
    train_s: dict[str, list[float]] = {mode: [] for mode in steppers}
    rates: dict[str, list[float]] = {op: [] for op in products}
    sync()
    for step in range(steps):
        for op, product in products.items():
            rates[op].append(2.0 * matmul_n ** 3 / _timed(product) / 1e9)
        for mode, stepper in steppers.items():  # alternating: background load hits every mode alike
            train_s[mode].append(_timed(lambda: (stepper(1 + warmup + step), sync())))
    first_inference_s, eval_s = time_inference(evaluate, sync, warmup, steps)

    return {
        "backend": name, "impl": job["impl"], "device": device, "batch_size": batch, "input_size": size,
        "replicas": job.get("replicas", 1),
        "device_name": backend.gpu_status().detail if device == "gpu" else cpu_model(),
        "math": effective_math(job["math"], device),
        "options": options, "first_step_s": first_step_s,
        "first_inference_s": first_inference_s, "train_s": train_s, "eval_s": eval_s,
        "matmul": {"n": matmul_n, "gflops": rates, "warmup_gflops": warm_rates},
        "load_average": [load_before, os.getloadavg()[0]],
        "peak_host_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # KiB on Linux
        "peak_device_bytes": backend.peak_device_memory(device),
        "environment": {**backend.runtime_info(device), "pid": os.getpid()},
    }


def _real_stepper(trainer, job: dict, batch: int):
    """A step on the next real batch, in the training loop's order, input pipeline included."""
    from common.data import FashionMNIST, batch_indices

    data = FashionMNIST.load(job["data_dir"], download_missing=False, progress=False)
    images, labels = data.train_images, data.train_labels
    if len(labels) < batch:
        raise ValueError(f"batch size {batch} is larger than the training set ({len(labels)} images)")

    def batches():
        epoch = 0
        while True:
            yield from batch_indices(len(labels), batch, seed=0, epoch=epoch, drop_last=True)
            epoch += 1

    order = batches()

    def step(seed: int):
        indices = next(order)
        return trainer.train_step(trainer.prepare(images[indices]), labels[indices], seed=seed)

    return step


def environment() -> dict:
    """The process's side of the environment (the parent adds the machine's)."""
    return {"python": platform.python_version(), "threads_env": {k: os.environ[k] for k in recorded_variables()
                                                                 if k in os.environ}}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m common.bench_worker JOB.json (written by `alexnet bench`)", file=sys.stderr)
        return 2
    job = json.loads(Path(argv[0]).read_text())
    try:
        result = run(job)
        result["environment"].update(environment())
        code = 0
    except Exception as error:  # reported by the parent as one line; the traceback goes to the log
        traceback.print_exc()
        result = {"error": first_line(error), "error_type": type(error).__name__}
        code = 1
    rank = int(os.environ.get("RANK", "0"))  # one process per replica: rank 0 reports for the group
    write_text_atomic(Path(job["result"] + ("" if rank == 0 else f".rank{rank}")), json.dumps(result))
    return code


if __name__ == "__main__":
    sys.exit(main())
