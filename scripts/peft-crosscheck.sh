#!/usr/bin/env bash
# Prepares .bin/peft with ft (init adapter, 20-step run) and, if torch+peft are importable here,
# runs scripts/peft-crosscheck.py on it. Otherwise carry .bin/peft to a machine that has them.
#   scripts/peft-crosscheck.sh [path/to/ft]
set -euo pipefail
cd "$(dirname "$0")/.."
FT=${1:-target/release/ft}
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
"$FT" train "$D/recipe.toml" --quiet
# One step at learning rate 0 (warm-up step 0) leaves the PEFT-initialised adapter as it was.
"$FT" train "$D/recipe.toml" --quiet --set train.max_steps=1 --set train.warmup_steps=1 --output "$D/init-run"
mv "$D/init-run/adapter" "$D/init"
if python3 -c "import torch, transformers, peft" 2>/dev/null; then
  python3 scripts/peft-crosscheck.py "$D"
else
  echo "torch/transformers/peft not installed here: run python3 scripts/peft-crosscheck.py $D where they are"
fi
