//! Where a run stands: [`TrainState`] (saved in every checkpoint: with the adapter and the
//! optimizer moments, all that resume needs) and the data order it walks ([`DataOrder`]).

use std::collections::BTreeMap;
use std::path::Path;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use sha2::Digest;

use super::{IoAt, TrainError};
use crate::data::conversation::expand_data_path;

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

/// What a run trains on, besides its recipe: the sha256 of every data file (training and eval),
/// of the tokenizer and of the chat template's source. Saved in every checkpoint; `--resume`
/// refuses to continue on anything else.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Fingerprint {
    /// Data file → sha256.
    pub data: BTreeMap<String, String>,
    pub tokenizer: String,
    pub template: String,
}

fn sha256_of(path: &Path) -> Result<String, TrainError> {
    let mut h = sha2::Sha256::new();
    let mut f = std::fs::File::open(path).at("cannot read", path)?;
    std::io::copy(&mut f, &mut h).at("cannot read", path)?;
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

impl Fingerprint {
    /// The fingerprint of the data paths `data`, the tokenizer in `model_dir` and `template`.
    pub fn of(data: &[&Path], model_dir: &Path, template: &str) -> Result<Self, TrainError> {
        let mut files = BTreeMap::new();
        for d in data {
            for f in expand_data_path(d)? {
                files.insert(f.display().to_string(), sha256_of(&f)?);
            }
        }
        let template = sha2::Sha256::digest(template.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
        Ok(Fingerprint { data: files, tokenizer: sha256_of(&model_dir.join("tokenizer.json"))?, template })
    }

    /// What differs from `saved` (the fingerprint a checkpoint holds), and whether it is data.
    pub fn changed_since(&self, saved: &Fingerprint) -> Option<(String, bool)> {
        if self.data != saved.data {
            let changed: Vec<&str> = self
                .data
                .keys()
                .chain(saved.data.keys())
                .filter(|f| self.data.get(*f) != saved.data.get(*f))
                .map(String::as_str)
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            return Some((format!("the data changed ({})", changed.join(", ")), true));
        }
        if self.tokenizer != saved.tokenizer {
            return Some(("the tokenizer (tokenizer.json) changed".into(), false));
        }
        if self.template != saved.template {
            return Some(("the chat template changed".into(), false));
        }
        None
    }
}
