//! ft: parameter-efficient fine-tuning of Hugging Face language models.
//!
//! Layers, each importing only the ones listed before it (ARCHITECTURE.md; checked by
//! `scripts/check-layers.sh`):
//!
//! 1. ground: [`backend`] (the backend choice), [`atomic`] (crash-safe output), [`progress`]
//!    (where the library's messages go), [`quant`] (host NF4 maths), the `ft-kernels` crate;
//! 2. [`ops`] (every backend extension and its backward) and [`formats`] (on-disk formats);
//! 3. [`model`] (one decoder; the projection seam);
//! 4. [`data`], [`adapters`], [`generate`];
//! 5. [`loss`] (shared by training and evaluation), [`convert`] (merge, quantize, import);
//! 6. [`train`], [`eval`], [`geneval`] (generation evals), [`score`] (reward-model scoring);
//! 7. [`cli`] (argument parsing only), then `main`.

pub mod atomic;
pub mod backend;
pub mod progress;
pub mod quant;

pub mod formats;
pub mod ops;

pub mod model;

pub mod adapters;
pub mod data;
pub mod generate;

pub mod convert;
pub mod loss;

pub mod eval;
pub mod geneval;
pub mod score;
pub mod train;

pub mod cli;
