//! ft-kernels' CubeCL kernels launched on the buffers of burn's CubeCL tensors (CUDA; wgpu in
//! tests), each tensor read through its own strides and offset (cubecl-cuda pitches every row to
//! 512 bytes; narrowed views share their buffer). Only an input the kernels cannot take (an
//! unexpected dtype or shape) runs the tensor-op default, counted in [`super::kernel_use`].
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
use ft_kernels::attention::{masked_softmax, softmax_grad, Chunk, View};

use ft_kernels::nf4::{dequantize, Nf4Buffers};

use super::chunked::{self, Geometry};
use super::kernel_use::{MASKED_SOFTMAX, NF4_DEQUANTIZE, SOFTMAX_GRAD};
use super::{Nf4Linear, ScoreRows, Uploads};
use crate::quant::nf4_weight::Nf4Weight;

fn float<R: CubeRuntime, const D: usize, B: Backend<FloatTensorPrimitive = CubeTensor<R>>>(t: Tensor<B, D>) -> CubeTensor<R> {
    t.into_primitive().tensor()
}

fn tensor<R: CubeRuntime, B: Backend<FloatTensorPrimitive = CubeTensor<R>>, const D: usize>(t: CubeTensor<R>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// The kernels' view of a tensor.
fn view<R: CubeRuntime>(t: &CubeTensor<R>) -> View<'_> {
    View { handle: &t.handle, shape: t.meta.shape(), strides: t.meta.strides() }
}

/// The chunk's rows and the mask, when the kernels can take them: a float dtype they are
/// instantiated for, a u8/u32 mask, the scores `[B, KV, rep·C, keys]` within the mask.
fn chunk<R: CubeRuntime, B: Backend<BoolTensorPrimitive = CubeTensor<R>>>(g: &Geometry, raw: &CubeTensor<R>, mask: &Tensor<B, 3, Bool>, rows: &Range<usize>) -> Option<(Chunk, CubeTensor<R>)> {
    let mask_t: CubeTensor<R> = mask.clone().into_primitive();
    let [mb, mask_len_t, mask_s] = mask.dims();
    let float_ok = matches!(raw.dtype, DType::F32 | DType::BF16 | DType::F16);
    let mask_ok = matches!(mask_t.dtype, DType::Bool(BoolStore::U8) | DType::Bool(BoolStore::U32));
    let [b, kv, n, keys] = raw.shape().dims::<4>();
    let fits = b == g.b && kv == g.kv && n == g.rep() * rows.len() && keys <= mask_s && rows.end <= mask_len_t && (mb == 1 || mb == g.b);
    (float_ok && mask_ok && fits && !rows.is_empty()).then_some((Chunk { rows: rows.len(), t0: rows.start }, mask_t))
}

/// A new contiguous tensor on `like`'s device.
fn empty<R: CubeRuntime>(like: &CubeTensor<R>, shape: Shape, dtype: DType) -> CubeTensor<R> {
    let handle = like.client.empty(shape.num_elements() * dtype.size());
    CubeTensor::new_contiguous(like.client.clone(), like.device.clone(), shape, handle, dtype)
}

