#!/usr/bin/env bash
# One command for a CUDA machine (about 5 minutes on one H100/H200): correctness of the Triton path against the
# reference, optimizer step time against torch's fused AdamW on GPT-2 124M and Llama-3.2-1B shapes (16 layers),
# and Trainer tokens/s with peak allocated memory (Llama-1B shapes, bf16 autocast, batch 8 x 512).
# Baselines that are not installed (bitsandbytes, torchao, Adam-mini) are reported as skipped.
#   bash scripts/gpu_bench.sh [OUTPUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu_bench_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python -c "import torch; assert torch.cuda.is_available(), 'gpu_bench.sh needs a CUDA device'; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"

echo "## Correctness on CUDA"
python scripts/gpu_check.py | tee "$out/correctness.md"

step_optims=("torch AdamW fused" "SlimAdamW default" "SlimAdamW default, int8 m" "SlimAdamW default, bf16 m"
             "SlimAdamW default, bf16 m stochastic" "SlimAdamW default, robust" "SlimAdamW foreach"
             "bnb AdamW8bit" "torchao AdamW8bit" "Adam-mini")
echo "## Optimizer step on CUDA"
python scripts/bench_step.py --device cuda --no-rss --models gpt2-124m --repeats 31 --warmup 3 \
  --optimizers "${step_optims[@]}" --output "$out/step_gpt2.md"
python scripts/bench_step.py --device cuda --no-rss --models llama-1b --llama-layers 16 --repeats 15 --warmup 2 \
  --optimizers "${step_optims[@]}" --output "$out/step_llama1b.md"

echo "## Trainer on CUDA"
python scripts/bench_step.py --device cuda --no-rss --models llama-1b --llama-layers 16 --repeats 1 --warmup 0 \
  --optimizers "torch AdamW fused" --trainer --trainer-steps 20 --trainer-batch 8 --trainer-seq 512 \
  --trainer-repeats 1 --trainer-optims adamw_torch_fused slimadam "slimadam int8 m" "slimadam bf16 m" \
  "slimadam robust" adamw_bnb_8bit adamw_torch_8bit --output "$out/trainer_llama1b.md"
