//! AdamW (Loshchilov & Hutter) with decoupled weight decay and two parameter groups:
//! matrices decay, biases, norms and embeddings do not (`ParamSpec::decay`). Updates
//! run over flat f32 buffers, one parameter per task, in the same order every time,
//! so two runs with the same inputs give bit-identical weights.
//!
//! Also here: gradient accumulation into flat buffers and global-norm clipping, the
//! two things that happen to gradients between backward and the update.

use candle_core::{backprop::GradStore, Tensor, Var};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::Params;
use crate::ops::simd::simd_kernel;

/// The optimizer's hyper-parameters (TRL/transformers names in the CLI).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// Per-parameter moment estimates, in the order of `Params::vars()`.
#[derive(Debug, Clone)]
pub struct AdamW {
    pub config: AdamWConfig,
    /// Completed update steps (for bias correction).
    pub step: u64,
    pub exp_avg: Vec<Vec<f32>>,
    pub exp_avg_sq: Vec<Vec<f32>>,
    /// The moments on the parameters' device when that is not the CPU (a GPU):
    /// (exp_avg, exp_avg_sq) per parameter; `exp_avg` and `exp_avg_sq` are then empty.
    device_moments: Option<(Vec<Tensor>, Vec<Tensor>)>,
    decay: Vec<bool>,
}

fn flat(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1()?)
}

/// Elements per task when one parameter's update or accumulation is split.
const CHUNK: usize = 1 << 16;

/// One step's scalars for one parameter.
#[derive(Debug, Clone, Copy)]
struct Hyper {
    /// The gradient's clipping factor (1 when not clipped: g·1 = g exactly).
    clip: f32,
    wd: f32,
    b1: f32,
    b2: f32,
    eps: f32,
    step_size: f32,
    bc2_sqrt: f32,
}

simd_kernel! {
    /// AdamW on a run of elements: decoupled weight decay (shrink the weight, not the
    /// gradient), both moments, the bias-corrected step. Vector sqrt and division
    /// round as the scalar ones do, so the AVX2 copy gives the same bits.
    fn adamw_chunk(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], h: Hyper) {
        assert!(m.len() == p.len() && v.len() == p.len() && g.len() == p.len());
        for (((p, m), v), &g) in p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
            // The product `clip` used to store into the gradient buffer, here.
            let g = g * h.clip;
            *p -= h.wd * *p;
            *m = h.b1 * *m + (1.0 - h.b1) * g;
            *v = h.b2 * *v + (1.0 - h.b2) * g * g;
            let denom = v.sqrt() / h.bc2_sqrt + h.eps;
            *p -= h.step_size * *m / denom;
        }
    }
}

simd_kernel! {
    /// y += x (`axpy` with α = 1: the same bits as y + x), in its AVX2 copy.
    fn add_into(y: &mut [f32], x: &[f32]) {
        crate::ops::axpy(1.0, x, y)
    }
}

simd_kernel! {
    /// Σ x² in f64 with eight independent sums (a single chain of dependent f64 adds
    /// ran at one element per add latency, a tenth of the 124M step's clipping).
    fn sum_of_squares(x: &[f32]) -> f64 {
        let mut acc = [0f64; 8];
        let chunks = x.chunks_exact(8);
        let rest = chunks.remainder();
        for c in chunks {
            for k in 0..8 {
                acc[k] += (c[k] as f64) * (c[k] as f64);
            }
        }
        let tail: f64 = rest.iter().map(|&x| (x as f64) * (x as f64)).sum();
        ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
    }
}

simd_kernel! {
    /// y = 0 + x: what `add_into` gives on a zeroed y (−0 becomes +0 as there), in
    /// one pass that neither zeroes y first nor reads it.
    fn set_from(y: &mut [f32], x: &[f32]) {
        for (yi, xi) in y.iter_mut().zip(x) {
            *yi = 0.0 + xi;
        }
    }
}

/// The update of one f32 parameter in its own storage (no copy out and back).
struct InPlaceUpdate<'a> {
    /// (exp_avg, exp_avg_sq), borrowed mutably through `cpu_fwd`'s `&self`.
    moments: std::cell::RefCell<(&'a mut [f32], &'a mut [f32])>,
    grad: &'a [f32],
    h: Hyper,
}

