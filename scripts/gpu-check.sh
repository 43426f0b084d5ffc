#!/usr/bin/env bash
# The prepared GPU check, for every backend whose framework computes on the GPU there (read from the
# registry and each backend's gpu_status, not from a list: on the lent machine PyTorch and JAX): the
# GPU tests, `alexnet bench --device gpu` side by side (fp32/bf16 x fp32/tf32 math, batch 128 and
# 256, MFU) and the book's full recipe on Fashion-MNIST at 224x224 with its test accuracy, per
# backend, in at most 530 s, from the source tree with the machine's own packages (no network and
# no pip install of the project).
#
#   bash scripts/gpu-check.sh --prepare    # here, on the CPU machine, before the device call:
#                                          # Fashion-MNIST and pytest's wheels into .gpu-carry/
#   then the device tool, from the checkout that travels (the session's own):
#   run(command="bash scripts/gpu-check.sh", carry=[".gpu-carry"], timeout_s=580)
#   bash scripts/gpu-check.sh --cpu-smoke  # the same steps on CPU at tiny sizes (tests the script)
#
# The summary (gpu-check.json, gpu-check.md, the log, each recipe's training curves and an archive
# of the run) goes to $OUT when it is set (the device tool brings that folder back), else to
# runs/gpu-check-MODE-TIME/. Without a GPU the GPU steps are skipped with a message, exit 0.
# The steps and their time budget are in scripts/gpu_check.py; this wrapper picks the Python.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    # The project's .venv where there is one; on the GPU machine, python3 is the one with its frameworks.
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PYTHON" scripts/gpu_check.py "$@"
