//! CPU kernels of the fused operations (burn's `flex` backend, f32): each reads its inputs once
//! from contiguous memory and writes one output, rows in parallel with rayon; attention's
//! matrix products go through the `gemm` crate (the one flex's own matmul uses), per
//! (batch, kv head) with strided operands, so no head transpose or K/V copy is made, in blocks of
//! query rows that span only the keys the block attends to (half the work for causal masks,
//! O(T·window) for sliding windows).

use burn::prelude::*;
use burn::tensor::{Bool, TensorData, TensorPrimitive};
use burn_flex::{Flex, FlexTensor};
use rayon::prelude::*;

use super::{FusedOps, Nf4Linear, ScoreRows, Scores};
use crate::quant::nf4_weight::Nf4Weight;
use burn::tensor::FloatDType;

fn contiguous<const D: usize>(t: Tensor<Flex, D>) -> FlexTensor {
    t.into_primitive().tensor().to_contiguous()
}

fn f32s(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("contiguous f32 tensor")
}

fn tensor<const D: usize>(data: Vec<f32>, shape: [usize; D]) -> Tensor<Flex, D> {
    Tensor::from_primitive(TensorPrimitive::Float(FlexTensor::from_data(TensorData::new(data, shape))))
}

/// The mask as a contiguous tensor (shared with the caller's, not copied, when it already is
/// one) and its batch size; [`mask_slice`] reads its bytes (1 = not attended).
fn contiguous_mask(mask: Tensor<Flex, 3, Bool>) -> (FlexTensor, usize) {
    let batch = mask.dims()[0];
    (mask.into_primitive().to_contiguous(), batch)
}

fn mask_slice(m: &FlexTensor) -> &[u8] {
    let (start, end) = m.layout().contiguous_offsets().expect("contiguous mask");
    &m.storage::<u8>()[start..end]
}

/// Rows per rayon task for row-wise element kernels (keeps tasks above ~16k elements).
fn rows_per_task(row_len: usize) -> usize {
    (16384 / row_len.max(1)).max(1)
}

/// A raw output pointer shared by tasks that write disjoint parts of one buffer.
#[derive(Clone, Copy)]
struct Out(*mut f32);
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// The pointer `i` elements in (the caller keeps `i` inside the buffer).
    fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

/// `dst[m×n] = (dst +)? beta · lhs[m×k] · rhs[k×n]`, every operand given by (pointer, row
/// stride, column stride) in elements.
#[allow(clippy::too_many_arguments)]
unsafe fn mm(
    (m, n, k): (usize, usize, usize),
    dst: (*mut f32, usize, usize),
    accumulate: bool,
    lhs: (*const f32, usize, usize),
    rhs: (*const f32, usize, usize),
    beta: f32,
    par: gemm::Parallelism,
) {
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.0,
            dst.2 as isize,
            dst.1 as isize,
            accumulate,
            lhs.0,
            lhs.2 as isize,
            lhs.1 as isize,
            rhs.0,
            rhs.2 as isize,
            rhs.1 as isize,
            1.0,
            beta,
            false,
            false,
            false,
            par,
        )
    }
}

/// Query rows per attention block: the score scratch is `ROW_BLOCK × S` per task (small blocks
/// in unit tests, so that they cover several).
const ROW_BLOCK: usize = if cfg!(test) { 3 } else { 128 };

/// Shapes of one attention call.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    t: usize,
    s: usize,
    h: usize,
    kv: usize,
    hd: usize,
    mask_batch: usize,
}

