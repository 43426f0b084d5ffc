"""Where one PyTorch training step spends its time: the library's own step (``alexnet_pt``'s
``prepare`` + ``train_step``, as ``alexnet bench`` times it) under ``torch.profiler``, kernels
grouped by what they do.

    python benchmarks/profile_pt.py --device gpu --precision bf16 --batch 256 [--math tf32] [--on compile]

Prints the wall time per step, the device time per step by group (convolution, matrix product,
elementwise and pooling, copies and casts, optimizer, other) and the top kernels, and with
``--trace FILE`` writes a Chrome trace. The gap between the wall time and the device time is
the time the device waited for the host (launches, the per-step synchronisation). A tool for
working on speed, not a benchmark: ``alexnet bench`` is the one that reports figures.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a file: the project's own modules come from this tree

from common import shapes  # noqa: E402
from common.backend import apply_math_environment  # noqa: E402
from common.bench_worker import synthetic_batch  # noqa: E402
from common.io import atomic_path  # noqa: E402
from common.cli_args import (OneLineErrorParser, add_math_arg, add_precision_arg, add_speed_up_args,  # noqa: E402
                             chosen_speed_ups, non_negative_int, positive_int, speed_up_owner)
from common.spec import book_alexnet  # noqa: E402

# Kernel-name fragments, most specific first; the first that matches names the group.
GROUPS = (
    ("optimizer", ("sgd", "foreach", "multi_tensor", "_amp_")),
    ("convolution", ("conv", "cudnn", "implicit_gemm", "winograd", "fft", "fprop", "dgrad", "wgrad",
                     "onednn", "mkldnn_convolution")),
    ("matrix product", ("gemm", "cublas", "cutlass", "nvjet", "addmm", "aten::mm", "aten::bmm", "matmul")),
    # casts are copy kernels (bfloat16_copy_kernel_cuda); "nocast" in a kernel's name says nothing
    ("copy and cast", ("copy", "memcpy", "memset", "fill")),
    ("elementwise and pooling", ("elementwise", "relu", "threshold", "pool", "dropout", "bernoulli", "mul", "add",
                                 "div", "sub", "softmax", "nll", "reduce", "max", "triton")),
)


def group_of(name: str) -> str:
    lowered = name.lower()
    return next((group for group, fragments in GROUPS if any(f in lowered for f in fragments)), "other")


def main(argv: list[str] | None = None) -> int:
    parser = OneLineErrorParser(prog="benchmarks/profile_pt.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "gpu"), default="gpu")
    add_precision_arg(parser)
    add_math_arg(parser)
    parser.add_argument("--batch", type=positive_int, default=256)
    parser.add_argument("--input-size", type=positive_int, default=224, metavar="S", help="images are 1xSxS")
    parser.add_argument("--steps", type=positive_int, default=10, help="profiled steps (after --warmup untimed ones)")
    parser.add_argument("--warmup", type=non_negative_int, default=3)
    add_speed_up_args(parser)
    parser.add_argument("--top", type=positive_int, default=15, help="kernels listed (default 15)")
    parser.add_argument("--trace", type=Path, help="also write a Chrome trace (chrome://tracing, Perfetto)")
    args = parser.parse_args(argv)
    spec = book_alexnet().with_input(1, args.input_size, args.input_size)
    try:
        options = chosen_speed_ups(args)
        foreign = [name for name in options if speed_up_owner(name) != "pt"]
        if foreign:
            raise ValueError(f"speed-up(s) {', '.join(foreign)} are not PyTorch's")
        shapes.check_input(spec, spec.input_shape)
        if args.trace and not args.trace.parent.is_dir():  # before minutes of work, not after
            raise ValueError(f"--trace {args.trace}: folder {args.trace.parent} does not exist")
    except ValueError as error:
        parser.error(str(error))

    apply_math_environment(args.math)  # before PyTorch is imported, as every entry point does
    from torch.profiler import ProfilerActivity, profile

    import alexnet_pt as backend

    backend.set_math_mode(args.math)
    on_gpu = args.device == "gpu"
    if on_gpu and not backend.gpu_available():
        parser.exit(2, f"{parser.prog}: error: {backend.gpu_status().detail}\n")
    model = backend.build(spec, device=args.device)
    trainer = backend.make_trainer(model, lr=0.01, precision=args.precision, **options)
    images, labels = synthetic_batch(args.batch, spec.num_classes)  # the batch alexnet bench times

    def step(seed: int) -> None:
        trainer.train_step(trainer.prepare(images), labels, seed=seed)
        backend.synchronize(args.device)

    for seed in range(args.warmup):
        step(seed)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        for seed in range(args.steps):
            step(args.warmup + seed)
        wall = (time.perf_counter() - started) / args.steps
    if args.trace:  # whole or not at all; PyTorch only logs a failed write, so the file is checked
        try:
            with atomic_path(args.trace) as tmp:
                prof.export_chrome_trace(str(tmp))
                if not tmp.is_file() or tmp.stat().st_size == 0:
                    raise OSError("PyTorch wrote no trace there")
        except OSError as error:
            parser.exit(2, f"{parser.prog}: error: --trace {args.trace}: {error}\n")

    # Device kernels on a GPU (self device time); the operators' own CPU time on a CPU.
    events = [e for e in prof.key_averages()
              if (e.device_type.name == "CUDA" if on_gpu else e.device_type.name == "CPU" and not e.key.startswith("ProfilerStep"))]
    seconds = {e.key: (e.self_device_time_total if on_gpu else e.self_cpu_time_total) / 1e6 / args.steps
               for e in events}
    groups: dict[str, float] = {}
    for name, s in seconds.items():
        groups[group_of(name)] = groups.get(group_of(name), 0.0) + s
    busy = sum(seconds.values())
    print(f"AlexNet 1x{args.input_size}x{args.input_size}, batch {args.batch}, {args.precision}, math {args.math}, "
          f"{backend.runtime_info(args.device).get('gpu') or 'CPU'}, options {trainer.options}")
    print(f"wall {wall * 1e3:.2f} ms per step ({args.batch / wall:.0f} img/s); "
          f"{'device busy' if on_gpu else 'operators (self CPU time)'} {busy * 1e3:.2f} ms "
          f"({busy / wall:.0%} of the wall)")
    for group, s in sorted(groups.items(), key=lambda item: -item[1]):
        print(f"  {group:<24} {s * 1e3:8.3f} ms  {s / busy:6.1%}")
    print(f"top {args.top} {'kernels' if on_gpu else 'operators'}:")
    for name, s in sorted(seconds.items(), key=lambda item: -item[1])[:args.top]:
        print(f"  {s * 1e3:8.3f} ms  {s / busy:6.1%}  [{group_of(name)}] {name[:110]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
