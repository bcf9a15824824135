#!/usr/bin/env bash
# The paper's headline on one GPU: GPT-2 124M, AdamW vs SlimAdam (gpt2 preset), robust and int8 momentum, at the
# paper's LR and at 3x it; writes paper_gpt2.md (final validation losses, ratios to AdamW) and paper_gpt2.png.
#   bash scripts/paper_gpt2.sh [--out DIR] [--smoke] [other options of scripts/paper_gpt2.py]
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
exec "${PYTHON:-python}" scripts/paper_gpt2.py "$@"
