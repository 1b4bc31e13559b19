//! bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map()`), used to store the absmax of
//! NF4 blocks under double quantization, and blockwise 8-bit quantization with it.
//!
//! Quantization follows bitsandbytes' CPU kernel (`quantize_cpu` in `csrc/cpu_ops.cpp`, 0.50):
//! the scaled value is mapped to one of 65536 evenly spaced points of [−1, 1], and each point to
//! the code whose midpoint interval holds it.

/// `torch.linspace(start, end, steps)` in f32 as its CPU kernel computes it: a float step, the
/// first half counted up from `start` and the second half down from `end`, each value one fused
/// multiply-add (what the compiled kernel does; checked against bitsandbytes' map).
fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| if i < half { step.mul_add(i as f32, start) } else { (-step).mul_add((steps - i - 1) as f32, end) })
        .collect()
}

/// The signed dynamic map of `create_dynamic_map(signed=True, max_exponent_bits=7,
/// total_bits=8)`, sorted ascending: for exponent `i` in 0..7, the midpoints of
/// `linspace(0.1, 1, 2^i + 1)` times `±10^(i−6)` (f32 arithmetic, as torch does), then 0 and 1.
pub fn dynamic_map() -> [f32; 256] {
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for i in 0..7i32 {
        let b = linspace_f32(0.1, 1.0, (1usize << i) + 1);
        let means: Vec<f32> = b.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
        // Python's `10 ** (i - 6)`: the correctly rounded double, then f32 as torch casts it.
        let scale = format!("1e{}", i - 6).parse::<f64>().expect("float literal") as f32;
        data.extend(means.iter().map(|m| scale * m));
        data.extend(means.iter().map(|m| -scale * m));
    }
    data.push(0.0);
    data.push(1.0);
    data.sort_by(f32::total_cmp);
    data.try_into().expect("256 codes")
}

const LUT_SIZE: usize = 65536;

/// For each of the 65536 points `−1 + 2i/65535` of [−1, 1], the index of its code: the number of
/// midpoints between neighbouring codes strictly below it.
fn lut(code: &[f32; 256]) -> Vec<u8> {
    let mid: Vec<f32> = (0..255).map(|i| 0.5 * (code[i] + code[i + 1])).collect();
    let mut out = vec![0u8; LUT_SIZE];
    let mut c = 0;
    for (i, slot) in out.iter_mut().enumerate() {
        let val = -1.0f32 + (2.0 * i as f32) / (LUT_SIZE - 1) as f32;
        while c < 255 && mid[c] < val {
            c += 1;
        }
        *slot = c as u8;
    }
    out
}

fn lut_index(v: f32) -> usize {
    let v = v.clamp(-1.0, 1.0);
    ((v + 1.0) * 0.5 * (LUT_SIZE - 1) as f32 + 0.5) as u16 as usize
}

/// `(codes, absmax)`: blockwise 8-bit dynamic quantization of `x`.
pub fn quantize_blockwise(x: &[f32], blocksize: usize) -> (Vec<u8>, Vec<f32>) {
    let code = dynamic_map();
    let lut = lut(&code);
    let mut codes = Vec::with_capacity(x.len());
    let mut absmax = Vec::with_capacity(x.len().div_ceil(blocksize));
    for block in x.chunks(blocksize) {
        let am = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        absmax.push(am);
        if am == 0.0 {
            codes.extend(std::iter::repeat_n(0, block.len()));
            continue;
        }
        let inv = 1.0 / am;
        codes.extend(block.iter().map(|&v| lut[lut_index(v * inv)]));
    }
    (codes, absmax)
}

/// `code[q] · absmax` per block.
pub fn dequantize_blockwise(codes: &[u8], absmax: &[f32], blocksize: usize) -> Vec<f32> {
    let code = dynamic_map();
    codes.iter().enumerate().map(|(i, &q)| code[q as usize] * absmax[i / blocksize]).collect()
}