impl Dims {
    fn of(q: &[usize; 4], k: &[usize; 4], mask_batch: usize) -> Self {
        let [b, t, h, hd] = *q;
        let [_, s, kv, _] = *k;
        assert!(kv > 0 && h % kv == 0, "attention: {h} query heads over {kv} kv heads");
        Dims { b, t, s, h, kv, hd, mask_batch }
    }
    /// Element offset of (batch, position 0, head) in `[B, T, H, hd]` and its row stride.
    fn q_at(&self, b: usize, h: usize) -> (usize, usize) {
        ((b * self.t * self.h + h) * self.hd, self.h * self.hd)
    }
    fn kv_at(&self, b: usize, g: usize) -> (usize, usize) {
        ((b * self.s * self.kv + g) * self.hd, self.kv * self.hd)
    }
    fn mask_row<'a>(&self, mask: &'a [u8], b: usize, t: usize) -> &'a [u8] {
        let mb = if self.mask_batch == 1 { 0 } else { b };
        &mask[(mb * self.t + t) * self.s..][..self.s]
    }
    /// Query rows in blocks of [`ROW_BLOCK`]: `(first row, rows, first key, end key)`, where the
    /// keys `first..end` span every key a row of the block attends to (a causal mask needs no
    /// later columns, a sliding window no earlier ones: O(T·window) work); blocks that attend to
    /// nothing are left out (their output stays zero).
    fn blocks(&self, mask: &[u8], b: usize) -> Vec<(usize, usize, usize, usize)> {
        (0..self.t)
            .step_by(ROW_BLOCK)
            .filter_map(|r0| {
                let rows = ROW_BLOCK.min(self.t - r0);
                let (mut first, mut end) = (usize::MAX, 0);
                for t in r0..r0 + rows {
                    let row = self.mask_row(mask, b, t);
                    if let (Some(f), Some(l)) = (row.iter().position(|&m| m == 0), row.iter().rposition(|&m| m == 0)) {
                        first = first.min(f);
                        end = end.max(l + 1);
                    }
                }
                (end > 0).then_some((r0, rows, first, end))
            })
            .collect()
    }
    /// Inner GEMMs run single-threaded when the (batch, kv head) tasks already fill the pool.
    fn parallelism(&self) -> gemm::Parallelism {
        if self.b * self.kv >= rayon::current_num_threads() {
            gemm::Parallelism::None
        } else {
            gemm::Parallelism::Rayon(0)
        }
    }
}

impl FusedOps for Flex {
    fn rms_norm_fused(x: Tensor<Self, 2>, w: Tensor<Self, 1>, eps: f64) -> Option<Tensor<Self, 2>> {
        let [n, d] = x.dims();
        let (x, w) = (contiguous(x), contiguous(w));
        let (xs, ws) = (f32s(&x), f32s(&w));
        let mut y = vec![0f32; n * d];
        let per = rows_per_task(d) * d;
        y.par_chunks_mut(per).zip(xs.par_chunks(per)).for_each(|(yc, xc)| {
            for (yr, xr) in yc.chunks_mut(d).zip(xc.chunks(d)) {
                let r = rstd(xr, eps);
                for ((y, x), w) in yr.iter_mut().zip(xr).zip(ws) {
                    *y = x * r * w;
                }
            }
        });
        Some(tensor(y, [n, d]))
    }

    fn rms_norm_backward(x: Tensor<Self, 2>, w: Tensor<Self, 1>, eps: f64, grad: Tensor<Self, 2>) -> Option<Tensor<Self, 2>> {
        let [n, d] = x.dims();
        let (x, w, g) = (contiguous(x), contiguous(w), contiguous(grad));
        let (xs, ws, gs) = (f32s(&x), f32s(&w), f32s(&g));
        let mut dx = vec![0f32; n * d];
        let per = rows_per_task(d) * d;
        dx.par_chunks_mut(per).zip(xs.par_chunks(per)).zip(gs.par_chunks(per)).for_each(|((dc, xc), gc)| {
            for ((dr, xr), gr) in dc.chunks_mut(d).zip(xc.chunks(d)).zip(gc.chunks(d)) {
                // y = w·x·r, r = (mean(x²)+eps)^-½: dx = r·w·g − x·r³·mean(w·g·x)
                let r = rstd(xr, eps);
                let dot: f32 = xr.iter().zip(gr).zip(ws).map(|((x, g), w)| x * g * w).sum();
                let c = dot * r * r * r / d as f32;
                for (((dx, x), g), w) in dr.iter_mut().zip(xr).zip(gr).zip(ws) {
                    *dx = r * w * g - x * c;
                }
            }
        });
        Some(tensor(dx, [n, d]))
    }

