#!/usr/bin/env bash
# One-command CUDA reproduction of the optimizer step benchmark (scripts/bench_step.py), < 8 minutes
# on one H100/H200-class GPU. Needs a Python with CUDA torch and transformers (no network needed);
# run from the repository root:
#
#   bash scripts/gpu_bench.sh                # writes gpu_bench.md
#   PYTHON=/path/to/python OUT=/tmp/gpu.md bash scripts/gpu_bench.sh
#
# Optional baselines (adam-mini, bitsandbytes, torchao) are measured when importable and skipped
# otherwise. The Llama-1B set uses all 16 layers of Llama-3.2-1B (about 60 GB of GPU memory for
# all optimizers together); set LLAMA_LAYERS=8 on smaller cards.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
OUT="${OUT:-gpu_bench.md}"
LLAMA_LAYERS="${LLAMA_LAYERS:-16}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

"$PYTHON" - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_bench.sh: torch.cuda.is_available() is False; run this on a CUDA machine")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

{
  echo "# bench_step.py on CUDA ($(date -u +%Y-%m-%dT%H:%MZ))"
  echo
  timeout 240 "$PYTHON" scripts/bench_step.py --device cuda --models gpt2-124m --repeats 30 --warmup 3 \
    --skip "SlimAdamW reference" "SlimAdamW fused"
  echo
  timeout 300 "$PYTHON" scripts/bench_step.py --device cuda --models llama-1b --llama-layers "$LLAMA_LAYERS" \
    --repeats 15 --warmup 2 --skip "SlimAdamW reference" "SlimAdamW fused" "torch AdamW foreach"
} | tee "$OUT"
echo "wrote $OUT"
