"""Device truth: a GPU counts only if a convolution forward and backward runs on it; 'auto'
falls back to the CPU saying why; '--device gpu' fails with the reason; records name the device."""
from __future__ import annotations

import pytest

from common import backend as B
from common.machine import cpu_features, cpu_model, describe_cpu
from tests.conftest import get_backend


def test_auto_with_a_usable_gpu_takes_it_and_without_one_is_quiet(capsys):
    assert B.choose_device("auto", B.GpuStatus(True, "NVIDIA H200", present=True), "X") == "gpu"
    assert B.choose_device("auto", B.GpuStatus(False, "X sees no GPU"), "X") == "cpu"
    assert capsys.readouterr().err == ""  # no GPU at all: nothing to warn about


def test_auto_with_an_unusable_gpu_falls_back_with_one_warning_line(capsys):
    status = B.GpuStatus(False, "this MXNet build has no kernels for compute capability 9.0", present=True)
    assert B.choose_device("auto", status, "FrameworkA") == "cpu"
    assert B.choose_device("auto", status, "FrameworkA") == "cpu"
    err = capsys.readouterr().err.splitlines()
    assert err == ["warning: FrameworkA runs on the CPU: this MXNet build has no kernels for compute capability 9.0"]


def test_gpu_request_without_a_usable_gpu_names_the_reason():
    status = B.GpuStatus(False, "this MXNet build has no kernels for compute capability 9.0", present=True)
    with pytest.raises(B.DeviceError, match=r"MXNet cannot compute on a GPU here: this MXNet build has no kernels "
                                            r"for compute capability 9\.0; use --device cpu or auto"):
        B.choose_device("gpu", status, "MXNet")


def test_every_backend_answers_false_with_a_reason_on_this_cpu_machine(backend):
    status = backend.gpu_status()
    if status.usable:
        pytest.skip("this machine has a GPU the framework can use")
    assert backend.gpu_available() is False and status.detail and "\n" not in status.detail
    assert backend.FRAMEWORK.split()[0] in status.detail or "build" in status.detail


def test_pytorch_counts_a_gpu_only_if_a_convolution_runs_on_it(monkeypatch):
    """A device PyTorch reports but cannot run kernels on (an old wheel on a new GPU) is not usable."""
    get_backend("pt")  # skipped with the reason where PyTorch is not installed
    import torch

    from alexnet_pt import _framework

    if torch.cuda.is_available():
        pytest.skip("a real GPU is here: the simulation would be wrong")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "Simulated H200")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_80", "sm_86"])
    _framework.gpu_status.cache_clear()
    try:
        status = _framework.gpu_status()  # the convolution on "cuda" fails in this CPU build
    finally:
        _framework.gpu_status.cache_clear()
    assert not status.usable and status.present
    assert status.detail.startswith("Simulated H200 (compute capability 9.0): a convolution failed on it")
    assert "sm_80, sm_86" in status.detail


def test_mxnet_explains_a_gpu_beyond_its_wheels_kernels(monkeypatch):
    """MXNet 1.9.1's CUDA wheels stop at compute capability 8.6: on an H100/H200 (9.0) it sees the
    GPU and cannot run a kernel. Simulated on this CPU build: the convolution on gpu(0) fails."""
    alexnet_mx = get_backend("mx")  # skipped with the reason where MXNet is not installed
    from alexnet_mx import _framework
    from mxnet import runtime, util

    if alexnet_mx.gpu_available():
        pytest.skip("a real GPU is here: the simulation would be wrong")
    monkeypatch.setattr(runtime.Features, "is_enabled", lambda self, name: True)
    monkeypatch.setattr(_framework.mx.context, "num_gpus", lambda: 1)
    monkeypatch.setattr(util, "get_cuda_compute_capability", lambda ctx: 90)
    _framework.gpu_status.cache_clear()
    try:
        status = _framework.gpu_status()
    finally:
        _framework.gpu_status.cache_clear()
    assert not status.usable and status.present
    assert status.detail == ("this MXNet build has no kernels for compute capability 9.0 "
                             "(MXNet 1.9.1's CUDA wheels stop at 8.6, without PTX)")


@pytest.mark.parametrize("math, expected", [
    ("fp32", {"NVIDIA_TF32_OVERRIDE": "0", "MXNET_CUDA_ALLOW_TENSOR_CORE": "0"}),
    ("tf32", {"MXNET_CUDA_ALLOW_TENSOR_CORE": "1"}),
])
def test_math_environment_is_set_before_a_framework_import(math, expected):
    env = B.apply_math_environment(math, {"NVIDIA_TF32_OVERRIDE": "0", "OTHER": "kept"})
    assert all(env[k] == v for k, v in expected.items()) and env["OTHER"] == "kept"
    if math == "tf32":
        assert "NVIDIA_TF32_OVERRIDE" not in env  # a leftover override would silently forbid TF32
    with pytest.raises(ValueError, match="math mode must be one of fp32, tf32"):
        B.math_environment("fp16")


def test_pytorch_math_mode_switches_both_convolutions_and_matmuls():
    alexnet_pt = get_backend("pt")  # skipped with the reason where PyTorch is not installed
    import torch

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        alexnet_pt.set_math_mode("tf32")
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        alexnet_pt.set_math_mode("fp32")
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        with pytest.raises(ValueError, match="has math mode fp32 or tf32, not 'bf16'"):
            alexnet_pt.set_math_mode("bf16")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_records_name_the_cpu():
    assert cpu_model() and cpu_model() in describe_cpu() and cpu_features() in describe_cpu()
    effective = [B.effective_math(m, d) for m in ("fp32", "tf32") for d in ("cpu", "gpu")]
    assert effective == ["fp32", "fp32", "fp32", "tf32"]  # a CPU computes float32 as float32


def test_process_seconds_counts_from_the_process_start():
    """A fresh interpreter is younger than this test process, and both are older than 0."""
    import subprocess
    from pathlib import Path
    import sys

    from common.machine import process_seconds

    mine = process_seconds()
    child = float(subprocess.run([sys.executable, "-c", "from common.machine import process_seconds; "
                                  "print(process_seconds())"], capture_output=True, text=True, check=True,
                                 cwd=str(Path(__file__).resolve().parents[1])).stdout)
    assert 0 < child < mine
