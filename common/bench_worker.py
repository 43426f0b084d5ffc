"""One ``alexnet bench`` configuration, alone in its own process.

``python -m common.bench_worker JOB.json`` reads the job that ``common.bench`` wrote, runs it
and writes the measurements (or a one-line error) to the job's ``result`` path. One process
per backend and configuration, because frameworks in one process fight over threads, memory
pools and GPU memory, and a framework's first import sets thread pools for good.

What is timed is the code users train with: ``backend.build``, ``backend.make_trainer`` and
the Trainer's ``prepare`` / ``train_step`` / ``eval_step``, as ``common.train.fit`` calls
them. Synchronisation: device work is asynchronous (CUDA streams; MXNet's engine, on CPU
too). A Trainer step returns Python numbers (``loss.item()``, ``asscalar()``,
``float(tensor)``), but those wait only for the work they read: in MXNet the backward pass
and the update are still queued when the loss is known, and a harness that stopped the
clock there would time them inside the next thing it measures. So every timed step ends
with the framework's own "wait for everything" (``mx.nd.waitall()``,
``torch.cuda.synchronize()``, ``tf.test.experimental.sync_devices()`` on a GPU), for the
library's steps and the book's plain baselines (``benchmarks/plain_*.py``) alike.

Data: "synthetic" prepares one random uint8 batch once and trains on it again and again (no
input pipeline at all); "real" takes each step's batch of Fashion-MNIST in the training
loop's order and runs the whole input pipeline (index, ``prepare``: copy to the device,
resize, normalise) inside the timed step. With both, the two alternate step by step, so a
change in the machine's background load hits both alike.

Only this module imports a framework; ``common.bench`` (the parent) never does.
"""
from __future__ import annotations

import importlib.util
import json
import os
import platform
import resource
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from common.train import write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
PLAIN_DIR = ROOT / "benchmarks"
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TF_NUM_INTRAOP_THREADS",
                    "TF_NUM_INTEROP_THREADS", "TF_ENABLE_ONEDNN_OPTS", "MXNET_OMP_MAX_THREADS",
                    "MXNET_CPU_WORKER_NTHREADS", "MXNET_ENGINE_TYPE", "KMP_AFFINITY", "KMP_BLOCKTIME")
MATMUL_SECONDS = 1.0  # time spent measuring the matmul rate (at least 3 products)


# ------------------------------------------------------------------ per framework
class _Framework:
    """What differs per framework: its matmul, device memory and environment."""

    def __init__(self, name: str, device: str, precision: str):
        self.name, self.device, self.precision = name, device, precision

    def matmuls(self, n: int) -> dict:
        """{op name: a callable doing one n x n x n product and waiting for it}."""
        raise NotImplementedError

    def sync(self) -> None:
        """Wait until all work queued on the device so far has finished."""

    def device_memory(self) -> int | None:
        return None

    def environment(self) -> dict:
        return {}


class _PyTorch(_Framework):
    def __init__(self, *args):
        super().__init__(*args)
        import torch

        self.torch = torch
        self.dev = torch.device("cuda" if self.device == "gpu" else "cpu")

    def sync(self):
        if self.dev.type == "cuda":
            self.torch.cuda.synchronize()

    def matmuls(self, n):
        torch = self.torch
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]
        a, b = (torch.randn(n, n, device=self.dev).to(dtype) for _ in range(2))

        def mm():
            torch.mm(a, b)
            self.sync()
        return {"torch.mm": mm}

    def device_memory(self):
        return int(self.torch.cuda.max_memory_allocated()) if self.dev.type == "cuda" else None

    def environment(self):
        torch = self.torch
        env = {"framework": f"PyTorch {torch.__version__}", "intra_op_threads": torch.get_num_threads(),
               "inter_op_threads": torch.get_num_interop_threads(),
               "blas": "MKL" if torch.backends.mkl.is_available() else "other",
               "onednn": bool(torch.backends.mkldnn.is_available())}
        if self.dev.type == "cuda":
            env["gpu"] = torch.cuda.get_device_name(self.dev)
            env["cuda"] = torch.version.cuda
            env["cudnn"] = torch.backends.cudnn.version()
        return env


