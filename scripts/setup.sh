#!/usr/bin/env bash
# Creates .venv with the four frameworks, ONNX Runtime and this project (editable).
# The pinned PyTorch goes in first, so that the project's "torch" requirement is already met
# and pip does not pick another (multi-GB CUDA) build. Where PyPI's torch is a CUDA build and
# you want CPU only, set TORCH_INDEX_URL to PyTorch's CPU wheel index. On a GPU machine set
# ALEXNET_GPU=1 for TensorFlow's CUDA build too (tensorflow[and-cuda]) and onnxruntime-gpu.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==${TORCH_VERSION}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
# JAX 0.7.1 is the newest that runs beside MXNet's numpy<2 (0.7.2 and later need numpy 2).
.venv/bin/python -m pip install -q "jax==0.7.1" "jaxlib==0.7.1" "flax==0.12.0" "optax==0.2.8"
extras="all,test"
[ "${ALEXNET_GPU:-0}" = 1 ] && extras="torch,tensorflow-gpu,mxnet,onnx-gpu,test"
.venv/bin/python -m pip install -q -e ".[$extras]"
.venv/bin/python -c "import common, alexnet_pt, alexnet_tf, alexnet_mx, alexnet_jax, alexnet_onnx; print('alexnet: pt, tf, mx, jax and onnx backends installed in .venv')"
