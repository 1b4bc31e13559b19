//! Where a run stands: [`TrainState`] (saved in every checkpoint: with the adapter and the
//! optimizer moments, all that resume needs) and the data order it walks ([`DataOrder`]).

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

/// Where the loop stands.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainState {
    pub step: usize,
    pub epoch: usize,
    pub cursor: usize,
    pub tokens_seen: usize,
    pub optimizer_t: usize,
}

/// Where the loop stands in the data: the epoch, the position in that epoch's order, and the
/// order itself, a pure function of (seed, epoch).
#[derive(Clone)]
pub struct DataOrder {
    seed: u64,
    n: usize,
    pub epoch: usize,
    pub cursor: usize,
    order: Vec<usize>,
}

impl DataOrder {
    pub fn new(seed: u64, n: usize, epoch: usize, cursor: usize) -> Self {
        DataOrder { seed, n, epoch, cursor, order: Self::shuffled(seed, n, epoch) }
    }

    fn shuffled(seed: u64, n: usize, epoch: usize) -> Vec<usize> {
        let mut o: Vec<usize> = (0..n).collect();
        o.shuffle(&mut StdRng::seed_from_u64(seed.wrapping_add(epoch as u64)));
        o
    }

    /// The next example, moving on to the next epoch's order at the end of one.
    pub fn next_index(&mut self) -> usize {
        if self.cursor == self.order.len() {
            self.epoch += 1;
            self.order = Self::shuffled(self.seed, self.n, self.epoch);
            self.cursor = 0;
        }
        self.cursor += 1;
        self.order[self.cursor - 1]
    }

    /// Epochs done, fractional.
    pub fn progress(&self) -> f64 {
        self.epoch as f64 + self.cursor as f64 / self.n as f64
    }
}
