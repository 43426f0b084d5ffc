"""``alexnet bench``: training and inference throughput of each backend, side by side and fairly.

Each (backend, configuration, batch size) runs in a fresh process (``common.bench_worker``),
one after another, so frameworks never share threads or GPU memory. In the same process,
before the steps and again before each timed step, each framework measures its own large
float matrix-multiply rate on the same device: the peak that model FLOP utilisation (MFU)
is reported against, training FLOPs per image being
``common.shapes.training_flops_per_image`` (forward MACs x 2 x 3). This module is
framework-free: it plans the jobs, reads their JSON results and reports (terminal table,
``bench.json`` with every figure and the environment, ``bench.png``).

The framework-specific speed-ups, and the flags that switch them (``--off``, ``--on``, or
``--ablate`` for each one flipped in turn), are each backend's ``CAPABILITIES.speed_ups``. docs/benchmarks.md has the
measurements.

``--replicas 1,2`` times data-parallel training through each framework's own engine (the first
of ``CAPABILITIES.replicas``: one process per replica, started together by ``common.launch``, or
one process driving every replica). Each replica takes ``--batch-sizes`` examples per step (the
global batch is N times that), and the scaling efficiency is the training images/s at N
replicas over N times the images/s of one replica at the same per-replica batch: 1.0 when N
replicas do N times the work in the same time. Where the replicas share the same cores (a CPU)
it measures the engine's overhead, not a speed-up.

A backend that does not train (``CAPABILITIES.trains`` False: ONNX Runtime) is benched where it
is named (``--backends pt,onnx``; "all" means the training backends): its row has the inference
figures (images/s, and MFU against its own matmul peak, measured in the same process) and "-"
in every training column (``None`` or an empty mapping in ``bench.json``). ``--baseline``,
``--ablate`` and ``--replicas`` compare training, so they are skipped for it, said in one
line; a precision or math mode its record lacks is refused before any job starts, as for any
backend.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from . import ROOT, shapes
from .backend import (BACKENDS, DEVICES, DeviceError, all_speed_ups, apply_math_environment, capabilities,
                      speed_up_owner, thread_variables)
from .cli_args import (DEVICE_HELP, EXIT_ERROR, add_math_arg, add_precision_arg, add_speed_up_args, chosen_speed_ups,
                       backend_list, default_run_dir, int_list, non_negative_int, positive_int)
from .io import check_creatable, write_text_atomic
from .launch import replica_processes, run_processes
from .machine import cpu_features, cpu_model, usable_cpus
from .report import NOT_APPLICABLE, format_table, human_bytes
from .spec import get_spec

DATA_MODES = ("synthetic", "real")


def plain_min_input(backends=None) -> int:
    """The smallest --input-size every backend's plain baseline takes (``Capabilities.plain_min_input``)."""
    return max([capabilities(name).plain_min_input for name in (backends or BACKENDS) if capabilities(name).trains],
               default=0)
RESULT_JSON, RESULT_PNG, LOG_DIR = "bench.json", "bench.png", "logs"
NOT_TRAINED = NOT_APPLICABLE  # the table's cell for a training figure of a backend that does not train


class BenchError(ValueError):
    """A job could not run; the message names the job and says why, in one line."""


