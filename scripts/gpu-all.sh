#!/usr/bin/env bash
# One GPU session's checks and measurements: fits in 9 minutes of wall time on one H200 from cold
# (no kernel cache), on binaries built beforehand on a machine without a GPU; nothing is built or
# installed here, and no Python runs (bash, awk, nvidia-smi). Writes OUT/gpu-all.json (rewritten
# after every part, so a cut-off keeps what finished) and OUT/gpu-all.log.
#
#   scripts/build-gpu.sh                      (build machine: .bin/gpu/, see that script)
#   scripts/gpu-all.sh --dry-run              (anywhere: checks the inputs, prints the plan)
#   scripts/gpu-all.sh [OUT] [BUDGET_S]       (GPU machine; OUT defaults to ${OUT:-gpu-out},
#                                              BUDGET_S to 540: parts that no longer fit are skipped)
#
# Parts, most important first (estimates are for a cold H200; each part has its own limit):
#   paths_f32     .bin/gpu/gpu_paths: tests/gpu_paths.rs on CUDA in f32 — the NF4 kernel vs
#                 bitsandbytes, every oracle family's logits vs transformers, the attention row
#                 kernels at T = 511, 512, 2048 on CUDA's pitched rows (none may fall back), host
#                 memory while loading, LoRA/QLoRA steps vs the CPU, reproducible + resumed runs
#   paths_bf16    .bin/gpu/gpu_half: tests/gpu_half.rs on CUDA in bf16 — the NF4 kernel's bf16
#                 output, steps vs the f32 CPU, f32 adapter gradients, DPO, `ft train`'s loop
#   sft_smollm2   ft LoRA r16 all-linear SFT, SmolLM2-135M shape, batch 8, seq 2048, 6 steps
#   sft_qwen05    the same, Qwen2.5-0.5B shape
#   gemm_cuda     burn's bf16 matmul 8192×4096×14336, the `cuda` build
#   qlora_8b      ft QLoRA (NF4) SFT, Llama-3-8B shape, batch 4, seq 2048, gradient checkpointing
#   gemm_tuned    the same matmul, the `cuda-tuned` build (autotune on its first call)
# SFT parts report tokens/s as the median of the last 3 steps' and the peak GPU memory (nvidia-smi
# every 100 ms, and ft's allocator), beside transformers + PEFT on an H100 (measured earlier; bf16
# LoRA r16 all-linear, seq 2048; the H200 has the same bf16 peak and more memory bandwidth).
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${GPU_BIN:-.bin/gpu}
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT=${1:-${OUT:-gpu-out}}
BUDGET=${2:-540}
# build-gpu.sh packs the folder when it is over the device tool's carry limit.
if [ ! -x "$BIN/ft" ] && [ -f .bin/gpu.tar.xz ] && [ "$BIN" = .bin/gpu ]; then
  echo "unpacking .bin/gpu.tar.xz"
  tar -C .bin -xJf .bin/gpu.tar.xz
fi

# name | estimate s | limit s | what runs
PARTS=(
  "paths_f32|150|200|$BIN/gpu_paths --test-threads 1"
  "paths_bf16|90|120|$BIN/gpu_half --test-threads 1"
  "sft_smollm2|60|90|$BIN/ft train (SmolLM2-135M shape, b8, seq 2048, 6 steps)"
  "sft_qwen05|60|90|$BIN/ft train (Qwen2.5-0.5B shape, b8, seq 2048, 6 steps)"
  "gemm_cuda|20|45|$BIN/gemm_probe 8192 4096 14336"
  "qlora_8b|120|150|$BIN/ft train (Llama-3-8B shape, NF4, b4, seq 2048, checkpointing, 6 steps)"
  "gemm_tuned|60|90|$BIN/gemm_probe_tuned 8192 4096 14336"
)
# transformers + PEFT (+ bitsandbytes) on an H100, measured earlier: tokens/s, peak GiB.
declare -A HF_TOKS=([sft_smollm2]=70500 [sft_qwen05]=44700 [qlora_8b]=2620)
declare -A HF_GIB=([sft_smollm2]=28.0 [sft_qwen05]=63.5 [qlora_8b]=27.6)

