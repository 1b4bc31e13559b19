//! NF4 dequantization speed on the GPU: ft's CubeCL kernel against the tensor-op composition it
//! replaced (shift, mask, gather, multiply, cast), in the same run, for one Llama-3-8B MLP weight
//! (14336 × 4096) into f32 and into the compute dtype bf16 (CUDA only). Prints the effective
//! bandwidth (codes + absmax read, output written) and the ratio. `nf4_bandwidth [ROWS COLS]`
//! picks another shape (wgpu: 4096 × 4096 by default, under its buffer size limit).
//!
//! On the GPU machine: `scripts/build-gpu.sh` builds it as `.bin/nf4_bandwidth`.
//! `cargo run --release --features wgpu --example nf4_bandwidth` runs it on a Vulkan driver.

#[cfg(any(feature = "cuda", feature = "wgpu"))]
fn main() {
    use burn::prelude::*;
    use burn::tensor::FloatDType;
    use ft::ops::Nf4Linear;
    use ft::quant::nf4::{Nf4, BLOCKSIZE};
    use ft::quant::nf4_weight::Nf4Weight;
    use std::time::Instant;

    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse().expect("ROWS COLS")).collect();
    let shape = |default: (usize, usize)| if let [r, c] = args[..] { (r, c) } else { default };

    fn run<B: Nf4Linear>(label: &str, (rows, cols): (usize, usize), dtype: FloatDType, out_bytes: usize) {
        let w: Vec<f32> = (0..rows * cols).map(|i| ((i as u64 * 2654435761 % 10007) as f32 - 5003.0) / 3001.0).collect();
        let q = Nf4::quantize(&w, BLOCKSIZE, true);
        let device = Default::default();
        let t = Nf4Weight::<B>::new(&q, rows, cols, &device);
        let moved = t.bytes() + rows * cols * out_bytes;
        let time = |f: &dyn Fn() -> Tensor<B, 2>| {
            for _ in 0..3 {
                drop(f());
            }
            B::sync(&device).unwrap();
            let reps = 20;
            let start = Instant::now();
            for _ in 0..reps {
                drop(f());
            }
            B::sync(&device).unwrap();
            start.elapsed().as_secs_f64() / reps as f64
        };
        let kernel = time(&|| B::nf4_dequantize(&t, dtype));
        let ops = time(&|| t.dequantize().cast(dtype));
        let gbs = |s: f64| moved as f64 / s / 1e9;
        println!(
            "{label} {rows}x{cols}: kernel {:.3} ms ({:.1} GB/s), tensor ops {:.3} ms ({:.1} GB/s): kernel {:.2}x faster",
            kernel * 1e3,
            gbs(kernel),
            ops * 1e3,
            gbs(ops),
            ops / kernel
        );
    }
    #[cfg(feature = "cuda")]
    {
        ft::backend::init_cuda_runtime();
        run::<ft::backend::CudaF32>("cuda f32 ", shape((14336, 4096)), FloatDType::F32, 4);
        run::<ft::backend::CudaBf16>("cuda bf16", shape((14336, 4096)), FloatDType::BF16, 2);
    }
    #[cfg(all(feature = "wgpu", not(feature = "cuda")))]
    run::<burn::backend::Wgpu>("wgpu f32", shape((4096, 4096)), FloatDType::F32, 4);
}

#[cfg(not(any(feature = "cuda", feature = "wgpu")))]
fn main() {
    eprintln!("nf4_bandwidth needs a GPU backend: build with --features cuda (or wgpu)");
    std::process::exit(2);
}
