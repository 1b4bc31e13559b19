//! Training: recipes, the optimizer and schedules, the step, and the SFT loop.

pub mod checkpoint;
pub mod optim;
pub mod plot;
pub mod recipe;
pub mod sft;
pub mod step;
