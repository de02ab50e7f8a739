//! The key/value cache for incremental decoding, kept outside the model: the model is
//! immutable and takes the cache as an argument, so one model serves many concurrent
//! generations (and training, which uses none).

use candle_core::Tensor;

use crate::error::Result;

#[derive(Debug, Clone)]
pub struct KvCache {
    /// Per layer: keys and values, each (B, n_kv_heads, S, head_dim).
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        KvCache {
            layers: vec![None; num_layers],
        }
    }

    /// Number of positions cached so far.
    pub fn seq_len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, |(k, _)| k.dims()[2])
    }

    /// Appends this step's keys and values, (B, nkv, T, hd) each, and returns the
    /// whole cached sequence for the layer, (B, nkv, S + T, hd) each.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (k, v) = match &self.layers[layer] {
            None => (k.clone(), v.clone()),
            Some((pk, pv)) => (Tensor::cat(&[pk, k], 2)?, Tensor::cat(&[pv, v], 2)?),
        };
        self.layers[layer] = Some((k.clone(), v.clone()));
        Ok((k, v))
    }
}
