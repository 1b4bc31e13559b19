//! Dequantization of GGUF tensor types to f32, exactly as ggml (and gguf-py) compute it:
//! F32, F16, BF16, the blocks of 32 (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1: an f16 scale, an f16 min for
//! the `_1` kinds) and the K-quants Q4_K, Q5_K, Q6_K (super-blocks of 256 with 6-bit sub-block
//! scales) that `llama-quantize`'s Q4_K_M / Q5_K_M / Q6_K files hold.

use half::{bf16, f16};

pub const F32: u32 = 0;
pub const F16: u32 = 1;
pub const Q4_0: u32 = 2;
pub const Q4_1: u32 = 3;
pub const Q5_0: u32 = 6;
pub const Q5_1: u32 = 7;
pub const Q8_0: u32 = 8;
pub const Q4_K: u32 = 12;
pub const Q5_K: u32 = 13;
pub const Q6_K: u32 = 14;
pub const BF16: u32 = 30;

const QK: usize = 32;
/// Elements per super-block of the K-quants.
pub const QK_K: usize = 256;

/// The 6-bit scale and min of sub-block `j` from Q4_K/Q5_K's 12 packed bytes.
pub fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

pub fn type_name(t: u32) -> String {
    match t {
        F32 => "F32".into(),
        F16 => "F16".into(),
        Q4_0 => "Q4_0".into(),
        Q4_1 => "Q4_1".into(),
        Q8_0 => "Q8_0".into(),
        BF16 => "BF16".into(),
        Q5_0 => "Q5_0".into(),
        Q5_1 => "Q5_1".into(),
        10..=14 => format!("Q{}_K", t - 8),
        t => format!("type {t}"),
    }
}

/// A tensor ft cannot decode.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DequantError {
    #[error("unsupported GGUF tensor type {} (ft reads F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K)", type_name(*.0))]
    Unsupported(u32),
    #[error("{n} elements is not a multiple of the block size {block}")]
    PartialBlock { n: usize, block: usize },
    #[error("expected {expected} values, decoded {got}")]
    Count { expected: usize, got: usize },
    #[error("{0} elements do not fit in memory")]
    TooLarge(usize),
}

/// Bytes that `n` elements of type `t` occupy.
pub fn byte_size(t: u32, n: usize) -> Result<usize, DequantError> {
    let blocks = |block: usize| {
        if !n.is_multiple_of(block) {
            Err(DequantError::PartialBlock { n, block })
        } else {
            Ok(n / block)
        }
    };
    let bytes = match t {
        F32 => n.checked_mul(4),
        F16 | BF16 => n.checked_mul(2),
        Q4_0 => blocks(QK)?.checked_mul(18),
        Q4_1 => blocks(QK)?.checked_mul(20),
        Q5_0 => blocks(QK)?.checked_mul(22),
        Q5_1 => blocks(QK)?.checked_mul(24),
        Q8_0 => blocks(QK)?.checked_mul(34),
        Q4_K => blocks(QK_K)?.checked_mul(144),
        Q5_K => blocks(QK_K)?.checked_mul(176),
        Q6_K => blocks(QK_K)?.checked_mul(210),
        t => return Err(DequantError::Unsupported(t)),
    };
    bytes.ok_or(DequantError::TooLarge(n))
}

fn h(b: &[u8]) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()
}

