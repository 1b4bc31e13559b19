//! The decoder's fused operations: RMSNorm, rotary embedding, SwiGLU and attention, each one
//! operation with its own backward step instead of a chain of small tensor ops (each of which
//! allocates, walks strided views and records an autodiff node).
//!
//! Every backend extension lives here, one file per backend: the traits ([`FusedOps`],
//! [`ScoreRows`], [`Nf4Linear`]) and what the decoder calls (the functions below), the CPU
//! kernels (`cpu.rs`), the compositions from tensor ops that the CubeCL backends run as single
//! autodiff nodes (`chunked.rs`), the CubeCL kernel launches (`cubecl.rs`), every backward node
//! (`autodiff.rs`), and the plain tensor-op maths they are all tested against (`reference.rs`).
//!
//! Attention works on the projections' own layout `[B, T, heads, head_dim]` (no head transpose,
//! no copy of K/V per query head for grouped-query attention) and keeps only the softmax's
//! log-sum-exp for the backward, which recomputes the probabilities (as FlashAttention and
//! PyTorch's SDPA do): memory per layer is O(T), not O(T²).

mod autodiff;
pub mod chunked;
mod cpu;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
mod cubecl;
pub mod kernel_use;
pub mod reference;

use std::ops::Range;

use burn::prelude::*;
use burn::tensor::activation::silu;
use burn::tensor::{Bool, FloatDType};

use crate::quant::nf4_weight::Nf4Weight;
pub use chunked::Geometry;

/// A backend that runs the decoder: the NF4 linear map and the fused decoder operations, as
/// kernels of its own or composed from tensor ops, and its uploads' host copies released on
/// demand.
pub trait Kernels: Nf4Linear + FusedOps + Uploads {}

impl<T: Nf4Linear + FusedOps + Uploads> Kernels for T {}

/// Host memory held by uploads. burn's CubeCL runtimes copy each tensor created from host data
/// and keep that copy until a later flush (cubecl-cuda: until a kernel launch after 64 uploads or
/// 64 MiB, and one flush more; wgpu: until 64 writes), so loading a model without kernels in
/// between would hold a host copy of every weight. The loader calls [`Uploads::release_uploads`]
/// after each weight: the host then holds about one tensor at a time.
pub trait Uploads: Backend {
    /// Frees the host copies of every upload made so far on `device`, once the device has read
    /// them. A no-op where uploads keep no copy (the CPU).
    fn release_uploads(_device: &Self::Device) {}
}

/// A backend ft trains on: autodiff over an inner backend, both able to run the decoder (the
/// inner one runs evaluation without recording a graph).
pub trait TrainBackend: burn::tensor::backend::AutodiffBackend<InnerBackend: Kernels> + Kernels {}

impl<T: burn::tensor::backend::AutodiffBackend<InnerBackend: Kernels> + Kernels> TrainBackend for T {}

/// The QLoRA linear map `x · Wᵀ` with `W` held in NF4: the weight is dequantized for the forward
/// and again in the backward, never kept between them, so training holds only the 4-bit codes
/// (as bitsandbytes' `MatMul4Bit` does). Only the input gradient exists: `W` is frozen. Plain
/// backends compute `x · dequant(W)ᵀ`; the autodiff backend registers its own backward step
/// (`autodiff.rs`) instead of letting the matmul keep `W` for it.
pub trait Nf4Linear: Backend {
    /// `x [rows, in] · Wᵀ` for the NF4 weight `W [out, in]` → `[rows, out]`, in `x`'s dtype.
    fn nf4_linear(x: Tensor<Self, 2>, w: &Nf4Weight<Self>) -> Tensor<Self, 2> {
        let wt = Self::nf4_dequantize(w, x.dtype().into());
        x.matmul(wt.transpose())
    }

    /// The weight `[out, in]` in `dtype`: each value the f32 product `code[q] · absmax` rounded
    /// once (the tensor-op reference by default; the CPU kernel in `cpu.rs`, the CubeCL kernel in
    /// `cubecl.rs`).
    fn nf4_dequantize(w: &Nf4Weight<Self>, dtype: FloatDType) -> Tensor<Self, 2> {
        w.dequantize().cast(dtype)
    }
}