class _TensorFlow(_Framework):
    def __init__(self, *args):
        super().__init__(*args)
        from alexnet_tf._framework import keras, tf

        self.tf, self.keras = tf, keras
        self.dev = "/GPU:0" if self.device == "gpu" else "/CPU:0"

    def matmuls(self, n):
        tf = self.tf
        dtype = {"fp32": tf.float32, "bf16": tf.bfloat16, "fp16": tf.float16}[self.precision]
        with tf.device(self.dev):
            a, b = (tf.cast(tf.random.normal((n, n)), dtype) for _ in range(2))

        @tf.function
        def product():
            with tf.device(self.dev):
                return tf.matmul(a, b)[0, 0]  # one element back to the host: waits for the product

        return {"tf.matmul": lambda: product().numpy()}

    def sync(self):
        if self.device == "gpu":  # on CPU a tf.function call has finished when it returns
            self.tf.test.experimental.sync_devices()

    def device_memory(self):
        if self.device != "gpu":
            return None
        return int(self.tf.config.experimental.get_memory_info("GPU:0")["peak"])

    def environment(self):
        tf = self.tf
        env = {"framework": f"TensorFlow {tf.__version__}, Keras {self.keras.__version__}",
               "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads() or "default (all cores)",
               "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads() or "default",
               "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1") != "0"}
        if self.device == "gpu":
            gpu = tf.config.list_physical_devices("GPU")[0]
            env["gpu"] = tf.config.experimental.get_device_details(gpu).get("device_name", gpu.name)
        return env


class _MXNet(_Framework):
    def __init__(self, *args):
        super().__init__(*args)
        from alexnet_mx._framework import mx

        self.mx = mx
        self.ctx = mx.gpu(0) if self.device == "gpu" else mx.cpu()

    def matmuls(self, n):
        mx = self.mx
        if self.precision != "fp32":
            raise ValueError(f"the MXNet backend measures fp32 only, got {self.precision}")
        a, b = (mx.nd.random.normal(shape=(n, n), ctx=self.ctx) for _ in range(2))
        # Two routes to a matrix product: nd.dot goes to the BLAS MXNet was built with (OpenBLAS in
        # the pip wheel), FullyConnected to oneDNN (MKL-DNN), which is what the Dense layers run.
        return {"nd.dot": lambda: mx.nd.dot(a, b).wait_to_read(),
                "nd.FullyConnected": lambda: mx.nd.FullyConnected(a, b, no_bias=True, num_hidden=n).wait_to_read()}

    def sync(self):
        # MXNet's engine is asynchronous on CPU too: reading the loss waits for the forward pass only,
        # while the backward pass and the update may still be queued
        self.mx.nd.waitall()

    def device_memory(self):
        if self.device != "gpu":
            return None
        free, total = self.mx.context.gpu_memory_info(0)
        return int(total - free)  # in use now (MXNet reports no peak)

    def environment(self):
        from mxnet.runtime import Features

        features = Features()
        env = {"framework": f"MXNet {self.mx.__version__}",
               "features": [name for name in ("MKLDNN", "BLAS_OPEN", "BLAS_MKL", "OPENMP", "CUDA", "CUDNN")
                            if features.is_enabled(name)]}
        # The cap MXNet's engine puts on its operators' OpenMP threads (libgomp's own
        # omp_get_max_threads() does not show it: it read 2 while MXNet used 1 core here).
        # alexnet_mx._compat sets MXNET_OMP_MAX_THREADS unless the user chose.
        env["operator_threads"] = (os.environ.get("MXNET_OMP_MAX_THREADS") or os.environ.get("OMP_NUM_THREADS")
                                   or "MXNet's default: half the CPUs on x86")
        return env


FRAMEWORKS = {"pt": _PyTorch, "tf": _TensorFlow, "mx": _MXNet}


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


