//! The order in which an epoch visits the training items: a ChaCha shuffle keyed by
//! (seed, epoch), so that a resumed run sees exactly the batches an uninterrupted one
//! would, without saving any RNG state.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::cell::RefCell;

#[derive(Debug)]
pub struct EpochOrder {
    len: usize,
    seed: u64,
    /// The permutation of the most recent epoch asked for.
    cache: RefCell<(usize, Vec<usize>)>,
}

impl EpochOrder {
    pub fn new(len: usize, seed: u64) -> Self {
        EpochOrder {
            len,
            seed,
            cache: RefCell::new((usize::MAX, vec![])),
        }
    }

    /// Batches of `batch_size` items per epoch (the last one may be smaller).
    /// The seed the order was made from.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    pub fn batches(&self, batch_size: usize) -> usize {
        self.len.div_ceil(batch_size)
    }

    /// The item indices of batch `index` of `epoch`.
    pub fn batch(&self, epoch: usize, index: usize, batch_size: usize) -> Vec<usize> {
        let mut cache = self.cache.borrow_mut();
        if cache.0 != epoch {
            let mut perm: Vec<usize> = (0..self.len).collect();
            let key = self.seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            perm.shuffle(&mut ChaCha8Rng::seed_from_u64(key));
            *cache = (epoch, perm);
        }
        let start = (index * batch_size).min(self.len);
        let end = (start + batch_size).min(self.len);
        cache.1[start..end].to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_item_once_per_epoch_and_epochs_differ() {
        let o = EpochOrder::new(10, 3);
        let e0: Vec<usize> = (0..o.batches(4)).flat_map(|i| o.batch(0, i, 4)).collect();
        let mut sorted = e0.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
        let e1: Vec<usize> = (0..3).flat_map(|i| o.batch(1, i, 4)).collect();
        assert_ne!(e0, e1);
        assert_eq!(o.batch(0, 1, 4), EpochOrder::new(10, 3).batch(0, 1, 4));
    }
}