need=(ft gpu_paths gpu_half gemm_probe gemm_probe_tuned)
fixtures=(tests/fixtures/models/llama/config.json tests/fixtures/models/llama/tokenizer.json tests/fixtures/models/llama/tokenizer_config.json tests/fixtures/chat.jsonl)

if [ $DRY = 1 ]; then
  ok=1
  echo "gpu-all dry run: inputs"
  for b in "${need[@]}"; do
    if [ -x "$BIN/$b" ]; then
      printf '  ok       %-18s %6s  %s\n' "$b" "$(du -h "$BIN/$b" | cut -f1)" "$(file -b "$BIN/$b" 2>/dev/null | cut -d, -f1-2)"
    else
      echo "  MISSING  $BIN/$b (scripts/build-gpu.sh builds it)"; ok=0
    fi
  done
  [ -x "$BIN/ft" ] && echo "  $("$BIN/ft" --version 2>&1 | head -1)"
  for f in "${fixtures[@]}"; do
    [ -f "$f" ] && echo "  ok       $f" || { echo "  MISSING  $f"; ok=0; }
  done
  [ -x "$BIN/gpu_paths" ] && { "$BIN/gpu_paths" --list 2>/dev/null | grep -c ': test$' | sed 's/^/  gpu_paths tests: /'; }
  [ -x "$BIN/gpu_half" ] && { "$BIN/gpu_half" --list 2>/dev/null | grep -c ': test$' | sed 's/^/  gpu_half tests:  /'; }
  command -v nvidia-smi >/dev/null && echo "  nvidia-smi: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>&1 | head -1)" || echo "  nvidia-smi: not here (this is the dry run's machine; the GPU machine has it)"
  echo "plan (budget ${BUDGET} s; a part starts only if its estimate fits in what is left):"
  t=0
  for p in "${PARTS[@]}"; do
    IFS='|' read -r name est limit what <<<"$p"
    t=$((t + est))
    printf '  %-12s ~%4d s (limit %3d s, cumulative ~%4d s)  %s\n' "$name" "$est" "$limit" "$t" "$what"
  done
  echo "  total estimate ~$t s of the ${BUDGET} s budget; results in $OUT/gpu-all.json, log $OUT/gpu-all.log"
  [ $ok = 1 ] && echo "dry run: inputs complete" || { echo "dry run: inputs MISSING"; exit 1; }
  exit 0
fi

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/gpu-all.log"
JSON="$OUT/gpu-all.json"
: >"$LOG"
start=$(date +%s)
results=()
log() { echo "$*" | tee -a "$LOG"; }
write_json() {
  {
    printf '{"started": "%s", "elapsed_s": %d, "budget_s": %d, "gpu": "%s", "parts": [\n' "$(date -u -d @"$start" +%FT%TZ)" "$(($(date +%s) - start))" "$BUDGET" "$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)"
    local i
    for i in "${!results[@]}"; do
      printf '  %s%s\n' "${results[$i]}" "$([ "$i" -lt $((${#results[@]} - 1)) ] && echo ,)"
    done
    printf ']}\n'
  } >"$JSON.tmp" && mv "$JSON.tmp" "$JSON"
}
export CARGO_MANIFEST_DIR=$PWD
log "gpu-all: $("$BIN/ft" --version 2>&1 | head -1); $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -1)"

# Peak GPU memory used (MiB) while a command runs: nvidia-smi sampled every 100 ms.
peak_run() {
  local peakf=$1; shift
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$peakf" 2>/dev/null &
  local smi=$!
  "$@"
  local rc=$?
  kill $smi 2>/dev/null; wait $smi 2>/dev/null
  return $rc
}

