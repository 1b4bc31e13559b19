//! The fused operations composed from burn tensor ops on a backend without kernels of its own
//! (burn's CubeCL backends: CUDA, and wgpu in tests). Each forward and backward here runs on the
//! inner backend, so under autodiff each operation is one graph node that keeps only its inputs
//! (see `autodiff.rs`), instead of the dozen intermediates burn's autodiff keeps for the same
//! maths written as a chain of tensor ops.
//!
//! Attention works through the queries in chunks (FlashAttention's recomputation, with burn's
//! matmul for the products): the scores of one chunk of query rows against the keys that chunk
//! can see exist only while the chunk is processed; the forward keeps the output and the softmax's
//! log-sum-exp, and the backward recomputes the probabilities from them. Memory per layer is
//! O(T), not O(T²), and causal masks skip the keys after each chunk's last query (about half the
//! work at long sequences). Grouped-query attention needs no K/V copy per query head: the query
//! heads of one kv head are stacked as rows of one product. The row-wise work between the
//! products (masked softmax, and the backward's probabilities and score gradients) goes through
//! [`ScoreRows`]: tensor ops by default, ft's CubeCL kernels on the GPU backends (`cubecl.rs`).
//!
//! Precision follows the Python stack in bf16: softmax statistics, RMSNorm's mean square and the
//! attention gradient's accumulators are f32, the products run in the compute dtype.

use std::ops::Range;

use burn::prelude::*;
use burn::tensor::activation::{sigmoid, silu};
use burn::tensor::{Bool, FloatDType};

#[allow(unused_imports)]
use super::{chunked, FusedOps, Nf4Linear, ScoreRows, Scores};
use super::reference::rotate_half;

/// Score elements (rows × keys × heads × batch) one attention chunk may hold: 64 Mi, so 256 MiB
/// per f32 score-sized buffer (the backward holds about five at a time). Fewer, larger chunks
/// mean fewer kernel launches; more, smaller ones skip more masked keys. SmolLM2 at batch 8 and
/// 2048 tokens: 5 chunks of 448 rows (60% of the full score matrix computed).
pub const CHUNK_SCORES: usize = 1 << 26;

fn float_dtype<B: Backend, const D: usize>(t: &Tensor<B, D>) -> FloatDType {
    t.dtype().into()
}

fn f32<B: Backend, const D: usize>(t: Tensor<B, D>) -> Tensor<B, D> {
    t.cast(FloatDType::F32)
}

/// RMSNorm `w · x / sqrt(mean(x²) + eps)` as transformers computes it in any dtype: the mean
/// square and the normalisation in f32, rounded to the input's dtype, then times the weight.
pub fn rms_norm<B: Backend>(x: Tensor<B, 2>, w: Tensor<B, 1>, eps: f64) -> Tensor<B, 2> {
    let dtype = float_dtype(&x);
    let x = f32(x);
    let r = (x.clone().powi_scalar(2).mean_dim(1) + eps).sqrt().recip();
    (x * r).cast(dtype) * w.unsqueeze()
}

/// The input gradient of [`rms_norm`]: with `g = grad · w` and `r = 1 / rms(x)`,
/// `dx = r·g − x · r³ · mean(g·x)`, in f32.
pub fn rms_norm_backward<B: Backend>(x: Tensor<B, 2>, w: Tensor<B, 1>, eps: f64, grad: Tensor<B, 2>) -> Tensor<B, 2> {
    let dtype = float_dtype(&x);
    let x = f32(x);
    let g = f32(grad * w.unsqueeze());
    let r = (x.clone().powi_scalar(2).mean_dim(1) + eps).sqrt().recip();
    let gx = (g.clone() * x.clone()).mean_dim(1);
    let dx = g * r.clone() - x * (r.powi_scalar(3) * gx);
    dx.cast(dtype)
}

/// Rotary embedding `x·cos + rotate_half(x)·sin` of `x [B, T, H, hd]`, tables `[1 | B, T, hd]`;
/// with `transpose` the transposed map `x·cos − rotate_half(x·sin)` (rotate_half's transpose is
/// its negation), which is the backward.
pub fn rope<B: Backend>(x: Tensor<B, 4>, cos: Tensor<B, 3>, sin: Tensor<B, 3>, transpose: bool) -> Tensor<B, 4> {
    let cos: Tensor<B, 4> = cos.unsqueeze_dim(2);
    let sin: Tensor<B, 4> = sin.unsqueeze_dim(2);
    if transpose {
        x.clone() * cos - rotate_half(x * sin)
    } else {
        x.clone() * cos + rotate_half(x) * sin
    }
}

/// `silu(gate) · up`.
/// `t` in `dtype` (itself when it is already).
pub fn cast_to<B: Backend, const D: usize>(t: Tensor<B, D>, dtype: burn::tensor::DType) -> Tensor<B, D> {
    if t.dtype() == dtype {
        t
    } else {
        t.cast(dtype)
    }
}

/// `x·W + (s·(x'·A))·B` with the adapter computed in its weights' dtype, as PEFT computes a LoRA
/// layer without autocast: `x'` cast up to the f32 masters' dtype, the sum with the base output
/// `x·W` (compute dtype) formed in f32 and rounded once to the compute dtype (PEFT's `Linear`:
/// `(result + lora).to(result.dtype)`), so the gradients of A and B are f32 products of f32
/// operands. Also returns `t = s·(x'·A)` (adapter dtype) for the backward. In one dtype, the
/// plain composition.
pub fn lora_linear<B: Backend>(x: Tensor<B, 2>, x_lora: Option<Tensor<B, 2>>, w: Tensor<B, 2>, a: Tensor<B, 2>, b: Tensor<B, 2>, scale: f64) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let (xd, ad) = (x.dtype(), a.dtype());
    let xl = cast_to(x_lora.unwrap_or_else(|| x.clone()), ad);
    let t = xl.matmul(a) * scale;
    let base = x.matmul(w);
    let y = if xd == ad { base + t.clone().matmul(b) } else { (base.cast(ad) + t.clone().matmul(b)).cast(xd) };
    (y, t)
}

