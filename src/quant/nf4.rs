//! NF4 (4-bit NormalFloat) blockwise quantization as bitsandbytes computes it.
//!
//! Per block of `blocksize` (64) consecutive values: `absmax = max |x|` (f32); each value is
//! scaled `clamp(x · (1/absmax), −1, 1)` (a trailing partial block divides by its absmax
//! instead, as bitsandbytes does), and takes the index of the nearest NF4 code, found as the
//! number of midpoints between neighbouring codes strictly below it (`torch.bucketize`: a value
//! exactly on a midpoint takes the lower code). Two codes per byte, element `2k` in the high
//! nibble; an odd count is padded with a zero value. Dequantization is `code[q] · absmax` in f32.
//!
//! With double quantization the f32 absmax is stored as 8-bit dynamic codes of `absmax − mean`
//! in blocks of 256 ([`super::dynamic`]) plus one f32 absmax per 256 blocks and the f32 offset.

use super::dynamic;

/// The 16 NF4 values (bitsandbytes' `get_4bit_type("nf4")`), sorted. Written with
/// bitsandbytes' own digits (more than f32 holds) so the source can be compared with theirs.
#[allow(clippy::excessive_precision)]
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_800_998_687_7,
    -0.525_073_051_452_636_7,
    -0.394_917_488_098_144_53,
    -0.284_441_381_692_886_35,
    -0.184_773_430_228_233_34,
    -0.091_050_036_251_544_95,
    0.0,
    0.079_580_299_556_255_34,
    0.160_930_201_411_247_25,
    0.246_112_301_945_686_34,
    0.337_915_241_718_292_24,
    0.440_709_829_330_444_34,
    0.562_617_003_917_694_1,
    0.722_956_836_223_602_3,
    1.0,
];

/// bitsandbytes' default (and QLoRA's) block size.
pub const BLOCKSIZE: usize = 64;

/// Blocks of absmax per nested (double-quantization) block.
pub const NESTED_BLOCKSIZE: usize = 256;

/// The absmax of NF4 blocks, plain or double-quantized.
#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    Plain(Vec<f32>),
    Double(DoubleQuant),
}

/// Double-quantized absmax: `absmax[i] ≈ nested_code[codes[i]] · nested_absmax[i / 256] + offset`.
#[derive(Debug, Clone, PartialEq)]
pub struct DoubleQuant {
    pub codes: Vec<u8>,
    pub nested_absmax: Vec<f32>,
    pub offset: f32,
}

/// A quantized tensor: packed codes, absmax, element count.
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4 {
    /// `ceil(n / 2)` bytes.
    pub packed: Vec<u8>,
    pub absmax: Absmax,
    pub numel: usize,
    pub blocksize: usize,
}

fn bounds() -> [f32; 15] {
    std::array::from_fn(|i| (NF4_CODE[i] + NF4_CODE[i + 1]) / 2.0)
}

/// Index of the code for a scaled value: the number of bounds strictly below it.
fn bucket(x: f32, bounds: &[f32]) -> u8 {
    bounds.partition_point(|&b| b < x) as u8
}

/// `(packed, absmax)` of `x` with plain f32 absmax.
pub fn quantize(x: &[f32], blocksize: usize) -> (Vec<u8>, Vec<f32>) {
    let b = bounds();
    let n = x.len();
    let full = n - n % blocksize;
    let mut q = Vec::with_capacity(n + 1);
    let mut absmax = Vec::with_capacity(n.div_ceil(blocksize));
    for block in x[..full].chunks(blocksize) {
        let am = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        absmax.push(am);
        let inv = 1.0 / am.max(1e-38);
        q.extend(block.iter().map(|&v| bucket((v * inv).clamp(-1.0, 1.0), &b)));
    }
    if full < n {
        let am = x[full..].iter().fold(0f32, |m, v| m.max(v.abs()));
        absmax.push(am);
        let am = am.max(1e-38);
        q.extend(x[full..].iter().map(|&v| bucket((v / am).clamp(-1.0, 1.0), &b)));
    }
    if q.len() % 2 == 1 {
        q.push(bucket(0.0, &b));
    }
    let packed = q.chunks(2).map(|p| (p[0] << 4) | p[1]).collect();
    (packed, absmax)
}

