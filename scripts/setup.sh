#!/usr/bin/env bash
# Creates .venv with the three frameworks and this project (editable).
# PyTorch's CPU wheel goes in first: a bare "torch" requirement with no torch installed
# pulls a multi-GB CUDA build. On a GPU machine set ALEXNET_GPU=1 to install the CUDA
# builds instead (torch from PyPI, tensorflow[and-cuda]).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ "${ALEXNET_GPU:-0}" = 1 ]; then
  .venv/bin/python -m pip install -q "torch==${TORCH_VERSION}"
  .venv/bin/python -m pip install -q -e ".[torch,tensorflow-gpu,mxnet,test]"
else
  .venv/bin/python -m pip install -q "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu \
    || .venv/bin/python -m pip install -q "torch==${TORCH_VERSION}"
  .venv/bin/python -m pip install -q -e ".[all,test]"
fi
.venv/bin/python -c "import common, alexnet_pt, alexnet_tf, alexnet_mx; print('alexnet: pt, tf and mx backends installed in .venv')"
