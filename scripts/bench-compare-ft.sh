#!/usr/bin/env bash
# Two ft binaries on the same CPU SFT benchmark (scripts/bench-train-cpu.sh: SmolLM2, LoRA r 16
# all-linear, micro-batch 8), alternating A, B, A, B, ... in one invocation so that this
# machine's drift hits both alike; prints each run and the median ratios B/A.
#   scripts/bench-compare-ft.sh A_FT B_FT [rounds] [MODEL_DIR] [steps]
set -euo pipefail
cd "$(dirname "$0")/.."
A=$1
B=$2
ROUNDS=${3:-3}
MODEL=${4:-.cache/smollm2-hf}
STEPS=${5:-6}
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for i in $(seq "$ROUNDS"); do
  for which in A B; do
    ft=$([ "$which" = A ] && echo "$A" || echo "$B")
    line=$(scripts/bench-train-cpu.sh "$ft" "$MODEL" "$(nproc)" "$STEPS" | grep '^ft ')
    echo "$which $line" | tee -a "$out"
  done
done
python3 - "$out" <<'PY'
import json, statistics, sys
runs = {"A": [], "B": []}
for line in open(sys.argv[1]):
    which, _, js = line.split(maxsplit=2)
    runs[which].append(json.loads(js))
med = lambda w, k: statistics.median(r[k] for r in runs[w])
print("median tokens/s  A %.1f  B %.1f  ratio B/A %.3f" % (med("A", "tokens_per_s"), med("B", "tokens_per_s"), med("B", "tokens_per_s") / med("A", "tokens_per_s")))
print("median peak RSS  A %.3f GiB  B %.3f GiB  ratio B/A %.3f" % (med("A", "peak_rss_gib"), med("B", "peak_rss_gib"), med("B", "peak_rss_gib") / med("A", "peak_rss_gib")))
PY
