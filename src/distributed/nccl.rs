//! NCCL, one process per GPU: gradients are summed on the GPUs, scalar statistics
//! and broadcasts go through small device buffers.
//!
//! Ranks find each other as torchrun's do: `RANK`, `WORLD_SIZE`, and rank 0's
//! `MASTER_ADDR`/`MASTER_PORT`, where rank 0 hands the other ranks NCCL's 128-byte
//! unique id over one TCP connection each (NCCL's own bootstrap needs that id to
//! start; everything after it is NCCL's). A world of one needs no address.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, ValidAsZeroBits};
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, NcclType, ReduceOp};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage};
use candle_core::{CustomOp1, DType, Device, Layout, Shape, Tensor};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::rc::Rc;
use std::time::{Duration, Instant};

use super::collective::Collective;
use crate::error::{Error, Result};

/// How long ranks wait for each other at start-up before giving up with an error.
const RENDEZVOUS_TIMEOUT: Duration = Duration::from_secs(120);

pub struct Nccl {
    comm: Rc<Comm>,
    device: Device,
    rank: usize,
    world_size: usize,
}

fn nccl_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Invalid(format!("NCCL {what}: {e:?}"))
}

impl Nccl {
    /// Joins the run this process was launched into (`RANK`, `WORLD_SIZE`; a world of
    /// one where they are unset) on `device`, a GPU.
    pub fn from_env(device: &Device) -> Result<Self> {
        let (rank, world_size) = super::launcher::launcher_rank().unwrap_or((0, 1));
        let id = if world_size == 1 {
            Id::new().map_err(|e| nccl_err("unique id", e))?
        } else {
            exchange_id(rank, world_size)?
        };
        let stream = device.as_cuda_device()?.cuda_stream();
        let comm = Comm::from_rank(stream, rank, world_size, id)
            .map_err(|e| nccl_err(&format!("init of rank {rank} of {world_size}"), e))?;
        Ok(Nccl {
            comm: Rc::new(comm),
            device: device.clone(),
            rank,
            world_size,
        })
    }

    /// The sum over ranks of an f32 or f64 tensor, on this rank's GPU.
    fn reduce(&self, t: &Tensor) -> Result<Tensor> {
        let t = t.to_device(&self.device)?.contiguous()?;
        Ok(t.apply_op1_no_bwd(&AllReduce(self.comm.clone()))?)
    }

    /// The sum over ranks of a host buffer (f32 or f64), through this rank's GPU.
    fn reduce_host<T: candle_core::WithDType>(&self, buf: &mut [T]) -> Result<()> {
        let t = Tensor::from_slice(buf, buf.len(), &self.device)?;
        buf.copy_from_slice(&self.reduce(&t)?.to_vec1::<T>()?);
        Ok(())
    }
}