/// Gradients of [`lora_linear`] with respect to `x`, `x'` (when given), `A` and `B`, the
/// adapter's in its dtype (the activations cast up, its input gradient cast down to theirs).
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
pub fn lora_linear_backward<B: Backend>(
    x: Tensor<B, 2>,
    x_lora: Option<Tensor<B, 2>>,
    w: Tensor<B, 2>,
    a: Tensor<B, 2>,
    b: Tensor<B, 2>,
    t: Tensor<B, 2>,
    scale: f64,
    grad: Tensor<B, 2>,
) -> (Tensor<B, 2>, Option<Tensor<B, 2>>, Tensor<B, 2>, Tensor<B, 2>) {
    let (xd, ad) = (x.dtype(), a.dtype());
    let g = cast_to(grad.clone(), ad);
    let u = g.clone().matmul(b.transpose()) * scale;
    let db = t.transpose().matmul(g);
    let given = x_lora.is_some();
    let xl = cast_to(x_lora.unwrap_or_else(|| x.clone()), ad);
    let da = xl.transpose().matmul(u.clone());
    let dxl = cast_to(u.matmul(a.transpose()), xd);
    let dx = grad.matmul(w.transpose());
    if given {
        (dx, Some(dxl), da, db)
    } else {
        (dx + dxl, None, da, db)
    }
}

pub fn swiglu<B: Backend>(gate: Tensor<B, 2>, up: Tensor<B, 2>) -> Tensor<B, 2> {
    silu(gate) * up
}

/// Gradients of [`swiglu`] with respect to `gate` and `up`:
/// `silu'(g) = σ(g)·(1 + g·(1 − σ(g)))`.
pub fn swiglu_backward<B: Backend>(gate: Tensor<B, 2>, up: Tensor<B, 2>, grad: Tensor<B, 2>) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let s = sigmoid(gate.clone());
    let du = grad.clone() * gate.clone() * s.clone();
    let dsilu = s.clone() * ((s.neg() + 1.0) * gate + 1.0);
    (grad * up * dsilu, du)
}

/// The shapes of one attention call and how its queries are split into chunks.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    pub b: usize,
    pub t: usize,
    pub s: usize,
    pub h: usize,
    pub kv: usize,
    pub hd: usize,
    /// Query rows per chunk.
    pub chunk: usize,
}

impl Geometry {
    fn of(q: [usize; 4], k: [usize; 4], chunk_scores: usize) -> Self {
        let ([b, t, h, hd], [_, s, kv, _]) = (q, k);
        assert!(kv > 0 && h % kv == 0, "attention: {h} query heads are not a multiple of {kv} kv heads");
        assert!(s >= t, "attention: {t} queries over {s} keys (the queries are the last keys)");
        let per_row = (b * h * s).max(1);
        let mut chunk = (chunk_scores / per_row).clamp(1, t.max(1));
        if chunk > 64 {
            chunk -= chunk % 64;
        }
        Self { b, t, s, h, kv, hd, chunk }
    }

    /// Query heads per kv head.
    pub fn rep(&self) -> usize {
        self.h / self.kv
    }

    /// Each chunk's query rows and the keys it can see: a causal mask hides key
    /// `j > i + (S − T)` from query `i`, and a sliding window of `w` keys every `j ≤ i + (S − T) − w`
    /// (packed samples see less still: the mask says exactly what).
    fn chunks(&self, window: Option<usize>) -> impl Iterator<Item = (Range<usize>, Range<usize>)> + '_ {
        (0..self.t).step_by(self.chunk).map(move |t0| {
            let t1 = (t0 + self.chunk).min(self.t);
            let end = (t1 + self.s - self.t).min(self.s);
            let start = window.map_or(0, |w| (t0 + self.s - self.t + 1).saturating_sub(w)).min(end);
            (t0..t1, start..end)
        })
    }
}

/// `[B, T, H, hd]` → `[B, KV, rep, T, hd]`.
fn grouped<B: Backend>(g: &Geometry, x: Tensor<B, 4>) -> Tensor<B, 5> {
    x.reshape([g.b, g.t, g.kv, g.rep(), g.hd]).permute([0, 2, 3, 1, 4])
}

/// Rows `rows` of a grouped tensor as the stacked rows of each kv head: `[B, KV, rep·C, hd]`.
fn rows<B: Backend>(g: &Geometry, x: &Tensor<B, 5>, rows: &Range<usize>) -> Tensor<B, 4> {
    x.clone().narrow(3, rows.start, rows.len()).reshape([g.b, g.kv, g.rep() * rows.len(), g.hd])
}

/// Chunks `[B, KV, rep·C, hd]` back to `[B, T, H, hd]`.
fn ungrouped<B: Backend>(g: &Geometry, chunks: Vec<Tensor<B, 4>>) -> Tensor<B, 4> {
    let parts = chunks.into_iter().map(|c| {
        let n = c.dims()[2] / g.rep();
        c.reshape([g.b, g.kv, g.rep(), n, g.hd])
    });
    Tensor::cat(parts.collect(), 3).permute([0, 3, 1, 2, 4]).reshape([g.b, g.t, g.h, g.hd])
}

