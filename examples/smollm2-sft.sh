#!/usr/bin/env bash
# The whole path on SmolLM2-135M-Instruct, on a CPU: import the GGUF, measure the base model,
# fine-tune a LoRA adapter (recipes/smollm2-sft.toml), measure again, merge, generate from the
# merged checkpoint.
#
#   cargo build --release && examples/smollm2-sft.sh
set -euo pipefail
cd "$(dirname "$0")/.."
FT=${FT:-target/release/ft}
scripts/fetch-smollm2.sh "$FT"                      # → .cache/smollm2-hf
HELDOUT=datasets/json-answers/heldout.jsonl
RUN=${RUN:-runs/smollm2-sft}
if [ -e "$RUN" ]; then echo "$RUN already exists: remove it or run with RUN=another/dir" >&2; exit 1; fi

echo "== before: held-out loss and JSON-answer rate"
"$FT" eval --model .cache/smollm2-hf --data "$HELDOUT" --json
"$FT" generate --model .cache/smollm2-hf --data "$HELDOUT" --max-new-tokens 24 | python3 scripts/json-answers-metric.py

echo "== train"
"$FT" train recipes/smollm2-sft.toml --output "$RUN"

echo "== after"
"$FT" eval --model .cache/smollm2-hf --adapter "$RUN/adapter" --data "$HELDOUT" --json
"$FT" generate --model .cache/smollm2-hf --adapter "$RUN/adapter" --data "$HELDOUT" --max-new-tokens 24 | python3 scripts/json-answers-metric.py

echo "== merge and generate from the merged checkpoint"
rm -rf "$RUN-merged"
"$FT" merge --model .cache/smollm2-hf --adapter "$RUN/adapter" --out "$RUN-merged"
"$FT" generate --model "$RUN-merged" --prompt "What is the capital of Peru?"
