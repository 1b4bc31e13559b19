//! PiSSA and OLoRA initialisation (PEFT's `init_lora_weights = "pissa" | "pissa_niter_N" |
//! "olora"`): the adapter starts as a rank-r part of the base weight and the base becomes the
//! residual, so the adapted model starts equal to the original. With `W = U S Vᵀ` (`[out, in]`)
//! and scale s, PiSSA: `A₀ = diag(√(S_r / s)) V_rᵀ`, `B₀ = U_r diag(√(S_r / s))`; `pissa_niter_N`
//! the same from a randomized SVD with N subspace iterations (torch's `svd_lowrank`, from the
//! run's seed); OLoRA, with `W = Q R`: `A₀ = R_r` (the first r rows), `B₀ = Q_r`. Always
//! `W_res = W − s·B₀A₀`.
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

/// Orthonormalises the columns of the column-major `[m, k]` matrix `q` in place (modified
/// Gram-Schmidt, twice for f64-level orthogonality); a column that vanishes stays zero.
fn orthonormalise(q: &mut [f64], m: usize, k: usize) {
    for _ in 0..2 {
        for j in 0..k {
            for i in 0..j {
                let dot: f64 = (0..m).map(|t| q[i * m + t] * q[j * m + t]).sum();
                for t in 0..m {
                    q[j * m + t] -= dot * q[i * m + t];
                }
            }
            let norm = (0..m).map(|t| q[j * m + t] * q[j * m + t]).sum::<f64>().sqrt();
            for t in 0..m {
                q[j * m + t] = if norm > 0.0 { q[j * m + t] / norm } else { 0.0 };
            }
        }
    }
}

/// The first `r` columns of `Q` and rows of `R` of `W = Q R` (`[out, in]`, row-major): `(Q_r
/// [out, r], R_r [r, in])`, row-major f64. The product `Q_r R_r` does not depend on the sign
/// convention.
pub fn qr_top(w: &[f32], rows: usize, cols: usize, r: usize) -> (Vec<f64>, Vec<f64>) {
    let r = r.min(rows).min(cols);
    let mut q = vec![0f64; rows * r];
    for j in 0..r {
        for i in 0..rows {
            q[j * rows + i] = w[i * cols + j] as f64;
        }
    }
    orthonormalise(&mut q, rows, r);
    let qr: Vec<f64> = (0..rows).flat_map(|i| (0..r).map(move |j| (i, j))).map(|(i, j)| q[j * rows + i]).collect();
    let rr: Vec<f64> = (0..r)
        .flat_map(|i| (0..cols).map(move |j| (i, j)))
        .map(|(i, j)| (0..rows).map(|t| q[i * rows + t] * w[t * cols + j] as f64).sum())
        .collect();
    (qr, rr)
}

/// Top-`r` singular triplets as [`svd_top`] gives them, from a randomized range finder with
/// `niter` subspace iterations (torch's `svd_lowrank(W, q=r, niter)`): the SVD of `Qᵀ W` for an
/// orthonormal basis `Q [rows, r]` of the range of `(W Wᵀ)^niter W Ω`, Ω Gaussian from `seed`.
pub fn svd_lowrank(w: &[f32], rows: usize, cols: usize, r: usize, niter: usize, seed: u64) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    use rand::SeedableRng;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let r = r.min(rows).min(cols);
    let wd: Vec<f64> = w.iter().map(|&x| x as f64).collect();
    // Column-major products: W · X (X [cols, r]) and Wᵀ · Y (Y [rows, r]).
    let wd = &wd;
    let mul = |x: &[f64]| -> Vec<f64> {
        let mut out = vec![0f64; rows * r];
        for k in 0..r {
            for i in 0..rows {
                out[k * rows + i] = (0..cols).map(|j| wd[i * cols + j] * x[k * cols + j]).sum();
            }
        }
        out
    };
    let mul_t = |y: &[f64]| -> Vec<f64> {
        let mut out = vec![0f64; cols * r];
        for k in 0..r {
            for j in 0..cols {
                out[k * cols + j] = (0..rows).map(|i| wd[i * cols + j] * y[k * rows + i]).sum();
            }
        }
        out
    };
    let omega: Vec<f64> = (0..cols * r).map(|_| crate::model::projection::normal(&mut rng, 1.0)).collect();
    let mut q = mul(&omega);
    orthonormalise(&mut q, rows, r);
    for _ in 0..niter {
        let mut z = mul_t(&q);
        orthonormalise(&mut z, cols, r);
        q = mul(&z);
        orthonormalise(&mut q, rows, r);
    }
    // B = Qᵀ W [r, cols], its SVD B = U_b S Vᵀ, and U = Q U_b.
    let b: Vec<f32> = (0..r).flat_map(|k| (0..cols).map(move |j| (k, j))).map(|(k, j)| (0..rows).map(|i| q[k * rows + i] * wd[i * cols + j]).sum::<f64>() as f32).collect();
    let (ub, s, v) = svd_top(&b, r, cols, r);
    let u: Vec<f64> = (0..rows).flat_map(|i| (0..r).map(move |k| (i, k))).map(|(i, k)| (0..r).map(|l| q[l * rows + i] * ub[l * r + k]).sum()).collect();
    (u, s, v)
}