/// The mask of one chunk's rows and visible keys, broadcast over the stacked heads:
/// `[B, KV, rep·C, keys]`.
fn chunk_mask<B: Backend>(g: &Geometry, mask: &Tensor<B, 3, Bool>, rows: &Range<usize>, keys: usize) -> Tensor<B, 4, Bool> {
    let mb = mask.dims()[0];
    let c = rows.len();
    mask.clone()
        .narrow(1, rows.start, c)
        .narrow(2, 0, keys)
        .reshape([mb, 1, 1, c, keys])
        .expand([g.b, g.kv, g.rep(), c, keys])
        .reshape([g.b, g.kv, g.rep() * c, keys])
}

/// The scaled, masked scores of one chunk in f32, from the raw products `q·kᵀ`.
fn scaled_masked<B: Backend>(g: &Geometry, raw: Tensor<B, 4>, mask: &Tensor<B, 3, Bool>, rows: &Range<usize>, scale: f64) -> Tensor<B, 4> {
    let keys = raw.dims()[3];
    f32(raw).mul_scalar(scale).mask_fill(chunk_mask(g, mask, rows, keys), f32::NEG_INFINITY)
}

/// Softcapped scores `c · tanh(scale·raw / c)` of one chunk in f32 and `tanh(scale·raw / c)`.
fn capped<B: Backend>(raw: Tensor<B, 4>, scale: f64, cap: f64) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let t = f32(raw).mul_scalar(scale / cap).tanh();
    (t.clone().mul_scalar(cap), t)
}

/// [`masked_softmax_ops`] of softcapped scores (Gemma 2).
fn masked_softmax_capped<B: Backend>(g: &Geometry, raw: Tensor<B, 4>, mask: &Tensor<B, 3, Bool>, rows: &Range<usize>, scale: f64, cap: f64) -> (Tensor<B, 4>, Tensor<B, 3>) {
    let (dtype, keys) = (float_dtype(&raw), raw.dims()[3]);
    let s = capped(raw, scale, cap).0.mask_fill(chunk_mask(g, mask, rows, keys), f32::NEG_INFINITY);
    let m = s.clone().max_dim(3);
    let p = (s - m.clone()).exp();
    let l = p.clone().sum_dim(3);
    ((p / l.clone()).cast(dtype), (m + l.log()).squeeze_dim(3))
}

/// [`softmax_grad_ops`] of softcapped scores: `dS = scale · P ∘ (dP − delta) ∘ (1 − tanh²)`.
#[allow(clippy::too_many_arguments)]
fn softmax_grad_capped<B: Backend>(
    g: &Geometry,
    raw: Tensor<B, 4>,
    dp: Tensor<B, 4>,
    mask: &Tensor<B, 3, Bool>,
    rows: &Range<usize>,
    lse: Tensor<B, 3>,
    delta: Tensor<B, 3>,
    scale: f64,
    cap: f64,
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let (dtype, keys) = (float_dtype(&raw), raw.dims()[3]);
    let (s, t) = capped(raw, scale, cap);
    let p = (s.mask_fill(chunk_mask(g, mask, rows, keys), f32::NEG_INFINITY) - lse.unsqueeze_dim(3)).exp();
    let ds = (p.clone() * (f32(dp) - delta.unsqueeze_dim(3)) * (t.powi_scalar(2).neg() + 1.0)).mul_scalar(scale);
    (p.cast(dtype), ds.cast(dtype))
}

/// The mask's columns `keys` (the whole mask when they are all of it).
fn key_columns<B: Backend>(mask: &Tensor<B, 3, Bool>, keys: &Range<usize>) -> Tensor<B, 3, Bool> {
    if keys.start == 0 {
        mask.clone()
    } else {
        mask.clone().narrow(2, keys.start, keys.len())
    }
}

/// [`ScoreRows::masked_softmax`] from tensor ops.
pub fn masked_softmax_ops<B: Backend>(g: &Geometry, raw: Tensor<B, 4>, mask: &Tensor<B, 3, Bool>, rows: &Range<usize>, scale: f64) -> (Tensor<B, 4>, Tensor<B, 3>) {
    let dtype = float_dtype(&raw);
    let s = scaled_masked(g, raw, mask, rows, scale);
    let m = s.clone().max_dim(3);
    let p = (s - m.clone()).exp();
    let l = p.clone().sum_dim(3);
    ((p / l.clone()).cast(dtype), (m + l.log()).squeeze_dim(3))
}

/// [`ScoreRows::softmax_grad`] from tensor ops.
#[allow(clippy::too_many_arguments)]
pub fn softmax_grad_ops<B: Backend>(
    g: &Geometry,
    raw: Tensor<B, 4>,
    dp: Tensor<B, 4>,
    mask: &Tensor<B, 3, Bool>,
    rows: &Range<usize>,
    lse: Tensor<B, 3>,
    delta: Tensor<B, 3>,
    scale: f64,
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let dtype = float_dtype(&raw);
    let p = (scaled_masked(g, raw, mask, rows, scale) - lse.unsqueeze_dim(3)).exp();
    let ds = (p.clone() * (f32(dp) - delta.unsqueeze_dim(3))).mul_scalar(scale);
    (p.cast(dtype), ds.cast(dtype))
}

