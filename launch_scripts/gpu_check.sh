#!/usr/bin/env bash
# The one prepared GPU check (about 5-8 minutes on an H100): what only a GPU can show. Results go to $OUT
# (default runs/gpu-check): logs, kernel and training benchmark tables (JSON + PNG).
#   - the gpu-marked kernel tests and the whole kernel suite on real Triton (no interpreter);
#   - megalm bench kernels: attention TFLOP/s and norm GB/s beside torch SDPA (flash, cuDNN backends), Liger
#     and the card's measured matmul/copy peak, and the attention tile each shape kept after tuning
#     (bench.json "attention_tiles");
#   - megalm bench train: GPT-2 124M shape, bf16, seq 1024, with the Triton kernels and with the torch path,
#     beside a plain transformers loop, MFU against the measured peak;
#   - a short CUDA training run of configs/tiny.yaml on the embedded corpus (the loss must fall).
# Works on a machine without deepspeed (the native engine needs none) and without network access.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi -L | tee "$OUT/device.txt"
"$PY" -c "import megalm.kernels" 2>/dev/null \
  || "$PY" -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 \
  || echo "gpu_check: could not install megalm (see $OUT/install.log)"
step() { echo "=== $1"; shift; timeout "${STEP_TIMEOUT:-300}" "$@"; echo "=== exit $?"; }
step "kernel tests on CUDA" "$PY" -m pytest -q -x tests/kernels -p no:cacheprovider 2>&1 | tee "$OUT/kernel_tests.log"
step "kernel benchmark" "$PY" -m megalm bench kernels --out "$OUT" 2>&1 | tee "$OUT/bench_kernels.log"
KERNELS=(kernels.attention kernels.norm kernels.rope kernels.swiglu kernels.cross_entropy)
TRAIN=(--config configs/gpt2-124m.yaml --tp 0 --steps 10 --vocab-size 50304 train.precision=bf16
       train.micro_batch_size=8 train.global_batch_size=8 data.seq_len=1024 model.dropout=0.0)
step "train benchmark, Triton kernels" "$PY" -m megalm bench train "${TRAIN[@]}" --out "$OUT/triton" \
  "${KERNELS[@]/%/=triton}" 2>&1 | tee "$OUT/bench_train_triton.log"
step "train benchmark, torch path" "$PY" -m megalm bench train "${TRAIN[@]}" --out "$OUT/torch" \
  "${KERNELS[@]/%/=torch}" 2>&1 | tee "$OUT/bench_train_torch.log"
[ -f data/stdlib.idx ] || "$PY" -m megalm preprocess --output-prefix data/stdlib --quiet
step "short CUDA training run" "$PY" -m megalm train --config configs/tiny.yaml train.steps=100 \
  train.precision=bf16 train.run_dir="$OUT/tiny" train.eval_interval=0 checkpoint.interval=0 2>&1 \
  | tee "$OUT/train_tiny.log"