/// How an adapter is cut out of its base weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// Exact SVD.
    Pissa,
    /// Randomized SVD with this many subspace iterations.
    PissaNiter(usize),
    /// QR.
    Olora,
}

/// The initial adapter and residual of `w` (`[out, in]`, row-major) at rank `r` and scale
/// `scale`: `(A₀ [r, in], B₀ [out, r], W_res [out, in])`, in f32 as PEFT stores them.
pub fn init(split: Split, w: &[f32], d_out: usize, d_in: usize, r: usize, scale: f64, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    if split == Split::Olora {
        let (q, rr) = qr_top(w, d_out, d_in, r);
        let r = rr.len() / d_in;
        let a: Vec<f32> = rr.iter().map(|&x| x as f32).collect();
        let b: Vec<f32> = q.iter().map(|&x| x as f32).collect();
        return (a.clone(), b.clone(), residual(w, &a, &b, d_out, d_in, r, scale));
    }
    let (u, s, v) = match split {
        Split::PissaNiter(n) => svd_lowrank(w, d_out, d_in, r, n, seed),
        _ => svd_top(w, d_out, d_in, r),
    };
    let r = s.len();
    let root: Vec<f64> = s.iter().map(|x| (x / scale).sqrt()).collect();
    let (root, u, v) = (&root, &u, &v);
    let a: Vec<f32> = (0..r).flat_map(|k| (0..d_in).map(move |i| (root[k] * v[i * r + k]) as f32)).collect();
    let b: Vec<f32> = (0..d_out).flat_map(|o| (0..r).map(move |k| (u[o * r + k] * root[k]) as f32)).collect();
    let res = residual(w, &a, &b, d_out, d_in, r, scale);
    (a, b, res)
}

/// `W − s·B A` (PEFT subtracts the f32 adapter it stores).
fn residual(w: &[f32], a: &[f32], b: &[f32], d_out: usize, d_in: usize, r: usize, scale: f64) -> Vec<f32> {
    let mut res = w.to_vec();
    for o in 0..d_out {
        for i in 0..d_in {
            let delta: f64 = (0..r).map(|k| b[o * r + k] as f64 * a[k * d_in + i] as f64).sum();
            res[o * d_in + i] = (w[o * d_in + i] as f64 - scale * delta) as f32;
        }
    }
    res
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
    fn randomized_svd_finds_a_clear_top_subspace() {
        // W = a rank-2 signal + small noise: the randomized SVD's top-2 product equals the exact
        // one's closely.
        let (rows, cols) = (12, 9);
        let w: Vec<f32> = (0..rows * cols)
            .map(|k| {
                let (i, j) = ((k / cols) as f32, (k % cols) as f32);
                5.0 * (0.3 * i).sin() * (0.2 * j).cos() + 3.0 * (0.5 * i).cos() * (0.7 * j).sin() + 0.01 * ((k * 37 % 17) as f32 - 8.0)
            })
            .collect();
        let product = |(u, s, v): (Vec<f64>, Vec<f64>, Vec<f64>)| -> Vec<f64> {
            (0..rows * cols).map(|k| (0..2).map(|l| u[(k / cols) * 2 + l] * s[l] * v[(k % cols) * 2 + l]).sum()).collect()
        };
        let exact = product(svd_top(&w, rows, cols, 2));
        let approx = product(svd_lowrank(&w, rows, cols, 2, 4, 7));
        let d = exact.iter().zip(&approx).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(d < 1e-6, "{d}");
    }

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