    fn rope_fused(x: Tensor<Self, 4>, cos: Tensor<Self, 3>, sin: Tensor<Self, 3>, transpose: bool) -> Option<Tensor<Self, 4>> {
        let [b, t, h, hd] = x.dims();
        let tb = cos.dims()[0];
        let (x, cos, sin) = (contiguous(x), contiguous(cos), contiguous(sin));
        let (xs, cs, ss) = (f32s(&x), f32s(&cos), f32s(&sin));
        let half = hd / 2;
        let mut y = vec![0f32; b * t * h * hd];
        let row = h * hd;
        y.par_chunks_mut(row).zip(xs.par_chunks(row)).enumerate().with_min_len(rows_per_task(row)).for_each(|(bt, (yr, xr))| {
            let (bi, ti) = (bt / t, bt % t);
            let at = ((if tb == 1 { 0 } else { bi }) * t + ti) * hd;
            let (c, s) = (&cs[at..at + hd], &ss[at..at + hd]);
            for (yh, xh) in yr.chunks_mut(hd).zip(xr.chunks(hd)) {
                for i in 0..half {
                    let j = i + half;
                    if transpose {
                        yh[i] = xh[i] * c[i] + xh[j] * s[j];
                        yh[j] = xh[j] * c[j] - xh[i] * s[i];
                    } else {
                        yh[i] = xh[i] * c[i] - xh[j] * s[i];
                        yh[j] = xh[j] * c[j] + xh[i] * s[j];
                    }
                }
            }
        });
        Some(tensor(y, [b, t, h, hd]))
    }

    fn swiglu_fused(gate: Tensor<Self, 2>, up: Tensor<Self, 2>) -> Option<Tensor<Self, 2>> {
        Some(gated_forward(gate, up, silu))
    }

    fn swiglu_backward(gate: Tensor<Self, 2>, up: Tensor<Self, 2>, grad: Tensor<Self, 2>) -> Option<(Tensor<Self, 2>, Tensor<Self, 2>)> {
        Some(gated_backward(gate, up, grad, silu))
    }

    fn geglu_fused(gate: Tensor<Self, 2>, up: Tensor<Self, 2>) -> Option<Tensor<Self, 2>> {
        Some(gated_forward(gate, up, gelu_tanh))
    }

    fn geglu_backward(gate: Tensor<Self, 2>, up: Tensor<Self, 2>, grad: Tensor<Self, 2>) -> Option<(Tensor<Self, 2>, Tensor<Self, 2>)> {
        Some(gated_backward(gate, up, grad, gelu_tanh))
    }

