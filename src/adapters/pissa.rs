//! PiSSA initialisation (PEFT's `init_lora_weights = "pissa"`): the adapter starts as the top-r
//! singular components of the base weight and the base becomes the residual, so the adapted model
//! starts equal to the original. With `W = U S Vᵀ` (`[out, in]`) and scale s:
//! `A₀ = diag(√(S_r / s)) V_rᵀ`, `B₀ = U_r diag(√(S_r / s))`, `W_res = W − s·B₀A₀`.
//!
//! The SVD is a one-sided Jacobi SVD in f64 written here: ft has no linear-algebra dependency and
//! this init needs nothing else of one (nalgebra or faer would add minutes to every cold build for
//! one routine). One-sided Jacobi is accurate to f64 rounding (products compared with PEFT's f32
//! SVD to 1e-5); its cost grows as in·out·min(in, out) per sweep, so it suits the small and
//! mid-sized matrices of tests and ≤1B models on a CPU.

/// Top-`r` singular triplets of the row-major `[rows, cols]` matrix `w`: `(u [rows, r], s [r],
/// v [cols, r])`, singular values descending, `w ≈ u diag(s) vᵀ`.
pub fn svd_top(w: &[f32], rows: usize, cols: usize, r: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    // Orthogonalise the columns of M = W (or Wᵀ when wider than tall) by plane rotations.
    let transposed = cols > rows;
    let (m, n) = if transposed { (cols, rows) } else { (rows, cols) };
    // Column-major M: column j is a[j*m..(j+1)*m].
    let mut a = vec![0f64; m * n];
    for i in 0..rows {
        for j in 0..cols {
            let (row, col) = if transposed { (j, i) } else { (i, j) };
            a[col * m + row] = w[i * cols + j] as f64;
        }
    }
    let mut v = vec![0f64; n * n];
    for j in 0..n {
        v[j * n + j] = 1.0;
    }
    for _sweep in 0..80 {
        let mut rotated = false;
        for i in 0..n {
            for j in i + 1..n {
                let (ci, cj) = (&a[i * m..(i + 1) * m], &a[j * m..(j + 1) * m]);
                let (mut alpha, mut beta, mut gamma) = (0f64, 0f64, 0f64);
                for k in 0..m {
                    alpha += ci[k] * ci[k];
                    beta += cj[k] * cj[k];
                    gamma += ci[k] * cj[k];
                }
                if gamma.abs() <= 1e-15 * (alpha * beta).sqrt() || gamma == 0.0 {
                    continue;
                }
                rotated = true;
                let zeta = (beta - alpha) / (2.0 * gamma);
                let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
                let c = 1.0 / (1.0 + t * t).sqrt();
                let s = c * t;
                for k in 0..m {
                    let (x, y) = (a[i * m + k], a[j * m + k]);
                    a[i * m + k] = c * x - s * y;
                    a[j * m + k] = s * x + c * y;
                }
                for k in 0..n {
                    let (x, y) = (v[i * n + k], v[j * n + k]);
                    v[i * n + k] = c * x - s * y;
                    v[j * n + k] = s * x + c * y;
                }
            }
        }
        if !rotated {
            break;
        }
    }
    let sigma: Vec<f64> = (0..n).map(|j| a[j * m..(j + 1) * m].iter().map(|x| x * x).sum::<f64>().sqrt()).collect();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&x, &y| sigma[y].total_cmp(&sigma[x]));
    let r = r.min(n);
    // M = A Vᵀ-rotated: M V = U Σ. Left vectors of M are columns of A / σ; right ones columns of V.
    let (mut left, mut right, mut s) = (vec![0f64; m * r], vec![0f64; n * r], vec![0f64; r]);
    for (k, &j) in order.iter().take(r).enumerate() {
        s[k] = sigma[j];
        for i in 0..m {
            left[i * r + k] = if sigma[j] > 0.0 { a[j * m + i] / sigma[j] } else { 0.0 };
        }
        for i in 0..n {
            right[i * r + k] = v[j * n + i];
        }
    }
    // For Wᵀ = L Σ Rᵀ, W = R Σ Lᵀ.
    if transposed {
        (right, s, left)
    } else {
        (left, s, right)
    }
}

/// PiSSA's initial adapter and residual of `w` (`[out, in]`, row-major) at rank `r` and scale
/// `scale`: `(A₀ [r, in], B₀ [out, r], W_res [out, in])`, in f32 as PEFT stores them.
pub fn pissa_init(w: &[f32], d_out: usize, d_in: usize, r: usize, scale: f64) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (u, s, v) = svd_top(w, d_out, d_in, r);
    let r = s.len();
    let root: Vec<f64> = s.iter().map(|x| (x / scale).sqrt()).collect();
    let (root, u, v) = (&root, &u, &v);
    let a: Vec<f32> = (0..r).flat_map(|k| (0..d_in).map(move |i| (root[k] * v[i * r + k]) as f32)).collect();
    let b: Vec<f32> = (0..d_out).flat_map(|o| (0..r).map(move |k| (u[o * r + k] * root[k]) as f32)).collect();
    let mut res = w.to_vec();
    for o in 0..d_out {
        for i in 0..d_in {
            let delta: f64 = (0..r).map(|k| b[o * r + k] as f64 * a[k * d_in + i] as f64).sum();
            res[o * d_in + i] = (w[o * d_in + i] as f64 - scale * delta) as f32;
        }
    }
    (a, b, res)
}

/// The adapter for the original base that an adapter `(A, B)` trained from PiSSA's `(A₀, B₀)` on
/// the residual base is (PEFT's `path_initial_model_for_weight_conversion`): `A' = [A; A₀]`
/// (`[2r, in]`), `B' = [B, −B₀]` (`[out, 2r]`), to be saved with rank 2r and alpha 2α (the same
/// scale): `s·B'A' = s·BA − s·B₀A₀`, and `W_res + s·BA = W + s·B'A'`.
pub fn convert(a: &[f32], b: &[f32], a0: &[f32], b0: &[f32], d_out: usize, r: usize) -> (Vec<f32>, Vec<f32>) {
    let a2 = [a, a0].concat();
    let mut b2 = Vec::with_capacity(d_out * 2 * r);
    for o in 0..d_out {
        b2.extend_from_slice(&b[o * r..(o + 1) * r]);
        b2.extend(b0[o * r..(o + 1) * r].iter().map(|x| -x));
    }
    (a2, b2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jacobi_svd_reconstructs_and_orders() {
        // A 5×3 and its transpose: U diag(S) Vᵀ rebuilds it, S descending, U's columns orthonormal.
        let w: Vec<f32> = (0..15).map(|i| ((i * 7 % 11) as f32 - 5.0) / 3.0).collect();
        for (rows, cols, m) in [(5, 3, w.clone()), (3, 5, (0..15).map(|k| w[(k % 5) * 3 + k / 5]).collect::<Vec<_>>())] {
            let r = rows.min(cols);
            let (u, s, v) = svd_top(&m, rows, cols, r);
            assert!(s.windows(2).all(|p| p[0] >= p[1]));
            for i in 0..rows {
                for j in 0..cols {
                    let x: f64 = (0..r).map(|k| u[i * r + k] * s[k] * v[j * r + k]).sum();
                    assert!((x - m[i * cols + j] as f64).abs() < 1e-9);
                }
            }
            for k in 0..r {
                for l in 0..r {
                    let dot: f64 = (0..rows).map(|i| u[i * r + k] * u[i * r + l]).sum();
                    assert!((dot - f64::from(u8::from(k == l))).abs() < 1e-9);
                }
            }
        }
    }
}
