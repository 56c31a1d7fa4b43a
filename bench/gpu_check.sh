#!/usr/bin/env bash
# bash bench/gpu_check.sh        (one GPU, about 10 minutes; prints figures, writes bench/gpu_check.log)
# 1. the `gpu` tests: the GPT trained with every strategy and precision on the GPU
# 2. gpt2_124m throughput: bf16-mixed + torch.compile + SDPA, batch 32 x 1024 tokens, MFU
# 3. the largest GPT width (24 layers) that trains with DDP and with DeepSpeed ZeRO-3 + offload
set -uo pipefail
cd "$(dirname "$0")/.."
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$PWD/.cache/inductor}
LOG=bench/gpu_check.log
: > "$LOG"
say() { echo "== $*" | tee -a "$LOG"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$LOG"
say "gpu tests"
timeout 240 python -m pytest -q -m gpu -x tests/test_scale.py 2>&1 | tail -15 | tee -a "$LOG"

say "throughput: gpt2_124m, bf16-mixed, compile, SDPA"
timeout 180 python bench/gpu_throughput.py --model gpt2_124m --batch 32 --steps 50 --warmup 10 \
  2>&1 | tail -1 | tee -a "$LOG"

for s in ddp deepspeed_stage_3_offload; do
  say "largest width: $s"
  timeout 150 python bench/gpu_throughput.py --max-width --strategy "$s" --trial-timeout 60 \
    2>&1 | grep -E "^width|^\{" | tee -a "$LOG"
done
say "done: figures in $LOG"
