//! ft-kernels' CubeCL kernels launched on the buffers of burn's CubeCL tensors (CUDA; wgpu in
//! tests). Inputs laid out otherwise than expected (not contiguous, an unexpected dtype) take the
//! tensor-op default.
//!
//! - The chunked attention's row-wise parts ([`ScoreRows`]): one kernel where the tensor-op
//!   default runs about eight over the chunk's score matrix.
//! - NF4 dequantization ([`Nf4Linear`]): written straight in the compute dtype (bf16 on the GPU:
//!   one rounding of the f32 product, as bitsandbytes). Under burn's fusion (`cuda-tuned`) the
//!   tensor-op default runs.

use std::ops::Range;

use burn::prelude::*;
use burn::tensor::{Bool, BoolStore, DType, FloatDType, Shape, TensorMetadata, TensorPrimitive};
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use ft_kernels::attention::{masked_softmax, softmax_grad, ChunkLayout};

use ft_kernels::nf4::{dequantize, Nf4Buffers};

use super::chunked::{self, Geometry};
use super::{Nf4Linear, ScoreRows};
use crate::quant::nf4_weight::Nf4Weight;

/// The float and mask buffers of one call, when the kernels can take them.
struct Buffers<R: CubeRuntime> {
    layout: ChunkLayout,
    dtype: DType,
    mask: CubeTensor<R>,
}

fn float<R: CubeRuntime, const D: usize, B: Backend<FloatTensorPrimitive = CubeTensor<R>>>(t: Tensor<B, D>) -> CubeTensor<R> {
    t.into_primitive().tensor()
}