/// `torch.sum` of a contiguous f32 vector as PyTorch's CPU kernel computes it (single-threaded
/// range): 8-lane vectors summed by `row_sum` (4 interleaved accumulators, each a 4-level
/// cascade), the scalar tail, then the 8 lanes in order. bitsandbytes' double-quantization
/// offset is this sum divided by the count, so matching it bit for bit needs the same order.
/// (torch splits reductions of more than 32768 values across threads; for such tensors the last
/// bit of the offset can depend on the thread count of the machine that quantized.) The loops
/// index the accumulators as PyTorch's `cascade_sum` does, so the two read side by side.
#[allow(clippy::needless_range_loop)]
pub fn torch_sum_f32(x: &[f32]) -> f32 {
    const W: usize = 8;
    const ILP: usize = 4;
    const LEVELS: usize = 4;
    type V = [f32; W];
    let add = |a: &mut V, b: &V| a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
    let vecs: Vec<V> = x.chunks_exact(W).map(|c| c.try_into().expect("8 lanes")).collect();
    // multi_row_sum over rows of ILP vectors.
    let rows = vecs.len() / ILP;
    let ceil_log2 = |n: usize| if n <= 1 { 0 } else { usize::BITS - (n - 1).leading_zeros() } as usize;
    let power = 4usize.max(ceil_log2(rows) / LEVELS);
    let (step, mask) = (1usize << power, (1usize << power) - 1);
    let mut acc = [[[0f32; W]; ILP]; LEVELS];
    let mut i = 0;
    while i + step <= rows {
        for _ in 0..step {
            for k in 0..ILP {
                add(&mut acc[0][k], &vecs[i * ILP + k]);
            }
            i += 1;
        }
        for j in 1..LEVELS {
            for k in 0..ILP {
                let lower = acc[j - 1][k];
                add(&mut acc[j][k], &lower);
                acc[j - 1][k] = [0.0; W];
            }
            if i & (mask << (j * power)) != 0 {
                break;
            }
        }
    }
    while i < rows {
        for k in 0..ILP {
            add(&mut acc[0][k], &vecs[i * ILP + k]);
        }
        i += 1;
    }
    for j in 1..LEVELS {
        for k in 0..ILP {
            let upper = acc[j][k];
            add(&mut acc[0][k], &upper);
        }
    }
    let mut partial = acc[0];
    for v in &vecs[rows * ILP..] {
        add(&mut partial[0], v);
    }
    for k in 1..ILP {
        let p = partial[k];
        add(&mut partial[0], &p);
    }
    let mut total = 0f32;
    for &v in &x[vecs.len() * W..] {
        total += v;
    }
    for lane in partial[0] {
        total += lane;
    }
    total
}

/// Double quantization of f32 absmax (bitsandbytes' `compress_statistics`): the offset is
/// torch's f32 `absmax.mean()`.
pub fn double_quantize(absmax: &[f32]) -> DoubleQuant {
    let offset = torch_sum_f32(absmax) / absmax.len().max(1) as f32;
    let centred: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
    let (codes, nested_absmax) = dynamic::quantize_blockwise(&centred, NESTED_BLOCKSIZE);
    DoubleQuant { codes, nested_absmax, offset }
}

impl DoubleQuant {
    /// The f32 absmax it stands for: `code[q] · nested_absmax + offset`.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut v = dynamic::dequantize_blockwise(&self.codes, &self.nested_absmax, NESTED_BLOCKSIZE);
        for a in &mut v {
            *a += self.offset;
        }
        v
    }
}

impl Nf4 {
    /// Quantizes `x` (bitsandbytes' `quantize_4bit(..., quant_type="nf4")`; `double` is its
    /// `compress_statistics`).
    pub fn quantize(x: &[f32], blocksize: usize, double: bool) -> Self {
        let (packed, absmax) = quantize(x, blocksize);
        let absmax = if double { Absmax::Double(double_quantize(&absmax)) } else { Absmax::Plain(absmax) };
        Nf4 { packed, absmax, numel: x.len(), blocksize }
    }

    /// The per-block f32 absmax (double quantization undone).
    pub fn absmax_f32(&self) -> Vec<f32> {
        match &self.absmax {
            Absmax::Plain(a) => a.clone(),
            Absmax::Double(d) => d.dequantize(),
        }
    }

    /// The 4-bit code of element `i`.
    pub fn code(&self, i: usize) -> u8 {
        let byte = self.packed[i / 2];
        if i.is_multiple_of(2) {
            byte >> 4
        } else {
            byte & 0xF
        }
    }

    /// The f32 values (`code[q] · absmax`).
    pub fn dequantize(&self) -> Vec<f32> {
        let absmax = self.absmax_f32();
        (0..self.numel).map(|i| NF4_CODE[self.code(i) as usize] * absmax[i / self.blocksize]).collect()
    }
}
