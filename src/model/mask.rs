//! Attention masks and position ids for padded batches, left or right padded, with or
//! without a KV cache: the one place where padding is turned into model inputs.
//!
//! Convention (as transformers): `key_mask[b][j]` is 1 for a real token and 0 for
//! padding, over every position the keys cover (cached ones first, then the new
//! ones). A token's position id is the number of real tokens before it, so a
//! left-padded prompt gets the same positions as the prompt alone.

use candle_core::{Device, Tensor};
use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::ops::attention::CausalMask;

/// Additive bias for masked scores in the composite attention. Finite, so that a row
/// with every key masked (a padding query) gives a uniform softmax instead of NaN.
pub const MASKED: f32 = -1e30;

/// The per-forward inputs that encode padding and causality.
#[derive(Debug, Clone)]
pub struct AttentionMask {
    pub position_ids: Tensor, // (B, T) u32
    /// Which keys each query sees (used by the fused kernel and to build `bias`).
    pub causal: CausalMask,
    /// The sequences (examples) the rows hold, over all rows.
    pub sequences: usize,
}

impl AttentionMask {
    /// Builds the mask for the last `query_len` positions of `key_mask` (B rows of S).
    /// Query i sits at key index S - query_len + i and sees keys j ≤ that index whose
    /// mask is 1.
    pub fn new(key_mask: &[Vec<u8>], query_len: usize, device: &Device) -> Result<Self> {
        let segments: Vec<Vec<u32>> = key_mask
            .iter()
            .map(|row| row.iter().map(|&m| u32::from(m != 0)).collect())
            .collect();
        Self::from_segments(&segments, query_len, device)
    }

    /// Packed rows: `segments[b][j]` is 0 for padding and the example number (1, 2,
    /// ...) otherwise. A token attends only to earlier tokens of its own example, and
    /// its position is the number of earlier tokens of its example, so a packed row
    /// computes exactly what its examples would compute one by one, whether the
    /// examples lie one after another (training) or interleave (serving).
    pub fn from_segments(segments: &[Vec<u32>], query_len: usize, device: &Device) -> Result<Self> {
        Self::from_tree(segments, &HashMap::new(), query_len, device)
    }

    /// Packed rows where some examples continue a shared prefix: `parents[e] = p`
    /// makes example `e` the continuation of example `p` (its prompt, say), as if each
    /// of `p`'s children were `p ++ e` alone. A child sees `p`'s keys and its own; its
    /// positions count on from `p`'s length. `p` must lie in the child's row, wholly
    /// before it, and have no parent. `sequences` counts the examples that are not a
    /// parent.
    pub fn from_tree(
        segments: &[Vec<u32>],
        parents: &HashMap<u32, u32>,
        query_len: usize,
        device: &Device,
    ) -> Result<Self> {
        let b = segments.len();
        let s = segments.first().map_or(0, Vec::len);
        if segments.iter().any(|row| row.len() != s) || query_len > s || query_len == 0 {
            return Err(Error::Invalid(format!(
                "attention mask rows must have equal length ≥ query length {query_len}"
            )));
        }
        let is_parent: std::collections::HashSet<u32> = parents.values().copied().collect();
        if let Some((&e, &p)) = parents
            .iter()
            .find(|&(&e, &p)| e == 0 || p == 0 || e == p || parents.contains_key(&p))
        {
            return Err(Error::Invalid(format!(
                "attention mask: example {e} cannot continue example {p} (padding, itself, \
                 or a continuation)"
            )));
        }
        let offset = s - query_len;
        let mut positions = Vec::with_capacity(b * query_len);
        let mut seen: HashMap<u32, u32> = HashMap::new();
        let mut sequences = 0;
        for (r, row) in segments.iter().enumerate() {
            // The count of earlier tokens of the same example (a continuation's counts
            // on from its prefix's length): for a real token that is its position; for
            // padding any value works (it is masked). Examples may interleave (the
            // server packs many sequences into one row and appends one token of each
            // per step), so count per example id.
            seen.clear();
            for (j, &seg) in row.iter().enumerate() {
                if !seen.contains_key(&seg) {
                    let from = match parents.get(&seg) {
                        // The prefix is complete once its child starts.
                        Some(p) => match seen.get(p) {
                            Some(&n) if !row[j..].contains(p) => n,
                            _ => {
                                return Err(Error::Invalid(format!(
                                    "attention mask row {r}: example {seg} must follow all of \
                                     example {p}, its prefix"
                                )))
                            }
                        },
                        None => 0,
                    };
                    seen.insert(seg, from);
                }
                let count = seen.get_mut(&seg).expect("inserted above");
                if j >= offset {
                    positions.push(if seg == 0 { 0 } else { *count });
                }
                *count += 1;
            }
            sequences += seen
                .keys()
                .filter(|&&seg| seg != 0 && !is_parent.contains(&seg))
                .count();
        }
        let position_ids = Tensor::from_vec(positions, (b, query_len), device)?;
        let causal = CausalMask::with_parents(segments.concat(), parents, b, s, query_len);
        Ok(AttentionMask {
            position_ids,
            causal,
            sequences,
        })
    }

    /// Full-sequence mask (no cache): every position is a query.
    pub fn full(key_mask: &[Vec<u8>], device: &Device) -> Result<Self> {
        let s = key_mask.first().map_or(0, Vec::len);
        Self::new(key_mask, s, device)
    }