    fn lora_linear_fused(
        x: Tensor<Self, 2>,
        x_lora: Option<Tensor<Self, 2>>,
        w: Tensor<Self, 2>,
        a: Tensor<Self, 2>,
        b: Tensor<Self, 2>,
        scale: f64,
    ) -> Option<(Tensor<Self, 2>, Tensor<Self, 2>)> {
        let ([n, d_in], [_, d_out], [_, r]) = (x.dims(), w.dims(), a.dims());
        let (x, w, a, b) = (contiguous(x), contiguous(w), contiguous(a), contiguous(b));
        let xl = x_lora.map(contiguous);
        let (xs, ws, as_, bs) = (f32s(&x), f32s(&w), f32s(&a), f32s(&b));
        let xls = xl.as_ref().map_or(xs, f32s);
        let par = gemm::Parallelism::Rayon(0);
        let (mut y, mut t) = (vec![0f32; n * d_out], vec![0f32; n * r]);
        // SAFETY: every operand is a contiguous row-major buffer of the stated shape.
        unsafe {
            mm((n, d_out, d_in), (y.as_mut_ptr(), d_out, 1), false, (xs.as_ptr(), d_in, 1), (ws.as_ptr(), d_out, 1), 1.0, par);
            mm((n, r, d_in), (t.as_mut_ptr(), r, 1), false, (xls.as_ptr(), d_in, 1), (as_.as_ptr(), r, 1), scale as f32, par);
            mm((n, d_out, r), (y.as_mut_ptr(), d_out, 1), true, (t.as_ptr(), r, 1), (bs.as_ptr(), d_out, 1), 1.0, par);
        }
        Some((tensor(y, [n, d_out]), tensor(t, [n, r])))
    }

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
        let ([n, d_in], [_, d_out], [_, r]) = (x.dims(), w.dims(), a.dims());
        let (x, w, a, b, t, dy) = (contiguous(x), contiguous(w), contiguous(a), contiguous(b), contiguous(t), contiguous(grad));
        let xl = x_lora.map(contiguous);
        let (xs, ws, as_, bs, ts, dys) = (f32s(&x), f32s(&w), f32s(&a), f32s(&b), f32s(&t), f32s(&dy));
        let xls = xl.as_ref().map_or(xs, f32s);
        let par = gemm::Parallelism::Rayon(0);
        let (mut dx, mut u) = (vec![0f32; n * d_in], vec![0f32; n * r]);
        let mut dxl = xl.as_ref().map(|_| vec![0f32; n * d_in]);
        let (mut da, mut db) = (vec![0f32; d_in * r], vec![0f32; r * d_out]);
        // SAFETY: contiguous row-major buffers; transposes are expressed by swapped strides.
        unsafe {
            // dx = dy·Wᵀ; u = s·(dy·Bᵀ); the adapter's input gradient u·Aᵀ goes into dx or dx'.
            mm((n, d_in, d_out), (dx.as_mut_ptr(), d_in, 1), false, (dys.as_ptr(), d_out, 1), (ws.as_ptr(), 1, d_out), 1.0, par);
            mm((n, r, d_out), (u.as_mut_ptr(), r, 1), false, (dys.as_ptr(), d_out, 1), (bs.as_ptr(), 1, d_out), scale as f32, par);
            let (into, accumulate) = match &mut dxl {
                Some(v) => (v.as_mut_ptr(), false),
                None => (dx.as_mut_ptr(), true),
            };
            mm((n, d_in, r), (into, d_in, 1), accumulate, (u.as_ptr(), r, 1), (as_.as_ptr(), 1, r), 1.0, par);
            // dA = x'ᵀ·u, dB = tᵀ·dy
            mm((d_in, r, n), (da.as_mut_ptr(), r, 1), false, (xls.as_ptr(), 1, d_in), (u.as_ptr(), r, 1), 1.0, par);
            mm((r, d_out, n), (db.as_mut_ptr(), d_out, 1), false, (ts.as_ptr(), 1, r), (dys.as_ptr(), d_out, 1), 1.0, par);
        }
        Some((tensor(dx, [n, d_in]), dxl.map(|v| tensor(v, [n, d_in])), tensor(da, [d_in, r]), tensor(db, [r, d_out])))
    }

    // The window needs no argument here: each block's key range comes from the mask.
    fn attention_fused(q: Tensor<Self, 4>, k: Tensor<Self, 4>, v: Tensor<Self, 4>, mask: Tensor<Self, 3, Bool>, s: Scores) -> Option<(Tensor<Self, 4>, Tensor<Self, 3>)> {
        Some(attention_forward(q, k, v, mask, s.scale, s.softcap.map(|c| c as f32)))
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
        Some(attention_backward(q, k, v, o, lse, mask, s.scale, s.softcap.map(|c| c as f32), grad))
    }
}

