#!/usr/bin/env bash
# CPU benchmark for SmolLM2-135M-Instruct: load time, `ft eval` tokens/s, `ft generate` tokens/s,
# next to transformers (float32, same threads) when it is installed. Ratios are from one run.
#   scripts/bench-cpu.sh [path/to/ft] [SMOLLM2_HF_DIR] [threads]
set -euo pipefail
cd "$(dirname "$0")/.."
FT=${1:-target/release/ft}
DIR=${2:-.cache/smollm2-hf}
THREADS=${3:-$(nproc)}
export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS
data=$(mktemp --suffix .jsonl)
ev=$(mktemp --suffix .json)
gen=$(mktemp --suffix .json)
trap 'rm -f "$data" "$ev" "$gen"' EXIT
python3 - "$data" <<'PY'
import json, sys
topics = ["the sea", "mountains", "a city at night", "autumn", "a robot", "coffee", "the moon", "rain"]
with open(sys.argv[1], "w") as f:
    for i in range(32):
        t = topics[i % len(topics)]
        msgs = [{"role": "user", "content": f"Write a short paragraph about {t}, number {i}."},
                {"role": "assistant", "content": (f"Here is a paragraph about {t}. " * 6).strip()}]
        f.write(json.dumps({"messages": msgs}) + "\n")
PY
echo "machine: $(nproc) cores, threads $THREADS; ft: $("$FT" --version | tr '\n' ' ')"
"$FT" eval --model "$DIR" --data "$data" --template chatml --json > "$ev"
"$FT" generate --model "$DIR" --prompt "Write a haiku about the sea." --max-new-tokens 64 --ignore-eos --json > "$gen"
python3 - "$DIR" "$data" "$THREADS" "$ev" "$gen" <<'PY'
import json, sys, time
d, data, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
e, g = json.load(open(sys.argv[4])), json.load(open(sys.argv[5]))
ft = {"load_s": e["load_s"], "eval_tokens_per_s": e["tokens_per_s"], "generate_tokens_per_s": g["tokens_per_s"], "eval_loss": e["loss"]}
print("ft          ", json.dumps(ft))
try:
    import torch, transformers
except ImportError:
    print("transformers not installed: no baseline in this run"); sys.exit(0)
torch.set_num_threads(threads)
t = time.time()
model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32); model.eval()
tok = transformers.AutoTokenizer.from_pretrained(d)
load = time.time() - t
rows = [json.loads(l)["messages"] for l in open(data)]
texts = ["".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in r) for r in rows]
n = 0; t = time.time()
with torch.no_grad():
    for s in texts:
        ids = tok(s, return_tensors="pt", add_special_tokens=False).input_ids
        model(ids); n += ids.shape[1]
ev = n / (time.time() - t)
p = tok.apply_chat_template([{"role": "user", "content": "Write a haiku about the sea."}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
t = time.time()
with torch.no_grad():
    out = model.generate(**p, max_new_tokens=64, min_new_tokens=64, do_sample=False)
gen = (out.shape[1] - p["input_ids"].shape[1]) / (time.time() - t)
hf = {"load_s": load, "eval_tokens_per_s": ev, "generate_tokens_per_s": gen}
print("transformers", json.dumps(hf))
print("ratio ft/hf  ", json.dumps({"load": hf["load_s"] / ft["load_s"], "eval": ft["eval_tokens_per_s"] / ev, "generate": ft["generate_tokens_per_s"] / gen}))
PY
