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

impl KvCache {
    /// Keeps only the given positions (increasing indices into the cached sequence),
    /// copied into fresh buffers: the server drops finished sequences' columns from
    /// its packed row this way. Keeping nothing empties the cache.
    pub fn retain(&mut self, columns: &[u32]) -> Result<()> {
        let len = self
            .layers
            .iter()
            .flatten()
            .map(|c| c.len)
            .min()
            .unwrap_or(0);
        if let Some(&bad) = columns.iter().find(|&&j| j as usize >= len) {
            return Err(crate::Error::Invalid(format!(
                "KV cache has {len} positions, cannot keep position {bad}"
            )));
        }
        for layer in self.layers.iter_mut() {
            let Some(c) = layer.take() else { continue };
            if columns.is_empty() {
                continue;
            }
            let (b, h, _, d) = c.k.dims4()?;
            let keep = columns.len();
            let index = Tensor::from_slice(columns, keep, c.k.device())?;
            let cap = keep.max(MIN_CAPACITY).next_power_of_two();
            let k = Tensor::zeros((b, h, cap, d), c.k.dtype(), c.k.device())?;
            let v = Tensor::zeros((b, h, cap, d), c.v.dtype(), c.v.device())?;
            k.slice_set(&c.k.index_select(&index, 2)?.contiguous()?, 2, 0)?;
            v.slice_set(&c.v.index_select(&index, 2)?.contiguous()?, 2, 0)?;
            *layer = Some(LayerCache { k, v, len: keep });
        }
        Ok(())
    }
}

impl KvCache {
    /// Appends copies of the given positions (indices into the cached sequence) at
    /// the end: the server gives each of a request's n choices its own copy of the
    /// prompt's columns, computed once.
    pub fn duplicate(&mut self, columns: &[u32]) -> Result<()> {
        let len = self.seq_len();
        if let Some(&bad) = columns.iter().find(|&&j| j as usize >= len) {
            return Err(crate::Error::Invalid(format!(
                "KV cache has {len} positions, cannot copy position {bad}"
            )));
        }
        if columns.is_empty() {
            return Ok(());
        }
        for layer in 0..self.layers.len() {
            let Some(c) = &self.layers[layer] else {
                continue;
            };
            let index = Tensor::from_slice(columns, columns.len(), c.k.device())?;
            // Indices are below len ≤ capacity: select from the whole buffer.
            let k = c.k.index_select(&index, 2)?; // (B, nkv, P, hd)
            let v = c.v.index_select(&index, 2)?; // (B, nkv, P, hd)
            self.append(layer, &k, &v)?;
        }
        Ok(())
    }
}

impl KvCache {
    /// Replaces the batch by the given rows of it (indices into the B rows, repeats
    /// allowed): a batch that samples several completions of one prompt computes the
    /// prompt once and gives each completion a copy of its row.
    pub fn select_rows(&mut self, rows: &[u32]) -> Result<()> {
        for c in self.layers.iter_mut().flatten() {
            let b = c.k.dim(0)?;
            if let Some(&bad) = rows.iter().find(|&&r| r as usize >= b) {
                return Err(crate::Error::Invalid(format!(
                    "KV cache has {b} rows, cannot copy row {bad}"
                )));
            }
            let index = Tensor::from_slice(rows, rows.len(), c.k.device())?;
            c.k = c.k.index_select(&index, 0)?; // (rows, nkv, cap, hd)
            c.v = c.v.index_select(&index, 0)?;
        }
        Ok(())
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

    #[test]
    fn selected_rows_are_copied_and_grow_apart() {
        let mut cache = KvCache::new(1);
        let k = Tensor::rand(0f32, 1f32, (2, 1, 3, 2), &Device::Cpu).unwrap();
        cache.append(0, &k, &k).unwrap();
        cache.select_rows(&[1, 0, 1]).unwrap();
        // Each row appends its own step after the copy.
        let step = Tensor::arange(0f32, 6.0, &Device::Cpu)
            .unwrap()
            .reshape((3, 1, 1, 2))
            .unwrap();
        let (ck, _) = cache.append(0, &step, &step).unwrap();
        let rows: Vec<Vec<Vec<f32>>> = ck.squeeze(1).unwrap().to_vec3().unwrap();
        let orig: Vec<Vec<Vec<f32>>> = k.squeeze(1).unwrap().to_vec3().unwrap();
        for (r, &from) in [1usize, 0, 1].iter().enumerate() {
            assert_eq!(rows[r][..3], orig[from][..], "row {r}");
            assert_eq!(rows[r][3], [2.0 * r as f32, 2.0 * r as f32 + 1.0]);
        }
        assert!(cache.select_rows(&[3]).is_err());
    }

    /// A two-layer cache holding `len` positions of k = 0, 1, 2, ... and v = 2k, with
    /// those k and v, (1, 2, len, 3) each.
    fn filled(len: usize) -> (KvCache, Tensor, Tensor) {
        let mut cache = KvCache::new(2);
        let k = Tensor::arange(0f32, (2 * len * 3) as f32, &Device::Cpu)
            .unwrap()
            .reshape((1, 2, len, 3))
            .unwrap();
        let v = (&k * 2.0).unwrap();
        for layer in 0..2 {
            cache.append(layer, &k, &v).unwrap();
        }
        (cache, k, v)
    }

    #[test]
    fn retain_keeps_the_chosen_columns_in_order() {
        let (mut cache, k, _) = filled(70);
        let keep = [1u32, 5, 69];
        cache.retain(&keep).unwrap();
        assert_eq!(cache.seq_len(), 3);
        let index = Tensor::new(&keep, &Device::Cpu).unwrap();
        let want_k = k.index_select(&index, 2).unwrap();
        // Appending after a retain continues right behind the kept columns.
        let one = Tensor::full(-1f32, (1, 2, 1, 3), &Device::Cpu).unwrap();
        let (ck, cv) = cache.append(1, &one, &(&one * 2.0).unwrap()).unwrap();
        assert_eq!(ck.dims(), [1, 2, 4, 3]);
        let got: Vec<f32> = ck
            .narrow(2, 0, 3)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let want: Vec<f32> = want_k.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(got, want);
        let got_v: Vec<f32> = cv
            .narrow(2, 3, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(got_v, vec![-2.0; 6]);
        assert!(
            cache.retain(&[9]).is_err(),
            "position 9 is past the 4 cached"
        );
        cache.retain(&[]).unwrap();
        assert_eq!(cache.seq_len(), 0);
    }

    #[test]
    fn duplicate_appends_copies_of_the_chosen_columns() {
        let (mut cache, k, v) = filled(62);
        // 62 + 3 copies passes the first capacity (64): the copies survive growth.
        let copy = [4u32, 0, 61];
        cache.duplicate(&copy).unwrap();
        assert_eq!(cache.seq_len(), 65);
        let index = Tensor::new(&copy, &Device::Cpu).unwrap();
        let one = Tensor::zeros((1, 2, 1, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
        for layer in 0..2 {
            let (ck, cv) = cache.append(layer, &one, &one).unwrap();
            let flat = |t: Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
            assert_eq!(flat(ck.narrow(2, 0, 62).unwrap()), flat(k.clone()));
            assert_eq!(
                flat(ck.narrow(2, 62, 3).unwrap()),
                flat(k.index_select(&index, 2).unwrap())
            );
            assert_eq!(
                flat(cv.narrow(2, 62, 3).unwrap()),
                flat(v.index_select(&index, 2).unwrap())
            );
        }
        assert!(cache.duplicate(&[66]).is_err(), "past the 66 cached");
    }
}