# A test binary's pass/fail counts and its failing tests.
run_tests() {
  local name=$1 limit=$2 bin=$3 t0 rc out
  t0=$(date +%s)
  out="$OUT/$name.out"
  timeout "$limit" "$bin" --test-threads 1 --nocapture >"$out" 2>&1
  rc=$?
  cat "$out" >>"$LOG"
  local passed failed failing
  passed=$(grep -c '^test .* ok$' "$out")
  failed=$(grep -c '^test .* FAILED$' "$out")
  failing=$(grep '^test .* FAILED$' "$out" | awk '{ printf "%s\"%s\"", (n++ ? ", " : ""), $2 }')
  results+=("{\"part\": \"$name\", \"rc\": $rc, \"seconds\": $(($(date +%s) - t0)), \"passed\": $passed, \"failed\": $failed, \"failing\": [$failing]$([ $rc = 124 ] && echo ', "timed_out": true')}")
  log "$name: rc $rc, $passed passed, $failed failed, $(($(date +%s) - t0)) s"
}

# Conversations longer than 2048 tokens of the tiny tokenizer, cut to 2048 by the recipe.
data="$OUT/long.jsonl"
: >"$data"
for i in $(seq 0 15); do
  words=$(awk -v i="$i" 'BEGIN { for (k = 0; k < 2400; k++) printf "w%d ", (i * 7919 + k * 104729) % 997 }')
  printf '{"messages": [{"role": "user", "content": "Write %d."}, {"role": "assistant", "content": "%s"}]}\n' "$i" "$words" >>"$data"
done