/// Gemma 2's score softcapping in place, `s = c · tanh(s / c)`; keeps `tanh(s / c)` in `tanh`
/// when given (the backward's `1 − tanh²`).
fn softcap_scores(scores: &mut [f32], cap: f32, mut tanh: Option<&mut [f32]>) {
    for (i, x) in scores.iter_mut().enumerate() {
        let t = (*x / cap).tanh();
        if let Some(tz) = tanh.as_deref_mut() {
            tz[i] = t;
        }
        *x = cap * t;
    }
}

/// The fused attention's forward (scores optionally softcapped): see [`FusedOps::attention_fused`].
fn attention_forward(q: Tensor<Flex, 4>, k: Tensor<Flex, 4>, v: Tensor<Flex, 4>, mask: Tensor<Flex, 3, Bool>, scale: f64, softcap: Option<f32>) -> (Tensor<Flex, 4>, Tensor<Flex, 3>) {
    let (mask, mb) = contiguous_mask(mask);
    let mask = mask_slice(&mask);
    let d = Dims::of(&q.dims(), &k.dims(), mb);
    let (q, k, v) = (contiguous(q), contiguous(k), contiguous(v));
    let (qs, ks, vs) = (f32s(&q), f32s(&k), f32s(&v));
    let mut o = vec![0f32; d.b * d.t * d.h * d.hd];
    let mut lse = vec![f32::INFINITY; d.b * d.h * d.t];
    let (op, lp) = (Out(o.as_mut_ptr()), Out(lse.as_mut_ptr()));
    let par = d.parallelism();
    let n_rep = d.h / d.kv;
    (0..d.b * d.kv).into_par_iter().for_each(|task| {
        let (bi, g) = (task / d.kv, task % d.kv);
        let mut p = vec![0f32; ROW_BLOCK.min(d.t) * d.s];
        let (kv_at, kv_rs) = d.kv_at(bi, g);
        for (r0, rows, k0, k1) in d.blocks(mask, bi) {
            let (keys, kv_at) = (k1 - k0, kv_at + k0 * kv_rs);
            for h in g * n_rep..(g + 1) * n_rep {
                let (q_at, q_rs) = d.q_at(bi, h);
                let q_at = q_at + r0 * q_rs;
                // SAFETY: task (b, g) alone writes heads g·n_rep.. of batch b in `o` and
                // `lse`; every pointer stays inside its buffer for the shapes and strides.
                unsafe {
                    mm((rows, keys, d.hd), (p.as_mut_ptr(), keys, 1), false, (qs.as_ptr().add(q_at), q_rs, 1), (ks.as_ptr().add(kv_at), 1, kv_rs), scale as f32, par);
                    if let Some(cap) = softcap {
                        softcap_scores(&mut p[..rows * keys], cap, None);
                    }
                    let lse_h = std::slice::from_raw_parts_mut(lp.at((bi * d.h + h) * d.t + r0), rows);
                    for (i, l) in lse_h.iter_mut().enumerate() {
                        *l = softmax_row(&mut p[i * keys..][..keys], &d.mask_row(mask, bi, r0 + i)[k0..k1]);
                    }
                    mm((rows, d.hd, keys), (op.at(q_at), q_rs, 1), false, (p.as_ptr(), keys, 1), (vs.as_ptr().add(kv_at), kv_rs, 1), 1.0, par);
                }
            }
        }
    });
    (tensor(o, [d.b, d.t, d.h, d.hd]), tensor(lse, [d.b, d.h, d.t]))
}

