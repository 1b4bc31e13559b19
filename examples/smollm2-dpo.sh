#!/usr/bin/env bash
# DPO on SmolLM2-135M-Instruct, on a CPU: held-out DPO metrics of the base model (policy =
# reference), preference training with recipes/smollm2-dpo.toml, the same metrics for the
# adapter, and replies to a few held-out prompts before and after.
#
#   cargo build --release && examples/smollm2-dpo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
FT=${FT:-target/release/ft}
scripts/fetch-smollm2.sh "$FT"                      # → .cache/smollm2-hf
HELDOUT=datasets/direct-answers/heldout.jsonl
RUN=${RUN:-runs/smollm2-dpo}
if [ -e "$RUN" ]; then echo "$RUN already exists: remove it or run with RUN=another/dir" >&2; exit 1; fi
PROMPTS=$(mktemp --suffix .jsonl)
trap 'rm -f "$PROMPTS"' EXIT
head -4 "$HELDOUT" | python3 -c '
import json, sys
for line in sys.stdin:
    p = json.loads(line)
    print(json.dumps({"messages": p["prompt"] + p["chosen"]}))' > "$PROMPTS"

echo "== before: held-out DPO metrics (the policy is the reference: every reward is 0)"
"$FT" eval --dpo --model .cache/smollm2-hf --data "$HELDOUT"
"$FT" generate --model .cache/smollm2-hf --data "$PROMPTS" --max-new-tokens 40

echo "== train"
"$FT" train recipes/smollm2-dpo.toml --output "$RUN"

echo "== after"
"$FT" eval --dpo --model .cache/smollm2-hf --adapter "$RUN/adapter" --data "$HELDOUT"
"$FT" generate --model .cache/smollm2-hf --adapter "$RUN/adapter" --data "$PROMPTS" --max-new-tokens 40
