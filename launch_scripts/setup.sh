#!/usr/bin/env bash
# Create .venv and install megalm with its test extras. Idempotent: a second run only checks.
# CPU machines get the CPU wheel of torch (no multi-GB CUDA download); where nvidia-smi sees a GPU, pip's
# default CUDA build is used instead. Set MEGALM_TORCH to pin another torch requirement.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    .venv/bin/python -m pip install -q "${MEGALM_TORCH:-torch}"
  else
    .venv/bin/python -m pip install -q "${MEGALM_TORCH:-torch==2.13.0}" \
      || .venv/bin/python -m pip install -q --index-url https://download.pytorch.org/whl/cpu torch
  fi
fi
# Importing megalm.kernels (through the megalm/kernels symlink) and each test dependency catches a stale install.
if ! .venv/bin/python -c "import megalm.kernels, deepspeed, tokenizers, safetensors, transformers, pytest, pyarrow, zstandard, datasketch, datasets, hypothesis, wandb, peft" 2>/dev/null; then
  .venv/bin/python -m pip install -q -e ".[test]"
fi
.venv/bin/python -c "import torch, megalm; print(f'megalm {megalm.__version__} ready: torch {torch.__version__}, '
                     f'CUDA {torch.cuda.is_available()}')"
