//! The chunked attention's row kernels on wgpu (in CI: Mesa's lavapipe) against a host
//! computation of the same formulas in f64: grids wider than one dimension's 65535 cubes, a mask
//! per batch element and one shared, rows with every key masked. ft's own tests compare the
//! whole attention against the plain composition (`tests/gpu_paths.rs`).
//! `cargo test -p ft-kernels --features wgpu`.
#![cfg(feature = "wgpu")]

use cubecl::prelude::*;
use cubecl::wgpu::{WgpuDevice, WgpuRuntime};
use ft_kernels::attention::{masked_softmax, softmax_grad, ChunkLayout};

/// Deterministic values in [-2, 2).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect()
}

/// A chunk of `rows` score rows over `keys` keys; the mask hides key `j` from query `t` when
/// `(t + j + b) % 5 == 0` or `j > t + offset` (and every key of query 1 in batch element 0).
struct Case {
    c: ChunkLayout,
    mask: Vec<u32>,
}

impl Case {
    fn new(batch: usize, rows_per_batch: usize, chunk: usize, t0: usize, keys: usize, batched: bool) -> Case {
        let (mask_t, mask_s) = (t0 + chunk + 2, keys + 3);
        let mb = if batched { batch } else { 1 };
        let mut mask = vec![0u32; mb * mask_t * mask_s];
        for b in 0..mb {
            for t in 0..mask_t {
                for j in 0..mask_s {
                    let hidden = (t + j + b) % 5 == 0 || j > t + 2 || (b == 0 && t == t0 + 1);
                    mask[(b * mask_t + t) * mask_s + j] = hidden as u32;
                }
            }
        }
        let c = ChunkLayout { rows: batch * rows_per_batch, keys, rows_per_batch, chunk, t0, mask_t, mask_s, mask_batched: batched };
        Case { c, mask }
    }

    fn masked(&self, row: usize, j: usize) -> bool {
        let c = &self.c;
        let b = if c.mask_batched { row / c.rows_per_batch } else { 0 };
        let t = c.t0 + row % c.chunk;
        self.mask[(b * c.mask_t + t) * c.mask_s + j] != 0
    }

    /// Host probabilities and log-sum-exps (f64 arithmetic, −3e38 for a row with no key).
    fn softmax(&self, s: &[f32], scale: f32) -> (Vec<f32>, Vec<f32>) {
        let (rows, keys) = (self.c.rows, self.c.keys);
        let (mut p, mut lse) = (vec![0f32; rows * keys], vec![-3.0e38f32; rows]);
        for r in 0..rows {
            let seen: Vec<usize> = (0..keys).filter(|&j| !self.masked(r, j)).collect();
            if seen.is_empty() {
                continue;
            }
            let m = seen.iter().map(|&j| (s[r * keys + j] * scale) as f64).fold(f64::MIN, f64::max);
            let l: f64 = seen.iter().map(|&j| ((s[r * keys + j] * scale) as f64 - m).exp()).sum();
            for &j in &seen {
                p[r * keys + j] = (((s[r * keys + j] * scale) as f64 - m).exp() / l) as f32;
            }
            lse[r] = (m + l.ln()) as f32;
        }
        (p, lse)
    }
}

fn client() -> ComputeClient<WgpuRuntime> {
    WgpuRuntime::client(&WgpuDevice::default())
}

fn close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= 2e-6 * w.abs().max(1.0), "{what}[{i}]: {g} vs {w}");
    }
}

#[test]
fn masked_softmax_matches_the_host() {
    // 2 batch elements × 3 stacked heads × 4 chunk rows; then > 65535 rows (a 2-D grid).
    for (case, what) in [(Case::new(2, 12, 4, 3, 9, true), "batched mask"), (Case::new(2, 12, 4, 3, 9, false), "shared mask"), (Case::new(3, 24_000, 4, 0, 5, true), "70k rows")] {
        let (rows, keys) = (case.c.rows, case.c.keys);
        let s = values(rows * keys, 7);
        let client = client();
        let (sh, mh) = (client.create_from_slice(bytemuck::cast_slice(&s)), client.create_from_slice(bytemuck::cast_slice(&case.mask)));
        let (ph, lh) = (client.empty(rows * keys * 4), client.empty(rows * 4));
        masked_softmax::<WgpuRuntime, f32, u32>(&client, &case.c, &sh, &mh, case.mask.len(), &ph, &lh, 0.7);
        let p = f32::from_bytes(&client.read_one_unchecked(ph)).to_vec();
        let lse = f32::from_bytes(&client.read_one_unchecked(lh)).to_vec();
        let (want_p, want_lse) = case.softmax(&s, 0.7);
        close(&p, &want_p, &format!("{what}: probabilities"));
        close(&lse, &want_lse, &format!("{what}: log-sum-exp"));
    }
}

