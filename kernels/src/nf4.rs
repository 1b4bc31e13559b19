//! NF4 dequantization: `w[e] = code[q(e)] · absmax[e / blocksize]`, one thread per 32-bit word of
//! eight 4-bit codes (element `8w + j` in bits `4j..4j + 4`, the layout of ft's `Nf4Weight`).
//!
//! The product is one f32 multiply, rounded once to the output type, which is what bitsandbytes'
//! `kDequantizeBlockwise` computes for NF4 (double quantization is undone into the f32 absmax
//! when the weight is loaded), so the f32 output is bit-identical to the CPU path and the bf16
//! output is its round-to-nearest-even.

use cubecl::prelude::*;

use crate::attention::View;

/// Codes per 32-bit word.
pub const CODES_PER_WORD: usize = 8;

#[cube(launch)]
fn dequantize_kernel<F: Float>(words: &Tensor<u32>, absmax: &Tensor<f32>, code: &Tensor<f32>, out: &mut Array<F>, #[comptime] blocksize: usize) {
    let w = ABSOLUTE_POS;
    let first = w * 8;
    if first < out.len() {
        // Inputs through their strides (a view of a larger buffer reads as well as its own).
        let word = words[w * words.stride(0)];
        // A block holds whole words (blocksize is a multiple of 8).
        let scale = absmax[(first / blocksize) * absmax.stride(0)];
        #[unroll]
        for j in 0..8u32 {
            let e = first + j as usize;
            if e < out.len() {
                let q = (word >> (4 * j)) & 15;
                out[e] = F::cast_from(code[q as usize * code.stride(0)] * scale);
            }
        }
    }
}

/// One NF4 weight on a device: 1-D views, any stride.
pub struct Nf4Buffers<'a> {
    /// `ceil(padded / 8)` words of eight codes (u32 or i32).
    pub words: View<'a>,
    /// One f32 per block.
    pub absmax: View<'a>,
    /// The 16 f32 NF4 values.
    pub code: View<'a>,
    /// Values per absmax (a multiple of 8; bitsandbytes uses 64).
    pub blocksize: usize,
}

/// Writes the `numel` dequantized values into `out` (a buffer of `numel` `F`s).
pub fn dequantize<R: Runtime, F: Float + CubeElement>(client: &ComputeClient<R>, w: &Nf4Buffers, out: &cubecl::server::Handle, numel: usize) {
    assert!(w.blocksize.is_multiple_of(CODES_PER_WORD), "NF4 blocksize {} is not a multiple of 8", w.blocksize);
    w.words.check(1, 4, "NF4 words");
    w.absmax.check(1, 4, "NF4 absmax");
    w.code.check(1, 4, "NF4 code");
    assert!(w.words.shape[0] * CODES_PER_WORD >= numel && w.absmax.shape[0] * w.blocksize >= numel && w.code.shape[0] == 16, "NF4 buffers too small for {numel} values");
    let threads = numel.div_ceil(CODES_PER_WORD);
    let cube_dim = CubeDim::new_1d(256);
    let cube_count = CubeCount::new_1d(threads.div_ceil(256) as u32);
    unsafe {
        dequantize_kernel::launch::<F, R>(
            client,
            cube_count,
            cube_dim,
            w.words.arg(),
            w.absmax.arg(),
            w.code.arg(),
            ArrayArg::from_raw_parts(out.clone(), numel),
            w.blocksize,
        );
    }
}

/// Every instantiation of the NF4 kernel ft launches (f32, f16, bf16 output; blocksize 64, as
/// bitsandbytes and ft quantize), defined for `client`'s runtime as [`dequantize`] launches it
/// (see `attention::definitions`).
pub(crate) fn definitions<R: Runtime>(client: &ComputeClient<R>) -> Vec<KernelDefinition> {
    fn one<R: Runtime, F: Float + CubeElement>(client: &ComputeClient<R>) -> KernelDefinition {
        let (t, a) = (|| cubecl::prelude::TensorCompilationArg { inplace: None }, cubecl::prelude::ArrayCompilationArg { inplace: None });
        let settings = KernelSettings::default().cube_dim(CubeDim::new_1d(256));
        dequantize_kernel::DequantizeKernel::<F, R>::new(settings, client.clone(), t(), t(), t(), a, 64).define()
    }
    vec![one::<R, f32>(client), one::<R, half::f16>(client), one::<R, half::bf16>(client)]
}
