//! Adapters on a loaded model: their settings ([`config`]), new adapters with PEFT's
//! initialisation ([`attach`]), and PEFT adapter directories read onto and written from a model
//! ([`peft`]), and what serving engines make of an adapter ([`serving`]). The adapter layer itself is a part of the model's projection
//! (`model::projection::Lora`); merging is `convert::merge`.

pub mod attach;
pub mod config;
pub mod peft;
pub mod pissa;
pub mod serving;
