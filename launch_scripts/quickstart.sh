#!/usr/bin/env bash
# The demo: set up, preprocess the embedded corpus (the Python standard library's sources), train
# configs/tiny.yaml for a few minutes, evaluate, and generate a sample. Extra arguments are config overrides
# for the training run, e.g. `bash launch_scripts/quickstart.sh train.steps=50`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch_scripts/setup.sh
export PYTHONUNBUFFERED=1
start=$(date +%s)
if [ ! -f data/stdlib.idx ]; then
  .venv/bin/megalm preprocess --output-prefix data/stdlib
fi
.venv/bin/megalm train --config configs/tiny.yaml "$@"
echo "--- the test split again, on more samples (training's test line used train.eval_samples=64; this uses 256," \
     "so the two perplexities differ by sampling, not by model) ---"
.venv/bin/megalm eval --checkpoint runs/tiny --split test --samples 256
echo "--- a sample from the model (greedy-ish, seed 0) ---"
.venv/bin/megalm generate --checkpoint runs/tiny --prompt "def " --max-new-tokens 80 --temperature 0.7 --seed 0
echo "---"
echo "demo finished in $(( $(date +%s) - start ))s; metrics, loss_curve.png and checkpoints are in runs/tiny/"
