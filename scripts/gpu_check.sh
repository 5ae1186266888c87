#!/usr/bin/env bash
# GPU check: vsft vs PyTorch eager (transformers + PEFT) on a LLaVA-1.5-7B-shaped random model,
# one training step (forward, backward, AdamW) at batch 8 x 1024 tokens, LoRA r 128.
#
# For a GPU machine without network access. It builds nothing: pass a stripped release binary
# built elsewhere with `cargo build --release -p vsft --features cuda`. Needs python3 with
# torch, transformers and peft (to create the model and run the PyTorch side). ~6-8 minutes.
#
#   [CONFIG=configs/llava-v1.6-mistral-7b.json] scripts/gpu_check.sh path/to/vsft-cuda [BATCH] [SEQ] [STEPS]
# CONFIG picks the 7B shape: LLaVA-1.5 (default) or LLaVA-NeXT (Mistral-7B, 5 tiles per image:
# use SEQ >= 2560, since one 640×480 photo takes 2340 image tokens).
set -uo pipefail
cd "$(dirname "$0")/.."
VSFT=${1:?usage: scripts/gpu_check.sh path/to/vsft-cuda [BATCH] [SEQ] [STEPS]}
B=${2:-8}; L=${3:-1024}; N=${4:-3}; R=128
WORK=${WORK:-/tmp/vsft-gpu-check}
mkdir -p "$WORK"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
CONFIG=${CONFIG:-configs/llava-1.5-7b.json}
MODEL=$WORK/$(basename "$CONFIG" .json)-random
if [ ! -f "$MODEL/config.json" ]; then
  echo "== creating a random $(basename "$CONFIG" .json) (bf16) with transformers"
  python3 - "$MODEL" "$CONFIG" <<'PY'
import sys, time, torch
from transformers import AutoConfig, AutoModelForImageTextToText
t = time.time()
cfg = AutoConfig.from_pretrained(sys.argv[2])
with torch.device("cuda"):
    torch.manual_seed(0)
    m = AutoModelForImageTextToText.from_config(cfg).to(torch.bfloat16)
m.save_pretrained(sys.argv[1], max_shard_size="5GB")
print(f"created in {time.time()-t:.0f} s")
PY
fi

# Peak device memory of a command: sample nvidia-smi while it runs.
peak_of() {
  local log=$WORK/mem.$$; nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$log" &
  local smi=$!; "$@"; local rc=$?; kill $smi 2>/dev/null; wait $smi 2>/dev/null
  PEAK=$(sort -n "$log" | tail -1); rm -f "$log"; return $rc
}

# Frozen weights in bf16 (model.dtype = "bfloat16"); LoRA, projector and AdamW state in f32.
# At the full batch, plain first, then with gradient checkpointing; then smaller batches.
echo "== vsft (batch $B x $L, LoRA r $R, bf16 frozen weights, $N timed steps)"
V=""; VB=$B
for try in "$B" "$B ckpt" 4 2 1; do
  set -- $try; b=$1; extra=""; [ "${2:-}" = ckpt ] && extra=--gradient-checkpointing
  [ "$b" -gt "$B" ] && continue
  if peak_of timeout 240 "$VSFT" bench train --model "$MODEL" --batch-size "$b" --seq-len "$L" --lora-r $R --steps "$N" \
       --dtype bfloat16 $extra --json > "$WORK/vsft.json" 2> "$WORK/vsft.err"; then
    V=$(tail -1 "$WORK/vsft.json"); VB=$b; VPEAK=$PEAK; break
  fi
  echo "vsft at batch $b $extra failed: $(tail -3 "$WORK/vsft.err" | tr '\n' ' ')"
done
echo "== PyTorch + PEFT, bf16 frozen weights, autocast, sdpa (batch $VB x $L)"
TPEAK=0
if peak_of python3 scripts/bench_torch.py --model "$MODEL" --batch-size "$VB" --seq-len "$L" --lora-r $R --steps "$N" \
     --device cuda --dtype bfloat16 > "$WORK/torch.json" 2>"$WORK/torch.err"; then
  T=$(tail -1 "$WORK/torch.json"); TPEAK=$PEAK
else
  T=""; echo "torch failed: $(tail -3 "$WORK/torch.err")"
fi
python3 - "$V" "$T" "${VPEAK:-0}" "$TPEAK" "$VB" "$L" <<'PY'
import json, sys
v = json.loads(sys.argv[1]) if sys.argv[1] else None
t = json.loads(sys.argv[2]) if sys.argv[2] else None
vpeak, tpeak = float(sys.argv[3]), float(sys.argv[4])
print(f"\nbatch {sys.argv[5]} x {sys.argv[6]} tokens, LoRA r 128, LLaVA-1.5-7B shape, frozen weights bf16")
print("| | step ms (median) | tokens/s | peak device MB (nvidia-smi) |")
print("|---|---|---|---|")
if v: print(f"| vsft ({v['backend']}{', grad ckpt' if v.get('gradient_checkpointing') else ''}) | {v['step_ms_median']:.0f} | {v['tokens_per_s']:.0f} | {vpeak:.0f} |")
if t: print(f"| {t['backend']} | {t['step_ms_median']:.0f} | {t['tokens_per_s']:.0f} | {tpeak:.0f} (allocator peak {t.get('peak_device_mb', 0):.0f}) |")
if v and t: print(f"| vsft / torch | {v['step_ms_median']/t['step_ms_median']:.2f}x time | {v['tokens_per_s']/t['tokens_per_s']:.2f}x | {vpeak/max(tpeak,1):.2f}x |")
PY