# ---------------------------------------------------------------- arguments
def _data_modes(text: str) -> tuple[str, ...]:
    modes = tuple(dict.fromkeys(part.strip() for part in text.split(",")))
    if not modes or any(m not in DATA_MODES for m in modes):
        raise argparse.ArgumentTypeError(f"choose synthetic, real or synthetic,real; got {text!r}")
    return modes


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``alexnet bench`` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "bench", help="throughput per backend: training and inference images/s, MFU, memory",
        description="Time training and inference of each backend, each in its own process, against the "
                    "matrix-multiply rate each framework measures on the same device. Writes a table, "
                    "bench.json and bench.png.",
    )
    p.add_argument("--backends", type=backend_list, default="all", metavar=",".join(BACKENDS),
                   help="default all: the backends that train; an inference-only one (onnx) is timed where named, "
                        "inference only")
    p.add_argument("--batch-sizes", type=functools.partial(int_list, name="batch sizes"), default=(32, 128),
                   metavar="N,N", help="global batch sizes to time (default 32,128)")
    p.add_argument("--input-size", type=positive_int, default=224, metavar="S",
                   help="images are 1xSxS (default 224, the book's; 65 is the smallest)")
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help=DEVICE_HELP)
    add_precision_arg(p)
    add_math_arg(p)
    p.add_argument("--steps", type=positive_int, default=10, help="timed steps per mode (default 10)")
    p.add_argument("--warmup", type=non_negative_int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--data", type=_data_modes, default=DATA_MODES, metavar="synthetic,real",
                   help="synthetic: one prepared batch over and over; real: Fashion-MNIST through the whole "
                        "input pipeline (default both, alternating, for the real/synthetic ratio)")
    p.add_argument("--data-dir", type=Path, help="folder with the Fashion-MNIST files (for --data real)")
    p.add_argument("--baseline", action="store_true",
                   help="also time the book's plain code (each backend's _plain.py) and print our ratio to it")
    add_speed_up_args(p)
    p.add_argument("--ablate", action="store_true", help="also run each backend with each of its speed-ups flipped")
    p.add_argument("--repeat", type=positive_int, default=1,
                   help="run every configuration this many times, round robin (noisy machines; default 1)")
    p.add_argument("--threads", type=non_negative_int, metavar="N",
                   help="threads per framework: sets " + ", ".join(thread_variables()) + " for the workers "
                        "(default: the usable CPUs, where not set already; 0: set nothing, each framework's own default)")
    p.add_argument("--replicas", type=functools.partial(int_list, name="replicas"), default=(1,), metavar="N,N",
                   help="data-parallel replicas through each framework's own engine, e.g. 1,2: the batch size is "
                        "per replica, and the table gives the scaling efficiency against 1 (default 1)")
    p.add_argument("--matmul-size", type=positive_int, metavar="N",
                   help="N x N matrices for the peak rate (default 2048 on CPU, 8192 on GPU)")
    p.add_argument("--timeout", type=positive_int, default=3600, metavar="S", help="seconds per job (default 3600)")
    p.add_argument("--out", type=Path, help="output folder (default runs/bench-TIME)")
    p.set_defaults(func=cmd_bench)
    return p


# ---------------------------------------------------------------- jobs
@dataclass(frozen=True)
class Config:
    backend: str
    impl: str  # "alexnet" (the library) or "plain" (the book's code)
    batch_size: int  # per replica
    options: tuple[tuple[str, bool], ...] = ()  # make_trainer overrides, by feature name
    replicas: int = 1

    @property
    def variant(self) -> str:
        if self.impl == "plain":
            return "plain (book)"
        variant = ", ".join(f"{name}={'on' if value else 'off'}" for name, value in self.options) or "default"
        return variant if self.replicas == 1 else f"{variant}, {self.replicas} replicas"

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.replicas

    @property
    def label(self) -> str:
        return f"{self.backend} {self.variant}"


def _check(args) -> None:
    if args.baseline and args.precision != "fp32":
        raise BenchError("--baseline runs the book's float32 code: use it with --precision fp32")
    if args.baseline and args.input_size < plain_min_input(args.backends):
        narrow = [capabilities(n).framework for n in args.backends
                  if capabilities(n).plain_min_input == plain_min_input(args.backends)]
        raise BenchError(f"--baseline needs --input-size {plain_min_input(args.backends)} or more (the book's "
                         f"{' and '.join(narrow)} AlexNet pads no first convolution), got {args.input_size}")
    for backend in args.backends:  # from the records, before any worker starts
        try:
            capabilities(backend).check_precision(args.precision)
        except ValueError as error:
            raise BenchError(f"--precision {args.precision}: {error}") from None
        try:
            capabilities(backend).check_math_mode(args.math)
        except ValueError as error:
            raise BenchError(f"--math {args.math}: {error}") from None
    for names in (args.on, args.off):
        for name in names:
            if speed_up_owner(name) not in args.backends:
                raise BenchError(f"speed-up {name} belongs to backend {speed_up_owner(name)}, "
                                 f"which is not in --backends {','.join(args.backends)}")
    try:
        chosen_speed_ups(args)
    except ValueError as error:
        raise BenchError(str(error)) from None
    shapes.check_input(get_spec("book"), (1, args.input_size, args.input_size))
    if max(args.replicas) > 1:
        for backend in args.backends:
            if capabilities(backend).trains and not capabilities(backend).replicas:
                raise BenchError(f"--replicas: backend {backend} has no data-parallel engine")


