//! The chunked attention's row kernels on wgpu (in CI: Mesa's lavapipe) against a host
//! computation of the same formulas in f64: grids wider than one dimension's 65535 cubes, a mask
//! per batch element and one shared, rows with every key masked, and every tensor laid out as CUDA
//! lays them (rows pitched to 512 bytes, NaN in the padding), as column slices at an offset, and
//! with T not a multiple of 512. ft's own tests compare the whole attention against the plain
//! composition (`tests/gpu_paths.rs`). `cargo test -p ft-kernels --features wgpu`.
#![cfg(feature = "wgpu")]

use cubecl::prelude::*;
use cubecl::server::Handle;
use cubecl::wgpu::{WgpuDevice, WgpuRuntime};
use ft_kernels::attention::{masked_softmax, softmax_grad, Chunk, View};

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

/// How a tensor lies in its buffer: its last dimension's rows `pad` elements apart more than
/// their length (a pitch), the first element `offset` elements in (a view of a larger buffer).
#[derive(Debug, Clone, Copy)]
struct Layout {
    pad: usize,
    offset: usize,
}

/// Contiguous.
const PLAIN: Layout = Layout { pad: 0, offset: 0 };

/// A tensor of `shape` laid out as `lay` says, its padding filled with `fill`.
struct Placed {
    handle: Handle,
    shape: Vec<usize>,
    strides: Vec<usize>,
    offset: usize,
}

impl Placed {
    fn new<T: bytemuck::Pod>(client: &ComputeClient<WgpuRuntime>, data: &[T], shape: &[usize], lay: Layout, fill: T) -> Placed {
        let last = shape.len() - 1;
        let pitch = shape[last] + lay.pad;
        let mut strides = vec![1; shape.len()];
        let mut s = pitch;
        for d in (0..last).rev() {
            strides[d] = s;
            s *= shape[d];
        }
        let rows: usize = shape[..last].iter().product();
        let mut buf = vec![fill; lay.offset + rows * pitch];
        for r in 0..rows {
            buf[lay.offset + r * pitch..lay.offset + r * pitch + shape[last]].copy_from_slice(&data[r * shape[last]..(r + 1) * shape[last]]);
        }
        let handle = client.create_from_slice(bytemuck::cast_slice(&buf)).offset_start((lay.offset * size_of::<T>()) as u64);
        Placed { handle, shape: shape.to_vec(), strides, offset: lay.offset }
    }

    /// An output of `shape` (NaN in the padding and before the offset).
    fn output(client: &ComputeClient<WgpuRuntime>, shape: &[usize], lay: Layout) -> Placed {
        Placed::new(client, &vec![f32::NAN; shape.iter().product()], shape, lay, f32::NAN)
    }

    fn view(&self) -> View<'_> {
        View { handle: &self.handle, shape: &self.shape, strides: &self.strides }
    }

    /// The tensor's values in row-major order (the padding left out).
    fn read(&self, client: &ComputeClient<WgpuRuntime>) -> Vec<f32> {
        let mut whole = self.handle.clone();
        whole.offset_start = None;
        let buf = f32::from_bytes(&client.read_one_unchecked(whole)).to_vec();
        let last = self.shape.len() - 1;
        let rows: usize = self.shape[..last].iter().product();
        let pitch = if last == 0 { self.shape[0] } else { self.strides[last - 1] };
        (0..rows).flat_map(|r| buf[self.offset + r * pitch..self.offset + r * pitch + self.shape[last]].to_vec()).collect()
    }
}

/// A chunk of `rows` score rows over `keys` keys; the mask hides key `j` from query `t` when
/// `(t + j + b) % 5 == 0` or `j > t + offset` (and every key of query 1 in batch element 0).
struct Case {
    /// Batch, heads (kv heads), rows per head (`rep · chunk`), keys.
    shape: [usize; 4],
    c: Chunk,
    mask: Vec<u32>,
    mask_shape: [usize; 3],
}

impl Case {
    fn new(batch: usize, heads: usize, rows_per_head: usize, chunk: usize, t0: usize, keys: usize, batched: bool) -> Case {
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
        Case { shape: [batch, heads, rows_per_head, keys], c: Chunk { rows: chunk, t0 }, mask, mask_shape: [mb, mask_t, mask_s] }
    }

    fn rows(&self) -> usize {
        self.shape[..3].iter().product()
    }

    fn keys(&self) -> usize {
        self.shape[3]
    }