/// Calls `$f::<R, F, M>` for the float dtype `$dtype` and the mask's storage `$mask`.
macro_rules! launch {
    ($f:ident, $dtype:expr, $mask:expr, $($arg:expr),*) => {{
        match ($dtype, $mask.dtype) {
            (DType::F32, DType::Bool(BoolStore::U8)) => $f::<R, f32, u8>($($arg),*),
            (DType::F32, _) => $f::<R, f32, u32>($($arg),*),
            (DType::BF16, DType::Bool(BoolStore::U8)) => $f::<R, half::bf16, u8>($($arg),*),
            (DType::BF16, _) => $f::<R, half::bf16, u32>($($arg),*),
            (_, DType::Bool(BoolStore::U8)) => $f::<R, half::f16, u8>($($arg),*),
            (_, _) => $f::<R, half::f16, u32>($($arg),*),
        }
    }};
}

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> ScoreRows for CubeBackend<R, F, I, BT> {
    fn masked_softmax(g: &Geometry, raw: Tensor<Self, 4>, mask: &Tensor<Self, 3, Bool>, rows: &Range<usize>, scale: f64) -> (Tensor<Self, 4>, Tensor<Self, 3>) {
        let raw_t: CubeTensor<R> = float(raw.clone());
        let Some((c, mask_t)) = chunk(g, &raw_t, mask, rows) else {
            MASKED_SOFTMAX.fallback();
            return chunked::masked_softmax_ops(g, raw, mask, rows, scale);
        };
        MASKED_SOFTMAX.kernel();
        let [b, kv, n, _] = raw.dims();
        let probs = empty(&raw_t, raw_t.shape(), raw_t.dtype);
        let lse = empty(&raw_t, Shape::new([b, kv, n]), DType::F32);
        launch!(masked_softmax, raw_t.dtype, mask_t, &raw_t.client, &c, &view(&raw_t), &view(&mask_t), &view(&probs), &view(&lse), scale as f32);
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
        // lse and delta: f32 per row, any layout (a chunk's lse is a narrowed view).
        let (lse_t, delta_t): (CubeTensor<R>, CubeTensor<R>) = (float(lse.clone()), float(delta.clone()));
        let stats_ok = lse_t.dtype == DType::F32 && delta_t.dtype == DType::F32 && dp_t.dtype == raw_t.dtype;
        let Some((c, mask_t)) = chunk(g, &raw_t, mask, rows).filter(|_| stats_ok && dp_t.shape() == raw_t.shape()) else {
            SOFTMAX_GRAD.fallback();
            return chunked::softmax_grad_ops(g, raw, dp, mask, rows, lse, delta, scale);
        };
        SOFTMAX_GRAD.kernel();
        let probs = empty(&raw_t, raw_t.shape(), raw_t.dtype);
        let dscores = empty(&raw_t, raw_t.shape(), raw_t.dtype);
        launch!(
            softmax_grad,
            raw_t.dtype,
            mask_t,
            &raw_t.client,
            &c,
            &view(&raw_t),
            &view(&dp_t),
            &view(&mask_t),
            &view(&lse_t),
            &view(&delta_t),
            &view(&probs),
            &view(&dscores),
            scale as f32
        );
        (tensor(probs), tensor(dscores))
    }
}

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> Uploads for CubeBackend<R, F, I, BT> {
    fn release_uploads(device: &Self::Device) {
        release_uploads::<R>(device);
    }
}

/// Flushes `device`'s upload queue twice: cubecl keeps each flushed batch until the next flush
/// has waited for the device to read it (a double buffer), so the second flush frees them all.
/// Errors are the device's and surface at its next operation.
fn release_uploads<R: CubeRuntime>(device: &R::Device) {
    let client = R::client(device);
    for _ in 0..2 {
        let _ = client.flush();
    }
}

// Under burn's fusion (`cuda-tuned`) the uploads are the CUDA runtime's.
#[cfg(feature = "cuda-tuned")]
impl Uploads for crate::backend::CudaF32 {
    fn release_uploads(device: &Self::Device) {
        release_uploads::<cubecl_cuda::CudaRuntime>(device);
    }
}

#[cfg(feature = "cuda-tuned")]
impl Uploads for crate::backend::CudaBf16 {
    fn release_uploads(device: &Self::Device) {
        release_uploads::<cubecl_cuda::CudaRuntime>(device);
    }
}

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> Nf4Linear for CubeBackend<R, F, I, BT> {
    fn nf4_dequantize(w: &Nf4Weight<Self>, dtype: FloatDType) -> Tensor<Self, 2> {
        let words: CubeTensor<R> = w.words.val().into_primitive();
        let absmax: CubeTensor<R> = w.absmax.val().into_primitive().tensor();
        let code: CubeTensor<R> = w.code.val().into_primitive().tensor();
        let out_dtype = DType::from(dtype);
        let kernel_types = matches!(words.dtype, DType::I32 | DType::U32) && absmax.dtype == DType::F32 && code.dtype == DType::F32;
        let sizes = words.shape().num_elements() * 8 >= w.rows * w.cols && absmax.shape().num_elements() * w.blocksize >= w.rows * w.cols && code.shape().num_elements() == 16;
        if !kernel_types || !sizes || !w.blocksize.is_multiple_of(8) || !matches!(out_dtype, DType::F32 | DType::BF16 | DType::F16) {
            // Not what Nf4Weight::new makes: the tensor-op path.
            NF4_DEQUANTIZE.fallback();
            return w.dequantize().cast(dtype);
        }
        NF4_DEQUANTIZE.kernel();
        let numel = w.rows * w.cols;
        let client = words.client.clone();
        let out = client.empty(numel * out_dtype.size());
        let buffers = Nf4Buffers { words: view(&words), absmax: view(&absmax), code: view(&code), blocksize: w.blocksize };
        match out_dtype {
            DType::F32 => dequantize::<R, f32>(&client, &buffers, &out, numel),
            DType::BF16 => dequantize::<R, half::bf16>(&client, &buffers, &out, numel),
            _ => dequantize::<R, half::f16>(&client, &buffers, &out, numel),
        }
        let out = CubeTensor::new_contiguous(client, words.device.clone(), Shape::new([w.rows, w.cols]), out, out_dtype);
        Tensor::from_primitive(TensorPrimitive::Float(out))
    }
}
