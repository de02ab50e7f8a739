//! The collectives of a data-parallel run, and the single-process case.

use candle_core::Tensor;

use crate::error::Result;

/// The collectives a data-parallel run needs. Every rank calls the same collectives
/// in the same order with buffers of the same length.
pub trait Collective {
    /// This process' rank, 0 ≤ rank < world_size.
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Replaces `buf` by its element-wise sum over all ranks.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()>;
    /// `all_reduce_sum` for statistics kept in f64 (token counts, loss sums).
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()>;
    /// The element-wise sum over all ranks of a tensor, where the tensor lives (NCCL
    /// reduces on the GPU); by default through the host.
    fn all_reduce_tensor(&self, t: &Tensor) -> Result<Tensor> {
        let mut host = t.flatten_all()?.to_vec1::<f32>()?;
        self.all_reduce_sum(&mut host)?;
        Ok(Tensor::from_vec(host, t.shape(), t.device())?)
    }
    /// Replaces `buf` on every rank by rank `root`'s.
    fn broadcast(&self, buf: &mut [u8], root: usize) -> Result<()>;
    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<()>;
    /// Ends every rank of the run with exit code `code` (after an error on this one,
    /// while others may wait in a collective).
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
    /// Whether this rank writes metrics, checkpoints and the model (rank 0).
    fn is_main(&self) -> bool {
        self.rank() == 0
    }
}

/// The seed of rank `rank`'s own random draws, from the run's `seed`: the seed
/// itself on rank 0 (so a one-process run draws what it always drew), another on
/// each other rank.
pub fn rank_seed(seed: u64, rank: usize) -> u64 {
    seed ^ (rank as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// One process: every collective is the identity.
#[derive(Debug, Clone, Copy, Default)]
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_f64(&self, _buf: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_tensor(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.clone())
    }
    fn broadcast(&self, _buf: &mut [u8], _root: usize) -> Result<()> {
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_single_process_reduces_to_itself() {
        let s = Single;
        let mut buf = [1f32, -2.5];
        s.all_reduce_sum(&mut buf).unwrap();
        assert_eq!(buf, [1.0, -2.5]);
        let t = Tensor::new(&[3f32, 4.], &candle_core::Device::Cpu).unwrap();
        let r = s.all_reduce_tensor(&t).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(r, [3.0, 4.0]);
        assert!(s.is_main() && s.world_size() == 1);
    }
}
