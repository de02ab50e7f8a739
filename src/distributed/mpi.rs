//! MPI (Open MPI, through rsmpi), for data-parallel training on CPU nodes:
//! `mpirun -np N rlhf sft …`. Gradients are summed with MPI_Allreduce over the host
//! buffers the trainer accumulates them in.
//!
//! A rank that dies makes the others stop, not hang: MPI's default error handler
//! aborts the job, and `mpirun` ends every rank and exits non-zero when one of them
//! exits without finalising.

use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;

use super::collective::Collective;
use crate::error::{Error, Result};

pub struct Mpi {
    // Dropping the universe finalises MPI: it lives as long as this value, which the
    // binary keeps for the whole run.
    _universe: Universe,
    world: SimpleCommunicator,
}

impl Mpi {
    /// Initialises MPI (once per process).
    pub fn init() -> Result<Self> {
        let universe = mpi::initialize().ok_or_else(|| {
            Error::Invalid("MPI could not be initialised (was it already?)".into())
        })?;
        let world = universe.world();
        // Started by RANK/WORLD_SIZE without mpirun, every process would be rank 0 of
        // a world of one: all training on all the data into the same folder.
        if let Some((rank, size)) = super::launcher::launcher_rank() {
            if (world.rank() as usize, world.size() as usize) != (rank, size) {
                return Err(Error::Invalid(format!(
                    "launched as rank {rank} of {size}, but MPI sees rank {} of {}: start MPI runs with `mpirun -np N rlhf …`",
                    world.rank(),
                    world.size()
                )));
            }
        }
        Ok(Mpi {
            _universe: universe,
            world,
        })
    }

    /// Replaces `buf` by its element-wise sum over the ranks (MPI_Allreduce).
    fn sum<T: Equivalence + Copy>(&self, buf: &mut [T]) -> Result<()> {
        let send = buf.to_vec();
        self.world
            .all_reduce_into(&send[..], buf, SystemOperation::sum());
        Ok(())
    }
}

impl Collective for Mpi {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }
    fn world_size(&self) -> usize {
        self.world.size() as usize
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        self.sum(buf)
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.sum(buf)
    }
    fn broadcast(&self, buf: &mut [u8], root: usize) -> Result<()> {
        self.world.process_at_rank(root as i32).broadcast_into(buf);
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        self.world.barrier();
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
}
