//! The row-wise parts of ft's chunked attention (`src/ops/composed.rs` in ft), each one kernel
//! instead of a chain of element-wise tensor operations over the score matrix of a chunk:
//!
//! - [`masked_softmax`]: scale, mask, the row maximum, the sum of exponentials, the log-sum-exp
//!   and the probabilities (one cube per row, reductions in shared memory);
//! - [`softmax_grad`]: the backward's probabilities `P = exp(scale·s − lse)` and score gradients
//!   `dS = scale · P ∘ (dP − delta)` (one thread per element).
//!
//! Scores are the rows of `[B, KV, rep·C, keys]` (the query heads of a kv head stacked, `C` query
//! rows of the chunk starting at `t0`); the mask is read where it lies, `[1 | B, T, S]`, nonzero =
//! not attended. Statistics are f32 whatever the score type; a masked key has probability 0 and
//! a row with every key masked gets probabilities 0 and log-sum-exp −3·10³⁸ (WGSL has no −∞
//! literal).

use cubecl::prelude::*;
use cubecl::server::Handle;

/// Threads per row in [`masked_softmax`] (a power of two).
const ROW_THREADS: usize = 128;

/// Stands for −∞.
const NEG: f32 = -3.0e38;

/// Where one chunk's rows sit in the scores and the mask.
#[derive(Debug, Clone, Copy)]
pub struct ChunkLayout {
    /// Rows of the scores: `B · KV · rep · C`.
    pub rows: usize,
    /// Keys per row.
    pub keys: usize,
    /// Rows per batch element: `KV · rep · C`.
    pub rows_per_batch: usize,
    /// Query rows of the chunk (`C`).
    pub chunk: usize,
    /// The chunk's first query position.
    pub t0: usize,
    /// The mask's query and key lengths (`T`, `S`) and whether it has one matrix per batch
    /// element (else one for all).
    pub mask_t: usize,
    pub mask_s: usize,
    pub mask_batched: bool,
}

/// The index of `row`'s first mask entry.
#[cube]
fn mask_row(row: usize, rows_per_batch: usize, chunk: usize, t0: usize, mask_t: usize, mask_s: usize, mask_batched: u32) -> usize {
    let b = row / rows_per_batch;
    let t = t0 + row % chunk;
    let mut base = t * mask_s;
    if mask_batched != 0 {
        base += b * mask_t * mask_s;
    }
    base
}

/// Tree reduction over the cube's threads (max when `max`, else sum); every thread gets the
/// result.
#[cube]
fn reduce(shared: &mut SharedMemory<f32>, v: f32, #[comptime] max: bool) -> f32 {
    let u = UNIT_POS_X as usize;
    shared[u] = v;
    sync_cube();
    // A runtime value (a comptime constant cannot be mutated); the cube is ROW_THREADS wide.
    let mut stride = (CUBE_DIM_X / 2) as usize;
    while stride > 0 {
        if u < stride {
            if max {
                shared[u] = f32::max(shared[u], shared[u + stride]);
            } else {
                shared[u] = shared[u] + shared[u + stride];
            }
        }
        sync_cube();
        stride /= 2;
    }
    let out = shared[0];
    sync_cube();
    out
}

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn masked_softmax_kernel<F: Float, M: Numeric>(
    scores: &Array<F>,
    mask: &Array<M>,
    probs: &mut Array<F>,
    lse: &mut Array<f32>,
    keys: u32,
    rows_per_batch: u32,
    chunk: u32,
    t0: u32,
    mask_t: u32,
    mask_s: u32,
    mask_batched: u32,
    scale: f32,
) {
    let row = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize;
    if row < lse.len() {
        let keys = keys as usize;
        let at = row * keys;
        let mrow = mask_row(row, rows_per_batch as usize, chunk as usize, t0 as usize, mask_t as usize, mask_s as usize, mask_batched);
        let zero = M::from_int(0);
        let mut shared = SharedMemory::<f32>::new(ROW_THREADS);
        let mut m = f32::new(NEG);
        let mut k = UNIT_POS_X as usize;
        while k < keys {
            if mask[mrow + k] == zero {
                m = f32::max(m, f32::cast_from(scores[at + k]) * scale);
            }
            k += ROW_THREADS;
        }
        let m = reduce(&mut shared, m, true);
        let mut l = f32::new(0.0);
        let mut k = UNIT_POS_X as usize;
        while k < keys {
            if mask[mrow + k] == zero {
                l += f32::exp(f32::cast_from(scores[at + k]) * scale - m);
            }
            k += ROW_THREADS;
        }
        let l = reduce(&mut shared, l, false);
        // `l` is 0 only for a row with every key masked. A NaN score makes `l` NaN (whether or not
        // the max skipped it), and the NaN goes on to every probability and the log-sum-exp, as
        // the composed softmax and transformers give it. `is_nan` tests the bits: WGSL may take
        // comparisons as never seeing a NaN.
        let nan = l.is_nan();
        let mut inv = f32::new(0.0);
        if l > 0.0 || nan {
            inv = 1.0 / l;
        }
        let mut k = UNIT_POS_X as usize;
        while k < keys {
            let mut p = f32::new(0.0);
            if mask[mrow + k] == zero {
                p = f32::exp(f32::cast_from(scores[at + k]) * scale - m) * inv;
            }
            probs[at + k] = F::cast_from(p);
            k += ROW_THREADS;
        }
        if UNIT_POS_X == 0 {
            let mut out = f32::new(NEG);
            if l > 0.0 || nan {
                out = m + f32::ln(l);
            }
            lse[row] = out;
        }
    }
}

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn softmax_grad_kernel<F: Float, M: Numeric>(
    scores: &Array<F>,
    dprobs: &Array<F>,
    mask: &Array<M>,
    lse: &Array<f32>,
    delta: &Array<f32>,
    probs: &mut Array<F>,
    dscores: &mut Array<F>,
    keys: u32,
    rows_per_batch: u32,
    chunk: u32,
    t0: u32,
    mask_t: u32,
    mask_s: u32,
    mask_batched: u32,
    scale: f32,
) {
    // Cubes on a 2-D grid (a dimension holds at most 65535 of them).
    let i = ((CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) * CUBE_DIM_X + UNIT_POS_X) as usize;
    if i < probs.len() {
        let keys = keys as usize;
        let row = i / keys;
        let mrow = mask_row(row, rows_per_batch as usize, chunk as usize, t0 as usize, mask_t as usize, mask_s as usize, mask_batched);
        let mut p = f32::new(0.0);
        if mask[mrow + i % keys] == M::from_int(0) {
            p = f32::exp(f32::cast_from(scores[i]) * scale - lse[row]);
        }
        probs[i] = F::cast_from(p);
        dscores[i] = F::cast_from(p * (f32::cast_from(dprobs[i]) - delta[row]) * scale);
    }
}