/// Operations a backend may run as single kernels. Each method returns `None` where the backend
/// has no kernel (the default); the functions of this module then compose the same maths from
/// burn tensor ops. A backend with a forward kernel has the matching backward kernel.
pub trait FusedOps: Backend {
    /// `x [N, dim]`, `w [dim]` → `w · x / sqrt(mean(x²) + eps)`
    fn rms_norm_fused(_x: Tensor<Self, 2>, _w: Tensor<Self, 1>, _eps: f64) -> Option<Tensor<Self, 2>> {
        None
    }
    /// Gradient with respect to `x` (the weight is frozen).
    fn rms_norm_backward(_x: Tensor<Self, 2>, _w: Tensor<Self, 1>, _eps: f64, _grad: Tensor<Self, 2>) -> Option<Tensor<Self, 2>> {
        None
    }

    /// Rotate-half rotary embedding of `x [B, T, H, hd]` with `cos`, `sin` `[1 | B, T, hd]`.
    /// With `transpose`, the transposed linear map (the backward).
    fn rope_fused(_x: Tensor<Self, 4>, _cos: Tensor<Self, 3>, _sin: Tensor<Self, 3>, _transpose: bool) -> Option<Tensor<Self, 4>> {
        None
    }

    /// `silu(gate) · up`, both `[N, I]`.
    fn swiglu_fused(_gate: Tensor<Self, 2>, _up: Tensor<Self, 2>) -> Option<Tensor<Self, 2>> {
        None
    }
    /// Gradients with respect to `gate` and `up`.
    fn swiglu_backward(_gate: Tensor<Self, 2>, _up: Tensor<Self, 2>, _grad: Tensor<Self, 2>) -> Option<(Tensor<Self, 2>, Tensor<Self, 2>)> {
        None
    }

    /// `gelu_tanh(gate) · up` (Gemma's GeGLU), both `[N, I]`.
    fn geglu_fused(_gate: Tensor<Self, 2>, _up: Tensor<Self, 2>) -> Option<Tensor<Self, 2>> {
        None
    }
    /// Gradients with respect to `gate` and `up`.
    fn geglu_backward(_gate: Tensor<Self, 2>, _up: Tensor<Self, 2>, _grad: Tensor<Self, 2>) -> Option<(Tensor<Self, 2>, Tensor<Self, 2>)> {
        None
    }

    /// `x·W + (s·(x'·A))·B` for a frozen `W [in, out]` and a LoRA adapter `A [in, r]`,
    /// `B [r, out]`, where `x'` is the adapter's input (`x` after dropout; `None` = `x`). Also
    /// returns `t = s·(x'·A)` `[N, r]` for the backward.
    fn lora_linear_fused(
        _x: Tensor<Self, 2>,
        _x_lora: Option<Tensor<Self, 2>>,
        _w: Tensor<Self, 2>,
        _a: Tensor<Self, 2>,
        _b: Tensor<Self, 2>,
        _scale: f64,
    ) -> Option<(Tensor<Self, 2>, Tensor<Self, 2>)> {
        None
    }
    /// Gradients with respect to `x`, `x'` (when given), `A` and `B`. Without `x'`, the adapter's
    /// input gradient is already added into the one for `x`.
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn lora_linear_backward(
        _x: Tensor<Self, 2>,
        _x_lora: Option<Tensor<Self, 2>>,
        _w: Tensor<Self, 2>,
        _a: Tensor<Self, 2>,
        _b: Tensor<Self, 2>,
        _t: Tensor<Self, 2>,
        _scale: f64,
        _grad: Tensor<Self, 2>,
    ) -> Option<(Tensor<Self, 2>, Option<Tensor<Self, 2>>, Tensor<Self, 2>, Tensor<Self, 2>)> {
        None
    }