/// Under burn's fusion (`cuda-tuned`) the row kernels do not run: the tensor ops, counted as
/// fallbacks.
#[cfg(feature = "cuda-tuned")]
macro_rules! counted_score_rows {
    () => {
        fn masked_softmax(g: &Geometry, raw: Tensor<Self, 4>, mask: &Tensor<Self, 3, Bool>, rows: &Range<usize>, scale: f64) -> (Tensor<Self, 4>, Tensor<Self, 3>) {
            super::kernel_use::MASKED_SOFTMAX.fallback();
            masked_softmax_ops(g, raw, mask, rows, scale)
        }
        #[allow(clippy::too_many_arguments)]
        fn softmax_grad(g: &Geometry, raw: Tensor<Self, 4>, dp: Tensor<Self, 4>, mask: &Tensor<Self, 3, Bool>, rows: &Range<usize>, lse: Tensor<Self, 3>, delta: Tensor<Self, 3>, scale: f64) -> (Tensor<Self, 4>, Tensor<Self, 4>) {
            super::kernel_use::SOFTMAX_GRAD.fallback();
            softmax_grad_ops(g, raw, dp, mask, rows, lse, delta, scale)
        }
    };
}

#[cfg(feature = "cuda-tuned")]
impl ScoreRows for crate::backend::CudaF32 {
    counted_score_rows!();
}

#[cfg(feature = "cuda-tuned")]
impl ScoreRows for crate::backend::CudaBf16 {
    counted_score_rows!();
}

/// The compositions of this file implementations as a backend's `FusedOps`: one node under autodiff, keeping
/// only the inputs (and attention's output and log-sum-exp).
#[cfg(any(feature = "cuda", feature = "wgpu"))]
macro_rules! composed_fused_ops {
    () => {
        fn rms_norm_fused(x: Tensor<Self, 2>, w: Tensor<Self, 1>, eps: f64) -> Option<Tensor<Self, 2>> {
            Some(chunked::rms_norm(x, w, eps))
        }
        fn rms_norm_backward(x: Tensor<Self, 2>, w: Tensor<Self, 1>, eps: f64, grad: Tensor<Self, 2>) -> Option<Tensor<Self, 2>> {
            Some(chunked::rms_norm_backward(x, w, eps, grad))
        }
        fn rope_fused(x: Tensor<Self, 4>, cos: Tensor<Self, 3>, sin: Tensor<Self, 3>, transpose: bool) -> Option<Tensor<Self, 4>> {
            Some(chunked::rope(x, cos, sin, transpose))
        }
        fn swiglu_fused(gate: Tensor<Self, 2>, up: Tensor<Self, 2>) -> Option<Tensor<Self, 2>> {
            Some(chunked::swiglu(gate, up))
        }
        fn lora_linear_fused(x: Tensor<Self, 2>, x_lora: Option<Tensor<Self, 2>>, w: Tensor<Self, 2>, a: Tensor<Self, 2>, b: Tensor<Self, 2>, scale: f64) -> Option<(Tensor<Self, 2>, Tensor<Self, 2>)> {
            Some(chunked::lora_linear(x, x_lora, w, a, b, scale))
        }
        #[allow(clippy::type_complexity)]
        fn lora_linear_backward(
            x: Tensor<Self, 2>,
            x_lora: Option<Tensor<Self, 2>>,
            w: Tensor<Self, 2>,
            a: Tensor<Self, 2>,
            b: Tensor<Self, 2>,
            t: Tensor<Self, 2>,
            scale: f64,
            grad: Tensor<Self, 2>,
        ) -> Option<(Tensor<Self, 2>, Option<Tensor<Self, 2>>, Tensor<Self, 2>, Tensor<Self, 2>)> {
            Some(chunked::lora_linear_backward(x, x_lora, w, a, b, t, scale, grad))
        }
        fn swiglu_backward(gate: Tensor<Self, 2>, up: Tensor<Self, 2>, grad: Tensor<Self, 2>) -> Option<(Tensor<Self, 2>, Tensor<Self, 2>)> {
            Some(chunked::swiglu_backward(gate, up, grad))
        }
        fn attention_fused(q: Tensor<Self, 4>, k: Tensor<Self, 4>, v: Tensor<Self, 4>, mask: Tensor<Self, 3, Bool>, s: Scores) -> Option<(Tensor<Self, 4>, Tensor<Self, 3>)> {
            Some(chunked::attention(q, k, v, mask, s, chunked::CHUNK_SCORES))
        }
        fn attention_backward(
            q: Tensor<Self, 4>,
            k: Tensor<Self, 4>,
            v: Tensor<Self, 4>,
            o: Tensor<Self, 4>,
            lse: Tensor<Self, 3>,
            mask: Tensor<Self, 3, Bool>,
            s: Scores,
            grad: Tensor<Self, 4>,
        ) -> Option<(Tensor<Self, 4>, Tensor<Self, 4>, Tensor<Self, 4>)> {
            Some(chunked::attention_backward(q, k, v, o, lse, mask, s, grad, chunked::CHUNK_SCORES))
        }
    };
}

// burn's CubeCL backends (CUDA; wgpu in tests): the compositions of this file.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
impl<R: burn_cubecl::CubeRuntime, F: burn_cubecl::FloatElement, I: burn_cubecl::IntElement, BT: burn_cubecl::BoolElement> FusedOps
    for burn_cubecl::CubeBackend<R, F, I, BT>
{
    composed_fused_ops!();
}

// Under burn's fusion (`cuda-tuned`) the CUDA types are fusion wrappers.
#[cfg(feature = "cuda-tuned")]
impl FusedOps for crate::backend::CudaF32 {
    composed_fused_ops!();
}

#[cfg(feature = "cuda-tuned")]
impl FusedOps for crate::backend::CudaBf16 {
    composed_fused_ops!();
}