/// A 2-D grid of at least `n` cubes, under the 65535 limit of a dimension.
fn grid(n: usize) -> CubeCount {
    let x = n.clamp(1, 65535);
    CubeCount::new_2d(x as u32, n.div_ceil(x).max(1) as u32)
}

/// The scalar arguments both kernels take, in order.
fn scalars(c: &ChunkLayout) -> [u32; 7] {
    [c.keys as u32, c.rows_per_batch as u32, c.chunk as u32, c.t0 as u32, c.mask_t as u32, c.mask_s as u32, c.mask_batched as u32]
}

/// `probs` (`rows × keys` `F`s) and `lse` (`rows` f32) from the raw products `scores`
/// (`rows × keys`, unscaled) under `mask` (`mask_len` `M`s).
#[allow(clippy::too_many_arguments)]
pub fn masked_softmax<R: Runtime, F: Float + CubeElement, M: Numeric + CubeElement>(
    client: &ComputeClient<R>,
    c: &ChunkLayout,
    scores: &Handle,
    mask: &Handle,
    mask_len: usize,
    probs: &Handle,
    lse: &Handle,
    scale: f32,
) {
    let n = c.rows * c.keys;
    let [keys, rpb, chunk, t0, mt, ms, mb] = scalars(c);
    unsafe {
        masked_softmax_kernel::launch::<F, M, R>(
            client,
            grid(c.rows),
            CubeDim::new_1d(ROW_THREADS as u32),
            ArrayArg::from_raw_parts(scores.clone(), n),
            ArrayArg::from_raw_parts(mask.clone(), mask_len),
            ArrayArg::from_raw_parts(probs.clone(), n),
            ArrayArg::from_raw_parts(lse.clone(), c.rows),
            keys,
            rpb,
            chunk,
            t0,
            mt,
            ms,
            mb,
            scale,
        );
    }
}

/// The backward's `probs` and `dscores` (`rows × keys` `F`s each) from the raw products
/// `scores`, their probabilities' gradient `dprobs`, and per row `lse` and
/// `delta = rowsum(dO ∘ O)` (f32).
#[allow(clippy::too_many_arguments)]
pub fn softmax_grad<R: Runtime, F: Float + CubeElement, M: Numeric + CubeElement>(
    client: &ComputeClient<R>,
    c: &ChunkLayout,
    scores: &Handle,
    dprobs: &Handle,
    mask: &Handle,
    mask_len: usize,
    lse: &Handle,
    delta: &Handle,
    probs: &Handle,
    dscores: &Handle,
    scale: f32,
) {
    let n = c.rows * c.keys;
    let [keys, rpb, chunk, t0, mt, ms, mb] = scalars(c);
    unsafe {
        softmax_grad_kernel::launch::<F, M, R>(
            client,
            grid(n.div_ceil(256)),
            CubeDim::new_1d(256),
            ArrayArg::from_raw_parts(scores.clone(), n),
            ArrayArg::from_raw_parts(dprobs.clone(), n),
            ArrayArg::from_raw_parts(mask.clone(), mask_len),
            ArrayArg::from_raw_parts(lse.clone(), c.rows),
            ArrayArg::from_raw_parts(delta.clone(), c.rows),
            ArrayArg::from_raw_parts(probs.clone(), n),
            ArrayArg::from_raw_parts(dscores.clone(), n),
            keys,
            rpb,
            chunk,
            t0,
            mt,
            ms,
            mb,
            scale,
        );
    }
}
