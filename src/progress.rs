//! Where the library's messages go: it prints nothing itself. The CLI passes a [`Progress`]
//! that writes to stderr (or stays quiet); tests and embedders pass their own.

/// A sink for what a long-running library call wants the user to see.
pub trait Progress {
    /// A one-line status ("resuming from …", "precomputing reference log-probs …").
    fn status(&self, message: &str);
    /// Something the user should know that does not stop the work.
    fn warning(&self, message: &str);
    /// A training run starts with `done` of `total` optimizer steps behind it.
    fn start(&self, _done: usize, _total: usize) {}
    /// Optimizer step `step` (1-based) of `total` finished: `message` holds its loss and friends.
    fn step(&self, _step: usize, _total: usize, _message: &str, _tokens_per_s: f64) {}
    /// The run's steps are over.
    fn finish(&self) {}
}

/// Drops everything.
pub struct Silent;

impl Progress for Silent {
    fn status(&self, _: &str) {}
    fn warning(&self, _: &str) {}
}
