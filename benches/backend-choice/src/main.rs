//! flex vs ndarray on a SmolLM2-135M-shaped decoder layer's work: projections (GEMM), attention
//! scores + softmax + weighted sum, RMSNorm-like reductions, and the vocabulary head.
use std::time::Instant;

use burn::prelude::*;
use burn::tensor::activation::{silu, softmax};
use burn::tensor::Distribution;

fn layer_step<B: Backend>(device: &B::Device, t: usize) -> f64 {
    let (h, i, nh, hd, v) = (576, 1536, 9, 64, 49152);
    let x = Tensor::<B, 3>::random([1, t, h], Distribution::Normal(0.0, 1.0), device);
    let wq = Tensor::<B, 2>::random([h, h], Distribution::Normal(0.0, 0.02), device);
    let wg = Tensor::<B, 2>::random([h, i], Distribution::Normal(0.0, 0.02), device);
    let wd = Tensor::<B, 2>::random([i, h], Distribution::Normal(0.0, 0.02), device);
    let emb = Tensor::<B, 2>::random([v, h], Distribution::Normal(0.0, 0.02), device);
    let start = Instant::now();
    let mut y = x.clone();
    for _ in 0..30 {
        let n = y.clone() * (y.clone().powi_scalar(2).mean_dim(2) + 1e-5).sqrt().recip();
        let q = n.clone().matmul(wq.clone().unsqueeze()).reshape([1, t, nh, hd]).swap_dims(1, 2);
        let s = softmax(q.clone().matmul(q.clone().swap_dims(2, 3)) * 0.125, 3);
        let a = s.matmul(q).swap_dims(1, 2).reshape([1, t, h]);
        let m = silu(a.matmul(wg.clone().unsqueeze())).matmul(wd.clone().unsqueeze());
        y = y + m;
    }
    let logits = emb.matmul(y.reshape([t, h]).transpose());
    let _ = logits.sum().into_scalar();
    start.elapsed().as_secs_f64()
}

fn bench<B: Backend>(name: &str, device: &B::Device) -> f64 {
    layer_step::<B>(device, 128); // warm-up
    let runs: Vec<f64> = (0..5).map(|_| layer_step::<B>(device, 128)).collect();
    let best = runs.iter().cloned().fold(f64::INFINITY, f64::min);
    println!("{name:8} best of 5: {:.3}s per 30-layer step (128 tokens)", best);
    best
}

fn main() {
    let flex = bench::<burn::backend::Flex>("flex", &Default::default());
    let nd = bench::<burn::backend::NdArray>("ndarray", &Default::default());
    println!("ndarray / flex time ratio: {:.2} (>1 means flex is faster)", nd / flex);
}