/// Dequantizes `n` elements of type `t` from `bytes` (sized by [`byte_size`]).
pub fn dequantize(t: u32, bytes: &[u8], n: usize) -> Result<Vec<f32>, DequantError> {
    let mut out = Vec::with_capacity(n);
    match t {
        F32 => out.extend(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
        F16 => out.extend(bytes.chunks_exact(2).map(h)),
        BF16 => out.extend(bytes.chunks_exact(2).map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())),
        Q8_0 => {
            for b in bytes.chunks_exact(34) {
                let d = h(&b[0..2]);
                out.extend(b[2..].iter().map(|&q| d * (q as i8) as f32));
            }
        }
        Q4_0 => {
            for b in bytes.chunks_exact(18) {
                let d = h(&b[0..2]);
                let qs = &b[2..];
                out.extend(qs.iter().map(|&q| ((q & 0x0F) as i32 - 8) as f32 * d));
                out.extend(qs.iter().map(|&q| ((q >> 4) as i32 - 8) as f32 * d));
            }
        }
        Q4_1 => {
            for b in bytes.chunks_exact(20) {
                let d = h(&b[0..2]);
                let m = h(&b[2..4]);
                let qs = &b[4..];
                out.extend(qs.iter().map(|&q| (q & 0x0F) as f32 * d + m));
                out.extend(qs.iter().map(|&q| (q >> 4) as f32 * d + m));
            }
        }
        Q5_0 | Q5_1 => {
            let with_min = t == Q5_1;
            for b in bytes.chunks_exact(if with_min { 24 } else { 22 }) {
                let d = h(&b[0..2]);
                let (m, rest) = if with_min { (h(&b[2..4]), &b[4..]) } else { (0.0, &b[2..]) };
                let qh = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
                let qs = &rest[4..];
                let level = |j: usize, nib: u8| {
                    let q = (nib | ((((qh >> j) & 1) as u8) << 4)) as i32;
                    if with_min {
                        q as f32 * d + m
                    } else {
                        (q - 16) as f32 * d
                    }
                };
                out.extend(qs.iter().enumerate().map(|(j, &q)| level(j, q & 0x0F)));
                out.extend(qs.iter().enumerate().map(|(j, &q)| level(j + 16, q >> 4)));
            }
        }
        Q4_K | Q5_K => {
            let five = t == Q5_K;
            for b in bytes.chunks_exact(if five { 176 } else { 144 }) {
                let (d, dmin) = (h(&b[0..2]), h(&b[2..4]));
                let scales = &b[4..16];
                let (qh, qs) = if five { (&b[16..48], &b[48..]) } else { (&b[0..0], &b[16..]) };
                for (k, q) in qs.chunks_exact(32).enumerate() {
                    for (half, shift) in [(0usize, 0u8), (1, 4)] {
                        let (sc, m) = scale_min_k4(2 * k + half, scales);
                        let (dl, ml) = (d * sc as f32, dmin * m as f32);
                        let bit = 2 * k + half;
                        out.extend(q.iter().enumerate().map(|(l, &v)| {
                            let high = if five && qh[l] & (1 << bit) != 0 { 16 } else { 0 };
                            dl * (((v >> shift) & 0xF) + high) as f32 - ml
                        }));
                    }
                }
            }
        }
        Q6_K => {
            for b in bytes.chunks_exact(210) {
                let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
                let d = h(&b[208..210]);
                for half in 0..2 {
                    let (ql, qh, sc) = (&ql[64 * half..], &qh[32 * half..], &sc[8 * half..]);
                    let mut y = [0f32; 128];
                    for l in 0..32 {
                        let is = l / 16;
                        let q = |low: u8, shift: u8| ((low | (((qh[l] >> shift) & 3) << 4)) as i32 - 32) as f32;
                        y[l] = d * (sc[is] as i8) as f32 * q(ql[l] & 0xF, 0);
                        y[l + 32] = d * (sc[is + 2] as i8) as f32 * q(ql[l + 32] & 0xF, 2);
                        y[l + 64] = d * (sc[is + 4] as i8) as f32 * q(ql[l] >> 4, 4);
                        y[l + 96] = d * (sc[is + 6] as i8) as f32 * q(ql[l + 32] >> 4, 6);
                    }
                    out.extend(y);
                }
            }
        }
        t => return Err(DequantError::Unsupported(t)),
    }
    if out.len() != n {
        return Err(DequantError::Count { expected: n, got: out.len() });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f16b(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_bits().to_le_bytes()
    }

    #[test]
    fn q4_1_block_layout() {
        // d = 0.5, m = -1; nibbles: low halves are elements 0..16, high halves 16..32.
        let mut b = Vec::new();
        b.extend(f16b(0.5));
        b.extend(f16b(-1.0));
        b.extend((0..16u8).map(|i| i | ((15 - i) << 4)));
        let v = dequantize(Q4_1, &b, 32).unwrap();
        for i in 0..16 {
            assert_eq!(v[i], i as f32 * 0.5 - 1.0);
            assert_eq!(v[16 + i], (15 - i) as f32 * 0.5 - 1.0);
        }
    }

    #[test]
    fn q4_0_and_q8_0_block_layout() {
        let mut b = Vec::new();
        b.extend(f16b(2.0));
        b.extend((0..16u8).map(|i| i | (i << 4)));
        let v = dequantize(Q4_0, &b, 32).unwrap();
        assert_eq!(v[0], -16.0);
        assert_eq!(v[31], 14.0);
        let mut b = Vec::new();
        b.extend(f16b(0.25));
        b.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let v = dequantize(Q8_0, &b, 32).unwrap();
        assert_eq!(v[0], -4.0);
        assert_eq!(v[31], 3.75);
    }

    #[test]
    fn unsupported_types_are_named() {
        assert!(byte_size(11, 256).unwrap_err().to_string().contains("Q3_K"));
    }
}