// With burn's fusion (`cuda-tuned`) the NF4 dequantization runs the tensor-op default (counted as
// the kernel's fallback).
#[cfg(feature = "cuda-tuned")]
impl Nf4Linear for crate::backend::CudaF32 {
    fn nf4_dequantize(w: &crate::quant::nf4_weight::Nf4Weight<Self>, dtype: FloatDType) -> Tensor<Self, 2> {
        super::kernel_use::NF4_DEQUANTIZE.fallback();
        w.dequantize().cast(dtype)
    }
}

#[cfg(feature = "cuda-tuned")]
impl Nf4Linear for crate::backend::CudaBf16 {
    fn nf4_dequantize(w: &crate::quant::nf4_weight::Nf4Weight<Self>, dtype: FloatDType) -> Tensor<Self, 2> {
        super::kernel_use::NF4_DEQUANTIZE.fallback();
        w.dequantize().cast(dtype)
    }
}

/// Softmax attention of `q [B, T, H, hd]` over `k`, `v` `[B, S, KV, hd]` under
/// `mask [1 | B, T, S]` (true = not attended; a causal mask or a subset of one), in chunks of at
/// most `chunk_scores` score elements. Scores are softcapped to `c · tanh(s / c)` with `softcap`
/// (Gemma 2); with `window` (the mask is a sliding window of that many keys) each chunk reads
/// only the keys inside its rows' windows: O(T·window). Returns the output `[B, T, H, hd]` and
/// the log-sum-exp `[B, H, T]` in f32.
pub fn attention<B: ScoreRows>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, mask: Tensor<B, 3, Bool>, sc: Scores, chunk_scores: usize) -> (Tensor<B, 4>, Tensor<B, 3>) {
    let Scores { scale, softcap, window } = sc;
    let g = Geometry::of(q.dims(), k.dims(), chunk_scores);
    let qg = grouped(&g, q);
    let (k, v) = (k.swap_dims(1, 2), v.swap_dims(1, 2));
    let (mut out, mut lse) = (Vec::new(), Vec::new());
    for (rows_c, keys) in g.chunks(window) {
        let kc = k.clone().narrow(2, keys.start, keys.len());
        let vc = v.clone().narrow(2, keys.start, keys.len());
        let raw = rows(&g, &qg, &rows_c).matmul(kc.swap_dims(2, 3));
        let m = key_columns(&mask, &keys);
        let (p, l) = match softcap {
            None => B::masked_softmax(&g, raw, &m, &rows_c, scale),
            Some(c) => masked_softmax_capped(&g, raw, &m, &rows_c, scale, c),
        };
        out.push(p.matmul(vc));
        lse.push(l.reshape([g.b, g.kv, g.rep(), rows_c.len()]));
    }
    (ungrouped(&g, out), Tensor::cat(lse, 3).reshape([g.b, g.h, g.t]))
}

/// Gradients of [`attention`] with respect to `q`, `k` and `v`, from its output `o` and
/// log-sum-exp: per chunk `P = exp(s − lse)`, `dV += Pᵀ·dO`, `dS = P ∘ (dO·Vᵀ − rowsum(dO ∘ O))`,
/// `dQ = scale · dS·K`, `dK += scale · dSᵀ·Q`; dK and dV accumulate in f32.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward<B: ScoreRows>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    o: Tensor<B, 4>,
    lse: Tensor<B, 3>,
    mask: Tensor<B, 3, Bool>,
    sc: Scores,
    grad: Tensor<B, 4>,
    chunk_scores: usize,
) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
    let Scores { scale, softcap, window } = sc;
    let g = Geometry::of(q.dims(), k.dims(), chunk_scores);
    let dtype = float_dtype(&q);
    let device = q.device();
    let (qg, og, dog) = (grouped(&g, q), grouped(&g, o), grouped(&g, grad));
    let lse = f32(lse).reshape([g.b, g.kv, g.rep(), g.t]);
    let (k, v) = (k.swap_dims(1, 2), v.swap_dims(1, 2));
    let zeros = || Tensor::<B, 4>::zeros([g.b, g.kv, g.s, g.hd], (&device, burn::tensor::DType::F32));
    let (mut dk, mut dv) = (zeros(), zeros());
    let mut dq = Vec::new();
    for (rows_c, keys) in g.chunks(window) {
        let n = g.rep() * rows_c.len();
        let (kc, vc) = (k.clone().narrow(2, keys.start, keys.len()), v.clone().narrow(2, keys.start, keys.len()));
        let (qc, oc, doc) = (rows(&g, &qg, &rows_c), rows(&g, &og, &rows_c), rows(&g, &dog, &rows_c));
        let lc = lse.clone().narrow(3, rows_c.start, rows_c.len()).reshape([g.b, g.kv, n]);
        let delta = (f32(doc.clone()) * f32(oc)).sum_dim(3).squeeze_dim(3);
        let raw = qc.clone().matmul(kc.clone().swap_dims(2, 3));
        let dp = doc.clone().matmul(vc.swap_dims(2, 3));
        let m = key_columns(&mask, &keys);
        let (p, ds) = match softcap {
            None => B::softmax_grad(&g, raw, dp, &m, &rows_c, lc, delta, scale),
            Some(c) => softmax_grad_capped(&g, raw, dp, &m, &rows_c, lc, delta, scale, c),
        };
        let dv_c = p.swap_dims(2, 3).matmul(doc);
        dq.push(ds.clone().matmul(kc));
        let dk_c = ds.swap_dims(2, 3).matmul(qc);
        let at = [0..g.b, 0..g.kv, keys.clone(), 0..g.hd];
        dk = dk.clone().slice_assign(at.clone(), dk.slice(at.clone()) + f32(dk_c));
        dv = dv.clone().slice_assign(at.clone(), dv.slice(at) + f32(dv_c));
    }
    let back = |t: Tensor<B, 4>| t.cast(dtype).swap_dims(1, 2);
    (ungrouped(&g, dq), back(dk), back(dv))
}

