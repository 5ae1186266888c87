#!/usr/bin/env bash
# The first training step's cost on a cubecl backend (wgpu on Mesa's lavapipe here), cold and
# with the caches warm: a 6-step stage-1 run of a tiny LLaVA (configs/tiny-llava-e2e.json) on
# the committed llava-instruct-mix fixture, four ways:
#   cold        no vsft cache (cubecl autotune results), no Mesa shader cache
#   mesa        Mesa's shader cache warm, the autotune cache cold
#   autotune    the autotune cache (under $VSFT_CACHE/cubecl) warm, Mesa's cold
#   warm        both warm (a user's second run)
# Prints each run's step-1 and step-6 elapsed_s from metrics.jsonl, and the process's CPU time
# (user + sys: less sensitive than wall time to other work on the machine).
#   cargo build --release --features wgpu && scripts/wgpu_startup.sh target/release/vsft
set -euo pipefail
VSFT=${1:-target/release/vsft}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
W=${WORK:-$ROOT/target/wgpu-startup}
rm -rf "$W" && mkdir -p "$W"
"$VSFT" init --config "$ROOT/configs/tiny-llava-e2e.json" --tokenizer-from "$ROOT/tests/fixtures/data/model" --out "$W/model" >/dev/null
cat > "$W/recipe.toml" <<TOML
[model]
path = "$W/model"
[data]
train = "$ROOT/tests/fixtures/data/llava_instruct_mix"
max_length = 512
[train]
stage = "pretrain"
output_dir = "$W/out"
max_steps = 6
batch_size = 2
lr = 1e-3
log_steps = 1
TOML
run() { # name, vsft cache dir, mesa cache dir
  rm -rf "$W/out"
  local t0=$(date +%s.%N)
  (cd "$W" && VSFT_CACHE="$2" MESA_SHADER_CACHE_DIR="$3" /usr/bin/time -f "%U %S" -o "$W/$1.cpu" "$VSFT" train --config "$W/recipe.toml" >/dev/null 2>"$W/$1.log")
  local t1=$(date +%s.%N)
  python3 - "$1" "$W/out/metrics.jsonl" "$t0" "$t1" "$W/$1.cpu" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[2]) if '"loss"' in l]
first = next(r for r in rows if r.get("step") == 1)
last = rows[-1]
cpu = sum(map(float, open(sys.argv[5]).read().split()[-2:]))
print(f"{sys.argv[1]:>9}: step 1 done at {first['elapsed_s']:.1f} s, step {last['step']} at {last['elapsed_s']:.1f} s, whole run {float(sys.argv[4]) - float(sys.argv[3]):.1f} s wall, {cpu:.1f} s CPU (user+sys); losses {[round(r['loss'], 6) for r in rows]}")
PY
}
run cold "$W/vsft-cold" "$W/mesa-a"
run mesa "$W/vsft-b" "$W/mesa-a"
rm -rf "$W/mesa-c"
run autotune "$W/vsft-b" "$W/mesa-c"
run warm "$W/vsft-b" "$W/mesa-c"
echo "autotune cache files: $(find "$W/vsft-b/cubecl" -type f 2>/dev/null | wc -l)"
