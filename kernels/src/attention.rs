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
//! not attended. Every tensor is read and written through its own strides (a [`View`]): on CUDA
//! cubecl pitches rows to 512 bytes, so a contiguous-only kernel would rarely run there. Statistics are f32 whatever the score type; a masked key has probability 0 and
//! a row with every key masked gets probabilities 0 and log-sum-exp −3·10³⁸ (WGSL has no −∞
//! literal).

use cubecl::prelude::*;
use cubecl::server::Handle;
use cubecl::zspace::{Shape, Strides};

/// Threads per row in [`masked_softmax`] (a power of two).
const ROW_THREADS: usize = 128;

/// Stands for −∞.
const NEG: f32 = -3.0e38;

/// Which query rows of the mask a chunk's score rows stand for.
#[derive(Debug, Clone, Copy)]
pub struct Chunk {
    /// Query rows of the chunk (`C`; the scores' third dimension is `rep · C`).
    pub rows: usize,
    /// The chunk's first query position.
    pub t0: usize,
}

/// A tensor on the device as the kernels read it: its buffer (a view's offset included) and, in
/// elements, its shape and strides. Any strides: rows pitched to an alignment (cubecl-cuda pads
/// every row to 512 bytes), column slices, broadcast (stride 0) dimensions.
#[derive(Debug, Clone, Copy)]
pub struct View<'a> {
    pub handle: &'a Handle,
    pub shape: &'a [usize],
    pub strides: &'a [usize],
}

impl View<'_> {
    /// The kernel argument (`Tensor<T>` in the kernel: strides read from its metadata).
    pub(crate) fn arg<R: Runtime>(&self) -> TensorArg<R> {
        // SAFETY: `check` below verified every element the kernels address lies in the buffer.
        unsafe { TensorArg::from_raw_parts(self.handle.clone(), Strides::new(self.strides), self.shape.iter().copied().collect::<Shape>()) }
    }

    /// One past the largest element offset the view addresses.
    fn extent(&self) -> usize {
        if self.shape.contains(&0) {
            return 0;
        }
        1 + self.shape.iter().zip(self.strides).map(|(d, s)| (d - 1) * s).sum::<usize>()
    }

    /// Panics unless the view has `rank` dimensions and fits in its buffer of `elem` bytes per
    /// element.
    pub(crate) fn check(&self, rank: usize, elem: usize, what: &str) {
        assert!(self.shape.len() == rank && self.strides.len() == rank, "{what}: rank {} (shape {:?}, strides {:?}), expected {rank}", self.shape.len(), self.shape, self.strides);
        let bytes = self.handle.size_in_used() as usize;
        assert!(self.extent() * elem <= bytes, "{what}: shape {:?} with strides {:?} reaches past its buffer of {bytes} bytes", self.shape, self.strides);
    }
}

/// The offset of row `(b, h, r)` of a `[B, H, R, …]` tensor.
#[cube]
fn row_offset<T: CubePrimitive>(t: &Tensor<T>, b: usize, h: usize, r: usize) -> usize {
    b * t.stride(0) + h * t.stride(1) + r * t.stride(2)
}

