//! The decoder's operations as plain burn tensor ops, written the way transformers writes them:
//! the oracle every kernel and every composition in `ops/` is tested against (the dispatchers
//! fall back to these only for a backend that has neither).

use burn::prelude::*;
use burn::tensor::activation::{log_softmax, softmax};
use burn::tensor::Bool;


pub fn rms_norm<B: Backend, const D: usize>(x: Tensor<B, D>, w: Tensor<B, 1>, eps: f64) -> Tensor<B, D> {
    let var = x.clone().powi_scalar(2).mean_dim(D - 1);
    let x = x * (var + eps).sqrt().recip();
    x * w.unsqueeze()
}

pub(crate) fn rotate_half<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    let d = x.dims()[3];
    let x1 = x.clone().narrow(3, 0, d / 2);
    let x2 = x.narrow(3, d / 2, d / 2);
    Tensor::cat(vec![x2.neg(), x1], 3)
}

/// `x [B, T, H, hd]`, tables `[1 | B, T, hd]`.
pub fn rope<B: Backend>(x: Tensor<B, 4>, cos: Tensor<B, 3>, sin: Tensor<B, 3>) -> Tensor<B, 4> {
    let cos: Tensor<B, 4> = cos.unsqueeze_dim(2);
    let sin: Tensor<B, 4> = sin.unsqueeze_dim(2);
    x.clone() * cos + rotate_half(x) * sin
}

pub fn token_logprobs<B: Backend>(logits: Tensor<B, 2>, targets: Tensor<B, 1, Int>) -> Tensor<B, 1> {
    let n = targets.dims()[0];
    log_softmax(logits.cast(burn::tensor::FloatDType::F32), 1).gather(1, targets.reshape([n, 1])).reshape([n])
}

pub fn attention<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, mask: Tensor<B, 3, Bool>, scale: f64) -> Tensor<B, 4> {
    attention_softcap(q, k, v, mask, scale, None)
}

/// Gemma 2's eager attention: scores `/ c`, `tanh`, `· c` before the mask.
pub fn attention_softcap<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, mask: Tensor<B, 3, Bool>, scale: f64, softcap: Option<f64>) -> Tensor<B, 4> {
    let [b, t, nh, hd] = q.dims();
    let [_, s, kvh, _] = k.dims();
    let (q, mut k, mut v) = (q.swap_dims(1, 2), k.swap_dims(1, 2), v.swap_dims(1, 2));
    // GQA: repeat each kv head n_rep times (HF's repeat_kv), materialised so that the
    // autodiff backward needs no broadcasting.
    let n_rep = nh / kvh;
    if n_rep > 1 {
        k = k.unsqueeze_dim::<5>(2).expand([b, kvh, n_rep, s, hd]).reshape([b, nh, s, hd]);
        v = v.unsqueeze_dim::<5>(2).expand([b, kvh, n_rep, s, hd]).reshape([b, nh, s, hd]);
    }
    let mut scores = q.matmul(k.swap_dims(2, 3)) * scale;
    if let Some(c) = softcap {
        scores = (scores / c).tanh() * c;
    }
    let mask: Tensor<B, 4, Bool> = mask.unsqueeze_dim(1);
    let scores = scores.mask_fill(mask.expand([b, nh, t, s]), f32::NEG_INFINITY);
    softmax(scores, 3).matmul(v).swap_dims(1, 2)
}
