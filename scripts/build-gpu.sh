#!/usr/bin/env bash
# Builds, here (no GPU needed), everything the GPU machine runs, into one folder, .bin/gpu/
# (ignored by git; carry it with the device tool, or the archive .bin/gpu.tar.xz when the folder
# is over the carry limit: scripts/gpu-all.sh unpacks it):
#   ft                the CLI with the CUDA backend
#   gpu_paths         tests/gpu_paths.rs built for CUDA (f32): the NF4 kernel against
#                     bitsandbytes' values, every oracle model's logits, the attention row kernels
#                     on pitched rows, host memory while loading, LoRA/QLoRA steps vs CPU,
#                     reproducible and resumed runs, DPO vs TRL
#   gpu_half          tests/gpu_half.rs built for CUDA (bf16): NF4 bf16 output, training steps vs
#                     the f32 CPU, f32 adapter gradients, DPO scores and gradients, `ft train`
#   gemm_probe        examples/gemm_probe.rs, `cuda` build: burn's bf16 matmul speed
#   gemm_probe_tuned  the same with `cuda-tuned` (burn's fusion and autotune)
#   nf4_bandwidth     examples/nf4_bandwidth.rs: the NF4 kernel's speed vs the tensor-op path
#   attention_bench   examples/attention_bench.rs: chunked vs plain attention, memory and time
# `scripts/build-gpu.sh --minimal` builds only what scripts/gpu-all.sh runs.
set -euo pipefail
cd "$(dirname "$0")/.."
export CUDARC_CUDA_VERSION=${CUDARC_CUDA_VERSION:-13000}
target=${CARGO_TARGET_DIR:-target}
out=.bin/gpu
mkdir -p "$out"
examples="nf4_bandwidth attention_bench"
[ "${1:-}" = "--minimal" ] && examples=""
cargo build --release --locked --features cuda --bin ft
cp "$target/release/ft" "$out/ft"
for example in gemm_probe $examples; do
  cargo build --release --locked --features cuda --example "$example"
  cp "$target/release/examples/$example" "$out/$example"
done
# The test binaries: cargo names them with a hash; its JSON messages say which.
for t in gpu_paths gpu_half; do
  exe=$(cargo test --release --locked --features cuda --test $t --no-run --message-format=json |
    grep '"reason":"compiler-artifact"' | grep "\"name\":\"$t\"" | grep -o '"executable":"[^"]*"' | cut -d'"' -f4 | tail -1)
  cp "$exe" "$out/$t"
done
# `cuda-tuned` last: it changes burn's features, so its build does not share the others' artifacts.
cargo build --release --locked --features cuda-tuned --example gemm_probe
cp "$target/release/examples/gemm_probe" "$out/gemm_probe_tuned"
# The `cuda` build of gemm_probe was overwritten by the last build's: copied above already.
ls -l "$out"
size=$(du -sm "$out" | cut -f1)
if [ "$size" -gt 60 ]; then
  tar -C .bin -cJf .bin/gpu.tar.xz gpu
  echo "$out is $size MiB, over the device tool's 64 MiB carry: carry .bin/gpu.tar.xz ($(du -m .bin/gpu.tar.xz | cut -f1) MiB) instead"
fi
