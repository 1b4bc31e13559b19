//! Dequantization of GGUF tensor types to f32, exactly as ggml (and gguf-py) compute it:
//! F32, F16, BF16, Q8_0, Q4_0, Q4_1 (blocks of 32 with an f16 scale, and for Q4_1 an f16 min).

use half::{bf16, f16};

pub const F32: u32 = 0;
pub const F16: u32 = 1;
pub const Q4_0: u32 = 2;
pub const Q4_1: u32 = 3;
pub const Q8_0: u32 = 8;
pub const BF16: u32 = 30;

const QK: usize = 32;

pub fn type_name(t: u32) -> String {
    match t {
        F32 => "F32".into(),
        F16 => "F16".into(),
        Q4_0 => "Q4_0".into(),
        Q4_1 => "Q4_1".into(),
        Q8_0 => "Q8_0".into(),
        BF16 => "BF16".into(),
        6 => "Q5_0".into(),
        7 => "Q5_1".into(),
        10..=14 => format!("Q{}_K", t - 8),
        t => format!("type {t}"),
    }
}

/// A tensor ft cannot decode.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DequantError {
    #[error("unsupported GGUF tensor type {} (ft reads F32, F16, BF16, Q8_0, Q4_0, Q4_1)", type_name(*.0))]
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
    let blocks = || {
        if !n.is_multiple_of(QK) {
            Err(DequantError::PartialBlock { n, block: QK })
        } else {
            Ok(n / QK)
        }
    };
    let bytes = match t {
        F32 => n.checked_mul(4),
        F16 | BF16 => n.checked_mul(2),
        Q4_0 => blocks()?.checked_mul(18),
        Q4_1 => blocks()?.checked_mul(20),
        Q8_0 => blocks()?.checked_mul(34),
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
        assert!(byte_size(12, 256).unwrap_err().to_string().contains("Q4_K"));
    }
}