/// Rank 0 makes the id and sends it to every other rank over TCP at
/// MASTER_ADDR:MASTER_PORT; the others connect, retrying until rank 0 listens.
fn exchange_id(rank: usize, world_size: usize) -> Result<Id> {
    let addr = format!(
        "{}:{}",
        std::env::var("MASTER_ADDR").unwrap_or_else(|_| "127.0.0.1".into()),
        std::env::var("MASTER_PORT").unwrap_or_else(|_| "29500".into())
    );
    let io = |e: std::io::Error| Error::Invalid(format!("NCCL rendezvous at {addr}: {e}"));
    if rank == 0 {
        let id = Id::new().map_err(|e| nccl_err("unique id", e))?;
        let bytes: Vec<u8> = id.internal().iter().map(|&c| c as u8).collect();
        let listener = TcpListener::bind(&addr).map_err(io)?;
        listener.set_nonblocking(true).map_err(io)?;
        let start = Instant::now();
        let mut joined = 1;
        while joined < world_size {
            match listener.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false).map_err(io)?;
                    s.write_all(&bytes).map_err(io)?;
                    joined += 1;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if start.elapsed() > RENDEZVOUS_TIMEOUT {
                        return Err(Error::Invalid(format!(
                            "rank 0: {joined} of {world_size} ranks joined at {addr} within {}s",
                            RENDEZVOUS_TIMEOUT.as_secs()
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(io(e)),
            }
        }
        return Ok(id);
    }
    let start = Instant::now();
    let mut stream = loop {
        match TcpStream::connect(&addr) {
            Ok(s) => break s,
            Err(e) if start.elapsed() > RENDEZVOUS_TIMEOUT => {
                return Err(Error::Invalid(format!(
                    "rank {rank}: rank 0 did not answer at {addr} within {}s: {e}",
                    RENDEZVOUS_TIMEOUT.as_secs()
                )))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    stream
        .set_read_timeout(Some(RENDEZVOUS_TIMEOUT))
        .map_err(io)?;
    let mut buf = [0u8; 128];
    stream.read_exact(&mut buf).map_err(io)?;
    Ok(Id::uninit(buf.map(|b| b as std::ffi::c_char)))
}

/// The sum over ranks of a contiguous f32 or f64 GPU tensor, as a new tensor.
struct AllReduce(Rc<Comm>);

impl CustomOp1 for AllReduce {
    fn name(&self) -> &'static str {
        "nccl-all-reduce"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("NCCL all-reduce: the tensor is on the CPU, not a GPU")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let (start, end) = match l.contiguous_offsets() {
            Some((start, end)) if end - start == l.shape().elem_count() => (start, end),
            _ => candle_core::bail!("NCCL all-reduce: expected a contiguous tensor"),
        };
        let dev: CudaDevice = s.device.clone();
        let out = match s.dtype() {
            DType::F32 => sum_slice::<f32>(&self.0, s, start..end, dev)?,
            DType::F64 => sum_slice::<f64>(&self.0, s, start..end, dev)?,
            other => candle_core::bail!("NCCL all-reduce: {other:?} tensors are not reduced"),
        };
        Ok((out, l.shape().clone()))
    }
}

/// The sum over ranks of `range` of a GPU storage of `T`s, into a new storage.
fn sum_slice<T>(
    comm: &Comm,
    s: &CudaStorage,
    range: std::ops::Range<usize>,
    dev: CudaDevice,
) -> candle_core::Result<CudaStorage>
where
    T: CudaDType + NcclType + DeviceRepr + ValidAsZeroBits,
{
    let n = range.len();
    let src = s.as_cuda_slice::<T>()?.slice(range);
    let mut dst = dev.alloc_zeros::<T>(n)?;
    comm.all_reduce(&src, &mut dst, &ReduceOp::Sum)
        .map_err(candle_core::Error::debug)?;
    Ok(CudaStorage::wrap_cuda_slice(dst, dev))
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world_size
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        self.reduce_host(buf)
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.reduce_host(buf)
    }
    fn all_reduce_tensor(&self, t: &Tensor) -> Result<Tensor> {
        let out = self.reduce(t)?;
        Ok(out.to_device(t.device())?)
    }
    fn broadcast(&self, buf: &mut [u8], root: usize) -> Result<()> {
        // A sum where every rank but the root contributes zeros: the root's bytes.
        let mine: Vec<f32> = if self.rank == root {
            buf.iter().map(|&b| b as f32).collect()
        } else {
            vec![0.0; buf.len()]
        };
        let mut sum = mine;
        self.all_reduce_sum(&mut sum)?;
        for (b, x) in buf.iter_mut().zip(sum) {
            *b = x as u8;
        }
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        let mut one = [1f32];
        self.all_reduce_sum(&mut one)?;
        if one[0] as usize != self.world_size {
            return Err(Error::Invalid(format!(
                "NCCL barrier: {} of {} ranks answered",
                one[0], self.world_size
            )));
        }
        Ok(())
    }
}
