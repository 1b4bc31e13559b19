#!/usr/bin/env bash
# GPU checks, run on the GPU machine with binaries built beforehand (nothing is built here):
#   scripts/build-gpu.sh            (here: .bin/gpu/: ft, gpu_paths, gpu_half, CUDA builds)
#   scripts/gpu-check.sh .bin/gpu/ft [SMOLLM2_HF_DIR [random]]
# First .bin/gpu/gpu_paths (tests/gpu_paths.rs on CUDA, f32): the NF4 CubeCL kernel against
# bitsandbytes' values bit for bit, oracle logits, chunked attention, LoRA/QLoRA steps vs CPU, DPO;
# then .bin/gpu/gpu_half (tests/gpu_half.rs, bf16): the kernel's bf16 output (= the rounded f32
# product), LoRA/QLoRA steps vs the f32 CPU, DPO scores and gradients, `ft train`'s whole loop.
# For each oracle model and dtype (f32, bf16) on CUDA: `ft eval` loss vs transformers' expected loss,
# and `ft generate` greedy ids vs transformers' (f32 must match to 1e-4 and exactly; bf16 is reported).
# With a SmolLM2 directory: its three greedy generations and eval/generate speed on the GPU
# ("random": a randomly initialised model of SmolLM2's shape, for speed only; greedy not compared).
# Then: the bitsandbytes 4-bit oracle model on CUDA vs CPU, and 20 LoRA / QLoRA SFT steps of the
# tiny llama on CUDA (bf16 compute) next to the same recipe on CPU (f32): max relative loss diff;
# and 10 DPO steps on CUDA (first loss ln 2) next to the CPU run.
set -uo pipefail
cd "$(dirname "$0")/.."
FT=${1:-.bin/gpu/ft}
SMOL=${2:-}
RANDOM_WEIGHTS=${3:-}
"$FT" --version
paths_failed=0
for t in gpu_paths gpu_half; do
  if [ -x .bin/gpu/$t ]; then
    CARGO_MANIFEST_DIR=$PWD .bin/gpu/$t --test-threads 1 --nocapture || paths_failed=1
  else
    echo "no .bin/gpu/$t (scripts/build-gpu.sh builds it): skipped"; paths_failed=1
  fi
