//! Data-parallel training's collective operations behind one small trait: all-reduce
//! of gradients and of scalar statistics, broadcast and barrier. The engines are
//! MPI (`--features mpi`, launched by `mpirun -np N rlhf …`) and NCCL
//! (`--features nccl`, one process per GPU); without either, a run is one process
//! (`Single`), and every collective is the identity.
//!
//! Each rank reads a disjoint shard of the same data order, so the global batch is
//! per-device batch × accumulation × world size; rank 0 alone writes metrics and
//! checkpoints.

pub mod collective;
pub mod launcher;
#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "nccl")]
pub mod nccl;

pub use collective::{rank_seed, Collective, Single};
pub use launcher::launcher_rank;

use candle_core::Device;
use std::cell::RefCell;
use std::rc::Rc;

use crate::error::Result;

thread_local! {
    // The run's collectives, set once by the binary (`init`). MPI and NCCL handles
    // belong to the thread that made them, the one that trains.
    static CURRENT: RefCell<Option<Rc<dyn Collective>>> = const { RefCell::new(None) };
}

/// Joins the data-parallel run this process was launched into, on `device`: NCCL
/// on a GPU, MPI on the CPU, one process where no launcher variables are set or the
/// world is of one (see `launcher_rank`). Called once by the binary before training.
pub fn init(device: &Device) -> Result<Rc<dyn Collective>> {
    let comm: Rc<dyn Collective> = match launcher_rank() {
        None | Some((_, 1)) => Rc::new(Single),
        Some((rank, world)) => join(device, rank, world)?,
    };
    CURRENT.with(|c| *c.borrow_mut() = Some(comm.clone()));
    Ok(comm)
}

/// The run's collectives on this thread: what `init` set, else a single process.
pub fn current() -> Rc<dyn Collective> {
    CURRENT.with(|c| c.borrow().clone().unwrap_or_else(|| Rc::new(Single)))
}

/// Leaves the run: drops this thread's collectives, which finalises MPI.
pub fn finish() {
    CURRENT.with(|c| c.borrow_mut().take());
}

/// Sets this thread's collectives (tests; the binary uses `init`).
pub fn set_current(comm: Rc<dyn Collective>) {
    CURRENT.with(|c| *c.borrow_mut() = Some(comm));
}

fn join(device: &Device, rank: usize, world: usize) -> Result<Rc<dyn Collective>> {
    if device.is_cuda() {
        join_nccl(device, rank, world)
    } else {
        join_mpi(rank, world)
    }
}

#[cfg(feature = "nccl")]
fn join_nccl(device: &Device, _rank: usize, _world: usize) -> Result<Rc<dyn Collective>> {
    Ok(Rc::new(nccl::Nccl::from_env(device)?))
}

#[cfg(not(feature = "nccl"))]
fn join_nccl(_device: &Device, rank: usize, world: usize) -> Result<Rc<dyn Collective>> {
    Err(crate::error::Error::Invalid(format!(
        "launched as rank {rank} of {world} on a GPU, but this rlhf was built without NCCL; build it with `--features nccl` (README: Scaling out)"
    )))
}

#[cfg(feature = "mpi")]
fn join_mpi(_rank: usize, _world: usize) -> Result<Rc<dyn Collective>> {
    Ok(Rc::new(mpi::Mpi::init()?))
}

#[cfg(not(feature = "mpi"))]
fn join_mpi(rank: usize, world: usize) -> Result<Rc<dyn Collective>> {
    Err(crate::error::Error::Invalid(format!(
        "launched as rank {rank} of {world} (mpirun, or RANK and WORLD_SIZE), but this rlhf was built without MPI; build it with `--features mpi` (README: Scaling out)"
    )))
}