/// The offset of the mask row of query `t` for batch element `b` (the mask's first dimension is
/// 1 = one matrix for all, or B).
#[cube]
fn mask_row<M: CubePrimitive>(mask: &Tensor<M>, b: usize, t: usize) -> usize {
    let mut base = t * mask.stride(1);
    if mask.shape(0) > 1 {
        base += b * mask.stride(0);
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
fn masked_softmax_kernel<F: Float, M: Numeric>(scores: &Tensor<F>, mask: &Tensor<M>, probs: &mut Tensor<F>, lse: &mut Tensor<f32>, chunk: u32, t0: u32, scale: f32) {
    let row = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize;
    let (heads, n, keys) = (scores.shape(1), scores.shape(2), scores.shape(3));
    if row < scores.shape(0) * heads * n {
        let (b, h, r) = (row / (heads * n), (row / n) % heads, row % n);
        let (at, ks) = (row_offset(scores, b, h, r), scores.stride(3));
        let (out, ps) = (row_offset(probs, b, h, r), probs.stride(3));
        let (mrow, ms) = (mask_row(mask, b, t0 as usize + r % chunk as usize), mask.stride(2));
        let zero = M::from_int(0);
        let mut shared = SharedMemory::<f32>::new(ROW_THREADS);
        let mut m = f32::new(NEG);
        let mut k = UNIT_POS_X as usize;
        while k < keys {
            if mask[mrow + k * ms] == zero {
                m = f32::max(m, f32::cast_from(scores[at + k * ks]) * scale);
            }
            k += ROW_THREADS;
        }
        let m = reduce(&mut shared, m, true);
        let mut l = f32::new(0.0);
        let mut k = UNIT_POS_X as usize;
        while k < keys {
            if mask[mrow + k * ms] == zero {
                l += f32::exp(f32::cast_from(scores[at + k * ks]) * scale - m);
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
            if mask[mrow + k * ms] == zero {
                p = f32::exp(f32::cast_from(scores[at + k * ks]) * scale - m) * inv;
            }
            probs[out + k * ps] = F::cast_from(p);
            k += ROW_THREADS;
        }
        if UNIT_POS_X == 0 {
            let mut v = f32::new(NEG);
            if l > 0.0 || nan {
                v = m + f32::ln(l);
            }
            lse[row_offset(lse, b, h, r)] = v;
        }
    }
}

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn softmax_grad_kernel<F: Float, M: Numeric>(
    scores: &Tensor<F>,
    dprobs: &Tensor<F>,
    mask: &Tensor<M>,
    lse: &Tensor<f32>,
    delta: &Tensor<f32>,
    probs: &mut Tensor<F>,
    dscores: &mut Tensor<F>,
    chunk: u32,
    t0: u32,
    scale: f32,
) {
    // Cubes on a 2-D grid (a dimension holds at most 65535 of them).
    let i = ((CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) * CUBE_DIM_X + UNIT_POS_X) as usize;
    let (heads, n, keys) = (scores.shape(1), scores.shape(2), scores.shape(3));
    if i < scores.shape(0) * heads * n * keys {
        let (row, k) = (i / keys, i % keys);
        let (b, h, r) = (row / (heads * n), (row / n) % heads, row % n);
        let mrow = mask_row(mask, b, t0 as usize + r % chunk as usize);
        let mut p = f32::new(0.0);
        let mut d = f32::new(0.0);
        if mask[mrow + k * mask.stride(2)] == M::from_int(0) {
            p = f32::exp(f32::cast_from(scores[row_offset(scores, b, h, r) + k * scores.stride(3)]) * scale - lse[row_offset(lse, b, h, r)]);
            d = p * (f32::cast_from(dprobs[row_offset(dprobs, b, h, r) + k * dprobs.stride(3)]) - delta[row_offset(delta, b, h, r)]) * scale;
        }
        probs[row_offset(probs, b, h, r) + k * probs.stride(3)] = F::cast_from(p);
        dscores[row_offset(dscores, b, h, r) + k * dscores.stride(3)] = F::cast_from(d);
    }
}

/// A 2-D grid of at least `n` cubes, under the 65535 limit of a dimension.
fn grid(n: usize) -> CubeCount {
    let x = n.clamp(1, 65535);
    CubeCount::new_2d(x as u32, n.div_ceil(x).max(1) as u32)
}

/// Panics unless the views are what the kernels read: `scores` (and every view of its shape)
/// `[B, H, rep·C, keys]`, the statistics `[B, H, rep·C]`, the mask `[1 | B, T, S]` with
/// `S ≥ keys` and the chunk's query rows inside `T`.
fn check_chunk(c: &Chunk, rows: &[(&View, usize, &str)], stats: &[(&View, &str)], mask: &View, mask_elem: usize) {
    let shape = rows[0].0.shape;
    for (v, elem, what) in rows {
        v.check(4, *elem, what);
        assert_eq!(v.shape, shape, "{what}: shape {:?}, the scores' is {shape:?}", v.shape);
    }
    for (v, what) in stats {
        v.check(3, 4, what);
        assert_eq!(v.shape, &shape[..3], "{what}: shape {:?}, expected the scores' rows {:?}", v.shape, &shape[..3]);
    }
    mask.check(3, mask_elem, "mask");
    assert!(c.rows > 0 && shape[2].is_multiple_of(c.rows), "{} score rows per head are not a multiple of the chunk's {}", shape[2], c.rows);
    assert!(mask.shape[0] == 1 || mask.shape[0] == shape[0], "mask batch {} for {} score batches", mask.shape[0], shape[0]);
    assert!(c.t0 + c.rows <= mask.shape[1] && shape[3] <= mask.shape[2], "chunk rows {}..{} over {} keys outside the mask {:?}", c.t0, c.t0 + c.rows, shape[3], mask.shape);
}

/// The probabilities `probs` (`F`, any layout of the scores' shape) and per row log-sum-exps
/// `lse` (f32 `[B, H, rep·C]`) of the chunk `c`'s raw products `scores` (`[B, H, rep·C, keys]`,
/// unscaled) under `mask` (`M`, `[1 | B, T, S]`, nonzero = not attended).
pub fn masked_softmax<R: Runtime, F: Float + CubeElement, M: Numeric + CubeElement>(client: &ComputeClient<R>, c: &Chunk, scores: &View, mask: &View, probs: &View, lse: &View, scale: f32) {
    let f = size_of::<F>();
    check_chunk(c, &[(scores, f, "scores"), (probs, f, "probs")], &[(lse, "lse")], mask, size_of::<M>());
    let rows: usize = scores.shape[..3].iter().product();
    masked_softmax_kernel::launch::<F, M, R>(
        client,
        grid(rows),
        CubeDim::new_1d(ROW_THREADS as u32),
        scores.arg(),
        mask.arg(),
        probs.arg(),
        lse.arg(),
        c.rows as u32,
        c.t0 as u32,
        scale,
    );
}

/// The backward's probabilities `P = exp(scale·s − lse)` and score gradients
/// `dS = scale · P ∘ (dP − delta)` (`probs`, `dscores`: `F`, any layout of the scores' shape) from
/// the raw products `scores`, their probabilities' gradient `dprobs` and per row `lse` and
/// `delta = rowsum(dO ∘ O)` (f32 `[B, H, rep·C]`).
#[allow(clippy::too_many_arguments)]
pub fn softmax_grad<R: Runtime, F: Float + CubeElement, M: Numeric + CubeElement>(
    client: &ComputeClient<R>,
    c: &Chunk,
    scores: &View,
    dprobs: &View,
    mask: &View,
    lse: &View,
    delta: &View,
    probs: &View,
    dscores: &View,
    scale: f32,
) {
    let f = size_of::<F>();
    check_chunk(c, &[(scores, f, "scores"), (dprobs, f, "dprobs"), (probs, f, "probs"), (dscores, f, "dscores")], &[(lse, "lse"), (delta, "delta")], mask, size_of::<M>());
    let n: usize = scores.shape.iter().product();
    softmax_grad_kernel::launch::<F, M, R>(
        client,
        grid(n.div_ceil(256)),
        CubeDim::new_1d(256),
        scores.arg(),
        dprobs.arg(),
        mask.arg(),
        lse.arg(),
        delta.arg(),
        probs.arg(),
        dscores.arg(),
        c.rows as u32,
        c.t0 as u32,
        scale,
    );
}

/// Every instantiation of this file's kernels ft launches (f32, f16, bf16 scores × u8, u32
/// masks), defined for `client`'s runtime as [`masked_softmax`] and [`softmax_grad`] launch them,
/// for compiling without launching (`crate::cuda_source`). These kernels read no device
/// property, so the definitions are the same on every runtime.
pub(crate) fn definitions<R: Runtime>(client: &ComputeClient<R>) -> Vec<KernelDefinition> {
    fn one<R: Runtime, F: Float + CubeElement, M: Numeric + CubeElement>(client: &ComputeClient<R>) -> [KernelDefinition; 2] {
        let t = || cubecl::prelude::TensorCompilationArg { inplace: None };
        let settings = |threads: usize| KernelSettings::default().cube_dim(CubeDim::new_1d(threads as u32));
        [
            masked_softmax_kernel::MaskedSoftmaxKernel::<F, M, R>::new(settings(ROW_THREADS), client.clone(), t(), t(), t(), t(), (), (), ()).define(),
            softmax_grad_kernel::SoftmaxGradKernel::<F, M, R>::new(settings(256), client.clone(), t(), t(), t(), t(), t(), t(), t(), (), (), ()).define(),
        ]
    }
    [
        one::<R, f32, u8>(client),
        one::<R, f32, u32>(client),
        one::<R, half::f16, u8>(client),
        one::<R, half::f16, u32>(client),
        one::<R, half::bf16, u8>(client),
        one::<R, half::bf16, u32>(client),
    ]
    .into_iter()
    .flatten()
    .collect()
}
