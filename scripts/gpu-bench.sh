#!/usr/bin/env bash
# ft vs transformers + peft (+ bitsandbytes) on the same GPU in one run: LoRA r 16 on all linear
# layers, seq 2048, bf16, random weights of the shapes SmolLM2-135M, Qwen2.5-0.5B and Llama-3-8B
# (ft: `model.random_init`), Llama-3-8B also as QLoRA (NF4). Run on the GPU machine with a binary
# built beforehand (nothing is built here):
#   scripts/build-gpu.sh   (here; writes .bin/gpu/)
#   scripts/gpu-bench.sh .bin/gpu/ft [path/to/hf_baseline.py] [shapes...]
# Prints, per run, ft's median step time after 3 warm-up steps, tokens/s and peak GPU memory
# (nvidia-smi, sampled every 100 ms), then the baseline's JSON lines and the ratios.
set -uo pipefail
cd "$(dirname "$0")/.."
FT=${1:-.bin/gpu/ft}
HF=${2:-../shared/bench/hf_baseline.py}
shift 2 2>/dev/null || shift $#
SHAPES=${*:-smollm2-135m qwen2.5-0.5b llama3-8b llama3-8b-qlora}
work=$(mktemp -d)
out=${OUT:-$work}
trap 'rm -rf "$work"' EXIT
"$FT" --version
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# The NF4 dequantization kernel vs the tensor-op path (scripts/build-gpu.sh builds it).
[ -x .bin/gpu/nf4_bandwidth ] && .bin/gpu/nf4_bandwidth
# One layer's attention: ft's chunked composition vs the plain one (memory held, time).
[ -x .bin/gpu/attention_bench ] && .bin/gpu/attention_bench
python3 - "$FT" "$work" "$out" $SHAPES <<'PY'
import json, os, shutil, statistics, subprocess, sys, threading, time
ft, work, out, shapes = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
fx = os.path.abspath("tests/fixtures/models/llama")
SHAPES = {  # the baseline's shapes (hf_baseline.py), as config.json
    "smollm2-135m": dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=49152, hidden_size=576,
        intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0,
        tie_word_embeddings=True),
    "qwen2.5-0.5b": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=151936, hidden_size=896,
        intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, rope_theta=1000000.0,
        tie_word_embeddings=True),
    "llama3-8b": dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=4096,
        intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
        tie_word_embeddings=False),
}
RUNS = {"smollm2-135m": (8, False, False), "qwen2.5-0.5b": (8, False, False), "llama3-8b": (4, False, True),
        "llama3-8b-qlora": (4, True, True)}
# Conversations of more than 2048 tokens (tiny tokenizer), truncated to 2048 by the recipe.
data = os.path.join(work, "long.jsonl")
with open(data, "w") as f:
    for i in range(16):
        words = " ".join(f"w{(i * 7919 + k * 104729) % 997}" for k in range(2400))
        f.write(json.dumps({"messages": [{"role": "user", "content": f"Write {i}."}, {"role": "assistant", "content": words}]}) + "\n")
def peak_sampler(stop, peak):
    while not stop.is_set():
        try:
            used = int(subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                      capture_output=True, text=True).stdout.split()[0])
            peak[0] = max(peak[0], used)
        except Exception:
            pass
        time.sleep(0.1)
results = []
for run in shapes:
    shape = run.removesuffix("-qlora")
    batch, qlora, ckpt = RUNS[run]
    d = os.path.join(work, run)
    os.makedirs(d, exist_ok=True)
    json.dump(dict(SHAPES[shape], rms_norm_eps=1e-5, max_position_embeddings=8192, hidden_act="silu", torch_dtype="bfloat16"),
              open(os.path.join(d, "config.json"), "w"))
    for t in ["tokenizer.json", "tokenizer_config.json"]:
        shutil.copy(os.path.join(fx, t), d)
    recipe = os.path.join(d, "recipe.toml")
    open(recipe, "w").write(f"""[model]
path = "{d}"
random_init = true
{'quantize = "nf4"' if qlora else ''}
[data]
train = "{data}"
template = "chatml"
max_len = 2049
overlong = "truncate"
[lora]
r = 16
alpha = 32
target_modules = ["all-linear"]
[train]
max_steps = 11
micro_batch_size = {batch}
lr = 1e-4
gradient_checkpointing = {str(ckpt).lower()}
device = "cuda"
[output]
dir = "{d}/run"
""")
    stop, peak = threading.Event(), [0]
    th = threading.Thread(target=peak_sampler, args=(stop, peak)); th.start()
    t = time.time()
    p = subprocess.run([ft, "train", recipe, "--quiet", "--json"], capture_output=True, text=True)
    stop.set(); th.join()
    if p.returncode != 0:
        print(f"ft {run}: FAILED exit {p.returncode}: {p.stderr.strip()[-600:]}", flush=True)
        continue
    s = json.loads(p.stdout)
    steps = [json.loads(l) for l in open(os.path.join(d, "run", "metrics.jsonl")) if '"step_s"' in l]
    med = statistics.median(x["step_s"] for x in steps[3:])
    r = dict(run=run, batch=batch, seq=2048, step_s_median=med, tokens_per_s=batch * 2048 / med, peak_gpu_gib=peak[0] / 1024,
             allocator_reserved_gib=s.get("peak_gpu_reserved_gib"), base_bytes_per_parameter=s["base_bytes_per_parameter"],
             wall_s=time.time() - t)
    print("ft", json.dumps(r), flush=True)
    results.append(r)
json.dump(results, open(os.path.join(out, "ft.json"), "w"), indent=1)
PY
if [ -f "$HF" ]; then
  python3 "$HF" "$out/hf.json" smollm2-135m qwen2.5-0.5b llama3-8b
  python3 "$HF" "$out/hfq.json" qlora8b 4
  python3 - "$out" <<'PY'
import json, sys
o = sys.argv[1]
ft = {r["run"]: r for r in json.load(open(f"{o}/ft.json"))}
hf = {(r["shape"] + ("-qlora" if r["qlora"] else "")): r for f in ["hf.json", "hfq.json"] for r in json.load(open(f"{o}/{f}"))}
print(f"{'run':18} {'ft tok/s':>9} {'hf tok/s':>9} {'ratio':>6} {'ft GiB':>7} {'hf GiB':>7} {'ratio':>6}")
for k in ft:
    if k in hf:
        a, b = ft[k], hf[k]
        print(f"{k:18} {a['tokens_per_s']:9.0f} {b['tokens_per_s']:9.0f} {a['tokens_per_s']/b['tokens_per_s']:6.2f} "
              f"{a['peak_gpu_gib']:7.1f} {b['peak_mem_gib']:7.1f} {a['peak_gpu_gib']/b['peak_mem_gib']:6.2f}")
PY
else
  echo "no baseline script at $HF: ft figures only"
fi
