//! burn's matmul speed on this build's backend: `[M, K] · [K, N]` in bf16 on CUDA (f32 on wgpu),
//! 3 warm-up products (the first compiles the kernel; under `cuda-tuned` it also autotunes), then
//! the median of 10 timed ones. Prints one JSON line: the build (`cuda` or `cuda-tuned`), shape,
//! median milliseconds and TFLOP/s. `gemm_probe [M K N]`; default 8192 4096 14336 (a Llama-3-8B
//! MLP projection over 8192 tokens).
//!
//! On the GPU machine `scripts/gpu-all.sh` runs the `cuda` and `cuda-tuned` builds
//! (`scripts/build-gpu.sh` builds both). `cargo run --release --features wgpu --example
//! gemm_probe -- 512 512 512` runs it on a Vulkan driver.

#[cfg(any(feature = "cuda", feature = "wgpu"))]
fn main() {
    use burn::prelude::*;
    use burn::tensor::Distribution;
    use std::time::Instant;

    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse().expect("M K N")).collect();
    let (m, k, n) = if let [m, k, n] = args[..] { (m, k, n) } else { (8192, 4096, 14336) };

    fn probe<B: Backend>(build: &str, (m, k, n): (usize, usize, usize)) {
        let device = Default::default();
        let a = Tensor::<B, 2>::random([m, k], Distribution::Normal(0.0, 1.0), &device);
        let b = Tensor::<B, 2>::random([k, n], Distribution::Normal(0.0, 1.0), &device);
        let t0 = Instant::now();
        for _ in 0..3 {
            drop(a.clone().matmul(b.clone()));
            B::sync(&device).unwrap();
        }
        let warmup = t0.elapsed().as_secs_f64();
        let mut times: Vec<f64> = (0..10)
            .map(|_| {
                let t = Instant::now();
                drop(a.clone().matmul(b.clone()));
                B::sync(&device).unwrap();
                t.elapsed().as_secs_f64()
            })
            .collect();
        times.sort_by(f64::total_cmp);
        let median = (times[4] + times[5]) / 2.0;
        let tflops = 2.0 * m as f64 * k as f64 * n as f64 / median / 1e12;
        println!(
            "{{\"build\": \"{build}\", \"dtype\": \"{:?}\", \"m\": {m}, \"k\": {k}, \"n\": {n}, \"warmup_s\": {warmup:.3}, \"median_ms\": {:.4}, \"tflops\": {tflops:.2}}}",
            a.dtype(),
            median * 1e3
        );
    }
    #[cfg(feature = "cuda")]
    {
        ft::backend::init_cuda_runtime();
        let build = if cfg!(feature = "cuda-tuned") { "cuda-tuned" } else { "cuda" };
        probe::<ft::backend::CudaBf16>(build, (m, k, n));
    }
    #[cfg(all(feature = "wgpu", not(feature = "cuda")))]
    probe::<burn::backend::Wgpu>("wgpu", (m, k, n));
}

#[cfg(not(any(feature = "cuda", feature = "wgpu")))]
fn main() {
    eprintln!("gemm_probe needs a GPU backend: --features cuda, cuda-tuned or wgpu");
    std::process::exit(2);
}