fn tensor<R: CubeRuntime, B: Backend<FloatTensorPrimitive = CubeTensor<R>>, const D: usize>(t: CubeTensor<R>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// The kernels' view of a chunk, or `None` where they do not apply.
fn buffers<R: CubeRuntime, B: Backend<BoolTensorPrimitive = CubeTensor<R>>>(g: &Geometry, raw: &CubeTensor<R>, mask: &Tensor<B, 3, Bool>, rows: &Range<usize>) -> Option<Buffers<R>> {
    let mask_t: CubeTensor<R> = mask.clone().into_primitive();
    let [mb, mask_len_t, mask_s] = mask.dims();
    let dtype = raw.dtype;
    let float_ok = matches!(dtype, DType::F32 | DType::BF16 | DType::F16) && raw.is_contiguous();
    let mask_ok = matches!(mask_t.dtype, DType::Bool(BoolStore::U8) | DType::Bool(BoolStore::U32)) && mask_t.is_contiguous();
    let [b, kv, n, keys] = raw.shape().dims::<4>();
    if !(float_ok && mask_ok && b == g.b && kv == g.kv && n == g.rep() * rows.len() && keys <= mask_s && (mb == 1 || mb == g.b)) {
        return None;
    }
    let layout = ChunkLayout {
        rows: b * kv * n,
        keys,
        rows_per_batch: kv * n,
        chunk: rows.len(),
        t0: rows.start,
        mask_t: mask_len_t,
        mask_s,
        mask_batched: mb > 1,
    };
    Some(Buffers { layout, dtype, mask: mask_t })
}

/// A new contiguous tensor on `like`'s device.
fn empty<R: CubeRuntime>(like: &CubeTensor<R>, shape: Shape, dtype: DType) -> CubeTensor<R> {
    let handle = like.client.empty(shape.num_elements() * dtype.size());
    CubeTensor::new_contiguous(like.client.clone(), like.device.clone(), shape, handle, dtype)
}

/// Calls `$f::<R, F, M>` for the chunk's float dtype and mask storage.
macro_rules! launch {
    ($f:ident, $buf:expr, $client:expr, $($arg:expr),*) => {{
        match ($buf.dtype, $buf.mask.dtype) {
            (DType::F32, DType::Bool(BoolStore::U8)) => $f::<R, f32, u8>($client, &$buf.layout, $($arg),*),
            (DType::F32, _) => $f::<R, f32, u32>($client, &$buf.layout, $($arg),*),
            (DType::BF16, DType::Bool(BoolStore::U8)) => $f::<R, half::bf16, u8>($client, &$buf.layout, $($arg),*),
            (DType::BF16, _) => $f::<R, half::bf16, u32>($client, &$buf.layout, $($arg),*),
            (_, DType::Bool(BoolStore::U8)) => $f::<R, half::f16, u8>($client, &$buf.layout, $($arg),*),
            (_, _) => $f::<R, half::f16, u32>($client, &$buf.layout, $($arg),*),
        }
    }};
}

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> ScoreRows for CubeBackend<R, F, I, BT> {
    fn masked_softmax(g: &Geometry, raw: Tensor<Self, 4>, mask: &Tensor<Self, 3, Bool>, rows: &Range<usize>, scale: f64) -> (Tensor<Self, 4>, Tensor<Self, 3>) {
        let raw_t: CubeTensor<R> = float(raw.clone());
        let Some(buf) = buffers(g, &raw_t, mask, rows) else {
            return chunked::masked_softmax_ops(g, raw, mask, rows, scale);
        };
        let [b, kv, n, _] = raw.dims();
        let probs = empty(&raw_t, raw_t.shape(), buf.dtype);
        let lse = empty(&raw_t, Shape::new([b, kv, n]), DType::F32);
        let mask_len = buf.mask.shape().num_elements();
        launch!(masked_softmax, buf, &raw_t.client, &raw_t.handle, &buf.mask.handle, mask_len, &probs.handle, &lse.handle, scale as f32);
        (tensor(probs), tensor(lse))
    }

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
        let (raw_t, dp_t): (CubeTensor<R>, CubeTensor<R>) = (float(raw.clone()), float(dp.clone()));
        // lse and delta are f32 per row; made contiguous (a chunk's lse is a narrowed view).
        let (lse_t, delta_t): (CubeTensor<R>, CubeTensor<R>) = (float(lse.clone() + 0.0), float(delta.clone() + 0.0));
        let stats_ok = lse_t.dtype == DType::F32 && delta_t.dtype == DType::F32 && lse_t.is_contiguous() && delta_t.is_contiguous();
        let buf = buffers(g, &raw_t, mask, rows).filter(|_| stats_ok && dp_t.is_contiguous() && dp_t.dtype == raw_t.dtype);
        let Some(buf) = buf else {
            return chunked::softmax_grad_ops(g, raw, dp, mask, rows, lse, delta, scale);
        };
        let probs = empty(&raw_t, raw_t.shape(), buf.dtype);
        let dscores = empty(&raw_t, raw_t.shape(), buf.dtype);
        let mask_len = buf.mask.shape().num_elements();
        launch!(
            softmax_grad,
            buf,
            &raw_t.client,
            &raw_t.handle,
            &dp_t.handle,
            &buf.mask.handle,
            mask_len,
            &lse_t.handle,
            &delta_t.handle,
            &probs.handle,
            &dscores.handle,
            scale as f32
        );
        (tensor(probs), tensor(dscores))
    }
}

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> Nf4Linear for CubeBackend<R, F, I, BT> {
    fn nf4_dequantize(w: &Nf4Weight<Self>, dtype: FloatDType) -> Tensor<Self, 2> {
        let words: CubeTensor<R> = w.words.val().into_primitive();
        let absmax: CubeTensor<R> = w.absmax.val().into_primitive().tensor();
        let code: CubeTensor<R> = w.code.val().into_primitive().tensor();
        let out_dtype = DType::from(dtype);
        let kernel_types = matches!(words.dtype, DType::I32 | DType::U32) && absmax.dtype == DType::F32 && code.dtype == DType::F32;
        let contiguous = words.is_contiguous() && absmax.is_contiguous() && code.is_contiguous();
        if !kernel_types || !contiguous || !matches!(out_dtype, DType::F32 | DType::BF16 | DType::F16) {
            // Not laid out as Nf4Weight::new makes them: the tensor-op path.
            return w.dequantize().cast(dtype);
        }
        let numel = w.rows * w.cols;
        let client = words.client.clone();
        let out = client.empty(numel * out_dtype.size());
        let buffers = Nf4Buffers {
            words: &words.handle,
            n_words: words.shape().num_elements(),
            absmax: &absmax.handle,
            n_blocks: absmax.shape().num_elements(),
            code: &code.handle,
            blocksize: w.blocksize,
        };
        match out_dtype {
            DType::F32 => dequantize::<R, f32>(&client, &buffers, &out, numel),
            DType::BF16 => dequantize::<R, half::bf16>(&client, &buffers, &out, numel),
            _ => dequantize::<R, half::f16>(&client, &buffers, &out, numel),
        }
        let out = CubeTensor::new_contiguous(client, words.device.clone(), Shape::new([w.rows, w.cols]), out, out_dtype);
        Tensor::from_primitive(TensorPrimitive::Float(out))
    }
}
