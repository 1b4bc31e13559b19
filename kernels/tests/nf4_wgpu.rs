//! The NF4 kernel on wgpu (in CI: Mesa's lavapipe Vulkan driver on the CPU), against the host
//! computation `code[q] · absmax`, bit for bit. Run with `cargo test -p ft-kernels --features wgpu`.
#![cfg(feature = "wgpu")]

use cubecl::prelude::*;
use cubecl::wgpu::{WgpuDevice, WgpuRuntime};
use ft_kernels::attention::View;
use ft_kernels::nf4::{dequantize, Nf4Buffers};

/// bitsandbytes' NF4 code.
const NF4: [f32; 16] = [
    -1.0, -0.696_192_8, -0.525_073_05, -0.394_917_5, -0.284_441_38, -0.184_773_43, -0.091_050_036, 0.0, 0.079_580_3, 0.160_930_2,
    0.246_112_3, 0.337_915_24, 0.440_709_83, 0.562_617, 0.722_956_84, 1.0,
];

struct Case {
    words: Vec<u32>,
    absmax: Vec<f32>,
    numel: usize,
    blocksize: usize,
}

impl Case {
    /// Pseudo-random codes and scales; `numel` need not fill the last word or block.
    fn new(numel: usize, blocksize: usize, seed: u64) -> Case {
        let mut s = seed;
        let mut next = || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (s >> 33) as u32
        };
        let blocks = numel.div_ceil(blocksize);
        let words = (0..(blocks * blocksize).div_ceil(8)).map(|_| next()).collect();
        let absmax = (0..blocks).map(|_| (next() % 10_000) as f32 / 997.0 + 1e-3).collect();
        Case { words, absmax, numel, blocksize }
    }

    fn host(&self) -> Vec<f32> {
        (0..self.numel).map(|e| NF4[((self.words[e / 8] >> (4 * (e % 8))) & 15) as usize] * self.absmax[e / self.blocksize]).collect()
    }

    fn device<F: Float + CubeElement>(&self) -> Vec<F> {
        self.device_strided::<F>(1, 0)
    }

    /// The kernel's output with every input a view: element `i` at `offset + stride · i` of its
    /// buffer, the elements between and before it garbage (all bits set: NaN scales, code 15).
    fn device_strided<F: Float + CubeElement>(&self, stride: usize, offset: usize) -> Vec<F> {
        let client = WgpuRuntime::client(&WgpuDevice::default());
        let place = |v: &[u32]| {
            let mut buf = vec![u32::MAX; offset + v.len() * stride];
            for (i, x) in v.iter().enumerate() {
                buf[offset + i * stride] = *x;
            }
            client.create_from_slice(bytemuck::cast_slice(&buf)).offset_start(4 * offset as u64)
        };
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
        let (words, absmax, code) = (place(&self.words), place(&bits(&self.absmax)), place(&bits(&NF4)));
        let out = client.empty(self.numel * std::mem::size_of::<F>());
        let (nw, nb, st) = ([self.words.len()], [self.absmax.len()], [stride]);
        let view = |handle, shape| View { handle, shape, strides: &st };
        let buffers = Nf4Buffers { words: view(&words, &nw), absmax: view(&absmax, &nb), code: view(&code, &[16]), blocksize: self.blocksize };
        dequantize::<WgpuRuntime, F>(&client, &buffers, &out, self.numel);
        F::from_bytes(&client.read_one_unchecked(out)).to_vec()
    }
}

#[test]
fn f32_output_is_bit_identical_to_the_host() {
    // Whole blocks; a partial last word and block; one value; blocksize 256; several thousand cubes.
    for (numel, blocksize) in [(64 * 40, 64), (3 * 70, 64), (1, 64), (1000, 256), (576 * 1536 + 4, 64)] {
        let case = Case::new(numel, blocksize, numel as u64);
        let got: Vec<u32> = case.device::<f32>().iter().map(|v| v.to_bits()).collect();
        let want: Vec<u32> = case.host().iter().map(|v| v.to_bits()).collect();
        assert_eq!(got.len(), want.len());
        let bad = got.iter().zip(&want).position(|(a, b)| a != b);
        assert!(bad.is_none(), "{numel} values, blocksize {blocksize}: first difference at {bad:?}");
    }
}

#[test]
fn f16_output_is_the_rounded_f32_product() {
    // WGSL has f16 but no bf16; bf16 output is checked on the GPU machine (scripts/gpu-check.sh).
    let client = WgpuRuntime::client(&WgpuDevice::default());
    if !half::f16::supported_uses(&client).contains(cubecl::features::TypeUsage::Arithmetic) {
        eprintln!("this wgpu adapter has no f16; skipping the f16 case");
        return;
    }
    let case = Case::new(64 * 33 + 5, 64, 7);
    let got: Vec<u16> = case.device::<half::f16>().iter().map(|v| v.to_bits()).collect();
    let want: Vec<u16> = case.host().iter().map(|&v| half::f16::from_f32(v).to_bits()).collect();
    assert_eq!(got, want);
}

#[test]
fn strided_inputs_at_an_offset_give_the_same_bits() {
    // Words, scales and the code table each a view (every third element, after a bound-aligned
    // offset of garbage): what a slice of a stacked weight looks like to the kernel.
    let client = WgpuRuntime::client(&WgpuDevice::default());
    let offset = (client.properties().memory.alignment as usize / 4).max(1);
    let case = Case::new(64 * 21 + 3, 64, 5);
    let got: Vec<u32> = case.device_strided::<f32>(3, offset).iter().map(|v| v.to_bits()).collect();
    let want: Vec<u32> = case.host().iter().map(|v| v.to_bits()).collect();
    assert_eq!(got, want);
}