/// `log softmax(logits)[target]` of each row of `logits [N, V]` (`targets [N]`), with the
/// softmax statistics in f32 whatever the logits' dtype (as transformers upcasts the logits for
/// its loss), in chunks of rows holding at most `chunk` f32 elements. Returns the log-probs and
/// each row's log-sum-exp, both `[N]` f32.
pub fn token_logprobs<B: Backend>(logits: Tensor<B, 2>, targets: Tensor<B, 1, Int>, chunk: usize) -> (Tensor<B, 1>, Tensor<B, 1>) {
    let [n, v] = logits.dims();
    if n == 0 {
        let empty = || Tensor::zeros([0], (&logits.device(), burn::tensor::DType::F32));
        return (empty(), empty());
    }
    let rows = (chunk / v.max(1)).clamp(1, n);
    let (mut logp, mut lse) = (Vec::new(), Vec::new());
    for r0 in (0..n).step_by(rows) {
        let c = rows.min(n - r0);
        let x = f32(logits.clone().narrow(0, r0, c));
        let m = x.clone().max_dim(1);
        let l = m.clone() + (x.clone() - m).exp().sum_dim(1).log();
        logp.push((x.gather(1, targets.clone().narrow(0, r0, c).reshape([c, 1])) - l.clone()).reshape([c]));
        lse.push(l.reshape([c]));
    }
    (Tensor::cat(logp, 0), Tensor::cat(lse, 0))
}

/// The gradient of [`token_logprobs`] with respect to the logits, given the gradient `grad [N]`
/// of the log-probs: `grad · (onehot(target) − softmax(logits))`, in the logits' dtype.
pub fn token_logprobs_backward<B: Backend>(logits: Tensor<B, 2>, targets: Tensor<B, 1, Int>, lse: Tensor<B, 1>, grad: Tensor<B, 1>, chunk: usize) -> Tensor<B, 2> {
    let [n, v] = logits.dims();
    let dtype = float_dtype(&logits);
    if n == 0 {
        return logits;
    }
    let rows = (chunk / v.max(1)).clamp(1, n);
    let (lse, grad) = (f32(lse), f32(grad));
    let mut parts = Vec::new();
    for r0 in (0..n).step_by(rows) {
        let c = rows.min(n - r0);
        let x = f32(logits.clone().narrow(0, r0, c));
        let p = (x - lse.clone().narrow(0, r0, c).reshape([c, 1])).exp();
        let g = grad.clone().narrow(0, r0, c).reshape([c, 1]);
        let t = targets.clone().narrow(0, r0, c).reshape([c, 1]);
        let d = p.neg().scatter(1, t, Tensor::ones([c, 1], (&g.device(), burn::tensor::DType::F32)), burn::tensor::IndexingUpdateOp::Add);
        parts.push((d * g).cast(dtype));
    }
    Tensor::cat(parts, 0)
}

#[cfg(test)]
mod tests {
    //! The compositions on the CPU backend (their forward and analytic backward, no autodiff)
    //! against the reference compositions' values and autodiff gradients.
    use super::*;
    use crate::backend::Cpu;
    use crate::ops::{reference, tests::packed_mask};
    use burn::backend::Autodiff;
    use burn::tensor::{DType, Distribution, TensorData};

    type Ad = Autodiff<Cpu>;

    fn worst<const D: usize>(a: Tensor<Cpu, D>, b: Tensor<Cpu, D>) -> f32 {
        let (a, b): (Vec<f32>, Vec<f32>) = (f32(a).into_data().to_vec().unwrap(), f32(b).into_data().to_vec().unwrap());
        assert_eq!(a.len(), b.len());
        a.iter().zip(&b).map(|(x, y)| (x - y).abs() / y.abs().max(1.0)).fold(0f32, f32::max)
    }

    fn assert_close<const D: usize>(a: Tensor<Cpu, D>, b: Tensor<Cpu, D>, tol: f32, what: &str) {
        let w = worst(a, b);
        assert!(w <= tol, "{what}: max difference {w}");
    }

    fn rand<const D: usize>(shape: [usize; D]) -> Tensor<Cpu, D> {
        Tensor::random(shape, Distribution::Normal(0.0, 1.0), &Default::default())
    }

    /// The reference's value, the gradients of `sum(y · c)` with respect to `inputs`, and `c` (a
    /// fixed pattern, so that every output element weighs differently).
    fn reference_grads<const D: usize, const E: usize>(inputs: &[Tensor<Cpu, D>], f: impl Fn(Vec<Tensor<Ad, D>>) -> Tensor<Ad, E>) -> (Tensor<Cpu, E>, Vec<Tensor<Cpu, D>>, Tensor<Cpu, E>) {
        let xs: Vec<Tensor<Ad, D>> = inputs.iter().map(|x| Tensor::from_inner(x.clone()).require_grad()).collect();
        let y = f(xs.clone());
        let n = y.shape().num_elements();
        let c = Tensor::<Cpu, E>::from_data(TensorData::new((0..n).map(|i| ((i * 37 % 11) as f32 - 5.0) / 7.0).collect::<Vec<_>>(), y.dims()), &Default::default());
        let grads = (y.clone() * Tensor::from_inner(c.clone())).sum().backward();
        let g = xs.iter().map(|x| x.grad(&grads).expect("gradient")).collect();
        (y.inner(), g, c)
    }