def inference_only_notes(args) -> list[str]:
    """One line per named backend that does not train: what its row holds, and which of the
    training comparisons asked for (--baseline, --ablate, --replicas N) are skipped for it."""
    skipped = (["--baseline"] * args.baseline + ["--ablate"] * args.ablate
               + [f"--replicas {n}" for n in args.replicas if n > 1])
    return [f"bench: {name} ({capabilities(name).framework}) runs inference only: its row has inference figures "
            f"and {NOT_TRAINED} for training" + (f"; {', '.join(skipped)} skipped for it" if skipped else "")
            for name in args.backends if not capabilities(name).trains]


def _job(config: Config, args, data_dir: str | None, result: Path) -> dict:
    return {
        "backend": config.backend, "impl": config.impl, "batch_size": config.global_batch,
        "replicas": config.replicas,
        "options": capabilities(config.backend).trainer_keywords(dict(config.options)),
        "input_size": args.input_size, "device": args.device, "precision": args.precision, "math": args.math,
        "steps": args.steps, "warmup": args.warmup,
        "data": list(args.data) if config.impl != "plain" else ["synthetic"],
        "data_dir": data_dir, "matmul_size": args.matmul_size, "result": str(result),
    }


def worker_environment(threads: int | None, math: str = "fp32") -> dict[str, str]:
    """This process's environment, plus this project on the path, the math mode (it must be in
    place before a worker imports its framework) and the thread counts."""
    env = apply_math_environment(math, dict(os.environ))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    if threads == 0:
        return env
    for name in thread_variables():
        if threads is not None or name not in env:
            env[name] = str(threads or usable_cpus())
    return env


def run_job(config: Config, args, data_dir: str | None, workdir: Path, index: int) -> dict:
    """One configuration in a fresh interpreter; its measurements, or BenchError."""
    stem = f"{index:03d}-{config.backend}-{config.impl}-b{config.batch_size}-r{config.replicas}"
    job_path, result_path, log_path = (workdir / f"{stem}{suffix}" for suffix in (".job.json", ".result.json", ".log"))
    job_path.write_text(json.dumps(_job(config, args, data_dir, result_path)))
    command = [sys.executable, "-m", "common.bench_worker", str(job_path)]
    engines = capabilities(config.backend).replicas
    if config.replicas > 1 and engines[0].processes:  # one process per replica; rank 0 writes the result
        threads = args.threads if args.threads == 0 else max(1, (args.threads or usable_cpus()) // config.replicas)
        env = worker_environment(threads, args.math)
        processes = replica_processes(command, config.replicas, threads=threads or None)
        for process in processes:
            process.env.update({k: env[k] for k in env if k not in process.env and os.environ.get(k) != env[k]})
    else:
        env = worker_environment(args.threads, args.math)
    with open(log_path, "w") as log:
        if config.replicas > 1 and engines[0].processes:
            code = run_processes(processes, timeout=args.timeout, stdout=log, stderr=subprocess.STDOUT)
            if code == 124:
                raise BenchError(f"{config.label}, batch {config.batch_size}: no result after {args.timeout} s "
                                 f"(--timeout); log: {log_path}")
        else:
            try:
                code = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      timeout=args.timeout).returncode
            except subprocess.TimeoutExpired:
                raise BenchError(f"{config.label}, batch {config.batch_size}: no result after {args.timeout} s "
                                 f"(--timeout); log: {log_path}") from None
    if not result_path.is_file():
        tail = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()][-1:]
        raise BenchError(f"{config.label}, batch {config.batch_size}: the worker died (exit {code})"
                         f"{': ' + tail[0] if tail else ''}; log: {log_path}")
    result = json.loads(result_path.read_text())
    if "error" in result:
        message = f"{config.backend}{' plain' if config.impl == 'plain' else ''}: {result['error']}"
        if result.get("error_type") == "DeviceError":
            raise DeviceError(message)
        raise BenchError(f"{message} (log: {log_path})")
    return result


