//! Packing: documents are tokenized, concatenated with end-of-document ids and cut into
//! fixed-length training sequences.

use crate::ByteTokenizer;
use crate::SplitMix64;

/// Which documents a `PackedSequences` holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// Documents not held out.
    Train,
    /// Held-out documents.
    Validation,
}

/// Whether document `index` is held out. A hash of the index, not of the seed, so the
/// split stays the same when the seed changes.
pub fn is_validation_document(index: usize, valid_fraction: f64) -> bool {
    let h = SplitMix64::new(index as u64 ^ 0x005e_ed0f_da7a).next_u64();
    (h as f64 / u64::MAX as f64) < valid_fraction
}

/// The token stream of one split, viewed as sequences of `seq_len + 1` ids: inputs are the
/// first `seq_len`, targets the last `seq_len`. Consecutive sequences share one token.
#[derive(Debug, Clone)]
pub struct PackedSequences {
    tokens: Vec<u32>,
    seq_len: usize,
}

impl PackedSequences {
    /// Packs the documents of `split`.
    pub fn new(docs: &[String], split: Split, valid_fraction: f64, seq_len: usize) -> Self {
        let tokenizer = ByteTokenizer;
        let mut tokens = Vec::new();
        for (i, doc) in docs.iter().enumerate() {
            if is_validation_document(i, valid_fraction) == (split == Split::Validation) {
                tokenizer.encode_document(doc, &mut tokens);
            }
        }
        Self { tokens, seq_len }
    }

    /// Number of whole sequences.
    pub fn len(&self) -> usize {
        self.tokens.len().saturating_sub(1) / self.seq_len
    }

    /// True when not even one sequence fits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Total tokens in the split.
    pub fn token_count(&self) -> usize {
        self.tokens.len()
    }

    /// Sequence `i`: `seq_len + 1` ids.
    pub fn sequence(&self, i: usize) -> &[u32] {
        let start = i * self.seq_len;
        &self.tokens[start..start + self.seq_len + 1]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequences_overlap_by_one_token_and_carry_end_of_document() {
        let docs = vec!["abc".to_string(), "de".to_string()];
        let p = PackedSequences::new(&docs, Split::Train, 0.0, 2);
        // a b c EOD d e EOD -> 7 tokens, (7 - 1) / 2 = 3 sequences
        assert_eq!(p.len(), 3);
        assert_eq!(p.sequence(0), &[97, 98, 99]);
        assert_eq!(p.sequence(1), &[99, ByteTokenizer::EOD, 100]);
        assert_eq!(p.sequence(2), &[100, 101, ByteTokenizer::EOD]);
    }

    #[test]
    fn validation_split_is_disjoint_and_near_the_fraction() {
        let n = 20_000;
        let held = (0..n).filter(|&i| is_validation_document(i, 0.1)).count();
        assert!((held as f64 / n as f64 - 0.1).abs() < 0.01, "{held}");
        let docs: Vec<String> = (0..100).map(|i| format!("d{i}")).collect();
        let t = PackedSequences::new(&docs, Split::Train, 0.3, 1);
        let v = PackedSequences::new(&docs, Split::Validation, 0.3, 1);
        let all = PackedSequences::new(&docs, Split::Train, 0.0, 1);
        assert_eq!(t.token_count() + v.token_count(), all.token_count());
        assert!(v.token_count() > 0 && t.token_count() > 0);
    }
}