# ft SFT on random weights of a model shape: tokens/s (median of the last 3 steps) and peak memory.
run_sft() {
  local name=$1 limit=$2 batch=$3 ckpt=$4 quant=$5 config=$6 t0 rc d
  t0=$(date +%s)
  d="$OUT/$name"
  mkdir -p "$d"
  echo "$config" >"$d/config.json"
  cp tests/fixtures/models/llama/tokenizer.json tests/fixtures/models/llama/tokenizer_config.json "$d/"
  cat >"$d/recipe.toml" <<EOF
[model]
path = "$d"
random_init = true
$quant
[data]
train = "$data"
template = "chatml"
max_len = 2049
overlong = "truncate"
[lora]
r = 16
alpha = 32
target_modules = ["all-linear"]
[train]
max_steps = 6
micro_batch_size = $batch
lr = 1e-4
gradient_checkpointing = $ckpt
device = "cuda"
[output]
dir = "$d/run"
EOF
  peak_run "$d/smi" timeout "$limit" "$BIN/ft" train "$d/recipe.toml" --quiet --json >"$d/summary.out" 2>"$d/stderr"
  rc=$?
  cat "$d/stderr" >>"$LOG"
  local toks step peak alloc
  # The median of the last 3 steps' times (POSIX awk: no asort).
  step=$(awk -F'"step_s":' 'NF > 1 { split($2, a, /[,}]/); s[n++] = a[1] + 0 }
    END { if (n >= 3) { x = s[n-3]; y = s[n-2]; z = s[n-1]; m = (x > y) ? ((y > z) ? y : ((x > z) ? z : x)) : ((x > z) ? x : ((y > z) ? z : y)); print m } }' "$d/run/metrics.jsonl" 2>/dev/null)
  toks=$([ -n "$step" ] && awk -v b="$batch" -v s="$step" 'BEGIN { printf "%.0f", b * 2048 / s }')
  peak=$(sort -n "$d/smi" 2>/dev/null | tail -1 | awk '{ printf "%.2f", $1 / 1024 }')
  alloc=$(grep -o '"peak_gpu_reserved_gib":[^,}]*' "$d/summary.out" 2>/dev/null | cut -d: -f2)
  local hf_t=${HF_TOKS[$name]} hf_g=${HF_GIB[$name]}
  results+=("{\"part\": \"$name\", \"rc\": $rc, \"seconds\": $(($(date +%s) - t0)), \"batch\": $batch, \"seq\": 2048, \"step_s_median_last3\": ${step:-null}, \"tokens_per_s\": ${toks:-null}, \"peak_gpu_gib\": ${peak:-null}, \"allocator_reserved_gib\": ${alloc:-null}, \"hf_h100_tokens_per_s\": $hf_t, \"hf_h100_peak_gib\": $hf_g, \"speed_vs_hf\": $([ -n "$toks" ] && awk -v a="$toks" -v b="$hf_t" 'BEGIN { printf "%.3f", a / b }' || echo null), \"memory_vs_hf\": $([ -n "$peak" ] && awk -v a="$peak" -v b="$hf_g" 'BEGIN { printf "%.3f", a / b }' || echo null), \"kernels\": $(grep -o '"gpu_kernels":\[[^]]*\]' "$d/summary.out" 2>/dev/null | cut -d: -f2- || echo null)$([ $rc = 124 ] && echo ', "timed_out": true')}")
  log "$name: rc $rc, step ${step:-?} s, ${toks:-?} tokens/s (HF on H100 $hf_t), peak ${peak:-?} GiB (HF $hf_g), $(($(date +%s) - t0)) s"
}

run_gemm() {
  local name=$1 limit=$2 bin=$3 t0 rc line
  t0=$(date +%s)
  line=$(timeout "$limit" "$bin" 8192 4096 14336 2>>"$LOG" | tail -1)
  rc=$?
  results+=("{\"part\": \"$name\", \"rc\": $rc, \"seconds\": $(($(date +%s) - t0)), \"probe\": ${line:-null}}")
  log "$name: rc $rc, ${line:-no output}, $(($(date +%s) - t0)) s"
}

SMOL='{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "rope_theta": 100000.0, "tie_word_embeddings": true, "rms_norm_eps": 1e-5, "max_position_embeddings": 8192, "hidden_act": "silu", "torch_dtype": "bfloat16"}'
QWEN='{"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "rope_theta": 1000000.0, "tie_word_embeddings": true, "rms_norm_eps": 1e-6, "max_position_embeddings": 8192, "hidden_act": "silu", "torch_dtype": "bfloat16"}'
LLAMA8B='{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 500000.0, "tie_word_embeddings": false, "rms_norm_eps": 1e-5, "max_position_embeddings": 8192, "hidden_act": "silu", "torch_dtype": "bfloat16"}'

for p in "${PARTS[@]}"; do
  IFS='|' read -r name est limit _ <<<"$p"
  left=$((BUDGET - ($(date +%s) - start)))
  if [ "$left" -lt "$est" ]; then
    results+=("{\"part\": \"$name\", \"skipped\": \"out of time: ${left} s left, estimate ${est} s\"}")
    log "$name: skipped (${left} s left, estimate ${est} s)"
    write_json
    continue
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  log "== $name (limit $limit s, $left s left)"
  case $name in
    paths_f32) run_tests "$name" "$limit" "$BIN/gpu_paths" ;;
    paths_bf16) run_tests "$name" "$limit" "$BIN/gpu_half" ;;
    sft_smollm2) run_sft "$name" "$limit" 8 false "" "$SMOL" ;;
    sft_qwen05) run_sft "$name" "$limit" 8 false "" "$QWEN" ;;
    gemm_cuda) run_gemm "$name" "$limit" "$BIN/gemm_probe" ;;
    qlora_8b) run_sft "$name" "$limit" 4 true 'quantize = "nf4"' "$LLAMA8B" ;;
    gemm_tuned) run_gemm "$name" "$limit" "$BIN/gemm_probe_tuned" ;;
  esac
  write_json
done
log "gpu-all: done in $(($(date +%s) - start)) s; $JSON"