def configs(args, backend: str, batch: int, defaults: dict[str, bool] | None, device: str = "cpu") -> list[Config]:
    """One backend's configurations at one batch size: its default (with --on/--off), the book's
    plain code with --baseline and, with --ablate once ``defaults`` (the options the default run
    resolved on ``device``) are known, one run per speed-up that can act there, flipped."""
    base = chosen_speed_ups(args, backend)
    if defaults is None:
        return [Config(backend, "alexnet", batch, tuple(sorted(base.items())))]
    result = [Config(backend, "plain", batch)] if args.baseline and capabilities(backend).trains else []
    if args.ablate:
        for feature in capabilities(backend).speed_ups:
            if device not in feature.devices:
                continue
            state = base.get(feature.name, defaults.get(feature.name))
            if isinstance(state, bool):
                result.append(Config(backend, "alexnet", batch, tuple(sorted({**base, feature.name: not state}.items()))))
    return result


# ---------------------------------------------------------------- statistics
def _stats(values) -> dict[str, float]:
    values = np.asarray(values, dtype=np.float64)
    p25, median, p75 = np.percentile(values, [25, 50, 75])
    return {"median": float(median), "p25": float(p25), "p75": float(p75), "min": float(values.min()),
            "max": float(values.max()), "n": int(values.size)}


def summarise(config: Config, results: list[dict], flops: dict[str, int]) -> dict:
    """Pooled figures of one configuration over its repeats."""
    batch = config.global_batch
    train = {mode: sum((r["train_s"][mode] for r in results), []) for mode in results[0]["train_s"]}
    rates = {op: sum((r["matmul"]["gflops"][op] for r in results), []) for op in results[0]["matmul"]["gflops"]}
    peak_op, peak = max(((op, float(np.median(v))) for op, v in rates.items()), key=lambda item: item[1])
    images_per_s = {mode: _stats([batch / s for s in steps]) for mode, steps in train.items()}
    eval_s = sum((r["eval_s"] for r in results), [])
    summary = {
        "label": config.label, "backend": config.backend, "impl": config.impl, "variant": config.variant,
        "trains": capabilities(config.backend).trains,
        "batch_size": config.batch_size, "replicas": config.replicas, "global_batch": batch,
        "options": results[0]["options"], "device": results[0]["device"],
        "device_name": results[0]["device_name"], "math": results[0]["math"],
        "train_images_per_s": images_per_s,
        "train_step_s": {mode: _stats(steps) for mode, steps in train.items()},
        "inference_images_per_s": _stats([batch / s for s in eval_s]),
        "first_step_s": [r["first_step_s"] for r in results],
        "matmul_gflops": {op: _stats(v) for op, v in rates.items()}, "matmul_n": results[0]["matmul"]["n"],
        "peak_gflops": peak, "peak_op": peak_op,
        "peak_host_bytes": max(r["peak_host_bytes"] for r in results),
        "peak_device_bytes": max((r["peak_device_bytes"] for r in results if r["peak_device_bytes"] is not None),
                                 default=None),
        "environment": results[0]["environment"], "repeats": len(results),
        "runs": [{key: r[key] for key in ("train_s", "eval_s", "first_step_s", "first_inference_s", "matmul",
                                          "load_average") if key in r}
                 for r in results],  # every step's seconds and every matmul rate, per repeat
    }
    summary["mfu"] = _utilisation(_headline(summary, "training"), flops["training"], peak)  # None: no training
    summary["inference_mfu"] = _utilisation(summary["inference_images_per_s"], flops["inference"], peak)
    if "synthetic" in images_per_s and "real" in images_per_s:
        summary["real_over_synthetic"] = images_per_s["real"]["median"] / images_per_s["synthetic"]["median"]
    return summary


def _utilisation(images_per_s: dict | None, flops_per_image: int, peak_gflops: float) -> float | None:
    """Model FLOP utilisation of a median images/s against a peak; None where there is no figure."""
    return None if images_per_s is None else images_per_s["median"] * flops_per_image / (peak_gflops * 1e9)


