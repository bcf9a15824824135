#!/usr/bin/env bash
# Multi-GPU checks for SlimAdamW under DDP / FSDP2 (nccl), for a CUDA machine with >= 2 GPUs.
#
#   bash scripts/gpu_dist_check.sh            # all visible GPUs
#   NGPU=4 HIDDEN=2048 LAYERS=8 bash scripts/gpu_dist_check.sh
#
# 1. the multi-process test suite (gloo on CPU processes: DDP, FSDP2 exactness, checkpoints, FSDP1 refusal,
#    Trainer + FSDP2), which must also pass on a GPU machine;
# 2. FSDP2 on nccl: exactness against single-process SlimAdamW (float64), with params on the GPUs and
#    with FSDP2 CPU offload (the optimizer then runs on CPU and all-reduces over the cuda mesh);
# 3. a larger optimizer-step benchmark (SlimAdamW vs torch AdamW) whose table goes to docs/distributed.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
NGPU=${NGPU:-$($PY -c "import torch; print(torch.cuda.device_count())")}
HIDDEN=${HIDDEN:-1024}
LAYERS=${LAYERS:-8}
if [ "$NGPU" -lt 2 ]; then
  echo "gpu_dist_check: need >= 2 CUDA GPUs, found $NGPU (nccl cannot put two ranks on one GPU)" >&2
  exit 2
fi
echo "== torch $($PY -c 'import torch; print(torch.__version__, torch.version.cuda)'), $NGPU GPUs"
$PY -m pytest -x -q tests/test_dist_multiprocess.py tests/test_dist_detection.py tests/test_dist_trainer.py

echo "== FSDP2 / nccl: exactness (float64, tiny) and step time"
$PY -m torch.distributed.run --nproc_per_node "$NGPU" scripts/dist_bench.py --backend nccl --check --hidden 128 --layers 2
echo "== FSDP2 / nccl + CPU offload: exactness"
$PY -m torch.distributed.run --nproc_per_node "$NGPU" scripts/dist_bench.py --backend nccl --check --offload --hidden 128 \
  --layers 2 --steps 3
echo "== FSDP2 / nccl: step benchmark, llama hidden=$HIDDEN layers=$LAYERS"
$PY -m torch.distributed.run --nproc_per_node "$NGPU" scripts/dist_bench.py --backend nccl --hidden "$HIDDEN" \
  --layers "$LAYERS" --vocab 32000 --steps 20