    /// `log softmax(logits)[target]` of each row of `logits [N, V]`, `targets [N]`, and each
    /// row's log-sum-exp, both `[N]` in f32. Every backend runs the [`chunked`] composition unless it
    /// has a kernel.
    fn token_logprobs_fused(logits: Tensor<Self, 2>, targets: Tensor<Self, 1, Int>) -> Option<(Tensor<Self, 1>, Tensor<Self, 1>)> {
        Some(chunked::token_logprobs(logits, targets, chunked::CHUNK_SCORES))
    }
    /// Gradient with respect to the logits, given the log-probs' gradient `grad [N]`.
    fn token_logprobs_backward(logits: Tensor<Self, 2>, targets: Tensor<Self, 1, Int>, lse: Tensor<Self, 1>, grad: Tensor<Self, 1>) -> Option<Tensor<Self, 2>> {
        Some(chunked::token_logprobs_backward(logits, targets, lse, grad, chunked::CHUNK_SCORES))
    }

    /// Softmax attention of `q [B, T, H, hd]` over `k`, `v` `[B, S, KV, hd]` (H a multiple of
    /// KV; query head h reads kv head h / (H / KV)), `mask [1 | B, T, S]` true = not attended,
    /// scores as `s` says (scale, Gemma 2's softcap, and a sliding window the mask already holds,
    /// which lets a backend skip the keys outside it). Returns the output `[B, T, H, hd]` and the
    /// softmax's log-sum-exp `[B, H, T]`.
    fn attention_fused(_q: Tensor<Self, 4>, _k: Tensor<Self, 4>, _v: Tensor<Self, 4>, _mask: Tensor<Self, 3, Bool>, _s: Scores) -> Option<(Tensor<Self, 4>, Tensor<Self, 3>)> {
        None
    }
    /// Gradients with respect to `q`, `k`, `v`, given the forward's output and log-sum-exp.
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn attention_backward(
        _q: Tensor<Self, 4>,
        _k: Tensor<Self, 4>,
        _v: Tensor<Self, 4>,
        _o: Tensor<Self, 4>,
        _lse: Tensor<Self, 3>,
        _mask: Tensor<Self, 3, Bool>,
        _s: Scores,
        _grad: Tensor<Self, 4>,
    ) -> Option<(Tensor<Self, 4>, Tensor<Self, 4>, Tensor<Self, 4>)> {
        None
    }
}

/// How attention turns `q·kᵀ` into scores: times `scale`, softcapped to `c · tanh(s / c)` when
/// `softcap` is `c` (Gemma 2), and whether the mask is a sliding window of `window` keys (the mask
/// holds it exactly; kernels use it to skip keys).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scores {
    pub scale: f64,
    pub softcap: Option<f64>,
    pub window: Option<usize>,
}

impl Scores {
    /// Plain scaled scores, no window.
    pub fn scaled(scale: f64) -> Self {
        Scores { scale, softcap: None, window: None }
    }
}

/// The row-wise parts of the chunked attention, which a backend may run as kernels (burn's
/// CubeCL backends: `kernels/src/attention.rs`); by default composed from tensor ops. `raw` is a
/// chunk's `q·kᵀ` `[B, KV, rep·C, keys]` in the compute dtype (unscaled, unmasked), for the
/// query rows `rows` of `g`; `mask` is the whole `[1 | B, T, S]` mask.
pub trait ScoreRows: Backend {
    /// The probabilities (compute dtype) and each row's log-sum-exp `[B, KV, rep·C]` (f32).
    fn masked_softmax(g: &Geometry, raw: Tensor<Self, 4>, mask: &Tensor<Self, 3, Bool>, rows: &Range<usize>, scale: f64) -> (Tensor<Self, 4>, Tensor<Self, 3>) {
        chunked::masked_softmax_ops(g, raw, mask, rows, scale)
    }

    /// The backward's probabilities `P = exp(scale·s − lse)` and score gradients
    /// `dS = scale · P ∘ (dP − delta)`, both in the compute dtype, given the probabilities'
    /// gradient `dp` (compute dtype) and per row `lse` and `delta = rowsum(dO ∘ O)` (f32).
    #[allow(clippy::too_many_arguments)]
    fn softmax_grad(
        g: &Geometry,
        raw: Tensor<Self, 4>,
        dp: Tensor<Self, 4>,
        mask: &Tensor<Self, 3, Bool>,
        rows: &Range<usize>,
        lse: Tensor<Self, 3>,
        delta: Tensor<Self, 3>,
        scale: f64,
    ) -> (Tensor<Self, 4>, Tensor<Self, 4>) {
        chunked::softmax_grad_ops(g, raw, dp, mask, rows, lse, delta, scale)
    }
}

