//! Training: recipes, the optimizer and schedules, the step, the loop, and its two objectives
//! (SFT and DPO).

pub mod checkpoint;
pub mod dpo;
pub mod optim;
pub mod plot;
pub mod recipe;
pub mod recompute;
pub mod run;
pub mod sft;
pub mod step;

use burn::prelude::*;

/// The value of a one-element tensor, read in the tensor's own dtype. burn's `into_scalar`
/// converts to the backend's float type first: on a bf16 backend an f32 loss or gradient norm
/// would come back rounded to three significant digits (and an f16 norm² overflows at 65504).
pub fn scalar<B: Backend>(t: Tensor<B, 1>) -> f64 {
    t.into_data().convert::<f64>().to_vec::<f64>().expect("one value")[0]
}
