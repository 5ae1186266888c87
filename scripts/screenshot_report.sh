#!/usr/bin/env bash
# Renders a run's report.html in headless Chromium and saves a screenshot, to look at what a
# user sees (issue: training you can watch). Needs `chromium` (Debian: apt-get install chromium).
#
#   scripts/screenshot_report.sh out/demo/instruct [report.png]
set -euo pipefail
dir=${1:?usage: $0 OUTPUT_DIR [PNG]}
png=${2:-$dir/report.png}
bin=$(dirname "$0")/../target/release/vsft
"$bin" report "$dir" >/dev/null
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1240,2400 \
  --screenshot="$png" "file://$(realpath "$dir")/report.html" 2>/dev/null
echo "$png"
