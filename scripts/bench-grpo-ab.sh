#!/usr/bin/env bash
# Two ft binaries on GRPO steps (recipes/smollm2-grpo.toml, SmolLM2, 2 prompts × 8 completions per
# step), alternating A, B, A, B in one invocation so this machine's drift hits both alike; prints
# each run's sampling and step seconds per step.
#   scripts/bench-grpo-ab.sh A_FT B_FT [rounds] [steps]
set -euo pipefail
cd "$(dirname "$0")/.."
A=$1
B=$2
ROUNDS=${3:-2}
STEPS=${4:-2}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for i in $(seq "$ROUNDS"); do
  for which in A B; do
    ft=$([ "$which" = A ] && echo "$A" || echo "$B")
    "$ft" train recipes/smollm2-grpo.toml --set train.max_steps="$STEPS" --set train.eval_every=0 --output "$out/$which-$i" --quiet >/dev/null
    python3 -c "
import json
m=[json.loads(l) for l in open('$out/$which-$i/metrics.jsonl') if 'step_s' in l]
print('$which', '  '.join(f\"sample_s {x['time/sample_s']:.2f} step_s {x['step_s']:.2f}\" for x in m))"
  done
done