def _compare(rows: list[dict], machine_peak: float, flops: dict[str, int]) -> None:
    """Add the ratios between rows: against the machine's best measured matmul rate, and to the plain code."""
    plain = {(r["backend"], r["batch_size"]): r for r in rows if r["impl"] == "plain"}
    single = {(r["backend"], r["batch_size"], r["label"].removesuffix(f", {r['replicas']} replicas")): r
              for r in rows if r["impl"] != "plain" and r["replicas"] == 1}
    for row in rows:
        row["mfu_machine"] = _utilisation(_headline(row, "training"), flops["training"], machine_peak)
        if not row["trains"]:
            continue  # no training figure to compare
        headline = _headline(row, "training")["median"]
        base = plain.get((row["backend"], row["batch_size"]))
        if row["impl"] != "plain" and base is not None and row["replicas"] == 1:
            row["over_plain"] = headline / _headline(base, "training")["median"]
        one = single.get((row["backend"], row["batch_size"], row["label"].removesuffix(f", {row['replicas']} replicas")))
        if row["impl"] != "plain" and row["replicas"] > 1 and one is not None:  # images/s at N over N x one replica's
            row["scaling"] = headline / (row["replicas"] * _headline(one, "training")["median"])


# ---------------------------------------------------------------- output
def _spread(stats: dict) -> str:
    """Half the interquartile range, in percent of the median."""
    return f"{50 * (stats['p75'] - stats['p25']) / stats['median']:.0f}%"


def _ratio(value) -> str:
    return "" if value is None else f"{value:.2f}"


def table(rows: list[dict]) -> str:
    headers = ["backend", "device", "math", "variant", "batch", "train img/s", "+-", "step s", "infer img/s", "infer MFU",
               "MFU own", "MFU machine", "vs plain", "scaling", "real/synth", "peak host", "peak device"]
    body = []
    for r in rows:
        if r["trains"]:
            train = _headline(r, "training")
            step = r["train_step_s"].get("synthetic") or r["train_step_s"]["real"]
            training = [f"{train['median']:.1f}", _spread(train), f"{step['median']:.3f}", f"{r['mfu']:.2f}",
                        f"{r['mfu_machine']:.2f}" if "mfu_machine" in r else "", _ratio(r.get("over_plain")),
                        _ratio(r.get("scaling")), _ratio(r.get("real_over_synthetic"))]
        else:
            training = [NOT_TRAINED] * 8
        body.append([
            r["backend"], r["device"], r["math"], r["variant"], r["batch_size"], *training[:3],
            f"{r['inference_images_per_s']['median']:.1f}", f"{r['inference_mfu']:.2f}", *training[3:],
            human_bytes(r["peak_host_bytes"]),
            human_bytes(r["peak_device_bytes"]) if r["peak_device_bytes"] is not None else "",
        ])
    return format_table(headers, body)


def machine_environment() -> dict:
    return {"cpu": cpu_model(), "cpu_features": cpu_features(), "cpu_count": os.cpu_count(), "usable_cpus": usable_cpus(), "platform": platform.platform(),
            "python": platform.python_version()}


def _headline(row: dict, kind: str) -> dict:
    """The statistics a row is judged by: training on synthetic data (real data without it), or inference;
    None for training where the backend does not train."""
    if kind == "inference":
        return row["inference_images_per_s"]
    return row["train_images_per_s"].get("synthetic") or row["train_images_per_s"].get("real")