/// RMSNorm as HF computes it: `w · x / sqrt(mean(x²) + eps)` over the last dimension.
pub fn rms_norm<B: FusedOps, const D: usize>(x: Tensor<B, D>, w: Tensor<B, 1>, eps: f64) -> Tensor<B, D> {
    let dims = x.dims();
    let dim = dims[D - 1];
    let rows = x.shape().num_elements() / dim.max(1);
    match B::rms_norm_fused(x.clone().reshape([rows, dim]), w.clone(), eps) {
        Some(y) => y.reshape(dims),
        None => reference::rms_norm(x, w, eps),
    }
}

/// Rotary embedding (HF's rotate-half form) of `x [B, T, H, hd]`; `cos`, `sin` `[1 | B, T, hd]`.
pub fn rope<B: FusedOps>(x: Tensor<B, 4>, cos: Tensor<B, 3>, sin: Tensor<B, 3>) -> Tensor<B, 4> {
    B::rope_fused(x.clone(), cos.clone(), sin.clone(), false).unwrap_or_else(|| reference::rope(x, cos, sin))
}

/// `silu(gate) · up` (the gated MLP's activation), any rank.
pub fn swiglu<B: FusedOps, const D: usize>(gate: Tensor<B, D>, up: Tensor<B, D>) -> Tensor<B, D> {
    let dims = gate.dims();
    let inner = dims[D - 1];
    let rows = gate.shape().num_elements() / inner.max(1);
    match B::swiglu_fused(gate.clone().reshape([rows, inner]), up.clone().reshape([rows, inner])) {
        Some(y) => y.reshape(dims),
        None => silu(gate) * up,
    }
}

/// GELU with PyTorch's tanh approximation (`gelu(x, approximate="tanh")`, transformers'
/// `gelu_pytorch_tanh`): `x/2 · (1 + tanh(√(2/π) · (x + 0.044715·x³)))`, any rank. Composed from
/// tensor ops (Gemma's MLP; autodiff records its few nodes).
pub fn gelu_tanh<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let beta = (2.0f64 / std::f64::consts::PI).sqrt();
    let inner = (x.clone() + x.clone().powi_scalar(3) * 0.044715) * beta;
    (inner.tanh() + 1.0) * x * 0.5
}

/// `gelu_tanh(gate) · up` (Gemma's gated MLP), any rank: one kernel where the backend has one
/// (the CPU), else composed from tensor ops.
pub fn geglu<B: FusedOps, const D: usize>(gate: Tensor<B, D>, up: Tensor<B, D>) -> Tensor<B, D> {
    let dims = gate.dims();
    let inner = dims[D - 1];
    let rows = gate.shape().num_elements() / inner.max(1);
    match B::geglu_fused(gate.clone().reshape([rows, inner]), up.clone().reshape([rows, inner])) {
        Some(y) => y.reshape(dims),
        None => gelu_tanh(gate) * up,
    }
}

/// The sum of every element, as `[1]`, added in the same order on every run and backend.
/// burn's CubeCL `sum` adds with float atomics where the device has them (CUDA): its last bits
/// change from run to run, and with the gradient norm so do clipping and every update after it.
/// Two `sum_dim` passes (rows of 1024 elements, then the row sums) reduce in a fixed order.
pub trait SumAll<B: Backend> {
    fn sum_all(self) -> Tensor<B, 1>;
}

impl<B: Backend, const D: usize> SumAll<B> for Tensor<B, D> {
    fn sum_all(self) -> Tensor<B, 1> {
        const ROW: usize = 1024;
        let n = self.shape().num_elements();
        let flat = self.reshape([n]);
        if n <= ROW {
            return flat.sum_dim(0);
        }
        let whole = n / ROW * ROW;
        let rows = flat.clone().narrow(0, 0, whole).reshape([whole / ROW, ROW]).sum_dim(1).reshape([whole / ROW]);
        let sums = if whole < n { Tensor::cat(vec![rows, flat.narrow(0, whole, n - whole).sum_dim(0)], 0) } else { rows };
        sums.sum_dim(0)
    }
}

