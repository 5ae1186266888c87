#!/usr/bin/env bash
# vsft vs PyTorch (transformers + PEFT) on the same machine, same model, same step, one run.
#   scripts/bench_train.sh [BATCH] [SEQ] [LORA_R] [STEPS]
# Builds nothing if target/release/vsft exists; needs python3 with torch, transformers, peft.
set -euo pipefail
cd "$(dirname "$0")/.."
B=${1:-4}; L=${2:-512}; R=${3:-16}; N=${4:-5}
VSFT=${VSFT:-target/release/vsft}
[ -x "$VSFT" ] || cargo build --release -p vsft
MODEL=${MODEL:-target/bench-llava-512x8}
[ -f "$MODEL/config.json" ] || "$VSFT" init --config configs/bench-llava-512x8.json --out "$MODEL"
THREADS=$(nproc)
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
V=$("$VSFT" bench train --model "$MODEL" --batch-size "$B" --seq-len "$L" --lora-r "$R" --steps "$N" --json)
T=$(python3 scripts/bench_torch.py --model "$MODEL" --batch-size "$B" --seq-len "$L" --lora-r "$R" --steps "$N" --threads "$THREADS" 2>/dev/null | tail -1)
python3 - "$V" "$T" <<'PY'
import json, sys
v, t = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"| | step ms (median) | tokens/s | peak RSS MB |")
print(f"|---|---|---|---|")
for name, r in (("vsft (" + v["backend"] + ")", v), (t["backend"], t)):
    print(f"| {name} | {r['step_ms_median']:.0f} | {r['tokens_per_s']:.0f} | {r['peak_rss_mb']:.0f} |")
print(f"| ratio vsft/torch | {v['step_ms_median']/t['step_ms_median']:.2f}x time | {v['tokens_per_s']/t['tokens_per_s']:.2f}x | {v['peak_rss_mb']/t['peak_rss_mb']:.2f}x |")
PY
