#!/usr/bin/env bash
# CPU SFT throughput and peak memory: ft vs PyTorch + PEFT (when installed) on the same model,
# data and settings (LoRA r 16 / alpha 32 on all linear layers and, for MoE models, every expert,
# micro-batch 8, ChatML, AdamW),
# in one run. Tokens/s are steady-state (after the first step); peak RSS from /usr/bin/time.
#   scripts/bench-train-cpu.sh [path/to/ft] [MODEL_DIR] [threads] [steps] [DATA] [micro_batch] [gc]
# DATA: a JSONL of conversations (default datasets/json-answers/train.jsonl, short replies) or
# `long` (16 synthetic ~900-token conversations, written here); gc = 1 turns on gradient
# checkpointing on both sides.
set -euo pipefail
cd "$(dirname "$0")/.."
FT=${1:-target/release/ft}
MODEL=${2:-.cache/smollm2-hf}
THREADS=${3:-$(nproc)}
STEPS=${4:-6}
DATA=${5:-datasets/json-answers/train.jsonl}
MB=${6:-8}
GC=${7:-0}
export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if [ "$DATA" = long ]; then
  DATA=$work/long.jsonl
  python3 - "$DATA" <<'PY'
import json, random, sys
random.seed(1)
words = "the of and to in is that for it as was with be by on not he this are or his from at which but have an they you were her she there one all we".split()
with open(sys.argv[1], "w") as f:
    for i in range(16):
        user, reply = (" ".join(random.choice(words) for _ in range(n)) for n in (700, 200))
        f.write(json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]}) + "\n")
PY
fi
GCB=$([ "$GC" = 1 ] && echo true || echo false)
cat > "$work/recipe.toml" <<TOML
[model]
path = "$MODEL"
[data]
train = "$DATA"
template = "chatml"
max_len = 2048
[lora]
r = 16
alpha = 32
[train]
max_steps = $STEPS
micro_batch_size = $MB
gradient_checkpointing = $GCB
lr = 1e-4
schedule = "constant"
[output]
dir = "$work/run"
TOML
/usr/bin/time -f "%M" -o "$work/rss" "$FT" train "$work/recipe.toml" --quiet > /dev/null
python3 - "$work" "$MODEL" "$THREADS" "$STEPS" "$DATA" "$MB" "$GC" <<'PY'
import json, resource, sys, time
work, model_dir, threads, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
data, mb, gc = sys.argv[5], int(sys.argv[6]), sys.argv[7] == "1"
m = [json.loads(l) for l in open(f"{work}/run/metrics.jsonl") if '"loss"' in l]
secs = [x["num_tokens"] / x["tokens_per_s"] for x in m]
ft = {"tokens_per_s": (m[-1]["num_tokens"] - m[0]["num_tokens"]) / (secs[-1] - secs[0]),
      "peak_rss_gib": int(open(f"{work}/rss").read().split()[-1]) / 2**20}
print("ft          ", json.dumps(ft))
try:
    import torch, transformers, peft
except ImportError:
    print("torch/transformers/peft not installed: no baseline in this run"); sys.exit(0)
torch.set_num_threads(threads)
tok = transformers.AutoTokenizer.from_pretrained(model_dir)
model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
# ft's all-linear reaches MoE experts; PEFT's needs target_parameters for them (same work on both sides).
experts = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"] if any(n.endswith("mlp.experts") for n, _ in model.named_modules()) else None
model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", target_parameters=experts, task_type="CAUSAL_LM"))
if gc:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
model.train()
rows = [json.loads(l)["messages"] for l in open(data)]
def encode(msgs):
    prompt = "".join(f"<|im_start|>{x['role']}\n{x['content']}<|im_end|>\n" for x in msgs[:-1]) + "<|im_start|>assistant\n"
    full = prompt + msgs[-1]["content"] + "<|im_end|>\n"
    p, f = tok(prompt, add_special_tokens=False).input_ids, tok(full, add_special_tokens=False).input_ids
    return f, [-100] * len(p) + f[len(p):]
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
times, tokens = [], []
for s in range(steps):
    batch = [encode(r) for r in (rows * steps * mb)[s * mb:(s + 1) * mb]]
    T = max(len(b[0]) for b in batch)
    ids = torch.tensor([b[0] + [0] * (T - len(b[0])) for b in batch])
    labels = torch.tensor([b[1] + [-100] * (T - len(b[1])) for b in batch])
    attn = torch.tensor([[1] * len(b[0]) + [0] * (T - len(b[0])) for b in batch])
    t = time.time()
    loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
    loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step(); opt.zero_grad()
    times.append(time.time() - t); tokens.append(sum(len(b[0]) - 1 for b in batch))
hf = {"tokens_per_s": sum(tokens[1:]) / sum(times[1:]), "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
print("torch+peft  ", json.dumps(hf))
print("ratio ft/hf ", json.dumps({"tokens_per_s": ft["tokens_per_s"] / hf["tokens_per_s"], "peak_rss": ft["peak_rss_gib"] / hf["peak_rss_gib"]}))
PY
