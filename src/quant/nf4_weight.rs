//! NF4 weights held as backend tensors (on the GPU for CUDA runs) and dequantized with tensor
//! ops, so one code path serves every backend: the codes packed 8 per `i32` (element `8w + j` in
//! bits `4j..4j + 4`), the per-block absmax in f32 (double quantization undone once at load) and
//! the 16-value NF4 code. Resident size: 0.5 + 4/64 ≈ 0.56 bytes per parameter. Dequantization is
//! `code[q] · absmax` in f32, bit-identical to [`Nf4::dequantize`].

use burn::module::{Module, Param};
use burn::prelude::*;
use burn::tensor::{DType, Int, TensorData};

use super::nf4::{Nf4, NF4_CODE};

/// An NF4 weight `[rows, cols]` (PyTorch layout `[out, in]`) as tensors.
#[derive(Module, Debug)]
pub struct Nf4Weight<B: Backend> {
    /// Eight 4-bit codes per word.
    pub words: Param<Tensor<B, 1, Int>>,
    /// One f32 absmax per block.
    pub absmax: Param<Tensor<B, 1>>,
    /// The NF4 code.
    pub code: Param<Tensor<B, 1>>,
    #[module(skip)]
    pub rows: usize,
    #[module(skip)]
    pub cols: usize,
    #[module(skip)]
    pub blocksize: usize,
}

/// NF4's index of 0.0: what padding codes hold.
const ZERO_CODE: u32 = 7;

impl<B: Backend> Nf4Weight<B> {
    /// Moves a quantized `[rows, cols]` weight onto `device`.
    pub fn new(q: &Nf4, rows: usize, cols: usize, device: &B::Device) -> Self {
        assert_eq!(q.numel, rows * cols, "NF4 weight shape");
        let blocks = q.numel.div_ceil(q.blocksize);
        let padded = blocks * q.blocksize;
        let words: Vec<i32> = (0..padded.div_ceil(8))
            .map(|w| {
                let mut word = 0u32;
                for j in 0..8 {
                    let i = w * 8 + j;
                    let code = if i < q.numel { q.code(i) as u32 } else { ZERO_CODE };
                    word |= code << (4 * j);
                }
                word as i32
            })
            .collect();
        let n = words.len();
        let absmax = q.absmax_f32();
        // The absmax and the code stay f32 whatever the compute dtype (bitsandbytes multiplies in
        // f32 and rounds the product once).
        let f32_on = (device, DType::F32);
        Nf4Weight {
            words: Param::initialized(burn::module::ParamId::new(), Tensor::from_data(TensorData::new(words, [n]), device)),
            absmax: Param::from_tensor(Tensor::from_data(TensorData::new(absmax, [blocks]), f32_on)).set_require_grad(false),
            code: Param::from_tensor(Tensor::from_data(TensorData::new(NF4_CODE.to_vec(), [16]), f32_on)).set_require_grad(false),
            rows,
            cols,
            blocksize: q.blocksize,
        }
    }

    /// From its tensors.
    pub fn from_parts(words: Tensor<B, 1, Int>, absmax: Tensor<B, 1>, code: Tensor<B, 1>, rows: usize, cols: usize, blocksize: usize) -> Self {
        Nf4Weight {
            words: Param::initialized(burn::module::ParamId::new(), words),
            absmax: Param::from_tensor(absmax).set_require_grad(false),
            code: Param::from_tensor(code).set_require_grad(false),
            rows,
            cols,
            blocksize,
        }
    }

    /// The f32 weight `[rows, cols]`, by tensor ops.
    pub fn dequantize(&self) -> Tensor<B, 2> {
        let words = self.words.val();
        let device = words.device();
        let [n] = words.dims();
        let shifts = Tensor::<B, 1, Int>::from_data(TensorData::new((0..8).map(|j| 4 * j).collect::<Vec<i32>>(), [8]), &device);
        let codes = words
            .reshape([n, 1])
            .expand([n, 8])
            .bitwise_right_shift(shifts.reshape([1, 8]).expand([n, 8]))
            .bitwise_and_scalar(15.elem())
            .reshape([n * 8]);
        let [blocks] = self.absmax.dims();
        let values = self.code.val().select(0, codes).narrow(0, 0, blocks * self.blocksize);
        let values = values.reshape([blocks, self.blocksize]) * self.absmax.val().reshape([blocks, 1]);
        values.reshape([blocks * self.blocksize]).narrow(0, 0, self.rows * self.cols).reshape([self.rows, self.cols])
    }

    /// Resident bytes (codes and absmax).
    pub fn bytes(&self) -> usize {
        4 * self.words.dims()[0] + 4 * self.absmax.dims()[0]
    }
}

impl<B: burn::tensor::backend::AutodiffBackend> Nf4Weight<B> {
    /// The same weight on the inner (non-autodiff) backend.
    pub fn inner(&self) -> Nf4Weight<B::InnerBackend> {
        Nf4Weight::from_parts(self.words.val().inner(), self.absmax.val().inner(), self.code.val().inner(), self.rows, self.cols, self.blocksize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Cpu;

    #[test]
    fn tensor_dequantization_is_bit_identical_to_the_host_one() {
        // 3 × 70 = 210 values: a partial last block and a partial last word.
        let x: Vec<f32> = (0..210).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
        for double in [false, true] {
            let q = Nf4::quantize(&x, 64, double);
            let t = Nf4Weight::<Cpu>::new(&q, 3, 70, &Default::default());
            let got: Vec<f32> = t.dequantize().into_data().to_vec().unwrap();
            let want = q.dequantize();
            assert_eq!(got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
        }
    }
}