/// The fused attention's backward (see [`FusedOps::attention_backward`]); with a softcap the
/// score gradient is multiplied by the cap's derivative `1 − tanh²(s / c)`.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
fn attention_backward(
    q: Tensor<Flex, 4>,
    k: Tensor<Flex, 4>,
    v: Tensor<Flex, 4>,
    o: Tensor<Flex, 4>,
    lse: Tensor<Flex, 3>,
    mask: Tensor<Flex, 3, Bool>,
    scale: f64,
    softcap: Option<f32>,
    grad: Tensor<Flex, 4>,
) -> (Tensor<Flex, 4>, Tensor<Flex, 4>, Tensor<Flex, 4>) {
    let (mask, mb) = contiguous_mask(mask);
    let mask = mask_slice(&mask);
    let d = Dims::of(&q.dims(), &k.dims(), mb);
    let (q, k, v, o, lse, dout) = (contiguous(q), contiguous(k), contiguous(v), contiguous(o), contiguous(lse), contiguous(grad));
    let (qs, ks, vs, os, ls, dos) = (f32s(&q), f32s(&k), f32s(&v), f32s(&o), f32s(&lse), f32s(&dout));
    let mut dq = vec![0f32; qs.len()];
    let (mut dk, mut dv) = (vec![0f32; ks.len()], vec![0f32; vs.len()]);
    let (dqp, dkp, dvp) = (Out(dq.as_mut_ptr()), Out(dk.as_mut_ptr()), Out(dv.as_mut_ptr()));
    let par = d.parallelism();
    let n_rep = d.h / d.kv;
    let scale = scale as f32;
    (0..d.b * d.kv).into_par_iter().for_each(|task| {
        let (bi, g) = (task / d.kv, task % d.kv);
        let block = ROW_BLOCK.min(d.t) * d.s;
        let (mut p, mut dp) = (vec![0f32; block], vec![0f32; block]);
        let mut tanh = if softcap.is_some() { vec![0f32; block] } else { Vec::new() };
        let (kv_at, kv_rs) = d.kv_at(bi, g);
        for (r0, rows, k0, k1) in d.blocks(mask, bi) {
            let (keys, kv_at) = (k1 - k0, kv_at + k0 * kv_rs);
            for h in g * n_rep..(g + 1) * n_rep {
                let (q_at, q_rs) = d.q_at(bi, h);
                let q_at = q_at + r0 * q_rs;
                // SAFETY: task (b, g) alone writes heads g·n_rep.. of batch b in `dq` and kv
                // head g of batch b in `dk`, `dv`; pointers stay inside their buffers.
                unsafe {
                    // P again from the saved log-sum-exp.
                    mm((rows, keys, d.hd), (p.as_mut_ptr(), keys, 1), false, (qs.as_ptr().add(q_at), q_rs, 1), (ks.as_ptr().add(kv_at), 1, kv_rs), scale, par);
                    if let Some(cap) = softcap {
                        softcap_scores(&mut p[..rows * keys], cap, Some(&mut tanh[..rows * keys]));
                    }
                    for i in 0..rows {
                        let l = ls[(bi * d.h + h) * d.t + r0 + i];
                        let m = &d.mask_row(mask, bi, r0 + i)[k0..k1];
                        for (x, &masked) in p[i * keys..][..keys].iter_mut().zip(m) {
                            *x = if masked != 0 || l == f32::INFINITY { 0.0 } else { (*x - l).exp() };
                        }
                    }
                    // dV += Pᵀ·dO
                    mm((keys, d.hd, rows), (dvp.at(kv_at), kv_rs, 1), true, (p.as_ptr(), 1, keys), (dos.as_ptr().add(q_at), q_rs, 1), 1.0, par);
                    // dP = dO·Vᵀ, then dS = P ∘ (dP − rowsum(dO ∘ O)) (∘ (1 − tanh²) when capped)
                    mm((rows, keys, d.hd), (dp.as_mut_ptr(), keys, 1), false, (dos.as_ptr().add(q_at), q_rs, 1), (vs.as_ptr().add(kv_at), 1, kv_rs), 1.0, par);
                    for i in 0..rows {
                        let at = q_at + i * q_rs;
                        let di: f32 = dos[at..at + d.hd].iter().zip(&os[at..at + d.hd]).map(|(a, b)| a * b).sum();
                        for (x, pv) in dp[i * keys..][..keys].iter_mut().zip(&p[i * keys..][..keys]) {
                            *x = pv * (*x - di);
                        }
                    }
                    if softcap.is_some() {
                        for (x, t) in dp[..rows * keys].iter_mut().zip(&tanh[..rows * keys]) {
                            *x *= 1.0 - t * t;
                        }
                    }
                    // dQ = scale·dS·K, dK += scale·dSᵀ·Q
                    mm((rows, d.hd, keys), (dqp.at(q_at), q_rs, 1), false, (dp.as_ptr(), keys, 1), (ks.as_ptr().add(kv_at), kv_rs, 1), scale, par);
                    mm((keys, d.hd, rows), (dkp.at(kv_at), kv_rs, 1), true, (dp.as_ptr(), 1, keys), (qs.as_ptr().add(q_at), q_rs, 1), scale, par);
                }
            }
        }
    });
    (tensor(dq, [d.b, d.t, d.h, d.hd]), tensor(dk, [d.b, d.s, d.kv, d.hd]), tensor(dv, [d.b, d.s, d.kv, d.hd]))
}

