//! The QLoRA linear map `x · Wᵀ` with `W` held in NF4: the weight is dequantized for the forward
//! and dequantized again in the backward, never kept between them, so training holds only the
//! 4-bit codes (as bitsandbytes' `MatMul4Bit` does). Only the input gradient exists: `W` is
//! frozen.
//!
//! A backend trait: plain backends compute `x · dequant(W)ᵀ` with tensor ops; the autodiff
//! backend registers its own backward step instead of letting the matmul keep `W` for it.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{unary, Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{FloatDType, TensorPrimitive};

use super::tensor::Nf4Weight;

/// Backends ft runs its decoder on.
pub trait Nf4Linear: Backend {
    /// `x [rows, in] · Wᵀ` for the NF4 weight `W [out, in]` → `[rows, out]`, in `x`'s dtype.
    fn nf4_linear(x: Tensor<Self, 2>, w: &Nf4Weight<Self>) -> Tensor<Self, 2> {
        let wt = Self::nf4_dequantize(w, x.dtype().into());
        x.matmul(wt.transpose())
    }

    /// The weight `[out, in]` in `dtype`: each value the f32 product `code[q] · absmax` rounded
    /// once (tensor ops by default).
    fn nf4_dequantize(w: &Nf4Weight<Self>, dtype: FloatDType) -> Tensor<Self, 2> {
        w.dequantize().cast(dtype)
    }
}

/// The CPU dequantizes in one pass over the codes (the same products as the tensor-op version,
/// bit for bit).
impl Nf4Linear for crate::backend::Cpu {
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

// burn's CubeCL backends (CUDA, and wgpu for tests) launch ft-kernels' NF4 kernel: see
// `quant::gpu`. With burn's fusion (`cuda-tuned`) the tensor-op default runs instead.
#[cfg(feature = "cuda-tuned")]
impl Nf4Linear for crate::backend::CudaF32 {}

#[cfg(feature = "cuda-tuned")]
impl Nf4Linear for crate::backend::CudaBf16 {}

/// What the backward step needs to dequantize `W` again.
#[derive(Debug, Clone)]
struct Packed<B: Backend> {
    words: IntTensor<B>,
    absmax: FloatTensor<B>,
    code: FloatTensor<B>,
    rows: usize,
    cols: usize,
    blocksize: usize,
}

impl<B: Backend> Packed<B> {
    fn weight(&self) -> Nf4Weight<B> {
        Nf4Weight::from_parts(
            Tensor::from_primitive(self.words.clone()),
            Tensor::from_primitive(TensorPrimitive::Float(self.absmax.clone())),
            Tensor::from_primitive(TensorPrimitive::Float(self.code.clone())),
            self.rows,
            self.cols,
            self.blocksize,
        )
    }
}

#[derive(Debug)]
struct Nf4LinearBackward;

impl<B: Nf4Linear> Backward<B, 1> for Nf4LinearBackward {
    type State = Packed<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let packed = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |grad| {
            // d(x · Wᵀ)/dx = grad · W, with W dequantized again here.
            let grad = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(grad));
            let dtype = grad.dtype().into();
            grad.matmul(B::nf4_dequantize(&packed.weight(), dtype)).into_primitive().tensor()
        });
    }
}

impl<B: Nf4Linear, C: CheckpointStrategy> Nf4Linear for Autodiff<B, C> {
    fn nf4_linear(x: Tensor<Self, 2>, w: &Nf4Weight<Self>) -> Tensor<Self, 2> {
        let inner = w.inner();
        let x = x.into_primitive().tensor();
        let x_inner = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(x.primitive.clone()));
        let out = B::nf4_linear(x_inner, &inner).into_primitive().tensor();
        let out = match Nf4LinearBackward.prepare::<C>([x.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let state = Packed {
                    words: inner.words.val().into_primitive(),
                    absmax: inner.absmax.val().into_primitive().tensor(),
                    code: inner.code.val().into_primitive().tensor(),
                    rows: inner.rows,
                    cols: inner.cols,
                    blocksize: inner.blocksize,
                };
                prep.finish(state, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(out),
        };
        Tensor::from_primitive(TensorPrimitive::Float(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Cpu;
    use crate::quant::nf4::Nf4;
    use burn::tensor::TensorData;

    type Ad = Autodiff<Cpu>;

    #[test]
    fn cpu_dequantization_equals_the_tensor_op_one_bit_for_bit() {
        let dev = Default::default();
        // Sizes that leave a partial last block and a partial last word.
        for (rows, cols) in [(3, 100), (70, 64 * 65 + 7)] {
            let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 97.0).collect();
            let q = Nf4Weight::<Cpu>::new(&Nf4::quantize(&w, 64, true), rows, cols, &dev);
            let fast: Vec<f32> = Cpu::nf4_dequantize(&q, FloatDType::F32).into_data().to_vec().unwrap();
            let ops: Vec<f32> = q.dequantize().into_data().to_vec().unwrap();
            assert_eq!(fast, ops, "{rows}x{cols}");
        }
    }

    #[test]
    fn gradient_equals_the_dense_matmul_gradient() {
        let dev = Default::default();
        let (out, inp) = (5, 128);
        let w: Vec<f32> = (0..out * inp).map(|i| ((i * 7919 % 257) as f32 - 128.0) / 300.0).collect();
        let q = Nf4::quantize(&w, 64, true);
        let x: Vec<f32> = (0..3 * inp).map(|i| ((i * 31 % 17) as f32 - 8.0) / 10.0).collect();
        let c: Vec<f32> = (0..3 * out).map(|i| i as f32 - 4.0).collect();
        let c = Tensor::<Ad, 2>::from_data(TensorData::new(c, [3, out]), &dev);

        let xq = Tensor::<Ad, 2>::from_data(TensorData::new(x.clone(), [3, inp]), &dev).require_grad();
        let yq = Ad::nf4_linear(xq.clone(), &Nf4Weight::new(&q, out, inp, &dev));
        let gq = (yq.clone() * c.clone()).sum().backward();
        let gq: Vec<f32> = xq.grad(&gq).unwrap().into_data().to_vec().unwrap();

        let xd = Tensor::<Ad, 2>::from_data(TensorData::new(x, [3, inp]), &dev).require_grad();
        let wd = Tensor::<Ad, 2>::from_data(TensorData::new(q.dequantize(), [out, inp]), &dev);
        let yd = xd.clone().matmul(wd.transpose());
        let gd = (yd.clone() * c).sum().backward();
        let gd: Vec<f32> = xd.grad(&gd).unwrap().into_data().to_vec().unwrap();

        let (yq, yd): (Vec<f32>, Vec<f32>) = (yq.into_data().to_vec().unwrap(), yd.into_data().to_vec().unwrap());
        assert_eq!(yq, yd);
        for (a, b) in gq.iter().zip(&gd) {
            assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{a} vs {b}");
        }
    }
}
