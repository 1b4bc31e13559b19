#!/usr/bin/env bash
# Peak RSS and step time of distillation with the logits formed in chunks of positions against one
# chunk for the whole batch (recipes/smollm2-distill.toml, distill.chunk_positions), alternating in
# one invocation. The teacher (runs/smollm2-sft-merged) must exist (examples/smollm2-distill.sh).
#   scripts/bench-distill-chunks.sh [ft-binary] [rounds] [steps] [chunk] [micro-batch]
set -euo pipefail
cd "$(dirname "$0")/.."
FT=${1:-target/release/ft}
ROUNDS=${2:-1}
STEPS=${3:-3}
CHUNK=${4:-64}
MICRO=${5:-8}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for i in $(seq "$ROUNDS"); do
  for c in "$CHUNK" 1000000; do
    /usr/bin/time -f "%M" -o "$out/rss" "$FT" train recipes/smollm2-distill.toml --set train.max_steps="$STEPS" --set train.eval_every=0 \
      --set distill.chunk_positions="$c" --set train.micro_batch_size="$MICRO" --output "$out/c$c-$i" --quiet >/dev/null
    python3 -c "
import json,statistics
m=[json.loads(l) for l in open('$out/c$c-$i/metrics.jsonl') if 'step_s' in l]
s=[l['step_s'] for l in m]
rss=int(open('$out/rss').read().split()[-1])/1e6
print(f'chunk_positions $c: steps 2-{len(s)} median {statistics.median(s[1:] or s):.2f} s  loss {m[-1][\"loss\"]:.6f}  peak RSS {rss:.2f} GB')"
  done
done