def plot(rows: list[dict], flops: dict[str, int], machine_peak: float, path: Path, title: str) -> Path:
    """Bars of training and inference images/s (median, whiskers from the 25th to the 75th
    percentile) per configuration and batch size; dashed: the images/s the measured matmul
    peak would give at 100% utilisation."""
    from .plots import _pyplot, save_figure

    plt = _pyplot()
    labels = list(dict.fromkeys(r["label"] for r in rows))
    batches = sorted({r["batch_size"] for r in rows})
    colours = {name: f"C{i}" for i, name in enumerate(BACKENDS)}
    fig, axes = plt.subplots(1, 2, figsize=(max(9.0, 2.2 * len(batches) * len(labels) ** 0.5 + 4), 4.6))
    width = 0.8 / len(labels)
    for axis, kind in zip(axes, ("training", "inference")):
        for i, label in enumerate(labels):
            mine = [r for r in rows if r["label"] == label and _headline(r, kind) is not None]
            if not mine:
                continue  # an inference-only backend in the training panel
            stats = [_headline(r, kind) for r in mine]
            axis.bar([batches.index(r["batch_size"]) + (i - (len(labels) - 1) / 2) * width for r in mine],
                     [s["median"] for s in stats], width * 0.95, label=label, capsize=2,
                     yerr=[[s["median"] - s["p25"] for s in stats], [s["p75"] - s["median"] for s in stats]],
                     color=colours.get(mine[0]["backend"], "grey"), alpha=1.0 if mine[0]["variant"] == "default" else 0.55,
                     hatch="//" if mine[0]["impl"] == "plain" else None if mine[0]["variant"] == "default" else "..",
                     edgecolor="black", linewidth=0.4)
        limit = machine_peak * 1e9 / flops[kind]
        axis.axhline(limit, color="black", linestyle="--", linewidth=1)
        axis.annotate(f"measured matmul peak {machine_peak:.0f} GFLOP/s = {limit:.0f} img/s", (0.01, limit),
                      xycoords=("axes fraction", "data"), va="bottom", fontsize=8)
        untrained = sorted({r["backend"] for r in rows if _headline(r, kind) is None})
        if untrained:  # say why a backend has no bar here
            axis.text(0.5, 0.5, f"{', '.join(untrained)}: inference only", transform=axis.transAxes,
                      ha="center", va="center", fontsize=9, color="grey")
        axis.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
        top = max([limit] + [_headline(r, kind)["p75"] for r in rows if _headline(r, kind) is not None])
        axis.set(ylabel="images/s (median; bars: interquartile range)", title=kind, ylim=(0, top * 1.12))
        axis.grid(axis="y", alpha=0.3)
    legend = {}  # every configuration once, from either panel (an inference-only one is in the second only)
    for axis in axes:
        legend.update((name, handle) for handle, name in zip(*axis.get_legend_handles_labels()) if name not in legend)
    handles, names = list(legend.values()), list(legend)
    fig.legend(handles, names, loc="upper center", bbox_to_anchor=(0.5, 0.02), ncol=min(len(names), 4), fontsize=8)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def _write_json(path: Path, payload: dict) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2) + "\n")


