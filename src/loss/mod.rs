//! The losses, shared by training and evaluation: the masked next-token NLL ([`nll`]: SFT
//! training, training's eval and `ft eval` all call it) and the preference losses with the
//! completion scoring they need ([`dpo`]).

pub mod distill;
pub mod dpo;
pub mod grpo;
pub mod kto;
pub mod nll;
pub mod ref_free;
pub mod reward;

use burn::prelude::*;

/// The value of a one-element tensor, read in the tensor's own dtype. burn's `into_scalar`
/// converts to the backend's float type first: on a bf16 backend an f32 loss or gradient norm
/// would come back rounded to three significant digits (and an f16 norm² overflows at 65504).
pub fn scalar<B: Backend>(t: Tensor<B, 1>) -> f64 {
    t.into_data().convert::<f64>().to_vec::<f64>().expect("one value")[0]
}

/// The values of a tensor as f64.
pub fn values<B: Backend>(t: Tensor<B, 1>) -> Vec<f64> {
    t.into_data().convert::<f64>().to_vec().expect("f64 values")
}