done
python3 - "$FT" "$SMOL" "$RANDOM_WEIGHTS" "$paths_failed" <<'PY'
import json, subprocess, sys, time
ft, smol, random_weights = sys.argv[1], sys.argv[2], sys.argv[3] == "random"
fx = "tests/fixtures"
exp_loss = json.load(open(f"{fx}/expected_chat_loss.json"))
fails = int(sys.argv[4])
print("gpu_paths, gpu_half:", "FAILED or missing" if fails else "passed")
def run(args):
    t = time.time()
    p = subprocess.run([ft] + args, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{args}: exit {p.returncode}: {p.stderr.strip()}")
    return json.loads(p.stdout), time.time() - t
print(f"{'model':24} {'dtype':5} {'loss':>10} {'expected':>10} {'abs diff':>9} {'greedy':>7}")
for m in ["llama", "llama3-rope-tied-bf16", "qwen2", "qwen3", "mistral"]:
    d = f"{fx}/models/{m}"
    g = json.load(open(f"{d}/expected_generate.json"))
    for dt in ["f32", "bf16"]:
        try:
            r, _ = run(["eval", "--model", d, "--data", f"{fx}/chat.jsonl", "--template", "chatml", "--device", "cuda", "--dtype", dt, "--json"])
            o, _ = run(["generate", "--model", d, "--system", "You are terse.", "--prompt", "What is the capital of France?",
                        "--max-new-tokens", "12", "--ignore-eos", "--device", "cuda", "--dtype", dt, "--json"])
        except RuntimeError as e:
            print(f"{m:24} {dt:5} ERROR {e}"); fails += 1; continue
        want = exp_loss[f"models/{m}"]["chat_loss_mean"]
        diff = abs(r["loss"] - want)
        same = o["ids"] == g["greedy_ids"] and o["prompt_ids"] == g["prompt_ids"]
        ok = dt != "f32" or (diff <= 1e-4 and same)
        fails += not ok
        print(f"{m:24} {dt:5} {r['loss']:10.6f} {want:10.6f} {diff:9.2e} {str(same):>7} {'' if ok else 'FAIL'}")
if smol:
    exp = json.load(open(f"{fx}/smollm2/expected.json"))
    for dt in ["f32", "bf16"]:
        for c in exp["generate"]:
            prompt = c["messages"][0]["content"]
            o, secs = run(["generate", "--model", smol, "--prompt", prompt, "--max-new-tokens", "24", "--device", "cuda", "--dtype", dt, "--json"])
            same = o["ids"] == c["greedy_ids"]
            if dt == "f32" and not same and not random_weights: fails += 1
            print(f"smollm2 {dt:5} greedy={same} {o['tokens_per_s']:.1f} tokens/s ({secs:.1f}s with load) {o['text'][:60]!r}")
        r, secs = run(["eval", "--model", smol, "--data", f"{fx}/chat.jsonl", "--template", "chatml", "--device", "cuda", "--dtype", dt, "--json"])
        want = sum(c["nll_sum"] for c in exp["chat_loss"]) / sum(c["tokens"] for c in exp["chat_loss"])
        print(f"smollm2 {dt:5} eval loss {r['loss']:.6f} (transformers f32 {want:.6f}, diff {abs(r['loss']-want):.2e}) in {secs:.1f}s")
import os, tempfile
# NF4: the 4-bit checkpoint on CUDA gives the CPU's loss.
d = f"{fx}/models/llama-bnb4"
cpu, _ = run(["eval", "--model", d, "--data", f"{fx}/chat.jsonl", "--template", "chatml", "--json"])
gpu, _ = run(["eval", "--model", d, "--data", f"{fx}/chat.jsonl", "--template", "chatml", "--device", "cuda", "--json"])
diff = abs(cpu["loss"] - gpu["loss"]); fails += diff > 1e-4
print(f"llama-bnb4 (NF4) f32 eval: cuda {gpu['loss']:.6f} cpu {cpu['loss']:.6f} diff {diff:.2e}")
# LoRA and QLoRA SFT: CUDA (bf16 compute) vs CPU (f32), 20 steps.
work = tempfile.mkdtemp()
def train(name, device, quantize, extra=""):
    r = f"{work}/{name}.toml"
    open(r, "w").write(f"""[model]\npath = "{os.path.abspath(fx)}/models/llama"\n{'quantize = "nf4"' if quantize else ''}
[data]\ntrain = "{os.path.abspath(fx)}/chat.jsonl"\ntemplate = "chatml"\n[lora]\nr = 4\nalpha = 8
[train]\nmax_steps = 20\nmicro_batch_size = 3\nlr = 1e-3\nseed = 3\ndevice = "{device}"\n{extra}\n[output]\ndir = "{work}/{name}"\n""")
    s, secs = run(["train", r, "--quiet", "--json"])
    losses = [json.loads(l)["loss"] for l in open(f"{work}/{name}/metrics.jsonl") if '"loss"' in l]
    return losses, s, secs
for quantize in [False, True]:
    tag = "qlora" if quantize else "lora"
    try:
        lc, _, _ = train(f"{tag}-cpu", "cpu", quantize)
        lg, s, secs = train(f"{tag}-cuda", "cuda", quantize)
    except RuntimeError as e:
        print(f"{tag} sft ERROR {e}"); fails += 1; continue
    rel = max(abs(a - b) / abs(b) for a, b in zip(lg, lc))
    print(f"{tag} sft 20 steps: cuda bf16 vs cpu f32 max rel loss diff {rel:.2e}; loss {lg[0]:.4f} -> {lg[-1]:.4f}; "
          f"{secs:.1f}s; base {s['base_bytes_per_parameter']:.3f} bytes/param")
# Gradient checkpointing (per-block recomputation) on CUDA gives the run without it.
try:
    la, _, ta = train("gc-off-cuda", "cuda", False)
    lb, _, tb = train("gc-on-cuda", "cuda", False, "gradient_checkpointing = true")
    rel = max(abs(a - b) / abs(b) for a, b in zip(la, lb))
    fails += rel > 1e-3
    print(f"gradient checkpointing on cuda: max rel loss diff on/off {rel:.2e}; {ta:.1f}s off, {tb:.1f}s on")
except RuntimeError as e:
    print(f"gradient checkpointing ERROR {e}"); fails += 1
# DPO on CUDA: starts at ln 2 and tracks the CPU run.
def dpo(device):
    r = f"{work}/dpo-{device}.toml"
    open(r, "w").write(f"""[model]\npath = "{os.path.abspath(fx)}/models/llama"
[data]\ntrain = "{os.path.abspath(fx)}/dpo/prefs.jsonl"\ntemplate = "chatml"\n[lora]\nr = 4\nalpha = 8
[train]\nmethod = "dpo"\nmax_steps = 10\nmicro_batch_size = 3\nlr = 1e-2\nseed = 3\ndevice = "{device}"\n[dpo]\nbeta = 0.1
[output]\ndir = "{work}/dpo-{device}"\n""")
    run(["train", r, "--quiet", "--json"])
    return [json.loads(l)["loss"] for l in open(f"{work}/dpo-{device}/metrics.jsonl") if '"loss"' in l]
try:
    lc, lg = dpo("cpu"), dpo("cuda")
    rel = max(abs(a - b) / abs(b) for a, b in zip(lg, lc))
    ok = abs(lg[0] - 0.6931472) < 1e-3
    fails += not ok
    print(f"dpo 10 steps: cuda bf16 first loss {lg[0]:.6f} (ln 2 = 0.693147), max rel diff to cpu f32 {rel:.2e}, "
          f"loss {lg[0]:.4f} -> {lg[-1]:.4f} {'' if ok else 'FAIL'}")
except RuntimeError as e:
    print(f"dpo ERROR {e}"); fails += 1
print("gpu-check:", "FAILED" if fails else "all f32 checks passed", f"({fails} failures)")
sys.exit(1 if fails else 0)
PY
