//! The key/value cache for incremental decoding, kept outside the model: the model is
//! immutable and takes the cache as an argument, so one model serves many concurrent
//! generations (and training, which uses none).
//!
//! Keys and values live in buffers with spare capacity along the sequence axis; each
//! step writes its rows in place and the model reads the filled prefix as a view, so
//! decoding allocates nothing per step (concatenating instead reallocated every
//! layer's cache at every step). The cache is for inference: writes are not tracked
//! for gradients.

use candle_core::Tensor;

use crate::error::Result;

#[derive(Debug, Clone)]
struct LayerCache {
    k: Tensor, // (B, nkv, cap, hd)
    v: Tensor, // (B, nkv, cap, hd)
    len: usize,
}

#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<Option<LayerCache>>,
}

/// Rows allocated beyond what is needed, at least: growth doubles the capacity.
const MIN_CAPACITY: usize = 64;

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
            .map_or(0, |l| l.len)
    }

    /// Appends this step's keys and values, (B, nkv, T, hd) each, and returns the
    /// whole cached sequence for the layer, (B, nkv, S + T, hd) each (views of the
    /// cache's buffers).
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let k = k.detach().contiguous()?;
        let v = v.detach().contiguous()?;
        let (b, h, t, d) = k.dims4()?;
        let len = self.layers[layer].as_ref().map_or(0, |c| c.len);
        let need = len + t;
        let grow = self.layers[layer]
            .as_ref()
            .is_none_or(|c| c.k.dim(2).map_or(true, |cap| cap < need));
        if grow {
            let cap = need.max(MIN_CAPACITY).next_power_of_two();
            let nk = Tensor::zeros((b, h, cap, d), k.dtype(), k.device())?;
            let nv = Tensor::zeros((b, h, cap, d), v.dtype(), v.device())?;
            if let Some(c) = &self.layers[layer] {
                nk.slice_set(&c.k.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
                nv.slice_set(&c.v.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
            }
            self.layers[layer] = Some(LayerCache { k: nk, v: nv, len });
        }
        let c = self.layers[layer].as_mut().expect("allocated above");
        c.k.slice_set(&k, 2, len)?;
        c.v.slice_set(&v, 2, len)?;
        c.len = need;
        Ok((c.k.narrow(2, 0, need)?, c.v.narrow(2, 0, need)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn growing_past_capacity_keeps_every_row() {
        let mut cache = KvCache::new(1);
        let mut all_k = vec![];
        for (i, t) in [60usize, 10, 1, 70].into_iter().enumerate() {
            let k = Tensor::rand(0f32, 1f32, (2, 3, t, 4), &Device::Cpu).unwrap();
            let v = (&k + i as f64).unwrap();
            let (ck, cv) = cache.append(0, &k, &v).unwrap();
            all_k.push(k);
            let want = Tensor::cat(&all_k.iter().collect::<Vec<_>>(), 2).unwrap();
            assert_eq!(ck.dims(), want.dims());
            let diff: f32 = (ck.contiguous().unwrap() - &want)
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar()
                .unwrap();
            assert_eq!(diff, 0.0, "step {i}");
            assert_eq!(cv.dims(), want.dims());
        }
        assert_eq!(cache.seq_len(), 141);
    }
}
