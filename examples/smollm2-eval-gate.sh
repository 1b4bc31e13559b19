#!/usr/bin/env bash
# A CI gate on generated answers: SmolLM2-135M-Instruct (and optionally an adapter, e.g. the
# GRPO one of recipes/smollm2-grpo.toml) answers the held-out arithmetic prompts of
# datasets/number-answers greedily; the answers are scored (the right number: `number:answer`)
# and the script fails with exit code 5 when the adapter's mean score is below MIN. With an
# adapter, the base model's answers are the baseline: paired difference and sign test.
#
#   cargo build --release && examples/smollm2-eval-gate.sh                       # the base model, MIN 0.3
#   ADAPTER=runs/smollm2-grpo/adapter MIN=0.55 examples/smollm2-eval-gate.sh
set -euo pipefail
cd "$(dirname "$0")/.."
FT=${FT:-target/release/ft}
scripts/fetch-smollm2.sh "$FT"                      # → .cache/smollm2-hf
DATA=datasets/number-answers/heldout.jsonl
OUT=${OUT:-runs/eval-gate}
MIN=${MIN:-0.3}
mkdir -p "$OUT"
common=(eval --generate --model .cache/smollm2-hf --data "$DATA" --max-new-tokens 16 --scorer number:answer)

# Without an adapter the base model itself is gated.
gate=()
if [ -z "${ADAPTER:-}" ]; then gate=(--fail-under "$MIN"); fi
echo "== the base model"
"$FT" "${common[@]}" --out "$OUT/base.jsonl" "${gate[@]}"

if [ -n "${ADAPTER:-}" ]; then
  echo "== $ADAPTER, gated at $MIN"
  "$FT" "${common[@]}" --adapter "$ADAPTER" --out "$OUT/adapter.jsonl" --baseline "$OUT/base.jsonl" --fail-under "$MIN"
fi
echo "gate passed"
