#!/usr/bin/env bash
# Step time of DPO, KTO, ORPO, CPO and SimPO on the same data, in one invocation (this machine's
# speed drifts, so only ratios against DPO in the same run mean anything):
#   scripts/bench-preference.sh [ft-binary] [steps]
# SmolLM2-135M-Instruct (.cache/smollm2-hf, see scripts/fetch-smollm2.sh), datasets/direct-answers
# (KTO: the same pairs unpaired, so a KTO step sees 8 rows where the others see 8 pairs), LoRA r8
# all-linear, micro-batch 8, no eval, the reference computed in each step (no precompute). Prints
# each method's median step time (steps after the first) and its ratio to DPO's.
set -euo pipefail
FT=${1:-target/release/ft}
STEPS=${2:-5}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
dpo_median=""
for method in dpo kto orpo cpo simpo; do
  cat > "$out/$method.toml" <<TOML
[model]
path = ".cache/smollm2-hf"
[data]
train = "datasets/direct-answers/train.jsonl"
template = "model"
max_len = 256
[lora]
r = 8
alpha = 16
target_modules = ["all-linear"]
[train]
method = "$method"
max_steps = $STEPS
micro_batch_size = 8
lr = 5e-4
seed = 42
[output]
dir = "$out/$method-run"
TOML
  "$FT" train "$out/$method.toml" --quiet >/dev/null
  median=$(python3 -c "
import json,statistics,sys
s=[json.loads(l)['step_s'] for l in open('$out/$method-run/metrics.jsonl') if 'step_s' in l]
print(statistics.median(s[1:] or s))")
  [ -z "$dpo_median" ] && dpo_median=$median
  python3 -c "print(f'$method median step {float($median):.2f} s  ratio to dpo {float($median)/float($dpo_median):.2f}')"
done