impl candle_core::InplaceOp1 for InPlaceUpdate<'_> {
    fn name(&self) -> &'static str {
        "adamw"
    }

    fn cpu_fwd(
        &self,
        storage: &mut candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        let (Some((start, end)), candle_core::CpuStorage::F32(data)) =
            (layout.contiguous_offsets(), storage)
        else {
            candle_core::bail!("adamw: expected a contiguous f32 parameter")
        };
        let p = &mut data[start..end];
        let mut moments = self.moments.borrow_mut();
        let (m, v) = &mut *moments;
        if m.len() != p.len() || v.len() != p.len() || self.grad.len() != p.len() {
            candle_core::bail!(
                "adamw: {} weights against {} / {} moments and {} gradients",
                p.len(),
                m.len(),
                v.len(),
                self.grad.len()
            )
        }
        let h = self.h;
        p.par_chunks_mut(CHUNK)
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .zip(self.grad.par_chunks(CHUNK))
            .for_each(|(((p, m), v), g)| adamw_chunk(p, m, v, g, h));
        Ok(())
    }
}

impl AdamW {
    pub fn new(params: &Params, config: AdamWConfig) -> Result<Self> {
        let vars = params.vars();
        if !params.device().is_cpu() {
            let zeros = || -> candle_core::Result<Vec<Tensor>> {
                vars.iter()
                    .map(|(_, v)| v.as_tensor().zeros_like())
                    .collect()
            };
            return Ok(AdamW {
                config,
                step: 0,
                exp_avg: vec![],
                exp_avg_sq: vec![],
                device_moments: Some((zeros()?, zeros()?)),
                decay: vars.iter().map(|(s, _)| s.decay).collect(),
            });
        }
        Ok(AdamW {
            config,
            step: 0,
            exp_avg: vars
                .iter()
                .map(|(_, v)| vec![0.0; v.elem_count()])
                .collect(),
            exp_avg_sq: vars
                .iter()
                .map(|(_, v)| vec![0.0; v.elem_count()])
                .collect(),
            device_moments: None,
            decay: vars.iter().map(|(s, _)| s.decay).collect(),
        })
    }

    /// One update with the accumulated gradients, where they and the parameters live.
    pub fn step(&mut self, params: &Params, grads: &GradAccumulator, lr: f64) -> Result<()> {
        match &grads.device {
            Some(g) => self.update_on_device(params, g, lr),
            None => {
                let (buffers, clip) = grads.unscaled()?;
                self.update_clipped(params, buffers, clip, lr)
            }
        }
    }