fn rstd(x: &[f32], eps: f64) -> f32 {
    let ss: f32 = x.iter().map(|v| v * v).sum();
    1.0 / (ss / x.len() as f32 + eps as f32).sqrt()
}

/// `act(gate) · up` of a gated MLP, rows in parallel; `act` gives the activation and its
/// derivative.
fn gated_forward(gate: Tensor<Flex, 2>, up: Tensor<Flex, 2>, act: fn(f32) -> (f32, f32)) -> Tensor<Flex, 2> {
    let [n, d] = gate.dims();
    let (g, u) = (contiguous(gate), contiguous(up));
    let (gs, us) = (f32s(&g), f32s(&u));
    let mut y = vec![0f32; n * d];
    let per = rows_per_task(d) * d;
    y.par_chunks_mut(per).zip(gs.par_chunks(per)).zip(us.par_chunks(per)).for_each(|((yc, gc), uc)| {
        for ((y, g), u) in yc.iter_mut().zip(gc).zip(uc) {
            *y = act(*g).0 * u;
        }
    });
    tensor(y, [n, d])
}

/// Gradients of [`gated_forward`] with respect to `gate` (`grad · up · act'(gate)`) and `up`
/// (`grad · act(gate)`).
fn gated_backward(gate: Tensor<Flex, 2>, up: Tensor<Flex, 2>, grad: Tensor<Flex, 2>, act: fn(f32) -> (f32, f32)) -> (Tensor<Flex, 2>, Tensor<Flex, 2>) {
    let [n, d] = gate.dims();
    let (g, u, dy) = (contiguous(gate), contiguous(up), contiguous(grad));
    let (gs, us, dys) = (f32s(&g), f32s(&u), f32s(&dy));
    let (mut dg, mut du) = (vec![0f32; n * d], vec![0f32; n * d]);
    let per = rows_per_task(d) * d;
    dg.par_chunks_mut(per).zip(du.par_chunks_mut(per)).zip(gs.par_chunks(per).zip(us.par_chunks(per)).zip(dys.par_chunks(per))).for_each(
        |((dgc, duc), ((gc, uc), dyc))| {
            for i in 0..gc.len() {
                let (y, dydg) = act(gc[i]);
                duc[i] = dyc[i] * y;
                dgc[i] = dyc[i] * uc[i] * dydg;
            }
        },
    );
    (tensor(dg, [n, d]), tensor(du, [n, d]))
}

/// SiLU `x·σ(x)` and its derivative `σ(x)·(1 + x·(1 − σ(x)))`.
fn silu(x: f32) -> (f32, f32) {
    let s = sigmoid(x);
    (x * s, s * (1.0 + x * (1.0 - s)))
}

