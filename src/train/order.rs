//! The order in which an epoch visits the training items: a ChaCha shuffle keyed by
//! (seed, epoch), so that a resumed run sees exactly the batches an uninterrupted one
//! would, without saving any RNG state.
//!
//! In a data-parallel run every rank walks the same order, and batch `index` is the
//! rank's shard of the global batch `index`: with world size W and per-device batch
//! B, global batch i holds items [i·B·W, (i+1)·B·W) of the order, and rank r takes
//! [i·B·W + r·B, i·B·W + (r+1)·B) of it. So W ranks × B see exactly the batches of one
//! rank × B·W.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::cell::RefCell;

#[derive(Debug)]
pub struct EpochOrder {
    len: usize,
    seed: u64,
    rank: usize,
    world: usize,
    /// The permutation of the most recent epoch asked for.
    cache: RefCell<(usize, Vec<usize>)>,
}

impl EpochOrder {
    /// The order of this process' rank in the run (`crate::distributed::current`).
    pub fn new(len: usize, seed: u64) -> Self {
        let comm = crate::distributed::current();
        Self::sharded(len, seed, comm.rank(), comm.world_size())
    }

    /// The order as rank `rank` of `world` walks it.
    pub fn sharded(len: usize, seed: u64, rank: usize, world: usize) -> Self {
        assert!(rank < world, "rank {rank} of a world of {world}");
        EpochOrder {
            len,
            seed,
            rank,
            world,
            cache: RefCell::new((usize::MAX, vec![])),
        }
    }

    /// The seed the order was made from.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The seed of this rank's random draws within a batch (LoRA dropout): the
    /// order's seed on rank 0, another on each other rank, so that ranks' shards of a
    /// batch do not share their masks.
    pub fn rank_seed(&self) -> u64 {
        crate::distributed::rank_seed(self.seed, self.rank)
    }

    /// Batches per epoch: global batches of `batch_size` items per rank (the last
    /// one may be smaller, and a rank's shard of it empty).
    pub fn batches(&self, batch_size: usize) -> usize {
        self.len.div_ceil(batch_size * self.world)
    }

    /// The item indices of this rank's shard of batch `index` of `epoch`.
    pub fn batch(&self, epoch: usize, index: usize, batch_size: usize) -> Vec<usize> {
        let mut cache = self.cache.borrow_mut();
        if cache.0 != epoch {
            let mut perm: Vec<usize> = (0..self.len).collect();
            let key = self.seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            perm.shuffle(&mut ChaCha8Rng::seed_from_u64(key));
            *cache = (epoch, perm);
        }
        let start = (index * batch_size * self.world + self.rank * batch_size).min(self.len);
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

    #[test]
    fn ranks_split_each_global_batch_in_rank_order() {
        let whole = EpochOrder::sharded(11, 5, 0, 1);
        let ranks = [
            EpochOrder::sharded(11, 5, 0, 2),
            EpochOrder::sharded(11, 5, 1, 2),
        ];
        assert_eq!(whole.batches(6), 2);
        assert_eq!(ranks[0].batches(3), 2);
        for epoch in 0..2 {
            for i in 0..2 {
                let joined = [ranks[0].batch(epoch, i, 3), ranks[1].batch(epoch, i, 3)].concat();
                assert_eq!(joined, whole.batch(epoch, i, 6), "epoch {epoch} batch {i}");
            }
        }
        // 11 items: the last global batch has 5, rank 1's shard 2 of them.
        assert_eq!(ranks[1].batch(0, 1, 3).len(), 2);
    }
}
