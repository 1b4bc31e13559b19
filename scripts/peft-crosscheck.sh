#!/usr/bin/env bash
# Prepares .bin/peft with ft — for every adapter kind ft writes (plain LoRA, rsLoRA, DoRA,
# modules_to_save lm_head, embedding LoRA, rank/alpha patterns): its PEFT-initialised adapter
# (one step at learning rate 0) and a 20-step run — and, if torch+peft are importable here (or
# with PYTHON=/path/to/python), runs scripts/peft-crosscheck.py on it.
#   scripts/peft-crosscheck.sh [path/to/ft]
set -euo pipefail
cd "$(dirname "$0")/.."
FT=${1:-target/release/ft}
PYTHON=${PYTHON:-python3}
D=.bin/peft
rm -rf "$D" && mkdir -p "$D"
cat > "$D/recipe.toml" <<TOML
[model]
path = "tests/fixtures/models/llama"
[data]
train = "tests/fixtures/chat.jsonl"
eval = "tests/fixtures/chat.jsonl"
template = "chatml"
[lora]
r = 4
alpha = 8
[train]
max_steps = 20
micro_batch_size = 3
lr = 1e-2
schedule = "constant"
seed = 5
[output]
dir = "$D/run"
TOML
# name;--set overrides (separated by ';': regexes contain '|').
kinds=(
  "lora"
  "rslora;lora.use_rslora=true"
  "dora;lora.use_dora=true"
  "modules_to_save;lora.modules_to_save=[\"lm_head\"]"
  "modules_to_save_embed;lora.modules_to_save=[\"embed_tokens\"]"
  "embedding;lora.target_modules=[\"q_proj\",\"v_proj\",\"embed_tokens\"]"
  "rank_pattern;lora.rank_pattern={q_proj=2};lora.alpha_pattern={v_proj=32}"
  "regex;lora.target_modules='.*\.1\..*(q_proj|v_proj)'"
  "targets;lora.target_modules=[\"q_proj\",\"v_proj\",\"down_proj\"];lora.exclude_modules=[\"down_proj\"];lora.layers_to_transform=[1]"
)
for k in "${kinds[@]}"; do
  IFS=';' read -ra parts <<<"$k"
  name=${parts[0]}
  args=()
  for s in "${parts[@]:1}"; do args+=(--set "$s"); done
  "$FT" train "$D/recipe.toml" --quiet "${args[@]}" --output "$D/$name/run"
  # One step at learning rate 0 (warm-up step 0) leaves the PEFT-initialised adapter as it was.
  "$FT" train "$D/recipe.toml" --quiet "${args[@]}" --set train.max_steps=1 --set train.warmup_steps=1 --output "$D/$name/init-run"
  mv "$D/$name/init-run/adapter" "$D/$name/init"
done
# A reward model (SEQ_CLS adapter: LoRA and the score head saved whole) and its rewards.
"$FT" train "$D/recipe.toml" --quiet --set 'train.method="reward"' --set 'data.train="tests/fixtures/dpo/prefs.jsonl"' \
  --set 'data.eval="tests/fixtures/dpo/prefs.jsonl"' --set train.max_steps=10 --output "$D/reward/run"
"$FT" score --model tests/fixtures/models/llama --adapter "$D/reward/run/adapter" --data tests/fixtures/dpo/prefs.jsonl \
  --template chatml --out "$D/reward/scores.jsonl"
if "$PYTHON" -c "import torch, transformers, peft" 2>/dev/null; then
  "$PYTHON" scripts/peft-crosscheck.py "$D"
else
  echo "torch/transformers/peft not installed here: run python3 scripts/peft-crosscheck.py $D where they are"
fi