#[test]
fn softmax_grad_matches_the_host() {
    // The second case has 65625 cubes of 256 elements (a 2-D grid).
    for (case, what) in [(Case::new(2, 12, 4, 3, 9, true), "batched mask"), (Case::new(1, 70_000, 7, 2, 240, false), "16.8M elements")] {
        let (rows, keys) = (case.c.rows, case.c.keys);
        let (s, dp, delta) = (values(rows * keys, 3), values(rows * keys, 5), values(rows, 11));
        let (_, lse) = case.softmax(&s, 0.7);
        let client = client();
        let h = |v: &[f32]| client.create_from_slice(bytemuck::cast_slice(v));
        let (sh, dph, mh, lh, deh) = (h(&s), h(&dp), client.create_from_slice(bytemuck::cast_slice(&case.mask)), h(&lse), h(&delta));
        let (ph, dsh) = (client.empty(rows * keys * 4), client.empty(rows * keys * 4));
        softmax_grad::<WgpuRuntime, f32, u32>(&client, &case.c, &sh, &dph, &mh, case.mask.len(), &lh, &deh, &ph, &dsh, 0.7);
        let p = f32::from_bytes(&client.read_one_unchecked(ph)).to_vec();
        let ds = f32::from_bytes(&client.read_one_unchecked(dsh)).to_vec();
        let mut want_p = vec![0f32; rows * keys];
        let mut want_ds = vec![0f32; rows * keys];
        for r in 0..rows {
            for j in 0..keys {
                if !case.masked(r, j) {
                    let pv = ((s[r * keys + j] * 0.7) as f64 - lse[r] as f64).exp();
                    want_p[r * keys + j] = pv as f32;
                    want_ds[r * keys + j] = (pv * (dp[r * keys + j] as f64 - delta[r] as f64) * 0.7) as f32;
                }
            }
        }
        close(&p, &want_p, &format!("{what}: probabilities"));
        close(&ds, &want_ds, &format!("{what}: score gradients"));
    }
}

#[test]
fn a_nan_score_makes_its_row_nan() {
    // A NaN never becomes a number: its row's probabilities and log-sum-exp are NaN (the host
    // reference and transformers agree); the other rows are untouched.
    let case = Case::new(2, 12, 4, 3, 9, true);
    let (rows, keys) = (case.c.rows, case.c.keys);
    let mut s = values(rows * keys, 7);
    let r = (0..rows).find(|&r| (0..keys).filter(|&j| !case.masked(r, j)).count() >= 2).unwrap();
    let j = (0..keys).find(|&j| !case.masked(r, j)).unwrap();
    s[r * keys + j] = f32::NAN;
    let client = client();
    let (sh, mh) = (client.create_from_slice(bytemuck::cast_slice(&s)), client.create_from_slice(bytemuck::cast_slice(&case.mask)));
    let (ph, lh) = (client.empty(rows * keys * 4), client.empty(rows * 4));
    masked_softmax::<WgpuRuntime, f32, u32>(&client, &case.c, &sh, &mh, case.mask.len(), &ph, &lh, 0.7);
    let p = f32::from_bytes(&client.read_one_unchecked(ph)).to_vec();
    let lse = f32::from_bytes(&client.read_one_unchecked(lh)).to_vec();
    assert!(lse[r].is_nan(), "log-sum-exp of the NaN row: {}", lse[r]);
    for k in (0..keys).filter(|&k| !case.masked(r, k)) {
        assert!(p[r * keys + k].is_nan(), "probability {k} of the NaN row: {}", p[r * keys + k]);
    }
    let (want_p, want_lse) = case.softmax(&s, 0.7);
    for row in (0..rows).filter(|&row| row != r) {
        close(&p[row * keys..(row + 1) * keys], &want_p[row * keys..(row + 1) * keys], "other rows");
        close(&lse[row..row + 1], &want_lse[row..row + 1], "other rows' log-sum-exp");
    }
}