    /// `update` as tensor ops on the parameters' device (a GPU): the same arithmetic,
    /// without copying weights, gradients or moments to the host.
    fn update_on_device(&mut self, params: &Params, grads: &[Tensor], lr: f64) -> Result<()> {
        let vars: Vec<&Var> = params.vars().into_iter().map(|(_, v)| v).collect();
        let Some((ms, vs)) = self.device_moments.as_mut() else {
            return Err(Error::Invalid(
                "optimizer: device gradients for host moments".into(),
            ));
        };
        let (bc1, bc2) = begin_step(&mut self.step, self.config, grads.len(), vars.len())?;
        let c = self.config;
        let step_size = lr / bc1;
        for (i, var) in vars.iter().enumerate() {
            let g = &grads[i];
            let wd = if self.decay[i] {
                lr * c.weight_decay
            } else {
                0.0
            };
            let p = var.as_tensor().affine(1.0 - wd, 0.0)?;
            let m = ((&ms[i] * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            let v = ((&vs[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let denom = ((v.sqrt()? / bc2.sqrt())? + c.eps)?;
            let p = (p - ((&m / denom)? * step_size)?)?;
            var.set(&p)?;
            ms[i] = m;
            vs[i] = v;
        }
        Ok(())
    }

    /// One update of every parameter with gradients `grads` (same order) at `lr`.
    pub fn update(&mut self, params: &Params, grads: &[Vec<f32>], lr: f64) -> Result<()> {
        self.update_clipped(params, grads, 1.0, lr)
    }

    /// `update` with the gradients `grads` times `clip` (clipping's factor, applied
    /// as each gradient is read: no pass of its own over them).
    fn update_clipped(
        &mut self,
        params: &Params,
        grads: &[Vec<f32>],
        clip: f32,
        lr: f64,
    ) -> Result<()> {
        if self.device_moments.is_some() {
            return Err(Error::Invalid(
                "optimizer: host gradients for parameters on a GPU (use `step`)".into(),
            ));
        }
        let vars: Vec<&Var> = params.vars().into_iter().map(|(_, v)| v).collect();
        let (bc1, bc2) = begin_step(&mut self.step, self.config, grads.len(), vars.len())?;
        let c = self.config;
        let step_size = (lr / bc1) as f32;
        let bc2_sqrt = bc2.sqrt() as f32;
        let (b1, b2, eps) = (c.beta1 as f32, c.beta2 as f32, c.eps as f32);
        // One parameter per task, updated in place in the parameter's own storage;
        // a large one is split into chunks (every element's arithmetic is its own, so
        // the bits do not depend on the split).
        vars.par_iter()
            .zip(self.exp_avg.par_iter_mut())
            .zip(self.exp_avg_sq.par_iter_mut())
            .zip(grads.par_iter())
            .zip(self.decay.par_iter())
            .try_for_each(|((((var, m), v), g), &decay)| -> Result<()> {
                let wd = if decay {
                    (lr * c.weight_decay) as f32
                } else {
                    0.0
                };
                let h = Hyper {
                    clip,
                    wd,
                    b1,
                    b2,
                    eps,
                    step_size,
                    bc2_sqrt,
                };
                // CPU parameters are contiguous f32 (`Params` loads them so); the op
                // says so by name otherwise.
                var.as_tensor().inplace_op1(&InPlaceUpdate {
                    moments: std::cell::RefCell::new((m.as_mut_slice(), v.as_mut_slice())),
                    grad: g,
                    h,
                })?;
                Ok(())
            })?;
        Ok(())
    }

    /// The state as named tensors (for the checkpoint's optimizer.safetensors).
    pub fn state_tensors(&self, params: &Params) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![];
        let dev = candle_core::Device::Cpu;
        if let Some((ms, vs)) = &self.device_moments {
            for (i, (spec, _)) in params.vars().iter().enumerate() {
                out.push((format!("exp_avg.{}", spec.name), ms[i].to_device(&dev)?));
                out.push((format!("exp_avg_sq.{}", spec.name), vs[i].to_device(&dev)?));
            }
            out.push(("step".into(), Tensor::new(&[self.step as f64], &dev)?));
            return Ok(out);
        }
        for (i, (spec, _)) in params.vars().iter().enumerate() {
            out.push((
                format!("exp_avg.{}", spec.name),
                Tensor::from_slice(&self.exp_avg[i], spec.shape.as_slice(), &dev)?,
            ));
            out.push((
                format!("exp_avg_sq.{}", spec.name),
                Tensor::from_slice(&self.exp_avg_sq[i], spec.shape.as_slice(), &dev)?,
            ));
        }
        out.push(("step".into(), Tensor::new(&[self.step as f64], &dev)?));
        Ok(out)
    }

    /// Restores the state written by `state_tensors`.
    pub fn load_state(
        &mut self,
        params: &Params,
        tensors: &std::collections::HashMap<String, Tensor>,
    ) -> Result<()> {
        let get = |name: &str| {
            tensors
                .get(name)
                .ok_or_else(|| Error::Invalid(format!("optimizer state lacks {name:?}")))
        };
        if let Some((ms, vs)) = self.device_moments.as_mut() {
            for (i, (spec, var)) in params.vars().iter().enumerate() {
                for (dst, key) in [(&mut ms[i], "exp_avg"), (&mut vs[i], "exp_avg_sq")] {
                    let t = get(&format!("{key}.{}", spec.name))?;
                    if t.dims() != spec.shape.as_slice() {
                        return Err(Error::Invalid(format!(
                            "optimizer state for {} has the wrong size",
                            spec.name
                        )));
                    }
                    *dst = t
                        .to_dtype(candle_core::DType::F32)?
                        .to_device(var.device())?;
                }
            }
        }
        for (i, (spec, _)) in params.vars().iter().enumerate() {
            if self.device_moments.is_some() {
                break;
            }
            self.exp_avg[i] = flat(get(&format!("exp_avg.{}", spec.name))?)?;
            self.exp_avg_sq[i] = flat(get(&format!("exp_avg_sq.{}", spec.name))?)?;
            if self.exp_avg[i].len() != spec.shape.iter().product::<usize>() {
                return Err(Error::Invalid(format!(
                    "optimizer state for {} has the wrong size",
                    spec.name
                )));
            }
        }
        self.step = get("step")?
            .to_dtype(candle_core::DType::F64)?
            .to_vec1::<f64>()?[0] as u64;
        Ok(())
    }
}

/// Checks that there is one gradient per parameter, counts the step and returns
/// Adam's bias corrections (1 − β1^t, 1 − β2^t).
fn begin_step(step: &mut u64, c: AdamWConfig, grads: usize, vars: usize) -> Result<(f64, f64)> {
    if grads != vars {
        return Err(Error::Invalid(format!(
            "optimizer: {grads} gradients for {vars} parameters"
        )));
    }
    *step += 1;
    Ok((
        1.0 - c.beta1.powi(*step as i32),
        1.0 - c.beta2.powi(*step as i32),
    ))
}

/// Gradients summed over the micro-batches of one optimizer step, one flat buffer
/// per parameter (in `Params::vars()` order); on a GPU, one tensor per parameter on
/// the device instead (`buffers` is then empty).
///
/// Zeroing is lazy: `zero` marks the buffers `fresh`, and the first `add` writes
/// 0 + g instead of adding g to a zero-filled buffer (the same bits, one pass over
/// memory less and no read of the buffer). `add_final`, the step's last micro-batch,
/// also takes the sums of squares that the global norm needs while each piece is
/// still in cache, so clipping does not read every gradient again; and clipping
/// records its factor (`clip`), which AdamW applies as it reads each gradient,
/// instead of a pass that scales them in place.
#[derive(Debug, Clone)]
pub struct GradAccumulator {
    buffers: Vec<Vec<f32>>,
    /// Clipping's factor, not yet applied to `buffers` (1: none).
    clip: f32,
    /// Buffers whose contents are stale: zero until the next `add` writes them.
    fresh: Vec<bool>,
    /// Σ g² of every CHUNK piece of every buffer, in `global_norm`'s order, taken by
    /// `add_final`; `None` once the buffers change after it.
    piece_sums: Option<Vec<f64>>,
    device: Option<Vec<Tensor>>,
}

impl GradAccumulator {
    pub fn new(params: &Params) -> Result<Self> {
        let vars = params.vars();
        if !params.device().is_cpu() {
            let device = vars
                .iter()
                .map(|(_, v)| v.as_tensor().zeros_like())
                .collect::<candle_core::Result<_>>()?;
            return Ok(GradAccumulator {
                buffers: vec![],
                clip: 1.0,
                fresh: vec![],
                piece_sums: None,
                device: Some(device),
            });
        }
        Ok(GradAccumulator {
            buffers: vars
                .iter()
                .map(|(_, v)| vec![0.0; v.elem_count()])
                .collect(),
            clip: 1.0,
            fresh: vec![false; vars.len()],
            piece_sums: None,
            device: None,
        })
    }

    /// The summed (and clipped) gradients, one flat buffer per parameter (empty on
    /// a GPU).
    pub fn buffers(&mut self) -> Result<&[Vec<f32>]> {
        self.apply_clip();
        Ok(self.unscaled()?.0)
    }

    /// The buffers before clipping's factor, and the factor (AdamW's view).
    fn unscaled(&self) -> Result<(&[Vec<f32>], f32)> {
        if self.fresh.iter().any(|&f| f) {
            return Err(Error::Invalid(
                "gradient accumulator: read after `zero` with no `add`, `clip` or `all_reduce`"
                    .into(),
            ));
        }
        Ok((&self.buffers, self.clip))
    }

    /// Scales the buffers by clipping's factor, where something other than AdamW
    /// is to read or change them.
    fn apply_clip(&mut self) {
        let c = std::mem::replace(&mut self.clip, 1.0);
        if c != 1.0 {
            self.piece_sums = None;
            self.buffers.iter_mut().for_each(|b| {
                b.par_chunks_mut(CHUNK)
                    .for_each(|b| b.iter_mut().for_each(|x| *x *= c))
            });
        }
    }

    /// Adds one backward pass's gradients; a parameter the loss did not reach adds 0.
    pub fn add(&mut self, params: &Params, grads: &GradStore) -> Result<()> {
        self.accumulate(params, grads, false)
    }

    /// `add` for the step's last micro-batch: also takes the pieces' sums of squares
    /// for `global_norm` (the same sums, in the same order, that it would take).
    pub fn add_final(&mut self, params: &Params, grads: &GradStore) -> Result<()> {
        self.accumulate(params, grads, true)
    }

    fn accumulate(&mut self, params: &Params, grads: &GradStore, squares: bool) -> Result<()> {
        self.apply_clip();
        if let Some(bufs) = self.device.as_mut() {
            for (buf, (_, var)) in bufs.iter_mut().zip(params.vars()) {
                if let Some(g) = grads.get(var.as_tensor()) {
                    *buf = (&*buf + g.detach())?;
                }
            }
            return Ok(());
        }
        // Σ g² of each piece, in `global_norm`'s order, when `squares`.
        let mut sums = Vec::new();
        let vars = params.vars();
        if vars.len() != self.buffers.len() {
            return Err(Error::Invalid(format!(
                "gradient accumulator: {} parameters for {} buffers",
                vars.len(),
                self.buffers.len()
            )));
        }
        for ((buf, fresh), (_, var)) in self.buffers.iter_mut().zip(&mut self.fresh).zip(vars) {
            match grads.get(var.as_tensor()) {
                Some(g) => {
                    // The gradient's own f32 storage, read in place (no copy).
                    crate::ops::with_f32_all(&[g], |g| {
                        let g = g[0];
                        if g.len() != buf.len() {
                            candle_core::bail!(
                                "gradient accumulator: {} gradients for {} weights",
                                g.len(),
                                buf.len()
                            );
                        }
                        let first = *fresh;
                        let pieces = buf.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK));
                        let write = |b: &mut [f32], g: &[f32]| {
                            if first {
                                set_from(b, g)
                            } else {
                                add_into(b, g)
                            }
                        };
                        // The squares right after the write, while the piece is in cache.
                        if squares {
                            let s: Vec<f64> = pieces
                                .map(|(b, g)| {
                                    write(b, g);
                                    sum_of_squares(b)
                                })
                                .collect();
                            sums.extend(s);
                        } else {
                            pieces.for_each(|(b, g)| write(b, g));
                        }
                        Ok(())
                    })?;
                }
                None => {
                    if *fresh {
                        crate::ops::clear(buf);
                    }
                    if squares {
                        let s: Vec<f64> = buf.par_chunks(CHUNK).map(sum_of_squares).collect();
                        sums.extend(s);
                    }
                }
            }
            *fresh = false;
        }
        self.piece_sums = squares.then_some(sums);
        Ok(())
    }

    /// Zero-fills the buffers still waiting for their first `add`.
    fn settle(&mut self) {
        for (b, fresh) in self.buffers.iter_mut().zip(&mut self.fresh) {
            if std::mem::take(fresh) {
                crate::ops::clear(b);
            }
        }
    }

    /// Replaces every gradient by its sum over the ranks of a data-parallel run.
    pub fn all_reduce(&mut self, comm: &dyn crate::distributed::Collective) -> Result<()> {
        if let Some(bufs) = self.device.as_mut() {
            for b in bufs.iter_mut() {
                *b = comm.all_reduce_tensor(b)?;
            }
        }
        self.settle();
        self.apply_clip();
        self.piece_sums = None;
        for b in self.buffers.iter_mut() {
            comm.all_reduce_sum(b)?;
        }
        Ok(())
    }

    pub fn zero(&mut self) -> Result<()> {
        if let Some(bufs) = self.device.as_mut() {
            for b in bufs.iter_mut() {
                *b = b.zeros_like()?;
            }
        }
        // Lazily: the next `add` overwrites them (or `settle` zeroes them).
        self.fresh.iter_mut().for_each(|f| *f = true);
        self.piece_sums = None;
        self.clip = 1.0;
        Ok(())
    }

    /// The global L2 norm of all gradients (in f64: fixed pieces of CHUNK elements in
    /// parameter order, each with eight partial sums, so the bits do not depend on the
    /// thread count; on a GPU each parameter's sum of squares is taken there, in f32).
    pub fn global_norm(&mut self) -> Result<f64> {
        self.apply_clip();
        if let Some(bufs) = &self.device {
            let sums: Vec<Tensor> = bufs
                .iter()
                .map(|b| b.sqr()?.sum_all())
                .collect::<candle_core::Result<_>>()?;
            let sums = Tensor::stack(&sums, 0)?.to_dtype(candle_core::DType::F64)?;
            return Ok(sums.to_vec1::<f64>()?.iter().sum::<f64>().sqrt());
        }
        if let Some(sums) = &self.piece_sums {
            return Ok(sums.iter().sum::<f64>().sqrt());
        }
        // Fixed pieces of CHUNK elements, each summed on its own task, then the
        // pieces' sums in order: the same bits on every thread count. A buffer still
        // waiting for its first `add` holds zeros, whose squares sum to 0.
        let sums: Vec<f64> = self
            .buffers
            .iter()
            .zip(&self.fresh)
            .flat_map(|(b, &fresh)| b.chunks(CHUNK).map(move |c| (c, fresh)))
            .collect::<Vec<_>>()
            .par_iter()
            .map(|&(piece, fresh)| if fresh { 0.0 } else { sum_of_squares(piece) })
            .collect();
        Ok(sums.iter().sum::<f64>().sqrt())
    }

    /// Scales gradients so that their global norm is at most `max_norm` (PyTorch's
    /// `clip_grad_norm_`: coefficient max_norm / (norm + 1e-6), capped at 1).
    /// Returns the norm before clipping.
    pub fn clip(&mut self, max_norm: f64) -> Result<f64> {
        let norm = self.global_norm()?;
        self.settle();
        if max_norm > 0.0 && norm.is_finite() {
            let coef = max_norm / (norm + 1e-6);
            if coef < 1.0 {
                let c = coef as f32;
                if let Some(bufs) = self.device.as_mut() {
                    for b in bufs.iter_mut() {
                        *b = (&*b * coef)?;
                    }
                }
                // Applied by AdamW as it reads the gradients (or by `apply_clip`
                // where anything else reads them first); on a GPU, done above.
                if self.device.is_none() {
                    self.clip = c;
                }
            }
        }
        Ok(norm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::params::{Init, ParamSpec};
    use candle_core::Device;

    #[test]
    fn adamw_matches_pytorch() {
        // p = torch.tensor([1.0, -2.0], requires_grad=True); b = torch.tensor([0.5], requires_grad=True)
        // opt = torch.optim.AdamW([{'params': [p], 'weight_decay': 0.1},
        //                          {'params': [b], 'weight_decay': 0.0}],
        //                         lr=0.1, betas=(0.9, 0.95), eps=1e-8)
        // for gp, gb in [([0.5, -1.0], [1.0]), ([0.2, 0.3], [-1.0])]:
        //     p.grad = torch.tensor(gp); b.grad = torch.tensor(gb); opt.step()
        // p → [0.7904129028320312, -1.8179587125778198], b → [0.40526315569877625]
        let specs = vec![
            ParamSpec::new("p", &[2], Init::Zeros).decayed(),
            ParamSpec::new("b", &[1], Init::Zeros),
        ];
        let params = Params::init(specs, 0, &Device::Cpu).unwrap();
        params
            .var("p")
            .unwrap()
            .set(&Tensor::new(&[1f32, -2.0], &Device::Cpu).unwrap())
            .unwrap();
        params
            .var("b")
            .unwrap()
            .set(&Tensor::new(&[0.5f32], &Device::Cpu).unwrap())
            .unwrap();
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let mut opt = AdamW::new(&params, cfg).unwrap();
        opt.update(&params, &[vec![0.5, -1.0], vec![1.0]], 0.1)
            .unwrap();
        opt.update(&params, &[vec![0.2, 0.3], vec![-1.0]], 0.1)
            .unwrap();
        let p: Vec<f32> = params.get("p").to_vec1().unwrap();
        let b: Vec<f32> = params.get("b").to_vec1().unwrap();
        for (got, want) in p
            .iter()
            .chain(&b)
            .zip([0.790_412_9f32, -1.817_958_7, 0.405_263_16])
        {
            assert!((got - want).abs() < 1e-6, "{p:?} {b:?}");
        }
    }

    #[test]
    fn clipping_scales_to_max_norm() {
        let specs = vec![ParamSpec::new("a", &[2], Init::Zeros)];
        let params = Params::init(specs, 0, &Device::Cpu).unwrap();
        let mut acc = GradAccumulator::new(&params).unwrap();
        acc.buffers[0] = vec![3.0, 4.0];
        let norm = acc.clip(1.0).unwrap();
        assert!((norm - 5.0).abs() < 1e-9);
        assert!((acc.global_norm().unwrap() - 1.0).abs() < 1e-5);
        // Below the limit nothing changes.
        acc.buffers[0] = vec![0.3, 0.4];
        acc.clip(1.0).unwrap();
        assert_eq!(acc.buffers[0], [0.3, 0.4]);
    }

    /// The eager accumulator this one replaced: zero-filled buffers, `add_into` for
    /// every gradient, the norm from a pass over all pieces.
    fn eager(params: &Params, passes: &[GradStore]) -> (Vec<Vec<f32>>, f64) {
        let mut bufs: Vec<Vec<f32>> = params
            .vars()
            .iter()
            .map(|(_, v)| vec![0.0; v.elem_count()])
            .collect();
        for grads in passes {
            for (b, (_, var)) in bufs.iter_mut().zip(params.vars()) {
                if let Some(g) = grads.get(var.as_tensor()) {
                    let g = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    add_into(b, &g);
                }
            }
        }
        let sums: Vec<f64> = bufs
            .iter()
            .flat_map(|b| b.chunks(CHUNK))
            .map(sum_of_squares)
            .collect();
        (bufs, sums.iter().sum::<f64>().sqrt())
    }

    #[test]
    fn lazy_zero_and_final_squares_give_the_eager_bits() {
        // "a" spans several CHUNK pieces; "unused" is reached by no loss; a −0
        // gradient must come out +0 as adding it to a zeroed buffer gives.
        let n = 2 * CHUNK + 77;
        // "middle" is reached by the second pass only: a buffer that a pass leaves
        // alone after an earlier round wrote it must read as zeros, and later passes
        // must add to what it holds.
        let specs = vec![
            ParamSpec::new("a", &[n], Init::Normal(1.0)),
            ParamSpec::new("unused", &[5], Init::Zeros),
            ParamSpec::new("b", &[3], Init::Zeros),
            ParamSpec::new("middle", &[4], Init::Normal(1.0)),
        ];
        let params = Params::init(specs, 7, &Device::Cpu).unwrap();
        let (a, b) = (params.var("a").unwrap(), params.var("b").unwrap());
        let middle = params.var("middle").unwrap();
        let pass = |scale: f64| {
            let la = (a.as_tensor().sqr().unwrap().sum_all().unwrap() * scale).unwrap();
            let lb = b.as_tensor().sum_all().unwrap();
            let mut loss = (la + lb).unwrap();
            if scale < 0.0 {
                let lm = (middle.as_tensor().sqr().unwrap().sum_all().unwrap() * 3.0).unwrap();
                loss = (loss + lm).unwrap();
            }
            let mut g = loss.backward().unwrap();
            let minus_zero = Tensor::new(&[-0.0f32, -0.0, -0.0], &Device::Cpu).unwrap();
            g.insert(b.as_tensor(), minus_zero);
            g
        };
        let passes = [pass(0.3), pass(-1.7), pass(0.011)];
        assert!(passes[0].get(middle.as_tensor()).is_none());
        assert!(passes[1].get(middle.as_tensor()).is_some());
        let bits = |v: &[Vec<f32>]| -> Vec<Vec<u32>> {
            v.iter()
                .map(|b| b.iter().map(|x| x.to_bits()).collect())
                .collect()
        };
        let mut acc = GradAccumulator::new(&params).unwrap();
        for k in 1..=passes.len() {
            // Stale contents from the previous round must not leak through `zero`.
            acc.zero().unwrap();
            assert!(acc.buffers().is_err(), "read before any add");
            for (j, g) in passes[..k].iter().enumerate() {
                if j + 1 == k {
                    acc.add_final(&params, g).unwrap();
                } else {
                    acc.add(&params, g).unwrap();
                }
            }
            let (want, norm) = eager(&params, &passes[..k]);
            assert_eq!(bits(acc.buffers().unwrap()), bits(&want), "{k} passes");
            assert_eq!(
                acc.global_norm().unwrap().to_bits(),
                norm.to_bits(),
                "{k} passes"
            );
            assert!(
                acc.buffers().unwrap()[2].iter().all(|x| x.to_bits() == 0),
                "+0, not -0"
            );
            // Without the final squares the norm is recomputed: the same bits.
            acc.piece_sums = None;
            assert_eq!(acc.global_norm().unwrap().to_bits(), norm.to_bits());
        }
        // Round 1 wrote "middle"; a round whose only pass does not reach it must
        // not see that.
        acc.zero().unwrap();
        acc.add(&params, &passes[1]).unwrap();
        acc.zero().unwrap();
        acc.add_final(&params, &passes[2]).unwrap();
        let (want, norm) = eager(&params, &passes[2..]);
        assert_eq!(
            bits(acc.buffers().unwrap()),
            bits(&want),
            "a pass that skips a buffer"
        );
        assert_eq!(acc.global_norm().unwrap().to_bits(), norm.to_bits());
        // A zeroed accumulator reads as zeros through clip and its norm.
        acc.zero().unwrap();
        assert_eq!(acc.clip(1.0).unwrap(), 0.0);
        assert!(acc.buffers().unwrap().iter().flatten().all(|&x| x == 0.0));
    }

    #[test]
    fn clipping_inside_adamw_gives_the_bits_of_scaled_gradients() {
        let specs = vec![
            ParamSpec::new("a", &[CHUNK + 9], Init::Normal(1.0)).decayed(),
            ParamSpec::new("b", &[4], Init::Normal(1.0)),
        ];
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let lazy = Params::init(specs.clone(), 3, &Device::Cpu).unwrap();
        let eager_params = Params::init(specs, 3, &Device::Cpu).unwrap();
        let (mut opt_lazy, mut opt_eager) = (
            AdamW::new(&lazy, cfg).unwrap(),
            AdamW::new(&eager_params, cfg).unwrap(),
        );
        let mut acc = GradAccumulator::new(&lazy).unwrap();
        for step in 0..3 {
            let loss = |p: &Params| {
                let a = p.var("a").unwrap().as_tensor();
                let b = p.var("b").unwrap().as_tensor();
                let l = (a.sqr().unwrap().sum_all().unwrap() * (1.0 + step as f64)).unwrap();
                (l + b.sum_all().unwrap()).unwrap().backward().unwrap()
            };
            acc.zero().unwrap();
            acc.add_final(&lazy, &loss(&lazy)).unwrap();
            let norm = acc.clip(0.5).unwrap();
            // The clipped gradients' norm, with the factor pending.
            let mut probe = acc.clone();
            assert!((probe.global_norm().unwrap() - 0.5).abs() < 1e-6);
            opt_lazy.step(&lazy, &acc, 1e-2).unwrap();
            // The eager way: scale the buffers in place, then update.
            let (mut bufs, want_norm) = eager(&eager_params, &[loss(&eager_params)]);
            assert_eq!(norm.to_bits(), want_norm.to_bits());
            let c = (0.5 / (want_norm + 1e-6)) as f32;
            assert!(c < 1.0, "the test must clip");
            bufs.iter_mut().flatten().for_each(|x| *x *= c);
            opt_eager.update(&eager_params, &bufs, 1e-2).unwrap();
            for name in ["a", "b"] {
                let bits = |p: &Params| -> Vec<u32> {
                    p.get(name)
                        .to_vec1::<f32>()
                        .unwrap()
                        .iter()
                        .map(|x| x.to_bits())
                        .collect()
                };
                assert_eq!(bits(&lazy), bits(&eager_params), "{name}, step {step}");
            }
            // What `buffers` shows is the clipped gradients.
            assert_eq!(acc.buffers().unwrap()[1], bufs[1]);
        }
    }

    #[test]
    fn an_add_after_clip_adds_to_the_clipped_gradients() {
        let specs = vec![ParamSpec::new("a", &[CHUNK + 5], Init::Normal(1.0))];
        let params = Params::init(specs, 4, &Device::Cpu).unwrap();
        let a = params.var("a").unwrap();
        let grads = |s: f64| {
            (a.as_tensor().sqr().unwrap().sum_all().unwrap() * s)
                .unwrap()
                .backward()
                .unwrap()
        };
        let (g1, g2) = (grads(1.0), grads(-0.25));
        let mut acc = GradAccumulator::new(&params).unwrap();
        acc.zero().unwrap();
        acc.add_final(&params, &g1).unwrap();
        let norm = acc.clip(0.1).unwrap();
        acc.add_final(&params, &g2).unwrap();
        // Eagerly: g1 scaled in place, then g2 added; the norm of that.
        let (mut want, n1) = eager(&params, &[g1]);
        assert_eq!(norm.to_bits(), n1.to_bits());
        let c = (0.1 / (n1 + 1e-6)) as f32;
        want.iter_mut().flatten().for_each(|x| *x *= c);
        let g2 = g2.get(a.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        add_into(&mut want[0], &g2);
        let want_norm = want[0]
            .chunks(CHUNK)
            .map(sum_of_squares)
            .sum::<f64>()
            .sqrt();
        assert_eq!(acc.global_norm().unwrap().to_bits(), want_norm.to_bits());
        let got: Vec<u32> = acc.buffers().unwrap()[0]
            .iter()
            .map(|x| x.to_bits())
            .collect();
        let want: Vec<u32> = want[0].iter().map(|x| x.to_bits()).collect();
        assert_eq!(got, want);
    }
}