    /// The additive bias of the composite attention: (B, 1, T, S), 0 where a query sees
    /// a key and `MASKED` elsewhere.
    pub fn bias(&self, device: &Device) -> Result<Tensor> {
        let c = &self.causal;
        let (batch, queries, keys) = (c.batch(), c.queries(), c.keys());
        let mut bias = vec![MASKED; batch * queries * keys];
        for bi in 0..batch {
            for q in 0..queries {
                let base = (bi * queries + q) * keys;
                for j in c.visible(bi, q) {
                    bias[base + j] = 0.0;
                }
            }
        }
        Ok(Tensor::from_vec(bias, (batch, 1, queries, keys), device)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flat_bias(m: &AttentionMask) -> Vec<f32> {
        m.bias(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn left_padding_gives_positions_from_zero_and_masks_pads() {
        let mask = vec![vec![0, 0, 1, 1], vec![1, 1, 1, 1]];
        let m = AttentionMask::full(&mask, &Device::Cpu).unwrap();
        let pos: Vec<Vec<u32>> = m.position_ids.to_vec2().unwrap();
        assert_eq!(pos[0][2..], [0, 1]);
        assert_eq!(pos[1], [0, 1, 2, 3]);
        let b = flat_bias(&m);
        // Row 0, query 3 (last): sees keys 2 and 3 only.
        let row = &b[3 * 4..4 * 4];
        assert_eq!(row, [MASKED, MASKED, 0.0, 0.0]);
        // Row 1, query 1: causal, sees keys 0 and 1.
        let row = &b[(4 + 1) * 4..(4 + 2) * 4];
        assert_eq!(row, [0.0, 0.0, MASKED, MASKED]);
    }

    #[test]
    fn cached_step_uses_last_position() {
        let mask = vec![vec![0, 1, 1, 1]];
        let m = AttentionMask::new(&mask, 1, &Device::Cpu).unwrap();
        assert_eq!(m.position_ids.to_vec2::<u32>().unwrap(), [[2]]);
        let b = flat_bias(&m);
        assert_eq!(b, [MASKED, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn packed_rows_restart_positions_and_block_attention() {
        let segs = vec![vec![1, 1, 1, 2, 2, 0]];
        let m = AttentionMask::from_segments(&segs, 6, &Device::Cpu).unwrap();
        assert_eq!(
            m.position_ids.to_vec2::<u32>().unwrap()[0][..5],
            [0, 1, 2, 0, 1]
        );
        let b = flat_bias(&m);
        // Query 4 (second example, position 1) sees keys 3 and 4 only.
        assert_eq!(&b[4 * 6..5 * 6], [MASKED, MASKED, MASKED, 0.0, 0.0, MASKED]);
        // The padding query sees nothing.
        assert!(b[5 * 6..].iter().all(|&x| x == MASKED));
    }

    #[test]
    fn a_continuation_counts_on_from_its_prefix_and_sees_it() {
        // Prefix 1 (3 tokens), continuations 2 and 3; then example 4 alone.
        let segs = vec![vec![1, 1, 1, 2, 2, 3, 4, 4, 0]];
        let parents = HashMap::from([(2, 1), (3, 1)]);
        let m = AttentionMask::from_tree(&segs, &parents, 9, &Device::Cpu).unwrap();
        assert_eq!(
            m.position_ids.to_vec2::<u32>().unwrap()[0][..8],
            [0, 1, 2, 3, 4, 3, 0, 1]
        );
        assert_eq!(m.sequences, 3, "the prefix is not a sequence of its own");
        let b = flat_bias(&m);
        let sees = |q: usize| -> Vec<usize> { (0..9).filter(|&j| b[q * 9 + j] == 0.0).collect() };
        assert_eq!(sees(4), [0, 1, 2, 3, 4]);
        assert_eq!(sees(5), [0, 1, 2, 5], "3 does not see its sibling");
        assert_eq!(sees(7), [6, 7]);
        // A continuation before or inside its prefix, or of a continuation: refused.
        let bad = |row: Vec<u32>, parents: &[(u32, u32)]| {
            let parents: HashMap<u32, u32> = parents.iter().copied().collect();
            let e = AttentionMask::from_tree(&[row], &parents, 3, &Device::Cpu).unwrap_err();
            assert!(e.to_string().contains("example"), "{e}");
        };
        bad(vec![2, 1, 1], &[(2, 1)]);
        bad(vec![1, 2, 1], &[(2, 1)]);
        bad(vec![2, 2, 2], &[(2, 1)]);
        bad(vec![1, 2, 3], &[(2, 1), (3, 2)]);
        bad(vec![1, 1, 1], &[(1, 1)]);
    }

    #[test]
    fn interleaved_segments_count_positions_per_example() {
        // Two sequences decoded side by side: 1's prompt, 2's prompt, then one token
        // of each per step; a finished sequence's columns become 0 (garbage).
        let segs = vec![vec![1, 1, 2, 2, 2, 1, 2, 0, 1, 2]];
        let m = AttentionMask::from_segments(&segs, 10, &Device::Cpu).unwrap();
        let pos = &m.position_ids.to_vec2::<u32>().unwrap()[0];
        assert_eq!([pos[0], pos[1], pos[5], pos[8]], [0, 1, 2, 3]);
        assert_eq!([pos[2], pos[3], pos[4], pos[6], pos[9]], [0, 1, 2, 3, 4]);
        // The last two tokens as queries of a cached step: same positions.
        let step = AttentionMask::from_segments(&segs, 2, &Device::Cpu).unwrap();
        assert_eq!(step.position_ids.to_vec2::<u32>().unwrap(), [[3, 4]]);
        let b = flat_bias(&step);
        // Query 0 (example 1) sees 1's columns only; query 1 (example 2) 2's only.
        let sees = |q: usize| -> Vec<usize> { (0..10).filter(|&j| b[q * 10 + j] == 0.0).collect() };
        assert_eq!(sees(0), [0, 1, 5, 8]);
        assert_eq!(sees(1), [2, 3, 4, 6, 9]);
    }
}