/// PyTorch's tanh-approximated GELU `x/2 · (1 + tanh(√(2/π)(x + 0.044715x³)))` and its derivative.
fn gelu_tanh(x: f32) -> (f32, f32) {
    const BETA: f32 = 0.797_884_6; // √(2/π)
    const K: f32 = 0.044_715;
    let t = (BETA * (x + K * x * x * x)).tanh();
    (0.5 * x * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * BETA * (1.0 + 3.0 * K * x * x))
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Masked softmax of one row of scores, in place; returns its log-sum-exp (+∞ for a row with
/// nothing to attend, which is then all zeros).
fn softmax_row(row: &mut [f32], mask: &[u8]) -> f32 {
    // NaN propagates (`f32::max` would skip it and a row of NaN scores would look fully masked).
    let max = row.iter().zip(mask).filter(|(_, &m)| m == 0).map(|(x, _)| *x).fold(f32::NEG_INFINITY, |a, x| if a.is_nan() || x.is_nan() { f32::NAN } else { a.max(x) });
    if max == f32::NEG_INFINITY {
        row.fill(0.0);
        return f32::INFINITY;
    }
    let mut sum = 0f32;
    for (x, &m) in row.iter_mut().zip(mask) {
        *x = if m == 0 { (*x - max).exp() } else { 0.0 };
        sum += *x;
    }
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|x| *x *= inv);
    max + sum.ln()
}

/// The chunked attention's row-wise parts: the tensor-op defaults (the CPU runs its own fused
/// attention and never reaches them outside tests).
impl ScoreRows for Flex {}

/// The CPU dequantizes in one pass over the codes (the same products as the tensor-op version,
/// bit for bit).
/// Tensors created on the CPU are the host data: nothing to release.
impl super::Uploads for Flex {}

impl Nf4Linear for Flex {
    fn nf4_dequantize(w: &Nf4Weight<Self>, dtype: FloatDType) -> Tensor<Self, 2> {
        use burn::tensor::TensorData;
        use rayon::prelude::*;
        let device = w.words.val().device();
        let words = w.words.val().into_primitive().to_contiguous();
        let words: &[i32] = words.as_slice().expect("i32 codes");
        let absmax: Vec<f32> = w.absmax.val().into_data().to_vec().expect("f32 absmax");
        let code: Vec<f32> = w.code.val().into_data().to_vec().expect("f32 code");
        let (n, bs) = (w.rows * w.cols, w.blocksize);
        let mut out = vec![0f32; n];
        // Chunks of whole blocks: each element reads its word's nibble and its block's absmax.
        out.par_chunks_mut(bs * 64).enumerate().for_each(|(c, chunk)| {
            let start = c * bs * 64;
            for (i, o) in chunk.iter_mut().enumerate() {
                let e = start + i;
                let nibble = (words[e / 8] >> (4 * (e % 8))) & 15;
                *o = code[nibble as usize] * absmax[e / bs];
            }
        });
        Tensor::<Self, 2>::from_data(TensorData::new(out, [w.rows, w.cols]), &device).cast(dtype)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::nf4::Nf4;

    #[test]
    fn cpu_dequantization_equals_the_tensor_op_one_bit_for_bit() {
        let dev = Default::default();
        // Sizes that leave a partial last block and a partial last word.
        for (rows, cols) in [(3, 100), (70, 64 * 65 + 7)] {
            let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 97.0).collect();
            let q = Nf4Weight::<Flex>::new(&Nf4::quantize(&w, 64, true), rows, cols, &dev);
            let fast: Vec<f32> = Flex::nf4_dequantize(&q, FloatDType::F32).into_data().to_vec().unwrap();
            let ops: Vec<f32> = q.dequantize().into_data().to_vec().unwrap();
            assert_eq!(fast, ops, "{rows}x{cols}");
        }
    }
}
