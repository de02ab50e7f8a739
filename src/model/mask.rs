//! Attention masks and position ids for padded batches, left or right padded, with or
//! without a KV cache: the one place where padding is turned into model inputs.
//!
//! Convention (as transformers): `key_mask[b][j]` is 1 for a real token and 0 for
//! padding, over every position the keys cover (cached ones first, then the new
//! ones). A token's position id is the number of real tokens before it, so a
//! left-padded prompt gets the same positions as the prompt alone.

use candle_core::{Device, Tensor};
use std::sync::Arc;

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
}

impl AttentionMask {
    /// Builds the mask for the last `query_len` positions of `key_mask` (B rows of S).
    /// Query i sits at key index S - query_len + i and sees keys j ≤ that index whose
    /// mask is 1.
    pub fn new(key_mask: &[Vec<u8>], query_len: usize, device: &Device) -> Result<Self> {
        let b = key_mask.len();
        let s = key_mask.first().map_or(0, Vec::len);
        if key_mask.iter().any(|row| row.len() != s) || query_len > s || query_len == 0 {
            return Err(Error::Invalid(format!(
                "attention mask rows must have equal length ≥ query length {query_len}"
            )));
        }
        let offset = s - query_len;
        let mut positions = Vec::with_capacity(b * query_len);
        for row in key_mask {
            // The count of real tokens before j: for a real token that is its position;
            // for padding any value works (it is masked).
            let mut seen = 0u32;
            for (j, &m) in row.iter().enumerate() {
                if j >= offset {
                    positions.push(seen);
                }
                seen += u32::from(m != 0);
            }
        }
        let position_ids = Tensor::from_vec(positions, (b, query_len), device)?;
        let causal = CausalMask {
            key_mask: Arc::new(key_mask.concat()),
            batch: b,
            keys: s,
            queries: query_len,
        };
        Ok(AttentionMask {
            position_ids,
            causal,
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
        let CausalMask {
            key_mask,
            batch: b,
            keys: s,
            queries: t,
        } = &self.causal;
        let (b, s, t) = (*b, *s, *t);
        let offset = s - t;
        let mut bias = vec![MASKED; b * t * s];
        for bi in 0..b {
            let row = &key_mask[bi * s..(bi + 1) * s];
            for q in 0..t {
                let base = (bi * t + q) * s;
                for (j, &m) in row[..=offset + q].iter().enumerate() {
                    if m != 0 {
                        bias[base + j] = 0.0;
                    }
                }
            }
        }
        Ok(Tensor::from_vec(bias, (b, 1, t, s), device)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn left_padding_gives_positions_from_zero_and_masks_pads() {
        let mask = vec![vec![0, 0, 1, 1], vec![1, 1, 1, 1]];
        let m = AttentionMask::full(&mask, &Device::Cpu).unwrap();
        let pos: Vec<Vec<u32>> = m.position_ids.to_vec2().unwrap();
        assert_eq!(pos[0][2..], [0, 1]);
        assert_eq!(pos[1], [0, 1, 2, 3]);
        let b = m
            .bias(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
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
        let b = m
            .bias(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(b, [MASKED, 0.0, 0.0, 0.0]);
    }
}