# ---------------------------------------------------------------- the command
def cmd_bench(args) -> int:
    try:
        return _bench(args)
    except BenchError as error:
        print(f"alexnet bench: error: {error}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("\nalexnet bench: interrupted; no results written", file=sys.stderr)
        return 130


def _run_jobs(args, data_dir: str | None, workdir: Path) -> dict[Config, list[dict]]:
    """Every job, round robin over the repeats; their results by configuration."""
    results: dict[Config, list[dict]] = {}
    count = 0

    def run(config: Config, repeat: int) -> dict:
        nonlocal count
        count += 1
        began = time.perf_counter()
        round_ = f"round {repeat + 1}/{args.repeat}, " if args.repeat > 1 else ""
        print(f"bench: [{round_}{count}] {config.label}, batch {config.batch_size} ...", end="", flush=True)
        try:
            result = run_job(config, args, data_dir, workdir, count)
        except BaseException:
            print(" failed", flush=True)
            raise
        steps = result["train_s"].get("synthetic") or result["train_s"].get("real")
        rate = (f"{config.global_batch / float(np.median(steps)):.1f} train img/s" if steps else
                f"{config.global_batch / float(np.median(result['eval_s'])):.1f} inference img/s")
        print(f" {rate} ({time.perf_counter() - began:.0f} s)", flush=True)
        results.setdefault(config, []).append(result)
        return result

    for repeat in range(args.repeat):  # round robin: a burst of background load hits every configuration alike
        for batch in args.batch_sizes:
            for backend in args.backends:
                (default,) = configs(args, backend, batch, None)
                first = run(default, repeat)
                resolved = {k: v for k, v in first["options"].items() if k in all_speed_ups()[backend]}
                for config in configs(args, backend, batch, resolved, first["device"]):
                    run(config, repeat)
                for replicas in (n for n in args.replicas if n > 1 and capabilities(backend).trains):
                    run(replace(default, replicas=replicas), repeat)
    return results


def _bench(args) -> int:
    _check(args)
    out = check_creatable(args.out or default_run_dir("bench"))  # before the benchmark, not after it
    for note in inference_only_notes(args):
        print(note, flush=True)
    data_dir = None
    if "real" in args.data:
        from .data import locate

        data_dir = str(locate(args.data_dir, progress=True).resolve())
    spec = get_spec("book").with_input(1, args.input_size)
    macs = shapes.totals(shapes.infer(spec))["macs"]
    flops = {"training": shapes.training_flops_per_image(spec), "inference": 2 * macs}
    started = time.time()
    load_before = os.getloadavg()
    # Job files, logs and the results are made in a scratch folder and moved to ``out`` at the
    # end, so an interrupted or failed run leaves nothing half-written there. A failed job's log
    # stays in the scratch folder, where the error message points.
    workdir = Path(tempfile.mkdtemp(prefix="alexnet-bench-"))
    keep = False
    try:
        try:
            results = _run_jobs(args, data_dir, workdir)
        except BenchError:
            keep = True
            raise
        rows = [summarise(config, runs, flops) for config, runs in results.items()]
        order = {name: i for i, name in enumerate(args.backends)}
        rows.sort(key=lambda r: (r["batch_size"], order[r["backend"]], r["impl"] == "plain", r["replicas"],
                                 r["variant"] != "default", r["variant"]))
        machine_peak = max(r["peak_gflops"] for r in rows)
        _compare(rows, machine_peak, flops)

        devices = ", ".join(sorted({r["device_name"] for r in rows}))
        title = (f"AlexNet 1x{args.input_size}x{args.input_size}, {args.precision}, math {rows[0]['math']}, "
                 f"{devices}; {args.steps} steps x {args.repeat} round(s)")
        environment = machine_environment()
        workers = worker_environment(args.threads, args.math)
        environment.update({
            "worker_threads_env": {name: workers.get(name) for name in thread_variables()},
            "load_average_before": load_before, "load_average_after": os.getloadavg(),
            "frameworks": {r["backend"]: r["environment"] for r in rows if r["impl"] == "alexnet"},
        })
        payload = {
            "command": ["alexnet", *sys.argv[1:]] if Path(sys.argv[0]).name in ("alexnet", "__main__.py") else sys.argv,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "seconds": time.time() - started,
            "settings": {k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v)
                         for k, v in vars(args).items() if k not in ("func", "command")},
            "flops_per_image": flops, "machine_peak_gflops": machine_peak,
            "environment": environment, "results": rows,
        }
        _write_json(workdir / RESULT_JSON, payload)
        plot(rows, flops, machine_peak, workdir / RESULT_PNG, title)
        (out / LOG_DIR).mkdir(parents=True, exist_ok=True)
        for log in workdir.glob("*.log"):
            shutil.move(log, out / LOG_DIR / log.name)
        for name in (RESULT_JSON, RESULT_PNG):
            shutil.move(workdir / name, out / name)
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)

    print()
    print(title)
    print(table(rows))
    peaks = {}
    for r in rows:
        peaks.setdefault(r["backend"], []).append((r["peak_gflops"], r["peak_op"]))
    print(f"measured matmul peak (median GFLOP/s, n={rows[0]['matmul_n']}): "
          + ", ".join(f"{b} {max(v)[0]:.0f} ({max(v)[1]})" for b, v in peaks.items())
          + f"; machine peak {machine_peak:.0f}")
    print(f"MFU = training FLOPs per image ({flops['training'] / 1e9:.2f} GFLOP = 6 x forward MACs) x train img/s "
          "/ measured matmul peak")
    print(f"infer MFU = inference FLOPs per image ({flops['inference'] / 1e9:.2f} GFLOP = 2 x MACs) x infer img/s "
          "/ the same framework's peak")
    print("  own: the same framework's peak, in the same process; machine: the best peak of the run; "
          "+-: half the interquartile range of per-step img/s")
    if any("scaling" in r for r in rows):
        print("scaling: training img/s with N replicas / (N x img/s of one replica), each replica taking the batch "
              "shown; replicas sharing a CPU's cores measure the engine's overhead, not a speed-up")
    print(f"load average before/after: {load_before[0]:.1f} / {environment['load_average_after'][0]:.1f} "
          f"on {environment['usable_cpus']} CPUs ({environment['cpu']})")
    print(f"results: {out / RESULT_JSON}, chart: {out / RESULT_PNG}")
    return 0


__all__ = ["BenchError", "Config", "add_bench_parser", "cmd_bench", "summarise", "table"]
