#!/usr/bin/env bash
# A reward model from SmolLM2-135M-Instruct on a CPU (recipes/smollm2-reward.toml): held-out pair
# accuracy before training (step 0: the fresh score head) and after, then the trained model used:
# `ft score` on the held-out pairs, merged into a LlamaForSequenceClassification checkpoint, and as
# the scorer of generated answers (`ft eval --generate --scorer model:...`) for the base model and
# for another adapter (COMPARE, default the DPO adapter of examples/smollm2-dpo.sh) when it exists.
#
#   cargo build --release && examples/smollm2-reward.sh
set -euo pipefail
cd "$(dirname "$0")/.."
FT=${FT:-target/release/ft}
scripts/fetch-smollm2.sh "$FT"                      # → .cache/smollm2-hf
HELDOUT=datasets/direct-answers/heldout.jsonl
RUN=${RUN:-runs/smollm2-reward}
if [ -e "$RUN" ]; then echo "$RUN already exists: remove it or run with RUN=another/dir" >&2; exit 1; fi

echo "== train (eval_on_start: the held-out accuracy of the untrained head is step 0)"
"$FT" train recipes/smollm2-reward.toml --output "$RUN"
python3 - "$RUN/metrics.jsonl" <<'PY'
import json, sys
evals = [l for l in map(json.loads, open(sys.argv[1])) if "eval_accuracy" in l]
for l in evals:
    print(f"step {l['step']:>3}: held-out accuracy {l['eval_accuracy']:.3f}, margin {l['eval_margin']:+.3f}, loss {l['eval_loss']:.4f}")
PY

echo "== ft score on the held-out pairs"
"$FT" score --model .cache/smollm2-hf --adapter "$RUN/adapter" --data "$HELDOUT" --out "$RUN/heldout-rewards.jsonl"

echo "== merged: a LlamaForSequenceClassification checkpoint"
"$FT" merge --model .cache/smollm2-hf --adapter "$RUN/adapter" --out "$RUN-merged"
"$FT" eval --objective reward --model "$RUN-merged" --data "$HELDOUT"

echo "== the reward model as the scorer of generated answers"
PROMPTS=$(mktemp --suffix .jsonl)
trap 'rm -f "$PROMPTS"' EXIT
head -40 "$HELDOUT" | python3 -c '
import json, sys
for line in sys.stdin:
    print(json.dumps({"prompt": json.loads(line)["prompt"]}))' > "$PROMPTS"
"$FT" eval --generate --model .cache/smollm2-hf --data "$PROMPTS" --max-new-tokens 48 \
    --scorer "model:$RUN-merged" --pass-threshold 0 --out "$RUN/answers-base.jsonl"
COMPARE=${COMPARE:-runs/smollm2-dpo/adapter}         # another adapter of SmolLM2 to compare
if [ -d "$COMPARE" ]; then
  "$FT" eval --generate --model .cache/smollm2-hf --adapter "$COMPARE" --data "$PROMPTS" --max-new-tokens 48 \
      --scorer "model:$RUN-merged" --pass-threshold 0 --out "$RUN/answers-compare.jsonl" --baseline "$RUN/answers-base.jsonl"
fi
