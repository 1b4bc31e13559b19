#!/usr/bin/env bash
# CPU cost of DPO steps against SFT steps on the same model and data (SmolLM2-135M-Instruct,
# datasets/direct-answers): SFT on prompt + chosen, DPO with the reference computed in every
# step, and DPO with the reference precomputed. Prints input tokens per second inside optimizer
# steps (summary.json's step_tokens_per_s) and the ratios to SFT, from one run.
#   scripts/bench-dpo-cpu.sh [path/to/ft] [SMOLLM2_HF_DIR] [steps]
set -euo pipefail
cd "$(dirname "$0")/.."
FT=${1:-target/release/ft}
DIR=$(realpath "${2:-.cache/smollm2-hf}")
STEPS=${3:-6}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 - "$work/sft.jsonl" <<'PY'
import json, sys
with open("datasets/direct-answers/train.jsonl") as f, open(sys.argv[1], "w") as out:
    for line in f:
        p = json.loads(line)
        out.write(json.dumps({"messages": p["prompt"] + p["chosen"]}) + "\n")
PY
recipe() {  # name, data, method, dpo-section
  cat > "$work/$1.toml" <<TOML
[model]
path = "$DIR"
[data]
train = "$2"
template = "model"
max_len = 256
[lora]
r = 8
alpha = 16
[train]
method = "$3"
max_steps = $STEPS
micro_batch_size = 8
lr = 5e-4
$4
[output]
dir = "$work/$1"
TOML
  "$FT" train "$work/$1.toml" --quiet --json > "$work/$1.json"
}
recipe sft "$work/sft.jsonl" sft ""
recipe dpo "$PWD/datasets/direct-answers/train.jsonl" dpo "[dpo]"
recipe dpo-precomputed "$PWD/datasets/direct-answers/train.jsonl" dpo $'[dpo]\nprecompute_ref = true'
echo "machine: $(nproc) cores; $STEPS optimizer steps of 8 examples (SFT: prompt + chosen; DPO: chosen and rejected)"
python3 - "$work" <<'PY'
import json, sys
s = {n: json.load(open(f"{sys.argv[1]}/{n}.json")) for n in ["sft", "dpo", "dpo-precomputed"]}
base = s["sft"]["step_tokens_per_s"]
for n, v in s.items():
    print(f"{n:<16} {v['step_tokens_per_s']:8.1f} input tokens/s in steps ({v['step_seconds']:6.1f} s)  ratio to SFT {v['step_tokens_per_s'] / base:.2f}")
PY
