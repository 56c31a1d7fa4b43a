#!/usr/bin/env bash
# bash bench/gpu_check.sh        (one GPU, about 10 minutes; prints figures, writes bench/gpu_check.log)
# 1. the `gpu` tests: the GPT trained with every strategy and precision on the GPU
# 2. gpt2_124m throughput: bf16-mixed + torch.compile + SDPA, batch 32 x 1024 tokens: tokens/s, MFU
# 3. the largest GPT width (24 layers) that trains with DDP and with DeepSpeed ZeRO-3 + offload
# Any step that fails or runs past its timeout stops the script with its name and a non-zero
# status; the log keeps everything printed up to there.
set -euo pipefail
cd "$(dirname "$0")/.."
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$PWD/.cache/inductor}
LOG=bench/gpu_check.log
: > "$LOG"
say() { echo "== $*" | tee -a "$LOG"; }
# step NAME SECONDS CMD...: the command's whole output goes to the log and the screen; a
# failure or a timeout (status 124) ends the script loudly
step() {
  local name=$1 secs=$2 status=0
  shift 2
  say "$name"
  timeout "$secs" "$@" 2>&1 | tee -a "$LOG" || status=$?
  if [ "$status" -ne 0 ]; then
    if [ "$status" -eq 124 ]; then say "FAILED: $name ran past ${secs} s"; else say "FAILED: $name (status $status)"; fi
    exit 1
  fi
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$LOG"
step "gpu tests" 240 python -m pytest -q -m gpu -x tests/test_scale.py
step "throughput: gpt2_124m, bf16-mixed, compile, SDPA" 180 \
  python bench/gpu_throughput.py --model gpt2_124m --batch 32 --steps 50 --warmup 10
python - "$LOG" <<'PY' | tee -a "$LOG"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{") and '"mfu"' in l]
r = rows[-1]
print(f"gpt2_124m: {r['tokens_per_s']:,.0f} tokens/s, MFU {100 * r['mfu']:.1f} %")
PY
for s in ddp deepspeed_stage_3_offload; do
  step "largest width: $s" 150 python bench/gpu_throughput.py --max-width --strategy "$s" --trial-timeout 60
done
say "done: figures in $LOG"
