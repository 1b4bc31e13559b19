#!/usr/bin/env bash
# Builds, here (no GPU needed), what scripts/gpu-check.sh and scripts/gpu-bench.sh run on the GPU
# machine, into .bin/ (ignored by git; carry it with the device tool):
#   .bin/ft         the CLI with the CUDA backend
#   .bin/gpu_paths  tests/gpu_paths.rs built for CUDA: the NF4 kernel against bitsandbytes' values
#                   (f32 and bf16), every oracle model's logits, LoRA/QLoRA training steps vs CPU
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
exe=$(cargo test --release --locked --features cuda --test gpu_paths --no-run --message-format=json \
  | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "gpu_paths" and m.get("executable"):
        print(m["executable"])')
cp "$exe" .bin/gpu_paths
ls -l .bin/
