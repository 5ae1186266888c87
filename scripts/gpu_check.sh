#!/usr/bin/env bash
# GPU check: vsft vs PyTorch eager (transformers + PEFT) on a LLaVA-1.5-7B-shaped random model,
# one training step (forward, backward, AdamW) at batch 8 x 1024 tokens, LoRA r 128.
#
# For a GPU machine without network access. It builds nothing: pass a stripped release binary
# built elsewhere with `cargo build --release -p vsft --features cuda`. Needs python3 with
# torch, transformers and peft (to create the model and run the PyTorch side). ~6-8 minutes,
# then the data-parallel section at the end (~2-3 minutes; DP=0 skips it).
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

# ---------------------------------------------------------------------------------------------
# Data parallel over NCCL (skip with DP=0). Needs libnccl (`pip install nvidia-nccl-cu12` puts
# libnccl.so.2 under site-packages/nvidia/nccl/lib: found below, or set VSFT_NCCL_LIBRARY).
# Built-in demo model and data: nothing to download. ~2-3 minutes.
#  1. world size 1 through NCCL (torchrun's variables) against the plain step: equal losses;
#  2. two ranks on this one GPU (a distinct NCCL_HOSTID per rank makes NCCL treat them as two
#     hosts over loopback sockets) × batch 2 against one rank × batch 4: losses within 1e-5;
#  3. rank 1 killed after the step-4 checkpoint: rank 0 stops with an error naming it,
#     checkpoint-4 is intact, and `--resume auto` on two ranks finishes the run;
#  4. the all-reduce bandwidth at the stage-2 gradient size (LLaVA-1.5-7B, LoRA r 128 +
#     projector: about 340 million f32).
if [ "${DP:-1}" = 1 ]; then
  if [ -z "${VSFT_NCCL_LIBRARY:-}" ]; then
    NCCL_DIR=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null || true)
    [ -n "$NCCL_DIR" ] && export LD_LIBRARY_PATH="$NCCL_DIR:${LD_LIBRARY_PATH:-}"
  fi
  DPW=$WORK/dp; rm -rf "$DPW"; mkdir -p "$DPW"
  cat > "$DPW/recipe.toml" <<TOML
[model]
path = "builtin:demo-tiny-llava"
[data]
train = "builtin:shapes/qa"
max_length = 128
num_workers = 2
[train]
stage = "instruct"
output_dir = "OUT"
max_steps = 8
batch_size = 4
lr = 2e-4
projector_lr = 1e-2
log_steps = 1
save_steps = 4
shuffle = false
[lora]
r = 8
alpha = 16
TOML
  run_dp() { # name world batch [extra args...]: ranks on GPU 0, each its own NCCL host
    local name=$1 world=$2 batch=$3; shift 3
    sed "s#OUT#$DPW/$name#" "$DPW/recipe.toml" > "$DPW/$name.toml"
    local pids=()
    for ((r = 0; r < world; r++)); do
      RANK=$r LOCAL_RANK=0 WORLD_SIZE=$world LOCAL_WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=29531 \
      NCCL_HOSTID=vsft-dp-$r NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 NCCL_SOCKET_IFNAME=lo \
        timeout 300 "$VSFT" train --config "$DPW/$name.toml" --set train.batch_size=$batch "$@" > "$DPW/$name.$r.log" 2>&1 &
      pids+=($!)
    done
    DP_PIDS=("${pids[@]}")
  }
  wait_all() { local rc=0; for p in "${DP_PIDS[@]}"; do wait "$p" || rc=$?; done; return $rc; }
  losses() { python3 -c 'import json,sys; print(json.dumps([round(json.loads(l)["loss"], 7) for l in open(sys.argv[1]) if "\"loss\"" in l]))' "$DPW/$1/metrics.jsonl"; }

  echo "== data parallel 1: world size 1 through NCCL against the plain step"
  sed "s#OUT#$DPW/plain4#" "$DPW/recipe.toml" > "$DPW/plain4.toml"
  timeout 300 "$VSFT" train --config "$DPW/plain4.toml" > "$DPW/plain4.log" 2>&1 || echo "plain run failed: $(tail -3 "$DPW/plain4.log")"
  run_dp nccl1 1 4; wait_all || echo "NCCL world 1 failed: $(tail -3 "$DPW/nccl1.0.log")"
  grep -h "NCCL" "$DPW/nccl1.0.log" | head -2
  echo "plain: $(losses plain4)"; echo "nccl1: $(losses nccl1)"

  echo "== data parallel 2: two ranks on one GPU × batch 2 against one rank × batch 4"
  run_dp nccl2 2 2; wait_all || echo "2 ranks failed: $(tail -3 "$DPW/nccl2.0.log") / $(tail -3 "$DPW/nccl2.1.log")"
  echo "nccl2: $(losses nccl2)"
  python3 - "$DPW" <<'PY'
import json, sys
def losses(n): return [json.loads(l)["loss"] for l in open(f"{sys.argv[1]}/{n}/metrics.jsonl") if '"loss"' in l]
a, b, c = losses("plain4"), losses("nccl1"), losses("nccl2")
rel = lambda x, y: max(abs(p - q) / max(abs(p), 1e-12) for p, q in zip(x, y)) if x and len(x) == len(y) else float("nan")
print(f"world 1 through NCCL vs plain: {rel(a, b):.2e} rel (expected 0); 2 ranks x 2 vs 1 x 4: {rel(a, c):.2e} rel (expected <= 1e-5)")
PY

  echo "== data parallel 3: a rank killed after the step-4 checkpoint"
  run_dp kill 2 2 --set train.max_steps=200
  for _ in $(seq 600); do [ -f "$DPW/kill/checkpoint-4/trainer_state.json" ] && break; sleep 0.1; done
  sleep 1; KILLED_AT=$(date +%s.%N); kill -9 "${DP_PIDS[1]}"
  wait "${DP_PIDS[0]}"; RC=$?; STOPPED=$(python3 -c "import time; print(f'{time.time() - $KILLED_AT:.1f}')")
  echo "rank 0 exited with $RC, ${STOPPED} s after the kill: $(grep -h "error" "$DPW/kill.0.log" | tail -1)"
  ls "$DPW/kill" | grep checkpoint
  run_dp kill 2 2 --set train.max_steps=200 --resume auto
  wait_all && echo "resumed on 2 ranks: $(losses kill | head -c 300)" || echo "resume failed: $(tail -3 "$DPW/kill.0.log")"

  echo "== data parallel 4: all-reduce bandwidth, 340 M f32 (the 7B stage-2 gradient), two ranks on one GPU"
  for r in 0 1; do
    RANK=$r LOCAL_RANK=0 WORLD_SIZE=2 LOCAL_WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=29532 \
    NCCL_HOSTID=vsft-bw-$r NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 NCCL_SOCKET_IFNAME=lo \
      timeout 300 "$VSFT" bench allreduce --elements 340000000 --iters 3 > "$DPW/bw.$r.json" 2> "$DPW/bw.$r.err" &
  done
  wait; cat "$DPW/bw.0.json" 2>/dev/null || echo "bandwidth run failed: $(tail -3 "$DPW/bw.0.err")"
fi
