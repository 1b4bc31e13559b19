//! One batch type for every forward that scores tokens (SFT training and eval, DPO, `ft eval`):
//! rows right-padded, or packed with several samples per row, and the flat positions whose next
//! token is scored.

use super::encode::Encoded;
use super::packing::Packed;

/// Rows of token ids `[b, t]` and the scored positions: at flat position `p = row · t + j` the
/// model's prediction for the next token `targets[k]` counts (position `positions[k]`, sample
/// `owner[k]`).
#[derive(Debug, Clone)]
pub struct Batch {
    /// `[b, t]`, padded with 0.
    pub input: Vec<i64>,
    pub b: usize,
    pub t: usize,
    /// Packed rows: the lengths of the samples laid end to end in each row.
    pub segments: Option<Vec<Vec<usize>>>,
    pub positions: Vec<i64>,
    pub targets: Vec<i64>,
    /// The row (padded) or the sample within the batch (packed, counted across rows) of each
    /// scored position.
    pub owner: Vec<usize>,
    /// Non-padding input tokens.
    pub real_tokens: usize,
}

impl Batch {
    /// Right-padded rows, one sample each: `input[i, j] = ids[j]`, scored where `mask[j + 1]`.
    pub fn padded(samples: &[&Encoded]) -> Self {
        let t = samples.iter().map(|s| s.ids.len().saturating_sub(1)).max().unwrap_or(1).max(1);
        let b = samples.len();
        let mut input = vec![0i64; b * t];
        let (mut positions, mut targets, mut owner) = (Vec::new(), Vec::new(), Vec::new());
        for (i, s) in samples.iter().enumerate() {
            for j in 0..s.ids.len().saturating_sub(1) {
                input[i * t + j] = s.ids[j] as i64;
                if s.mask[j + 1] == 1 {
                    positions.push((i * t + j) as i64);
                    targets.push(s.ids[j + 1] as i64);
                    owner.push(i);
                }
            }
        }
        let real_tokens = samples.iter().map(|s| s.ids.len().saturating_sub(1)).sum();
        Batch { input, b, t, segments: None, positions, targets, owner, real_tokens }
    }

    /// Packed rows: every token of a row is an input; a target never crosses from one sample
    /// into the next.
    pub fn packed(rows: &[&Packed]) -> Self {
        let t = rows.iter().map(|r| r.ids.len()).max().unwrap_or(1).max(1);
        let b = rows.len();
        let mut input = vec![0i64; b * t];
        let (mut positions, mut targets, mut owner) = (Vec::new(), Vec::new(), Vec::new());
        let (mut real_tokens, mut sample) = (0, 0);
        for (i, r) in rows.iter().enumerate() {
            let mut start = 0;
            for &len in &r.segments {
                for o in 0..len {
                    let j = start + o;
                    input[i * t + j] = r.ids[j] as i64;
                    if o + 1 < len && r.mask[j + 1] == 1 {
                        positions.push((i * t + j) as i64);
                        targets.push(r.ids[j + 1] as i64);
                        owner.push(sample);
                    }
                }
                real_tokens += len.saturating_sub(1);
                start += len;
                sample += 1;
            }
        }
        Batch { input, b, t, segments: Some(rows.iter().map(|r| r.segments.clone()).collect()), positions, targets, owner, real_tokens }
    }

    /// Tokens the loss is taken over.
    pub fn scored(&self) -> usize {
        self.positions.len()
    }

    /// Scored tokens per sample (`owner` indices).
    pub fn counts(&self, samples: usize) -> Vec<usize> {
        let mut counts = vec![0usize; samples];
        for &i in &self.owner {
            counts[i] += 1;
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(ids: &[u32], mask: &[u8]) -> Encoded {
        Encoded { text: String::new(), ids: ids.to_vec(), mask: mask.to_vec() }
    }

    #[test]
    fn padded_and_packed_score_the_same_targets() {
        let a = enc(&[1, 2, 3, 4], &[0, 0, 1, 1]);
        let b = enc(&[5, 6, 7], &[0, 1, 1]);
        let padded = Batch::padded(&[&a, &b]);
        assert_eq!((padded.b, padded.t), (2, 3));
        assert_eq!(padded.positions, vec![1, 2, 3, 4]);
        assert_eq!(padded.targets, vec![3, 4, 6, 7]);
        assert_eq!(padded.owner, vec![0, 0, 1, 1]);
        assert_eq!(padded.real_tokens, 5);
        let row = Packed { ids: vec![1, 2, 3, 4, 5, 6, 7], mask: vec![0, 0, 1, 1, 0, 1, 1], segments: vec![4, 3] };
        let packed = Batch::packed(&[&row]);
        assert_eq!((packed.b, packed.t), (1, 7));
        assert_eq!(packed.positions, vec![1, 2, 4, 5]);
        assert_eq!(packed.targets, padded.targets);
        assert_eq!(packed.owner, padded.owner);
        assert_eq!(packed.real_tokens, 5);
    }
}