    fn masked(&self, row: usize, j: usize) -> bool {
        let [_, heads, n, _] = self.shape;
        let [mb, mask_t, mask_s] = self.mask_shape;
        let b = if mb > 1 { row / (heads * n) } else { 0 };
        let t = self.c.t0 + (row % n) % self.c.rows;
        self.mask[(b * mask_t + t) * mask_s + j] != 0
    }

    /// Host probabilities and log-sum-exps (f64 arithmetic, −3e38 for a row with no key).
    fn softmax(&self, s: &[f32], scale: f32) -> (Vec<f32>, Vec<f32>) {
        let (rows, keys) = (self.rows(), self.keys());
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

    /// Host probabilities and score gradients of the backward.
    fn grad(&self, s: &[f32], dp: &[f32], lse: &[f32], delta: &[f32], scale: f32) -> (Vec<f32>, Vec<f32>) {
        let (rows, keys) = (self.rows(), self.keys());
        let mut want_p = vec![0f32; rows * keys];
        let mut want_ds = vec![0f32; rows * keys];
        for r in 0..rows {
            for j in 0..keys {
                if !self.masked(r, j) {
                    let pv = ((s[r * keys + j] * scale) as f64 - lse[r] as f64).exp();
                    want_p[r * keys + j] = pv as f32;
                    want_ds[r * keys + j] = (pv * (dp[r * keys + j] as f64 - delta[r] as f64) * scale as f64) as f32;
                }
            }
        }
        (want_p, want_ds)
    }

    /// The forward on the device, every tensor laid out as `lay` (the mask as `mask_lay`).
    fn run_softmax(&self, client: &ComputeClient<WgpuRuntime>, s: &[f32], lay: Layout, mask_lay: Layout, scale: f32) -> (Vec<f32>, Vec<f32>) {
        let sp = Placed::new(client, s, &self.shape, lay, f32::NAN);
        let mp = Placed::new(client, &self.mask, &self.mask_shape, mask_lay, 0u32);
        let pp = Placed::output(client, &self.shape, lay);
        let lp = Placed::output(client, &self.shape[..3], lay);
        masked_softmax::<WgpuRuntime, f32, u32>(client, &self.c, &sp.view(), &mp.view(), &pp.view(), &lp.view(), scale);
        (pp.read(client), lp.read(client))
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

/// Elements of a 512-byte row pitch (cubecl-cuda's) for `n` f32s, minus `n`.
fn cuda_pad(n: usize) -> usize {
    n.next_multiple_of(128) - n
}

/// A view's offset that wgpu can bind (its storage-buffer offset alignment), in f32s.
fn aligned_offset(client: &ComputeClient<WgpuRuntime>) -> usize {
    (client.properties().memory.alignment as usize / 4).max(1)
}

#[test]
fn masked_softmax_matches_the_host() {
    // 2 batch elements × 3 stacked heads × 4 chunk rows; then > 65535 rows (a 2-D grid).
    for (case, what) in [
        (Case::new(2, 1, 12, 4, 3, 9, true), "batched mask"),
        (Case::new(2, 3, 4, 4, 3, 9, false), "shared mask, 3 kv heads"),
        (Case::new(3, 1, 24_000, 4, 0, 5, true), "70k rows"),
    ] {
        let s = values(case.rows() * case.keys(), 7);
        let (p, lse) = case.run_softmax(&client(), &s, PLAIN, PLAIN, 0.7);
        let (want_p, want_lse) = case.softmax(&s, 0.7);
        close(&p, &want_p, &format!("{what}: probabilities"));
        close(&lse, &want_lse, &format!("{what}: log-sum-exp"));
    }
}

#[test]
fn masked_softmax_reads_and_writes_any_row_pitch() {
    // T = 511, 512 and 2048 keys, rows pitched as cubecl-cuda pitches them (512 bytes; 511 keys
    // get one element of padding), odd pitches, a view at an offset, a pitched mask.
    let client = client();
    let off = aligned_offset(&client);
    for (case, lay, mask_lay, what) in [
        (Case::new(2, 2, 6, 3, 505, 511, true), Layout { pad: cuda_pad(511), offset: 0 }, Layout { pad: cuda_pad(514), offset: 0 }, "T = 511, CUDA pitch"),
        (Case::new(1, 2, 4, 4, 500, 512, false), Layout { pad: 7, offset: off }, Layout { pad: 3, offset: off }, "T = 512, odd pitch at an offset"),
        (Case::new(1, 1, 8, 2, 2040, 2048, true), Layout { pad: 128, offset: 0 }, PLAIN, "T = 2048, pitched"),
        (Case::new(2, 3, 10, 5, 1, 13, true), Layout { pad: 3, offset: off }, Layout { pad: 1, offset: 0 }, "13 keys, pitch 16"),
    ] {
        let s = values(case.rows() * case.keys(), 17);
        let (p, lse) = case.run_softmax(&client, &s, lay, mask_lay, 0.3);
        let (want_p, want_lse) = case.softmax(&s, 0.3);
        close(&p, &want_p, &format!("{what}: probabilities"));
        close(&lse, &want_lse, &format!("{what}: log-sum-exp"));
    }
}

#[test]
fn softmax_grad_matches_the_host_for_any_layout() {
    // Contiguous; > 65535 cubes of 256 elements (a 2-D grid); CUDA's 512-byte pitch at T = 511 and
    // 2048; a column slice (the scores' keys a window of wider rows, at an offset).
    let client = client();
    let off = aligned_offset(&client);
    for (case, lay, what) in [
        (Case::new(2, 1, 12, 4, 3, 9, true), PLAIN, "batched mask"),
        (Case::new(1, 1, 70_000, 7, 2, 240, false), PLAIN, "16.8M elements"),
        (Case::new(2, 2, 6, 3, 505, 511, true), Layout { pad: cuda_pad(511), offset: 0 }, "T = 511, CUDA pitch"),
        (Case::new(1, 2, 4, 2, 2040, 2048, false), Layout { pad: 128, offset: off }, "T = 2048, pitched, at an offset"),
        (Case::new(2, 3, 6, 3, 4, 37, true), Layout { pad: 27, offset: off }, "column slice"),
    ] {
        let (rows, keys) = (case.rows(), case.keys());
        let (s, dp, delta) = (values(rows * keys, 3), values(rows * keys, 5), values(rows, 11));
        let (_, lse) = case.softmax(&s, 0.7);
        let p = |v: &[f32], shape: &[usize]| Placed::new(&client, v, shape, lay, f32::NAN);
        let (sp, dpp, lp, dep) = (p(&s, &case.shape), p(&dp, &case.shape), p(&lse, &case.shape[..3]), p(&delta, &case.shape[..3]));
        let mp = Placed::new(&client, &case.mask, &case.mask_shape, lay, 1u32);
        let (pp, dsp) = (Placed::output(&client, &case.shape, lay), Placed::output(&client, &case.shape, PLAIN));
        softmax_grad::<WgpuRuntime, f32, u32>(&client, &case.c, &sp.view(), &dpp.view(), &mp.view(), &lp.view(), &dep.view(), &pp.view(), &dsp.view(), 0.7);
        let (want_p, want_ds) = case.grad(&s, &dp, &lse, &delta, 0.7);
        close(&pp.read(&client), &want_p, &format!("{what}: probabilities"));
        close(&dsp.read(&client), &want_ds, &format!("{what}: score gradients"));
    }
}

#[test]
fn a_view_past_its_buffer_is_refused() {
    let client = client();
    let case = Case::new(1, 1, 4, 4, 0, 9, false);
    let sp = Placed::new(&client, &values(36, 1), &case.shape, PLAIN, f32::NAN);
    let mp = Placed::new(&client, &case.mask, &case.mask_shape, PLAIN, 0u32);
    let (pp, lp) = (Placed::output(&client, &case.shape, PLAIN), Placed::output(&client, &case.shape[..3], PLAIN));
    let wide = [1, 1, 4, 10];
    let bad = View { handle: &sp.handle, shape: &wide, strides: &[36, 36, 9, 1] };
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| masked_softmax::<WgpuRuntime, f32, u32>(&client, &case.c, &bad, &mp.view(), &pp.view(), &lp.view(), 1.0)));
    let msg = r.expect_err("a view reaching past its buffer must not launch");
    let msg = msg.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.contains("reaches past its buffer"), "{msg}");
}

#[test]
fn a_nan_score_makes_its_row_nan() {
    // A NaN never becomes a number: its row's probabilities and log-sum-exp are NaN (the host
    // reference and transformers agree); the other rows are untouched.
    let case = Case::new(2, 1, 12, 4, 3, 9, true);
    let (rows, keys) = (case.rows(), case.keys());
    let mut s = values(rows * keys, 7);
    let r = (0..rows).find(|&r| (0..keys).filter(|&j| !case.masked(r, j)).count() >= 2).unwrap();
    let j = (0..keys).find(|&j| !case.masked(r, j)).unwrap();
    s[r * keys + j] = f32::NAN;
    let (p, lse) = case.run_softmax(&client(), &s, PLAIN, PLAIN, 0.7);
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
