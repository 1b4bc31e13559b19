#!/usr/bin/env bash
# Builds, here (no GPU needed), what scripts/gpu-check.sh and scripts/gpu-bench.sh run on the GPU
# machine, into .bin/ (ignored by git; carry it with the device tool):
#   .bin/ft         the CLI with the CUDA backend
#   .bin/gpu_paths  tests/gpu_paths.rs built for CUDA (f32): the NF4 kernel against bitsandbytes'
#                   values, every oracle model's logits, LoRA/QLoRA training steps vs CPU, DPO vs TRL
#   .bin/gpu_half   tests/gpu_half.rs built for CUDA (bf16): NF4 bf16 output, training steps vs
#                   the f32 CPU, DPO scores and gradients, `ft train`'s whole loop
#   .bin/nf4_bandwidth  examples/nf4_bandwidth.rs: the NF4 kernel's speed vs the tensor-op path
#   .bin/attention_bench  examples/attention_bench.rs: chunked vs plain attention, memory and time
set -euo pipefail
cd "$(dirname "$0")/.."
export CUDARC_CUDA_VERSION=${CUDARC_CUDA_VERSION:-13000}
mkdir -p .bin
cargo build --release --locked --features cuda
cp target/release/ft .bin/ft
for example in nf4_bandwidth attention_bench; do
  cargo build --release --locked --features cuda --example $example
  cp target/release/examples/$example .bin/$example
done
for t in gpu_paths gpu_half; do
  exe=$(cargo test --release --locked --features cuda --test $t --no-run --message-format=json \
    | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == sys.argv[1] and m.get("executable"):
        print(m["executable"])' $t)
  cp "$exe" .bin/$t
done
ls -l .bin/
