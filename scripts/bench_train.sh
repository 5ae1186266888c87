#!/usr/bin/env bash
# vsft vs PyTorch (transformers + PEFT) on the same machine, same model, same step, one run.
#   [ROUNDS=3] [CONFIG=configs/bench-llava-512x8.json] scripts/bench_train.sh [BATCH] [SEQ] [LORA_R] [STEPS]
# CONFIG=configs/bench-llava-next-512x8.json times LLaVA-NeXT (5 tiles, 1048 image tokens per row).
# Builds nothing if target/release/vsft exists; needs python3 with torch, transformers, peft.
set -euo pipefail
cd "$(dirname "$0")/.."
B=${1:-4}; L=${2:-512}; R=${3:-16}; N=${4:-5}
VSFT=${VSFT:-target/release/vsft}
[ -x "$VSFT" ] || cargo build --release -p vsft
CONFIG=${CONFIG:-configs/bench-llava-512x8.json}
MODEL=${MODEL:-target/$(basename "$CONFIG" .json)}
[ -f "$MODEL/config.json" ] || "$VSFT" init --config "$CONFIG" --out "$MODEL"
THREADS=$(nproc)
# PyTorch's step time on this 2-core machine varies by ±20 % from run to run (vsft's by ±3 %),
# so the two alternate for ROUNDS rounds and the table gives each side's median over rounds.
ROUNDS=${ROUNDS:-3}
# LABEL_ALL=1: label every position, image placeholders too (both sides compute every logit).
LABELS=(); [ "${LABEL_ALL:-0}" = 1 ] && LABELS=(--label-all)
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $ROUNDS rounds of $N steps; labels: ${LABELS[*]:-image positions -100}"
RESULTS=()
for r in $(seq "$ROUNDS"); do
  V=$("$VSFT" bench train --model "$MODEL" --batch-size "$B" --seq-len "$L" --lora-r "$R" --steps "$N" "${LABELS[@]}" --json)
  T=$(python3 scripts/bench_torch.py --model "$MODEL" --batch-size "$B" --seq-len "$L" --lora-r "$R" --steps "$N" --threads "$THREADS" "${LABELS[@]}" 2>/dev/null | tail -1)
  RESULTS+=("$V" "$T")
done
python3 - "${RESULTS[@]}" <<'PY'
import json, statistics, sys
runs = [json.loads(a) for a in sys.argv[1:]]
v, t = runs[0::2], runs[1::2]
print("round | vsft step ms | torch step ms | ratio")
for i, (a, b) in enumerate(zip(v, t)):
    print(f"{i + 1} | {a['step_ms_median']:.0f} | {b['step_ms_median']:.0f} | {a['step_ms_median'] / b['step_ms_median']:.2f}")
def med(rs, k):
    return statistics.median(r[k] for r in rs)
print()
print("| | step ms (median of rounds) | tokens/s | peak RSS MB |")
print("|---|---|---|---|")
for name, rs in (("vsft (" + v[0]["backend"] + ")", v), (t[0]["backend"], t)):
    print(f"| {name} | {med(rs, 'step_ms_median'):.0f} | {med(rs, 'tokens_per_s'):.0f} | {med(rs, 'peak_rss_mb'):.0f} |")
vs, ts = med(v, "step_ms_median"), med(t, "step_ms_median")
print(f"| ratio vsft/torch | {vs / ts:.2f}x time | {ts / vs:.2f}x | {med(v, 'peak_rss_mb') / med(t, 'peak_rss_mb'):.2f}x |")
print(f"| torch's fastest round | {min(r['step_ms_median'] for r in t):.0f} | | vsft/fastest torch: {vs / min(r['step_ms_median'] for r in t):.2f}x time |")
PY