    fn check_attention(q: Tensor<Cpu, 4>, k: Tensor<Cpu, 4>, v: Tensor<Cpu, 4>, mask: Tensor<Cpu, 3, Bool>, what: &str) {
        check_attention_ext(q, k, v, mask, None, None, what)
    }

    /// The chunked attention (softcapped, windowed) against the reference's values and autodiff
    /// gradients and the CPU kernel's log-sum-exp, at several chunk sizes.
    fn check_attention_ext(q: Tensor<Cpu, 4>, k: Tensor<Cpu, 4>, v: Tensor<Cpu, 4>, mask: Tensor<Cpu, 3, Bool>, softcap: Option<f64>, window: Option<usize>, what: &str) {
        let scale = 0.35;
        let m = Tensor::<Ad, 3, Bool>::from_inner(mask.clone());
        let (y, g, c) = reference_grads(&[q.clone(), k.clone(), v.clone()], |x| reference::attention_softcap(x[0].clone(), x[1].clone(), x[2].clone(), m.clone(), scale, softcap));
        let sc = Scores { scale, softcap, window };
        let (_, lse_kernel) = Cpu::attention_fused(q.clone(), k.clone(), v.clone(), mask.clone(), sc).expect("CPU kernel");
        let [b, t, h, _] = q.dims();
        let s = k.dims()[1];
        // One query row per chunk, two, and everything in one chunk.
        for rows in [1, 2, t] {
            let budget = rows * b * h * s;
            let what = format!("{what}, {rows} rows per chunk");
            let (o, lse) = attention(q.clone(), k.clone(), v.clone(), mask.clone(), sc, budget);
            assert_close(o.clone(), y.clone(), 2e-5, &format!("{what}: output"));
            assert_close(lse.clone(), lse_kernel.clone(), 2e-5, &format!("{what}: log-sum-exp"));
            let (dq, dk, dv) = attention_backward(q.clone(), k.clone(), v.clone(), o, lse, mask.clone(), sc, c.clone(), budget);
            for (name, a, r) in [("dq", dq, &g[0]), ("dk", dk, &g[1]), ("dv", dv, &g[2])] {
                assert_close(a, r.clone(), 2e-5, &format!("{what}: {name}"));
            }
        }
    }

    #[test]
    fn chunked_attention_and_its_backward_match_the_reference() {
        let dev = Default::default();
        // (batch, queries, keys, heads, kv heads): causal, causal after 3 cached positions, one
        // query over a cache, grouped and plain multi-head.
        for (b, t, s, h, kv) in [(2, 6, 6, 6, 2), (2, 5, 8, 4, 4), (1, 1, 9, 3, 1), (3, 4, 4, 2, 1)] {
            let mask = Tensor::<Cpu, 2, Bool>::tril_mask([t, s], (s - t) as i64, &dev).reshape([1, t, s]);
            check_attention(rand([b, t, h, 8]), rand([b, s, kv, 8]), rand([b, s, kv, 8]), mask, &format!("b{b} t{t} s{s} h{h} kv{kv}"));
        }
        let mask = packed_mask::<Cpu>(6, &[vec![2, 3, 1], vec![6]]);
        check_attention(rand([2, 6, 4, 8]), rand([2, 6, 2, 8]), rand([2, 6, 2, 8]), mask, "packed mask");
    }

    #[test]
    fn chunked_attention_skips_keys_outside_a_sliding_window_and_softcaps() {
        // A window of 3 keys over 9 queries after 2 cached positions: chunks of one or two rows
        // start past key 0 (their first keys are outside every row's window), and Gemma 2's
        // softcapped scores, forward and backward.
        let dev = Default::default();
        let (t, s, w) = (9, 11, 3);
        let mut masked = vec![true; t * s];
        for q in 0..t {
            let end = s - t + q + 1;
            masked[q * s..][end - w..end].fill(false);
        }
        let mask = Tensor::<Cpu, 3, Bool>::from_data(TensorData::new(masked, [1, t, s]), &dev);
        for softcap in [None, Some(1.5)] {
            let what = format!("window {w}, softcap {softcap:?}");
            check_attention_ext(rand([2, t, 4, 8]), rand([2, s, 2, 8]), rand([2, s, 2, 8]), mask.clone(), softcap, Some(w), &what);
        }
        // Packed samples under a window: the mask hides more than the window does.
        let mut masked = vec![true; 2 * 8 * 8];
        for (row, segs) in [vec![5usize, 3], vec![8]].iter().enumerate() {
            let mut start = 0;
            for &len in segs {
                for q in 0..len {
                    let lo = (q + 1).saturating_sub(w);
                    masked[(row * 8 + start + q) * 8..][start + lo..start + q + 1].fill(false);
                }
                start += len;
            }
        }
        let mask = Tensor::<Cpu, 3, Bool>::from_data(TensorData::new(masked, [2, 8, 8]), &dev);
        check_attention_ext(rand([2, 8, 4, 8]), rand([2, 8, 2, 8]), rand([2, 8, 2, 8]), mask, Some(2.0), Some(w), "packed, window, softcap");
    }

