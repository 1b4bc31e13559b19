//! Packing: several tokenized samples share one sequence of at most `max_len` tokens, chosen
//! best-fit-decreasing (longest sample first, into the fullest sequence it still fits). Each
//! packed sequence remembers its samples' lengths, so the model restarts positions per sample and
//! keeps samples from attending to each other (block-diagonal causal mask), and no target crosses
//! a sample boundary: the loss of a packed batch equals the loss of the same samples unpacked.

use std::collections::BTreeSet;

use super::encode::Encoded;

/// One packed sequence: the samples' ids and masks concatenated, and their lengths in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Packed {
    pub ids: Vec<u32>,
    pub mask: Vec<u8>,
    pub segments: Vec<usize>,
}

impl Packed {
    pub fn trainable(&self) -> usize {
        self.mask.iter().map(|&m| m as usize).sum()
    }
}

/// Best-fit-decreasing over lengths (each at most `max_len`): the bins, as indices into
/// `lengths` in the order they were placed. Deterministic: ties keep input order.
pub fn pack_lengths(lengths: &[usize], max_len: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
    let mut bins: Vec<Vec<usize>> = Vec::new();
    // (free space, bin index) of every bin; the best fit is the first entry with enough space.
    let mut free: BTreeSet<(usize, usize)> = BTreeSet::new();
    for i in order {
        let len = lengths[i].min(max_len);
        let (space, b) = match free.range((len, 0)..).next().copied() {
            Some(entry) => {
                free.remove(&entry);
                entry
            }
            None => {
                bins.push(Vec::new());
                (max_len, bins.len() - 1)
            }
        };
        bins[b].push(i);
        free.insert((space - len, b));
    }
    bins
}

/// Packs `samples` (each at most `max_len` tokens; longer ones are the caller's to drop) into
/// sequences of at most `max_len` tokens.
pub fn pack(samples: &[Encoded], max_len: usize) -> Vec<Packed> {
    let lengths: Vec<usize> = samples.iter().map(|s| s.ids.len()).collect();
    pack_lengths(&lengths, max_len)
        .into_iter()
        .map(|members| {
            let mut p = Packed { ids: Vec::new(), mask: Vec::new(), segments: Vec::new() };
            for i in members {
                let s = &samples[i];
                let len = s.ids.len().min(max_len);
                p.ids.extend_from_slice(&s.ids[..len]);
                p.mask.extend_from_slice(&s.mask[..len]);
                p.segments.push(len);
            }
            p
        })
        .collect()
}

/// Share of the slots of `sequences` packed sequences of `max_len` that `tokens` real tokens fill.
pub fn efficiency(tokens: usize, sequences: usize, max_len: usize) -> f64 {
    tokens as f64 / (sequences * max_len).max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(len: usize, tag: u32) -> Encoded {
        Encoded { text: String::new(), ids: vec![tag; len], mask: vec![1; len] }
    }

    #[test]
    fn best_fit_decreasing_fills_tightly_and_keeps_every_token() {
        let lens = [7, 5, 4, 3, 3, 2, 1, 6];
        let samples: Vec<Encoded> = lens.iter().enumerate().map(|(i, &l)| sample(l, i as u32)).collect();
        let packed = pack(&samples, 10);
        // 31 tokens into bins of 10: BFD needs 4 (7+3, 6+4, 5+3+2, 1).
        assert_eq!(packed.iter().map(|p| p.segments.clone()).collect::<Vec<_>>(), vec![vec![7, 3], vec![6, 4], vec![5, 3, 2], vec![1]]);
        assert!(packed.iter().all(|p| p.ids.len() <= 10 && p.ids.len() == p.segments.iter().sum::<usize>()));
        let mut tags: Vec<u32> = packed.iter().flat_map(|p| p.ids.clone()).collect();
        tags.sort();
        let mut want: Vec<u32> = samples.iter().flat_map(|s| s.ids.clone()).collect();
        want.sort();
        assert_eq!(tags, want);
        let used: usize = packed.iter().map(|p| p.ids.len()).sum();
        assert!((efficiency(used, packed.len(), 10) - 31.0 / 40.0).abs() < 1e-12);
    }
}
