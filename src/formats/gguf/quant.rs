//! Quantization of f32 rows into GGUF block types, as ggml's reference quantizers compute them
//! (`quantize_row_*_ref` in ggml-quants.c: what `convert_hf_to_gguf.py --outtype q8_0` and
//! `llama-quantize` without an importance matrix write): Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 (blocks of
//! 32) and the K-quants Q4_K, Q5_K and Q6_K (super-blocks of 256).
//!
//! Written here rather than bound from C: the reference routines are small, frozen by the file
//! format, and ft builds without a C toolchain. The 32-blocks are byte-identical to gguf-py's
//! numpy quantizers (`scripts/check-gguf.py`); the K-quants follow the C operation by operation
//! (ggml's own builds may contract multiply-adds into FMAs, so a last-bit difference in a
//! scale is possible there, not a different algorithm).

use half::f16;

pub use super::dequant::{scale_min_k4, QK_K};
use super::dequant::{Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0};

const QK: usize = 32;
const GROUP_MAX_EPS: f32 = 1e-15;

fn fp16(x: f32) -> [u8; 2] {
    f16::from_f32(x).to_bits().to_le_bytes()
}

fn fp16_round(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// ggml's `nearest_int`: round half to even through the float's mantissa (|x| < 2^22).
fn nearest_int(x: f32) -> i32 {
    let v = x + 12582912.0;
    (v.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// Quantizes `x` (a whole number of blocks of `t`) to `t`'s bytes, appending them to `out`.
/// `None` when `t` is not a type ft quantizes to.
pub fn quantize_into(t: u32, x: &[f32], out: &mut Vec<u8>) -> Option<()> {
    match t {
        Q8_0 => x.chunks_exact(QK).for_each(|b| q8_0(b, out)),
        Q4_0 => x.chunks_exact(QK).for_each(|b| q4_0(b, out)),
        Q4_1 => x.chunks_exact(QK).for_each(|b| q4_1(b, out)),
        Q5_0 => x.chunks_exact(QK).for_each(|b| q5_0(b, out)),
        Q5_1 => x.chunks_exact(QK).for_each(|b| q5_1(b, out)),
        Q4_K => x.chunks_exact(QK_K).for_each(|b| qk_k(b, 15, out)),
        Q5_K => x.chunks_exact(QK_K).for_each(|b| qk_k(b, 31, out)),
        Q6_K => x.chunks_exact(QK_K).for_each(|b| q6_k(b, out)),
        _ => return None,
    }
    Some(())
}

/// The block size of a quantized type (1 for plain floats).
pub fn block_size(t: u32) -> usize {
    match t {
        Q4_K | Q5_K | Q6_K => QK_K,
        Q8_0 | Q4_0 | Q4_1 | Q5_0 | Q5_1 => QK,
        _ => 1,
    }
}

/// The value of largest magnitude (the first one on ties), as the reference scans for it.
fn signed_absmax(b: &[f32]) -> f32 {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in b {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

fn min_max(b: &[f32]) -> (f32, f32) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in b {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    (min, max)
}

fn inverse(d: f32) -> f32 {
    if d != 0.0 {
        1.0 / d
    } else {
        0.0
    }
}

fn q8_0(b: &[f32], out: &mut Vec<u8>) {
    let amax = b.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = inverse(d);
    out.extend(fp16(d));
    out.extend(b.iter().map(|&v| (v * id).round() as i8 as u8));
}

fn q4_0(b: &[f32], out: &mut Vec<u8>) {
    let d = signed_absmax(b) / -8.0;
    let id = inverse(d);
    out.extend(fp16(d));
    let q = |v: f32| ((v * id + 8.5) as i8).min(15) as u8;
    out.extend((0..QK / 2).map(|j| q(b[j]) | (q(b[j + QK / 2]) << 4)));
}

fn q4_1(b: &[f32], out: &mut Vec<u8>) {
    let (min, max) = min_max(b);
    let d = (max - min) / 15.0;
    let id = inverse(d);
    out.extend(fp16(d));
    out.extend(fp16(min));
    let q = |v: f32| (((v - min) * id + 0.5) as i8).min(15) as u8;
    out.extend((0..QK / 2).map(|j| q(b[j]) | (q(b[j + QK / 2]) << 4)));
}

/// Q5 blocks: the low nibbles like Q4, the fifth bits gathered in a little-endian u32.
fn q5_pack(q: impl Fn(f32) -> u8, b: &[f32], out: &mut Vec<u8>) {
    let mut qh = 0u32;
    let mut qs = [0u8; QK / 2];
    for j in 0..QK / 2 {
        let (x0, x1) = (q(b[j]), q(b[j + QK / 2]));
        qs[j] = (x0 & 0x0F) | ((x1 & 0x0F) << 4);
        qh |= (((x0 & 0x10) >> 4) as u32) << j;
        qh |= (((x1 & 0x10) >> 4) as u32) << (j + QK / 2);
    }
    out.extend(qh.to_le_bytes());
    out.extend(qs);
}

fn q5_0(b: &[f32], out: &mut Vec<u8>) {
    let d = signed_absmax(b) / -16.0;
    let id = inverse(d);
    out.extend(fp16(d));
    q5_pack(|v| ((v * id + 16.5) as i8).min(31) as u8, b, out);
}

fn q5_1(b: &[f32], out: &mut Vec<u8>) {
    let (min, max) = min_max(b);
    let d = (max - min) / 31.0;
    let id = inverse(d);
    out.extend(fp16(d));
    out.extend(fp16(min));
    q5_pack(|v| ((v - min) * id + 0.5) as u8, b, out);
}

/// ggml's `make_qkx2_quants`: a scale and a (non-positive) minimum for `x` with `nmax + 1`
/// levels, searched over `nstep + 1` candidate scales by weighted error; `L` gets the levels.
/// Returns `(scale, -min)`.
#[allow(clippy::too_many_arguments)]
fn make_qkx2_quants(nmax: i32, x: &[f32], w: &[f32], l: &mut [u8], rmin: f32, rdelta: f32, nstep: i32) -> (f32, f32) {
    let n = x.len();
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = w[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l.iter_mut().for_each(|v| *v = 0);
        return (0.0, -min);
    }
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0f32;
    for i in 0..n {
        let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l[i] = q as u8;
        let diff = scale * q as f32 + min - x[i];
        best_error += w[i] * (diff * diff);
    }
    let mut aux = [0u8; QK];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..n {
            let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            aux[i] = q as u8;
            let lf = q as f32;
            sum_l += w[i] * lf;
            sum_l2 += w[i] * lf * lf;
            sum_xl += w[i] * lf * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0f32;
            for i in 0..n {
                let diff = this_scale * aux[i] as f32 + this_min - x[i];
                cur_error += w[i] * (diff * diff);
            }
            if cur_error < best_error {
                l[..n].copy_from_slice(&aux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// Q4_K (`nmax` 15) and Q5_K (`nmax` 31): eight sub-blocks of 32 with 6-bit scales and mins.
fn qk_k(x: &[f32], nmax: i32, out: &mut Vec<u8>) {
    let mut l = [0u8; QK_K];
    let mut scales = [0f32; QK_K / 32];
    let mut mins = [0f32; QK_K / 32];
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for j in 0..QK_K / 32 {
        let xs = &x[32 * j..32 * j + 32];
        let mut sum_x2 = 0f32;
        for &v in xs {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        let mut w = [0f32; 32];
        for (wi, &v) in w.iter_mut().zip(xs) {
            *wi = av_x + v.abs();
        }
        let (rmin, nstep) = if nmax == 15 { (-1.0, 20) } else { (-0.5, 15) };
        let (s, m) = make_qkx2_quants(nmax, xs, &w, &mut l[32 * j..32 * j + 32], rmin, 0.1, nstep);
        scales[j] = s;
        mins[j] = m;
        if s > max_scale {
            max_scale = s;
        }
        if m > max_min {
            max_min = m;
        }
    }
    let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut sc = [0u8; 12];
    for j in 0..QK_K / 32 {
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            sc[j] = ls;
            sc[j + 4] = lm;
        } else {
            sc[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
            sc[j - 4] |= (ls >> 4) << 6;
            sc[j] |= (lm >> 4) << 6;
        }
    }
    let d = fp16(max_scale / 63.0);
    let dmin = fp16(max_min / 63.0);
    let (df, dminf) = (fp16_round(max_scale / 63.0), fp16_round(max_min / 63.0));
    for j in 0..QK_K / 32 {
        let (s, m) = scale_min_k4(j, &sc);
        let dj = df * s as f32;
        if dj == 0.0 {
            continue;
        }
        let dm = dminf * m as f32;
        for ii in 0..32 {
            l[32 * j + ii] = nearest_int((x[32 * j + ii] + dm) / dj).clamp(0, nmax) as u8;
        }
    }
    out.extend(d);
    out.extend(dmin);
    out.extend(sc);
    if nmax == 31 {
        // The fifth bits: element n+j of pair p sets bit 2p (first 32) or 2p+1 (second 32) of qh[j].
        let mut qh = [0u8; QK_K / 8];
        for (p, n) in (0..QK_K).step_by(64).enumerate() {
            for j in 0..32 {
                qh[j] |= ((l[n + j] > 15) as u8) << (2 * p);
                qh[j] |= ((l[n + j + 32] > 15) as u8) << (2 * p + 1);
            }
        }
        out.extend(qh);
    }
    for j in (0..QK_K).step_by(64) {
        out.extend((0..32).map(|i| (l[j + i] & 0xF) | ((l[j + i + 32] & 0xF) << 4)));
    }
}

/// ggml's `make_qx_quants` with `rmse_type = 1` (weights x²) and no importance weights: a signed
/// scale for `nmax·2` levels; `L` gets the levels offset by `nmax`.
fn make_qx_quants(nmax: i32, x: &[f32], l: &mut [i8]) -> f32 {
    let (mut max, mut amax) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        l.iter_mut().for_each(|v| *v = 0);
        return 0.0;
    }
    let nmaxf = nmax as f32;
    let mut iscale = -nmaxf / max;
    let (mut sumlx, mut suml2) = (0f32, 0f32);
    for (i, &v) in x.iter().enumerate() {
        let q = nearest_int(iscale * v).clamp(-nmax, nmax - 1);
        l[i] = (q + nmax) as i8;
        let w = v * v;
        let lf = q as f32;
        sumlx += w * v * lf;
        suml2 += w * lf * lf;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9i32..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmaxf + 0.1 * is as f32) / max;
        sumlx = 0.0;
        suml2 = 0.0;
        for &v in x {
            let lf = nearest_int(iscale * v).clamp(-nmax, nmax - 1) as f32;
            let w = v * v;
            sumlx += w * v * lf;
            suml2 += w * lf * lf;
        }
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (i, &v) in x.iter().enumerate() {
                l[i] = (nmax + nearest_int(iscale * v).clamp(-nmax, nmax - 1)) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

fn q6_k(x: &[f32], out: &mut Vec<u8>) {
    let mut l = [0i8; QK_K];
    let mut scales = [0f32; QK_K / 16];
    let (mut max_scale, mut max_abs_scale) = (0f32, 0f32);
    for ib in 0..QK_K / 16 {
        let s = make_qx_quants(32, &x[16 * ib..16 * ib + 16], &mut l[16 * ib..16 * ib + 16]);
        scales[ib] = s;
        if s.abs() > max_abs_scale {
            max_abs_scale = s.abs();
            max_scale = s;
        }
    }
    if max_abs_scale < GROUP_MAX_EPS {
        out.extend(std::iter::repeat_n(0u8, 210));
        return;
    }
    let iscale = -128.0 / max_scale;
    let d = fp16(1.0 / iscale);
    let df = fp16_round(1.0 / iscale);
    let mut sc = [0i8; QK_K / 16];
    for ib in 0..QK_K / 16 {
        sc[ib] = nearest_int(iscale * scales[ib]).min(127) as i8;
    }
    for j in 0..QK_K / 16 {
        let dj = df * sc[j] as f32;
        if dj == 0.0 {
            continue;
        }
        for ii in 0..16 {
            l[16 * j + ii] = (nearest_int(x[16 * j + ii] / dj).clamp(-32, 31) + 32) as i8;
        }
    }
    let l = l.map(|v| v as u8);
    let mut ql = [0u8; QK_K / 2];
    let mut qh = [0u8; QK_K / 4];
    for (half, j) in (0..QK_K).step_by(128).enumerate() {
        let (ql, qh) = (&mut ql[64 * half..], &mut qh[32 * half..]);
        for i in 0..32 {
            let (a, b, c, e) = (l[j + i], l[j + i + 32], l[j + i + 64], l[j + i + 96]);
            ql[i] = (a & 0xF) | ((c & 0xF) << 4);
            ql[i + 32] = (b & 0xF) | ((e & 0xF) << 4);
            qh[i] = (a >> 4) | ((b >> 4) << 2) | ((c >> 4) << 4) | ((e >> 4) << 6);
        }
    }
    out.extend(ql);
    out.extend(qh);
    out.extend(sc.map(|v| v as u8));
    out.extend(d);
}

#[cfg(test)]
mod tests {
    use super::super::dequant::{byte_size, dequantize};
    use super::*;

    /// A deterministic bell-shaped spread (sum of three uniforms) with a rare outlier, like
    /// trained weights.
    fn data(n: usize, seed: u32) -> Vec<f32> {
        let mut h = seed.wrapping_mul(2654435761) | 1;
        let mut u = || {
            h ^= h << 13;
            h ^= h >> 17;
            h ^= h << 5;
            (h >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        (0..n).map(|i| (u() + u() + u()) * if i % 211 == 0 { 0.3 } else { 0.05 }).collect()
    }

    #[test]
    fn nearest_int_rounds_half_to_even() {
        assert_eq!([0.5, 1.5, 2.5, -0.5, -1.5, 3.4, -3.6].map(nearest_int), [0, 2, 2, 0, -2, 3, -4]);
    }

    #[test]
    fn round_trips_within_each_types_resolution() {
        let x = data(4 * QK_K, 7);
        let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
        // Worst-case error per element relative to the tensor's range: the level spacing.
        for (t, bound) in [(Q8_0, 1.0 / 127.0), (Q4_0, 1.0 / 8.0), (Q4_1, 1.0 / 15.0), (Q5_0, 1.0 / 16.0), (Q5_1, 1.0 / 31.0), (Q4_K, 1.0 / 7.0), (Q5_K, 1.0 / 15.0), (Q6_K, 1.0 / 31.0)] {
            let mut b = Vec::new();
            quantize_into(t, &x, &mut b).unwrap();
            assert_eq!(b.len(), byte_size(t, x.len()).unwrap(), "type {t}");
            let y = dequantize(t, &b, x.len()).unwrap();
            let worst = x.iter().zip(&y).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst <= amax * bound, "type {t}: max error {worst} > {}", amax * bound);
        }
    }

    #[test]
    fn k_quants_beat_their_32_block_fallbacks_on_rms_error() {
        // llama.cpp's reason for K-quants: Q6_K is closer than Q5_0, Q4_K about as close as Q4_1.
        let x = data(8 * QK_K, 3);
        let rms = |t: u32| {
            let mut b = Vec::new();
            quantize_into(t, &x, &mut b).unwrap();
            let y = dequantize(t, &b, x.len()).unwrap();
            (x.iter().zip(&y).map(|(a, b)| ((a - b) * (a - b)) as f64).sum::<f64>() / x.len() as f64).sqrt()
        };
        assert!(rms(Q6_K) < rms(Q5_0), "{} vs {}", rms(Q6_K), rms(Q5_0));
        assert!(rms(Q4_K) < rms(Q4_0), "{} vs {}", rms(Q4_K), rms(Q4_0));
        assert!(rms(Q5_K) < rms(Q4_K), "{} vs {}", rms(Q5_K), rms(Q4_K));
    }

    #[test]
    fn zero_blocks_quantize_to_zero() {
        for t in [Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K] {
            let x = vec![0f32; QK_K];
            let mut b = Vec::new();
            quantize_into(t, &x, &mut b).unwrap();
            assert!(dequantize(t, &b, x.len()).unwrap().iter().all(|&v| v == 0.0), "type {t}");
        }
    }
}
