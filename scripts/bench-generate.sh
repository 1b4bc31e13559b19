#!/usr/bin/env bash
# `ft generate --data` one conversation at a time against batches of 16, alternating in one
# invocation, on the first 16 held-out prompts of datasets/json-answers (SmolLM2, 32 new tokens);
# prints each run's wall time and whether the replies are identical.
#   scripts/bench-generate.sh [ft-binary] [rounds]
set -euo pipefail
cd "$(dirname "$0")/.."
FT=${1:-target/release/ft}
ROUNDS=${2:-2}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
head -16 datasets/json-answers/heldout.jsonl > "$out/prompts.jsonl"
for i in $(seq "$ROUNDS"); do
  for b in 1 16; do
    start=$(date +%s.%N)
    "$FT" generate --model .cache/smollm2-hf --data "$out/prompts.jsonl" --max-new-tokens 32 --batch-size "$b" > "$out/replies-$b.jsonl"
    echo "batch-size $b: $(python3 -c "print(f'{$(date +%s.%N) - $start:.2f}')") s"
  done
done
cmp -s "$out/replies-1.jsonl" "$out/replies-16.jsonl" && echo "same replies" || echo "replies differ"
