#!/usr/bin/env bash
# Distillation on SmolLM2-135M-Instruct: the merged SFT model of recipes/smollm2-sft.toml (it
# answers in JSON) teaches the plain model + a fresh LoRA adapter (recipes/smollm2-distill.toml);
# the held-out behaviour — replies that are `{"answer": ...}` and right — of the teacher, the
# student before and the student after, measured with `ft eval --generate`.
#
#   cargo build --release && examples/smollm2-distill.sh      # needs runs/smollm2-sft (examples/smollm2-sft.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
FT=${FT:-target/release/ft}
scripts/fetch-smollm2.sh "$FT"                      # → .cache/smollm2-hf
HELDOUT=datasets/json-answers/heldout.jsonl
if [ ! -e runs/smollm2-sft/adapter ]; then echo "run recipes/smollm2-sft.toml first (examples/smollm2-sft.sh)" >&2; exit 1; fi
[ -e runs/smollm2-sft-merged ] || "$FT" merge --model .cache/smollm2-hf --adapter runs/smollm2-sft/adapter --out runs/smollm2-sft-merged
rm -rf runs/smollm2-distill
"$FT" train recipes/smollm2-distill.toml
# Scores: the reply is a JSON object with an "answer" key (0.5), and it equals the reference (0.5).
scorers=(--scorer '{kind = "regex", name = "json", pattern = "^\\s*\\{\\s*\"answer\"\\s*:.*\\}\\s*$", weight = 0.5}'
         --scorer '{kind = "answer", name = "right", field = "reference", weight = 0.5}')
gen=(eval --generate --data "$HELDOUT" --max-new-tokens 24 "${scorers[@]}")
echo "== teacher";        "$FT" "${gen[@]}" --model runs/smollm2-sft-merged --out runs/smollm2-distill/teacher.jsonl
echo "== student before"; "$FT" "${gen[@]}" --model .cache/smollm2-hf --out runs/smollm2-distill/before.jsonl
echo "== student after";  "$FT" "${gen[@]}" --model .cache/smollm2-hf --adapter runs/smollm2-distill/adapter --out runs/smollm2-distill/after.jsonl --baseline runs/smollm2-distill/before.jsonl
