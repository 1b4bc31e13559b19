//! Attention on the GPU under autodiff: ft's chunked composition (`src/ops/chunked.rs`: one
//! graph node keeping q, k, v, the output and the log-sum-exp) against the plain composition
//! (`ops::reference::attention`: scores and probabilities `[B, H, T, S]` kept for the backward),
//! in the same run, for one layer's causal attention. Prints, for each, the device memory held
//! between the forward and the backward (what a layer's attention keeps for the backward, the
//! output included) and the forward + backward time (the best of three after a warm-up run);
//! then the ratios; and the chunked forward + backward for chunk budgets 2^24 … 2^27 score
//! elements (the default is `ops::chunked::CHUNK_SCORES`).
//!
//! `attention_bench [B T H KV HD]`; defaults: the SmolLM2-135M shape at batch 8 and 2048 tokens
//! on CUDA (f32 and bf16) and, where the reference fits, the Llama-3-8B shape at batch 4; a small
//! shape on wgpu. On the GPU machine: `scripts/build-gpu.sh` builds it as `.bin/attention_bench`;
//! `cargo run --release --features wgpu --example attention_bench` runs it on a Vulkan driver.

#[cfg(any(feature = "cuda", feature = "wgpu"))]
fn main() {
    use burn::backend::Autodiff;
    use burn::prelude::*;
    use burn::tensor::{Bool, Distribution, TensorPrimitive};
    use burn_cubecl::{tensor::CubeTensor, BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
    use ft::ops;
    use std::time::Instant;

    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse().expect("B T H KV HD")).collect();
    let custom = if let [b, t, h, kv, hd] = args[..] { Some((b, t, h, kv, hd)) } else { None };

    /// Bytes in use on the device of `probe`.
    fn in_use<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(probe: &Tensor<CubeBackend<R, F, I, BT>, 1>) -> u64 {
        let t: CubeTensor<R> = match probe.clone().into_primitive() {
            TensorPrimitive::Float(t) => t,
            TensorPrimitive::QFloat(t) => t,
        };
        t.client.memory_usage().expect("memory usage").bytes_in_use
    }

    #[derive(Clone, Copy)]
    struct Measured {
        held: u64,
        seconds: f64,
    }

    fn run<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(label: &str, (b, t, h, kv, hd): (usize, usize, usize, usize, usize), reference_too: bool) {
        type Ad<R, F, I, BT> = Autodiff<CubeBackend<R, F, I, BT>>;
        let device = Default::default();
        let probe = Tensor::<CubeBackend<R, F, I, BT>, 1>::zeros([1], &device);
        let rand = |shape: [usize; 4]| Tensor::<CubeBackend<R, F, I, BT>, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
        let (q, k, v, c) = (rand([b, t, h, hd]), rand([b, t, kv, hd]), rand([b, t, kv, hd]), rand([b, t, h, hd]));
        let mask = Tensor::<Ad<R, F, I, BT>, 2, Bool>::tril_mask([t, t], 0, &device).reshape([1, t, t]);
        let scale = (hd as f64).powf(-0.5);
        let step = |composed: bool| -> Measured {
            let leaf = |x: &Tensor<CubeBackend<R, F, I, BT>, 4>| Tensor::<Ad<R, F, I, BT>, 4>::from_inner(x.clone()).require_grad();
            let (ql, kl, vl) = (leaf(&q), leaf(&k), leaf(&v));
            CubeBackend::<R, F, I, BT>::sync(&device).unwrap();
            let before = in_use(&probe);
            let start = Instant::now();
            let y = if composed {
                ops::attention(ql.clone(), kl.clone(), vl.clone(), mask.clone(), ops::Scores::scaled(scale))
            } else {
                ops::reference::attention(ql.clone(), kl.clone(), vl.clone(), mask.clone(), scale)
            };
            let loss = (y * Tensor::from_inner(c.clone())).sum();
            CubeBackend::<R, F, I, BT>::sync(&device).unwrap();
            let held = in_use(&probe).saturating_sub(before);
            let grads = loss.backward();
            let dq = ql.grad(&grads).expect("dq");
            drop((kl.grad(&grads), vl.grad(&grads), dq));
            CubeBackend::<R, F, I, BT>::sync(&device).unwrap();
            Measured { held, seconds: start.elapsed().as_secs_f64() }
        };
        let best = |composed: bool| {
            let runs: Vec<Measured> = (0..4).map(|_| step(composed)).collect();
            // The first run includes kernel compilation and autotuning.
            let seconds = runs[1..].iter().map(|m| m.seconds).fold(f64::INFINITY, f64::min);
            Measured { held: runs[1].held, seconds }
        };
        let mib = |x: u64| x as f64 / (1u64 << 20) as f64;
        let shape = format!("B{b} T{t} H{h} KV{kv} hd{hd}");
        let chunked = best(true);
        println!("{label} {shape} chunked:   held for backward {:.1} MiB, forward+backward {:.2} ms", mib(chunked.held), chunked.seconds * 1e3);
        // The chunk budget (`ops::chunked::CHUNK_SCORES` is the default): forward + backward
        // on the inner backend, as the autodiff node runs them.
        for budget in [1usize << 24, 1 << 25, 1 << 26, 1 << 27] {
            let once = || {
                let start = Instant::now();
                let (o, lse) = ops::chunked::attention(q.clone(), k.clone(), v.clone(), mask.clone().inner(), ops::Scores::scaled(scale), budget);
                let grads = ops::chunked::attention_backward(q.clone(), k.clone(), v.clone(), o, lse, mask.clone().inner(), ops::Scores::scaled(scale), c.clone(), budget);
                drop(grads);
                CubeBackend::<R, F, I, BT>::sync(&device).unwrap();
                start.elapsed().as_secs_f64()
            };
            let seconds = (0..4).map(|_| once()).skip(1).fold(f64::INFINITY, f64::min);
            let rows = (budget / (b * h * t)).clamp(1, t);
            println!("{label} {shape} chunk budget 2^{} ({} rows): forward+backward {:.2} ms", budget.trailing_zeros(), if rows > 64 { rows - rows % 64 } else { rows }, seconds * 1e3);
        }
        if reference_too {
            let plain = best(false);
            println!("{label} {shape} reference: held for backward {:.1} MiB, forward+backward {:.2} ms", mib(plain.held), plain.seconds * 1e3);
            println!(
                "{label} {shape} chunked/reference: memory held {:.3}x, time {:.2}x (speed-up {:.2}x)",
                chunked.held as f64 / plain.held.max(1) as f64,
                chunked.seconds / plain.seconds,
                plain.seconds / chunked.seconds
            );
        }
    }
    #[cfg(feature = "cuda")]
    {
        use cubecl_cuda::CudaRuntime;
        ft::backend::init_cuda_runtime();
        let shapes = match custom {
            Some(s) => vec![(s, true)],
            None => vec![((8, 2048, 9, 3, 64), true), ((4, 2048, 32, 8, 128), true)],
        };
        for (shape, reference_too) in shapes {
            run::<CudaRuntime, f32, i32, u8>("cuda f32 ", shape, reference_too);
            run::<CudaRuntime, half::bf16, i32, u8>("cuda bf16", shape, reference_too);
        }
    }
    #[cfg(all(feature = "wgpu", not(feature = "cuda")))]
    run::<burn::backend::wgpu::WgpuRuntime, f32, i32, u32>("wgpu f32", custom.unwrap_or((1, 512, 9, 3, 64)), true);
}

#[cfg(not(any(feature = "cuda", feature = "wgpu")))]
fn main() {
    eprintln!("attention_bench needs a GPU backend: build with --features cuda (or wgpu)");
    std::process::exit(2);
}