def load_plain(name: str):
    """benchmarks/plain_<name>.py, the book's code, loaded from its file (it is no package)."""
    path = PLAIN_DIR / f"plain_{name}.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the plain baseline for {name} is missing")
    spec = importlib.util.spec_from_file_location(f"plain_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(job: dict) -> dict:
    from common.backend import choose_device, load_backend
    from common.spec import get_spec

    load_before = os.getloadavg()[0]  # the machine's background load (it may be shared)
    name, batch, steps, warmup = job["backend"], job["batch_size"], job["steps"], job["warmup"]
    backend = load_backend(name)  # imports the framework (an ImportError names the extra)
    device = choose_device(job["device"], backend.gpu_available(), backend.FRAMEWORK)
    framework = FRAMEWORKS[name](name, device, job["precision"])
    size = job["input_size"]
    modes = job["data"]

    if job["impl"] == "plain":
        make_batch, train_step, eval_step = load_plain(name).make(batch_size=batch, input_size=(size, size),
                                                                  device=device)
        x, labels = make_batch()
        steppers = {"synthetic": lambda i: train_step(x, labels)}
        evaluate = lambda: eval_step(x, labels)  # noqa: E731
        options = {"precision": "fp32"}
    else:
        spec = get_spec("book").with_input(1, size)
        model = backend.build(spec, seed=0, device=device)
        trainer = backend.make_trainer(model, lr=0.01, precision=job["precision"], **job["options"])
        options = dict(getattr(trainer, "options", {}))
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (batch, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, spec.num_classes, batch)
        x = trainer.prepare(images)
        steppers = {"synthetic": lambda i: trainer.train_step(x, labels, seed=i)}
        if "real" in modes:
            steppers["real"] = _real_stepper(trainer, job, batch)
        evaluate = lambda: trainer.eval_step(x, labels)  # noqa: E731
    steppers = {mode: steppers[mode] for mode in modes if mode in steppers}

    matmul_n = job["matmul_size"] or (8192 if device == "gpu" else 2048)
    products = framework.matmuls(matmul_n)
    warm_rates = matmul_rates(products, matmul_n)
    first_step_s = _timed(lambda: (next(iter(steppers.values()))(0), framework.sync()))  # tracing, compiling
    for step in range(warmup):
        for stepper in steppers.values():
            stepper(1 + step)
    # The timed loop: before each step, one product per matmul op, so the peak the steps are
    # compared with is measured under the same background load (this machine may be shared).
    train_s: dict[str, list[float]] = {mode: [] for mode in steppers}
    rates: dict[str, list[float]] = {op: [] for op in products}
    framework.sync()
    for step in range(steps):
        for op, product in products.items():
            rates[op].append(2.0 * matmul_n ** 3 / _timed(product) / 1e9)
        for mode, stepper in steppers.items():  # alternating: background load hits every mode alike
            train_s[mode].append(_timed(lambda: (stepper(1 + warmup + step), framework.sync())))
    for _ in range(1 + warmup):
        evaluate()
    framework.sync()
    eval_s = [_timed(lambda: (evaluate(), framework.sync())) for _ in range(steps)]

    return {
        "backend": name, "impl": job["impl"], "device": device, "batch_size": batch, "input_size": size,
        "options": options, "first_step_s": first_step_s, "train_s": train_s, "eval_s": eval_s,
        "matmul": {"n": matmul_n, "gflops": rates, "warmup_gflops": warm_rates},
        "load_average": [load_before, os.getloadavg()[0]],
        "peak_host_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # KiB on Linux
        "peak_device_bytes": framework.device_memory(),
        "environment": {**framework.environment(), "pid": os.getpid()},
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
    return {"python": platform.python_version(), "threads_env": {k: os.environ[k] for k in THREAD_VARIABLES
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
        result = {"error": str(error) or type(error).__name__, "error_type": type(error).__name__}
        code = 1
    write_text_atomic(Path(job["result"]), json.dumps(result))
    return code


if __name__ == "__main__":
    sys.exit(main())
