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
