#!/usr/bin/env bash
# `ft data check` throughput on N synthetic conversations (default 100k) with SmolLM2's tokenizer
# and chat template; prints the report's samples, tokens, seconds and tokens/s, beside the same
# check restricted to one thread (the ratio is the parallel speed-up).
#   scripts/bench-data-check.sh [path/to/ft] [SMOLLM2_HF_DIR] [N]
set -euo pipefail
cd "$(dirname "$0")/.."
FT=${1:-target/release/ft}
DIR=${2:-.cache/smollm2-hf}
N=${3:-100000}
data=$(mktemp --suffix .jsonl)
trap 'rm -f "$data"' EXIT
python3 - "$data" "$N" <<'PY'
import json, random, sys
rng = random.Random(1)
words = "the a river mountain blue keyboard ocean library sun garden window rocket pencil forest coffee planet bridge music winter tiger cloud".split()
with open(sys.argv[1], "w") as f:
    for i in range(int(sys.argv[2])):
        turns = []
        for _ in range(rng.randrange(1, 4)):
            turns.append({"role": "user", "content": " ".join(rng.choice(words) for _ in range(rng.randrange(5, 40))) + "?"})
            turns.append({"role": "assistant", "content": " ".join(rng.choice(words) for _ in range(rng.randrange(5, 120))) + "."})
        f.write(json.dumps({"messages": turns}) + "\n")
PY
echo "machine: $(nproc) cores; $N conversations, $(du -h "$data" | cut -f1)"
for threads in "$(nproc)" 1; do
  RAYON_NUM_THREADS=$threads "$FT" data check "$data" --model "$DIR" --max-len 2048 --json |
    python3 -c "import json,sys; r=json.load(sys.stdin); print(f'threads $threads: {r[\"samples\"]} samples, {r[\"tokens\"]} tokens, {r[\"seconds\"]:.1f} s, {r[\"tokens_per_s\"]:.0f} tokens/s, packing efficiency {r[\"packing_efficiency\"]:.3f}, {len(r[\"errors\"])} errors, {len(r[\"warnings\"])} warnings')"
done