    #[test]
    fn chunked_attention_in_bf16_stays_within_bf16_rounding_of_f32() {
        // The casts between the compute dtype and the f32 statistics run (the GPU computes in
        // bf16; the other tests are f32).
        let dev = Default::default();
        let (b, t, h, kv, hd) = (2, 9, 4, 2, 16);
        let (q, k, v, c) = (rand([b, t, h, hd]), rand([b, t, kv, hd]), rand([b, t, kv, hd]), rand([b, t, h, hd]));
        let mask = Tensor::<Cpu, 2, Bool>::tril_mask([t, t], 0, &dev).reshape([1, t, t]);
        let bf = |x: &Tensor<Cpu, 4>| x.clone().cast(FloatDType::BF16);
        let budget = 4 * b * h * t;
        let (o, lse) = attention(q.clone(), k.clone(), v.clone(), mask.clone(), Scores::scaled(0.25), budget);
        let (o16, lse16) = attention(bf(&q), bf(&k), bf(&v), mask.clone(), Scores::scaled(0.25), budget);
        assert_eq!((o16.dtype(), lse16.dtype()), (DType::BF16, DType::F32));
        let grads = attention_backward(q.clone(), k.clone(), v.clone(), o, lse.clone(), mask.clone(), Scores::scaled(0.25), c.clone(), budget);
        let grads16 = attention_backward(bf(&q), bf(&k), bf(&v), o16.clone(), lse16.clone(), mask, Scores::scaled(0.25), bf(&c), budget);
        // bf16 keeps 8 significant bits: inputs and products each round at ~4e-3 relative.
        assert_close(lse16, lse, 2e-2, "bf16 log-sum-exp");
        for (name, a, r) in [("dq", grads16.0, grads.0), ("dk", grads16.1, grads.1), ("dv", grads16.2, grads.2)] {
            assert_eq!(a.dtype(), DType::BF16, "{name}");
            assert_close(a, r, 6e-2, &format!("bf16 {name}"));
        }
    }

    #[test]
    fn token_logprobs_and_their_gradient_match_log_softmax_in_f32() {
        let dev = Default::default();
        let (n, v) = (7, 50);
        let logits = rand([n, v]) * 3.0;
        let ids: Vec<i64> = (0..n).map(|i| (i * 13 % v) as i64).collect();
        let targets = Tensor::<Cpu, 1, Int>::from_data(TensorData::new(ids.clone(), [n]), &dev);
        let targets_ad = || Tensor::<Ad, 1, Int>::from_data(TensorData::new(ids.clone(), [n]), &dev);
        let (y, g, c) = reference_grads(std::slice::from_ref(&logits), |x| reference::token_logprobs(x[0].clone(), targets_ad()));
        for rows in [1, 3, n] {
            let (lp, lse) = token_logprobs(logits.clone(), targets.clone(), rows * v);
            assert_close(lp, y.clone(), 2e-6, &format!("{rows} rows per chunk: log-probs"));
            let d = token_logprobs_backward(logits.clone(), targets.clone(), lse, c.clone(), rows * v);
            assert_close(d, g[0].clone(), 2e-6, &format!("{rows} rows per chunk: gradient"));
        }
        // The autodiff node that training runs.
        let x = Tensor::<Ad, 2>::from_inner(logits.clone()).require_grad();
        let grads = (crate::ops::token_logprobs(x.clone(), targets_ad()) * Tensor::from_inner(c)).sum().backward();
        assert_close(x.grad(&grads).unwrap(), g[0].clone(), 2e-6, "autodiff node: gradient");
        // bf16 logits: f32 log-probs of the (rounded) values, not a bf16 softmax.
        let l16 = logits.cast(FloatDType::BF16);
        let (lp16, _) = token_logprobs(l16.clone(), targets.clone(), CHUNK_SCORES);
        assert_eq!(lp16.dtype(), DType::F32);
        let (lp_up, _) = token_logprobs(l16.cast(FloatDType::F32), targets, CHUNK_SCORES);
        assert_close(lp16, lp_up, 1e-7, "bf16 logits");
    }

    #[test]
    fn rms_norm_swiglu_and_rope_with_their_backward_match_the_reference() {
        let dev = Default::default();
        let w = Tensor::<Cpu, 1>::random([24], Distribution::Normal(1.0, 0.5), &dev);
        let wa = Tensor::<Ad, 1>::from_inner(w.clone());
        let x = rand([10, 24]);
        let (y, g, c) = reference_grads(std::slice::from_ref(&x), |x| reference::rms_norm(x[0].clone(), wa.clone(), 1e-5));
        assert_close(rms_norm(x.clone(), w.clone(), 1e-5), y, 2e-5, "rms_norm");
        assert_close(rms_norm_backward(x, w, 1e-5, c), g[0].clone(), 2e-5, "rms_norm backward");

        let (gate, up) = (rand([10, 24]), rand([10, 24]));
        let (y, g, c) = reference_grads(&[gate.clone(), up.clone()], |x| silu(x[0].clone()) * x[1].clone());
        assert_close(swiglu(gate.clone(), up.clone()), y, 2e-5, "swiglu");
        let (dg, du) = swiglu_backward(gate, up, c);
        assert_close(dg, g[0].clone(), 2e-5, "swiglu: gate gradient");
        assert_close(du, g[1].clone(), 2e-5, "swiglu: up gradient");

        for tb in [1, 2] {
            let cos = Tensor::<Cpu, 3>::random([tb, 7, 8], Distribution::Uniform(-1.0, 1.0), &dev);
            let sin = Tensor::<Cpu, 3>::random([tb, 7, 8], Distribution::Uniform(-1.0, 1.0), &dev);
            let (ca, sa) = (Tensor::<Ad, 3>::from_inner(cos.clone()), Tensor::from_inner(sin.clone()));
            let x = rand([2, 7, 3, 8]);
            let (y, g, c) = reference_grads(std::slice::from_ref(&x), |x| reference::rope(x[0].clone(), ca.clone(), sa.clone()));
            assert_close(rope(x, cos.clone(), sin.clone(), false), y, 2e-5, "rope");
            assert_close(rope(c, cos, sin, true), g[0].clone(), 2e-5, "rope transposed (the backward)");
        }
    }
}