/// A frozen linear map plus a LoRA adapter, `x·W + (s·(x'·A))·B` (PEFT's `lora_B(lora_A(x'))·s`
/// with the scale moved onto the rank-r product), `x'` = `x_lora` or `x`. `A` and `B` may be f32
/// masters under a half-precision `x` and `W`: the adapter then computes in f32 and its
/// gradients are f32, as PEFT without autocast ([`chunked::lora_linear`]).
///
/// # Shapes
/// `x`, `x_lora`: `[N, in]`, `w [in, out]`, `a [in, r]`, `b [r, out]` → `[N, out]`
pub fn lora_linear<B: FusedOps>(x: Tensor<B, 2>, x_lora: Option<Tensor<B, 2>>, w: Tensor<B, 2>, a: Tensor<B, 2>, b: Tensor<B, 2>, scale: f64) -> Tensor<B, 2> {
    if let Some((y, _)) = B::lora_linear_fused(x.clone(), x_lora.clone(), w.clone(), a.clone(), b.clone(), scale) {
        return y;
    }
    chunked::lora_linear(x, x_lora, w, a, b, scale).0
}

/// `log p(target)` of each row of `logits [N, V]` (`targets [N]`), in f32 whatever the logits'
/// dtype: one autodiff node that keeps the logits and one log-sum-exp per row, where burn's
/// `log_softmax` and `gather` keep several `[N, V]` tensors.
pub fn token_logprobs<B: FusedOps>(logits: Tensor<B, 2>, targets: Tensor<B, 1, Int>) -> Tensor<B, 1> {
    match B::token_logprobs_fused(logits.clone(), targets.clone()) {
        Some((logp, _)) => logp,
        None => reference::token_logprobs(logits, targets),
    }
}

/// Scaled dot-product attention, as transformers' eager attention computes it: scores
/// `q·kᵀ · scale` (softcapped to `c · tanh(s / c)` when `softcap` is `c`: Gemma 2), masked
/// positions at −∞, softmax, times `v`. A sliding window is part of the mask; `window` says so,
/// and the kernels skip the keys outside it (the CPU kernel reads that from the mask, the
/// chunked composition from `window`): O(T·window) work.
///
/// # Shapes
/// `q [B, T, H, hd]`, `k`, `v` `[B, S, KV, hd]`, `mask [1 | B, T, S]` (true = not attended)
/// → `[B, T, H, hd]`
pub fn attention<B: FusedOps>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, mask: Tensor<B, 3, Bool>, s: Scores) -> Tensor<B, 4> {
    match B::attention_fused(q.clone(), k.clone(), v.clone(), mask.clone(), s) {
        Some((o, _)) => o,
        None => reference::attention_softcap(q, k, v, mask, s.scale, s.softcap),
    }
}

#[cfg(test)]
mod tests {
    //! Each fused op (CPU kernels, with the autodiff backward) against the reference composition:
    //! values and input gradients.
    use super::*;
    use crate::backend::Cpu;
    use burn::backend::Autodiff;
    use burn::tensor::{Distribution, TensorData};

