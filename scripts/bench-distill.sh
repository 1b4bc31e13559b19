#!/usr/bin/env bash
# A distillation step against an SFT step on the same data and shapes (recipes/smollm2-sft.toml and
# recipes/smollm2-distill.toml: SmolLM2, LoRA r8 all-linear, 8 conversations per step),
# alternating SFT, distill, ... in one invocation; prints the median step time of steps 2.. and
# the peak RSS of each run. The distillation teacher (runs/smollm2-sft-merged) must exist
# (examples/smollm2-distill.sh makes it).
#   scripts/bench-distill.sh [ft-binary] [rounds] [steps]
set -euo pipefail
cd "$(dirname "$0")/.."
FT=${1:-target/release/ft}
ROUNDS=${2:-2}
STEPS=${3:-4}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for i in $(seq "$ROUNDS"); do
  for r in sft distill; do
    /usr/bin/time -f "%M" -o "$out/rss" "$FT" train "recipes/smollm2-$r.toml" --set train.max_steps="$STEPS" --set train.eval_every=0 --output "$out/$r-$i" --quiet >/dev/null
    python3 -c "
import json,statistics
m=[json.loads(l)['step_s'] for l in open('$out/$r-$i/metrics.jsonl') if 'step_s' in l]
rss=int(open('$out/rss').read().split()[-1])/1e6
print(f'$r steps 2-{len(m)} median {statistics.median(m[1:] or m):.2f} s  peak RSS {rss:.2f} GB')"
  done
done
