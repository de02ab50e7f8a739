//! Fused LayerNorm and RMSNorm over the last dimension, forward and backward.
//!
//! Backward, with x̂ = (x − μ)·r (LayerNorm) or x·r (RMSNorm), r the reciprocal
//! standard deviation (or RMS) of the row and g = dy·w:
//!   LayerNorm: dx = r·(g − mean(g) − x̂·mean(g·x̂)),  dw = Σ dy·x̂,  db = Σ dy
//!   RMSNorm:   dx = r·(g − x̂·mean(g·x̂)),            dw = Σ dy·x̂
//! (the standard derivation, e.g. llm.c's `layernorm_backward`).

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{f32_slice, with_f32_all, zeros, PARALLEL_MIN_WORK};

/// Rows per parallel chunk; fixed so that partial sums reduce in the same order.
const ROWS_PER_CHUNK: usize = 16;

#[derive(Clone, Copy)]
enum Kind {
    Layer,
    Rms,
}

/// (x̂ row into `out`, r) for one row.
#[inline]
fn normalize_row(kind: Kind, x: &[f32], eps: f32, out: &mut [f32]) -> f32 {
    let c = x.len() as f32;
    let mean = match kind {
        Kind::Layer => x.iter().sum::<f32>() / c,
        Kind::Rms => 0.0,
    };
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / c;
    let r = 1.0 / (var + eps).sqrt();
    for (o, v) in out.iter_mut().zip(x) {
        *o = (v - mean) * r;
    }
    r
}

fn forward(kind: Kind, x: &[f32], w: &[f32], b: Option<&[f32]>, eps: f32) -> Vec<f32> {
    let c = w.len();
    let mut y = zeros(x.len());
    let row = |(xr, yr): (&[f32], &mut [f32])| {
        normalize_row(kind, xr, eps, yr);
        for (i, v) in yr.iter_mut().enumerate() {
            *v = *v * w[i] + b.map_or(0.0, |b| b[i]);
        }
    };
    if x.len() >= PARALLEL_MIN_WORK {
        x.par_chunks(c).zip(y.par_chunks_mut(c)).for_each(row);
    } else {
        x.chunks(c).zip(y.chunks_mut(c)).for_each(row);
    }
    y
}

/// (dx, dw, db) for rows of x with upstream gradient dy.
fn backward(
    kind: Kind,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    eps: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let c = w.len();
    let mut dx = zeros(x.len());
    // Each chunk of rows accumulates its own (dw, db); chunks are summed in order.
    let chunk = |(xs, (dys, dxs)): (&[f32], (&[f32], &mut [f32]))| {
        let mut dw = vec![0f32; c];
        let mut db = vec![0f32; c];
        let mut xhat = vec![0f32; c];
        for ((xr, dyr), dxr) in xs.chunks(c).zip(dys.chunks(c)).zip(dxs.chunks_mut(c)) {
            let r = normalize_row(kind, xr, eps, &mut xhat);
            let (mut mean_g, mut mean_gx) = (0f32, 0f32);
            for i in 0..c {
                let g = dyr[i] * w[i];
                mean_g += g;
                mean_gx += g * xhat[i];
                dw[i] += dyr[i] * xhat[i];
                db[i] += dyr[i];
            }
            mean_g /= c as f32;
            mean_gx /= c as f32;
            if let Kind::Rms = kind {
                mean_g = 0.0;
            }
            for i in 0..c {
                dxr[i] = r * (dyr[i] * w[i] - mean_g - xhat[i] * mean_gx);
            }
        }
        (dw, db)
    };
    let rows = ROWS_PER_CHUNK * c;
    let partials: Vec<(Vec<f32>, Vec<f32>)> = if x.len() >= PARALLEL_MIN_WORK {
        x.par_chunks(rows)
            .zip(dy.par_chunks(rows).zip(dx.par_chunks_mut(rows)))
            .map(chunk)
            .collect()
    } else {
        x.chunks(rows)
            .zip(dy.chunks(rows).zip(dx.chunks_mut(rows)))
            .map(chunk)
            .collect()
    };
    let mut dw = vec![0f32; c];
    let mut db = vec![0f32; c];
    for (pw, pb) in partials {
        for i in 0..c {
            dw[i] += pw[i];
            db[i] += pb[i];
        }
    }
    (dx, dw, db)
}

struct LayerNormOp {
    eps: f32,
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "rlhf-layer-norm"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(sx, lx, "layer_norm x")?;
        let w = f32_slice(sw, lw, "layer_norm weight")?;
        let b = f32_slice(sb, lb, "layer_norm bias")?;
        let y = forward(Kind::Layer, x, w, Some(b), self.eps);
        Ok((CpuStorage::F32(y), lx.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = with_f32_all(&[x, w, dy], |a| {
            Ok(backward(Kind::Layer, a[0], a[1], a[2], self.eps))
        })?;
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dw, w.shape(), dev)?),
            Some(Tensor::from_vec(db, w.shape(), dev)?),
        ))
    }
}

struct RmsNormOp {
    eps: f32,
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "rlhf-rms-norm"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(sx, lx, "rms_norm x")?;
        let w = f32_slice(sw, lw, "rms_norm weight")?;
        let y = forward(Kind::Rms, x, w, None, self.eps);
        Ok((CpuStorage::F32(y), lx.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = with_f32_all(&[x, w, dy], |a| {
            Ok(backward(Kind::Rms, a[0], a[1], a[2], self.eps))
        })?;
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dw, w.shape(), dev)?),
        ))
    }
}

/// LayerNorm of x (..., C) with weight and bias (C,), on CPU f32 tensors.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &bias.contiguous()?,
        LayerNormOp { eps: eps as f32 },
    )
}

/// RMSNorm of x (..., C) with weight (C,), on CPU f32 tensors.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2(&weight.contiguous()?, RmsNormOp { eps: eps as f32 })
}
