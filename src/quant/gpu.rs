//! NF4 dequantization on burn's CubeCL backends: ft-kernels' CubeCL kernel launched on the
//! buffers of an [`Nf4Weight`], writing the weight straight in the compute dtype (bf16 on the
//! GPU: one rounding of the f32 product, as bitsandbytes). One generic impl serves CUDA and, for
//! tests without a GPU, wgpu. Under burn's fusion (`cuda-tuned`) the tensor-op default runs.

use burn::prelude::*;
use burn::tensor::{DType, FloatDType, Shape, TensorMetadata, TensorPrimitive};
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use ft_kernels::nf4::{dequantize, Nf4Buffers};

use super::linear::Nf4Linear;
use super::tensor::Nf4Weight;

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