    #[test]
    fn sum_all_is_the_sum_in_every_branch() {
        // Up to one row; whole rows; rows and a remainder; a 2-D tensor. And the same bits twice.
        for n in [1, 7, 1024, 4096, 5000] {
            let v: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1000) as f32 / 997.0 - 0.5).collect();
            let want: f64 = v.iter().map(|&x| x as f64).sum();
            let t = Tensor::<Cpu, 1>::from_data(TensorData::new(v.clone(), [n]), &Default::default());
            let got = t.clone().sum_all().into_scalar() as f64;
            assert!((got - want).abs() <= 1e-5 * (1.0 + want.abs()), "{n}: {got} vs {want}");
            assert_eq!(got.to_bits(), (t.sum_all().into_scalar() as f64).to_bits());
            if n % 4 == 0 {
                let t2 = Tensor::<Cpu, 2>::from_data(TensorData::new(v, [4, n / 4]), &Default::default());
                assert!((t2.sum_all().into_scalar() as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()));
            }
        }
    }

    type Ad = Autodiff<Cpu>;

    /// A packing mask `[rows, t, t]`: causal within each segment, segment lengths per row.
    pub(super) fn packed_mask<B: Backend>(t: usize, rows: &[Vec<usize>]) -> Tensor<B, 3, Bool> {
        let mut masked = vec![true; rows.len() * t * t];
        for (row, segs) in rows.iter().enumerate() {
            let mut start = 0;
            for &len in segs {
                for q in 0..len {
                    for k in 0..=q {
                        masked[row * t * t + (start + q) * t + start + k] = false;
                    }
                }
                start += len;
            }
        }
        Tensor::from_data(TensorData::new(masked, [rows.len(), t, t]), &Default::default())
    }

    fn close(a: Tensor<Ad, 4>, b: Tensor<Ad, 4>, tol: f32, what: &str) {
        let (a, b): (Vec<f32>, Vec<f32>) = (a.into_data().to_vec().unwrap(), b.into_data().to_vec().unwrap());
        assert_eq!(a.len(), b.len());
        let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs() / y.abs().max(1.0)).fold(0f32, f32::max);
        assert!(worst <= tol, "{what}: max difference {worst}");
    }

    fn rand4(shape: [usize; 4]) -> Tensor<Ad, 4> {
        Tensor::random(shape, Distribution::Normal(0.0, 1.0), &Default::default())
    }

    /// `sum(f(inputs) · c)` through both paths; compares outputs and the inputs' gradients.
    fn check(inputs: Vec<Tensor<Ad, 4>>, fused: impl Fn(Vec<Tensor<Ad, 4>>) -> Tensor<Ad, 4>, reference: impl Fn(Vec<Tensor<Ad, 4>>) -> Tensor<Ad, 4>, what: &str) {
        let run = |f: &dyn Fn(Vec<Tensor<Ad, 4>>) -> Tensor<Ad, 4>| {
            let xs: Vec<Tensor<Ad, 4>> = inputs.iter().map(|x| Tensor::from_data(x.to_data(), &Default::default()).require_grad()).collect();
            let y = f(xs.clone());
            let c = Tensor::<Ad, 4>::from_data(
                TensorData::new((0..y.shape().num_elements()).map(|i| ((i * 37 % 11) as f32 - 5.0) / 7.0).collect::<Vec<_>>(), y.dims()),
                &Default::default(),
            );
            let grads = (y.clone() * c).sum().backward();
            let g: Vec<Tensor<Ad, 4>> = xs.iter().map(|x| Tensor::from_inner(x.grad(&grads).expect("gradient"))).collect();
            (y, g)
        };
        let (yf, gf) = run(&fused);
        let (yr, gr) = run(&reference);
        close(yf, yr, 2e-5, what);
        for (i, (a, b)) in gf.into_iter().zip(gr).enumerate() {
            close(a, b, 2e-5, &format!("{what}: gradient of input {i}"));
        }
    }

    #[test]
    fn the_cpu_backend_has_every_kernel() {
        // Otherwise the comparisons below would compare the reference with itself.
        let dev = Default::default();
        let t2 = |m: usize, n: usize| Tensor::<Ad, 2>::random([m, n], Distribution::Normal(0.0, 1.0), &dev);
        let (cos, sin) = (Tensor::<Ad, 3>::ones([1, 2, 4], &dev), Tensor::<Ad, 3>::zeros([1, 2, 4], &dev));
        let mask = Tensor::<Ad, 2, Bool>::tril_mask([2, 2], 0, &dev).reshape([1, 2, 2]);
        assert!(Ad::rms_norm_fused(t2(2, 4), Tensor::ones([4], &dev), 1e-5).is_some());
        assert!(Ad::rope_fused(rand4([1, 2, 1, 4]), cos, sin, false).is_some());
        assert!(Ad::swiglu_fused(t2(2, 4), t2(2, 4)).is_some());
        assert!(Ad::geglu_fused(t2(2, 4), t2(2, 4)).is_some());
        assert!(Ad::lora_linear_fused(t2(2, 4), None, t2(4, 3), t2(4, 2), t2(2, 3), 0.5).is_some());
        assert!(Ad::attention_fused(rand4([1, 2, 2, 4]), rand4([1, 2, 1, 4]), rand4([1, 2, 1, 4]), mask.clone(), Scores::scaled(0.5)).is_some());
        assert!(Ad::attention_fused(rand4([1, 2, 2, 4]), rand4([1, 2, 1, 4]), rand4([1, 2, 1, 4]), mask, Scores { scale: 0.5, softcap: Some(3.0), window: Some(1) }).is_some());
    }

    #[test]
    fn rms_norm_and_swiglu_match_the_reference() {
        let w = Tensor::<Ad, 1>::random([24], Distribution::Normal(1.0, 0.5), &Default::default());
        let w2 = w.clone();
        check(vec![rand4([2, 5, 3, 24])], move |x| rms_norm(x[0].clone(), w.clone(), 1e-5), move |x| reference::rms_norm(x[0].clone(), w2.clone(), 1e-5), "rms_norm");
        check(vec![rand4([2, 5, 3, 24]), rand4([2, 5, 3, 24])], |x| swiglu(x[0].clone(), x[1].clone()), |x| silu(x[0].clone()) * x[1].clone(), "swiglu");
        // Gemma's GeGLU: the CPU kernel and its backward against the tensor-op composition.
        check(vec![rand4([2, 5, 3, 24]) * 2.0, rand4([2, 5, 3, 24])], |x| geglu(x[0].clone(), x[1].clone()), |x| gelu_tanh(x[0].clone()) * x[1].clone(), "geglu");
    }

    #[test]
    fn lora_linear_matches_the_reference_with_and_without_a_separate_adapter_input() {
        let dev = Default::default();
        let r2 = |m: usize, n: usize| Tensor::<Ad, 2>::random([m, n], Distribution::Normal(0.0, 1.0), &dev);
        let (n, d_in, d_out, r) = (7, 12, 10, 3);
        let (x, xl, w, a, b) = (r2(n, d_in), r2(n, d_in), r2(d_in, d_out), r2(d_in, r), r2(r, d_out));
        for separate in [false, true] {
            let run = |fused: bool| {
                let leaf = |t: &Tensor<Ad, 2>| Tensor::<Ad, 2>::from_data(t.to_data(), &dev).require_grad();
                let (x, xl, a, b) = (leaf(&x), leaf(&xl), leaf(&a), leaf(&b));
                let xl_in = separate.then(|| xl.clone());
                let y = if fused {
                    lora_linear(x.clone(), xl_in, w.clone(), a.clone(), b.clone(), 0.7)
                } else {
                    let xi = xl_in.unwrap_or_else(|| x.clone());
                    x.clone().matmul(w.clone()) + xi.matmul(a.clone()).matmul(b.clone()) * 0.7
                };
                let c = Tensor::<Ad, 2>::from_data(
                    TensorData::new((0..n * d_out).map(|i| ((i * 13 % 7) as f32 - 3.0) / 5.0).collect::<Vec<_>>(), [n, d_out]),
                    &dev,
                );
                let g = (y.clone() * c).sum().backward();
                let grad = |t: &Tensor<Ad, 2>| t.grad(&g).map(|g| g.into_data().to_vec::<f32>().unwrap());
                (y.into_data().to_vec::<f32>().unwrap(), [grad(&x), grad(&xl), grad(&a), grad(&b)])
            };
            let ((yf, gf), (yr, gr)) = (run(true), run(false));
            let worst = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs() / y.abs().max(1.0)).fold(0f32, f32::max);
            assert!(worst(&yf, &yr) <= 2e-5, "output");
            for (i, (f, r)) in gf.iter().zip(&gr).enumerate() {
                assert_eq!(f.is_some(), r.is_some(), "separate {separate}: gradient {i} presence");
                if let (Some(f), Some(r)) = (f, r) {
                    assert!(worst(f, r) <= 2e-5, "separate {separate}: gradient {i}: {}", worst(f, r));
                }
            }
        }
    }

    #[test]
    fn rope_matches_the_reference() {
        let dev = Default::default();
        let (b, t, h, hd) = (2, 7, 3, 8);
        for tb in [1, b] {
            let cos = Tensor::<Ad, 3>::random([tb, t, hd], Distribution::Uniform(-1.0, 1.0), &dev);
            let sin = Tensor::<Ad, 3>::random([tb, t, hd], Distribution::Uniform(-1.0, 1.0), &dev);
            let (c2, s2) = (cos.clone(), sin.clone());
            check(vec![rand4([b, t, h, hd])], move |x| rope(x[0].clone(), cos.clone(), sin.clone()), move |x| reference::rope(x[0].clone(), c2.clone(), s2.clone()), "rope");
        }
    }

    #[test]
    fn attention_matches_the_reference_with_gqa_caches_and_packed_masks() {
        let dev = Default::default();
        // (batch, queries, keys, heads, kv heads): causal without cache, with 3 cached positions,
        // one query over a cache (generation), grouped and plain multi-head.
        for (b, t, s, h, kv) in [(2, 6, 6, 6, 2), (2, 5, 8, 4, 4), (1, 1, 9, 3, 1), (3, 4, 4, 2, 1)] {
            let mask = Tensor::<Ad, 2, Bool>::tril_mask([t, s], (s - t) as i64, &dev).reshape([1, t, s]);
            let m2 = mask.clone();
            check(
                vec![rand4([b, t, h, 8]), rand4([b, s, kv, 8]), rand4([b, s, kv, 8])],
                move |x| attention(x[0].clone(), x[1].clone(), x[2].clone(), mask.clone(), Scores::scaled(0.35)),
                move |x| reference::attention(x[0].clone(), x[1].clone(), x[2].clone(), m2.clone(), 0.35),
                &format!("attention b{b} t{t} s{s} h{h} kv{kv}"),
            );
        }
        // A per-row block-diagonal mask (packing): row 0 holds samples of 2 and 3 tokens + 1 pad.
        let (b, t) = (2, 6);
        let mask = packed_mask::<Ad>(t, &[vec![2, 3, 1], vec![6]]);
        let m2 = mask.clone();
        check(
            vec![rand4([b, t, 4, 8]), rand4([b, t, 2, 8]), rand4([b, t, 2, 8])],
            move |x| attention(x[0].clone(), x[1].clone(), x[2].clone(), mask.clone(), Scores::scaled(0.35)),
            move |x| reference::attention(x[0].clone(), x[1].clone(), x[2].clone(), m2.clone(), 0.35),
            "attention, packed mask",
        );
    }

    #[test]
    fn softcapped_attention_under_a_sliding_window_matches_the_reference() {
        // Gemma 2's scores `c·tanh(s/c)` and a window of 9 keys over 80 queries (more than one
        // row block, so blocks start past key 0), with 3 cached positions; the kernel's forward
        // and backward against the composition of tensor ops.
        let dev = Default::default();
        let (b, t, s, w) = (2, 80, 83, 9);
        let mut masked = vec![true; t * s];
        for q in 0..t {
            let end = s - t + q + 1;
            masked[q * s..][end - w.min(end)..end].fill(false);
        }
        let mask = Tensor::<Ad, 3, Bool>::from_data(TensorData::new(masked, [1, t, s]), &dev);
        for softcap in [None, Some(2.0)] {
            let (m1, m2) = (mask.clone(), mask.clone());
            check(
                vec![rand4([b, t, 4, 8]), rand4([b, s, 2, 8]), rand4([b, s, 2, 8])],
                move |x| attention(x[0].clone(), x[1].clone(), x[2].clone(), m1.clone(), Scores { scale: 0.9, softcap, window: Some(w) }),
                move |x| reference::attention_softcap(x[0].clone(), x[1].clone(), x[2].clone(), m2.clone(), 0.9, softcap),
                &format!("window {w}, softcap {softcap:?}"),
            );
        }
    }
}
