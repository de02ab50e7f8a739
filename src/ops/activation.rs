//! Fused activations, forward and backward: GELU with the preceding layer's bias folded
//! in (GPT-2's MLP), and SwiGLU (Llama's MLP). One pass over the data each way, instead
//! of candle's chain of element-wise ops (a dozen for GELU's backward, with libm
//! `powf`).
//!
//! GELU, z = x + b:
//!   tanh form  y = ½z(1 + tanh u), u = √(2/π)(z + 0.044715 z³)
//!              dy/dz = ½(1 + t) + ½z(1 − t²)·√(2/π)(1 + 3·0.044715 z²), t = tanh u
//!   erf form   y = ½z(1 + erf(z/√2)),  dy/dz = ½(1 + erf(z/√2)) + z·φ(z)
//!   db = Σ over rows of dz.
//! SwiGLU, s = σ(g):  y = g·s·u,  dg = dy·u·s(1 + g(1 − s)),  du = dy·g·s.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::simd::{self, simd_kernel};
use super::{f32_slice, filled, with_f32_all, zeros, PARALLEL_MIN_WORK};

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_C: f32 = 0.044_715;
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

/// Elements per parallel chunk (a whole number of rows is rounded up to below).
const CHUNK: usize = 1 << 14;

/// GELU's (value, slope) at z; `exact` picks the erf form.
#[inline(always)]
fn gelu(z: f32, exact: bool) -> (f32, f32) {
    if exact {
        let e = candle_core::cpu::erf::erf_f32(z * std::f32::consts::FRAC_1_SQRT_2);
        let phi = FRAC_1_SQRT_2PI * simd::exp(-0.5 * z * z);
        (0.5 * z * (1.0 + e), 0.5 * (1.0 + e) + z * phi)
    } else {
        let z2 = z * z;
        let t = simd::tanh(SQRT_2_OVER_PI * (z + GELU_C * z2 * z));
        let y = 0.5 * z * (1.0 + t);
        let dy =
            0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_C * z2);
        (y, dy)
    }
}

simd_kernel! {
    /// y = gelu(x + b) over rows of width b.len().
    fn gelu_rows(x: &[f32], b: &[f32], y: &mut [f32], exact: bool) {
        let c = b.len();
        for (xr, yr) in x.chunks_exact(c).zip(y.chunks_exact_mut(c)) {
            for ((yi, &xi), &bi) in yr.iter_mut().zip(xr).zip(b) {
                *yi = gelu(xi + bi, exact).0;
            }
        }
    }
}

simd_kernel! {
    /// dx = dy·gelu'(x + b) over rows; returns these rows' Σ dx (their share of db).
    fn gelu_backward_rows(x: &[f32], b: &[f32], dy: &[f32], dx: &mut [f32], exact: bool) -> Vec<f32> {
        let c = b.len();
        let mut db = vec![0f32; c];
        for ((xr, dyr), dxr) in x.chunks_exact(c).zip(dy.chunks_exact(c)).zip(dx.chunks_exact_mut(c)) {
            for i in 0..c {
                let g = dyr[i] * gelu(xr[i] + b[i], exact).1;
                dxr[i] = g;
                db[i] += g;
            }
        }
        db
    }
}

simd_kernel! {
    /// y = silu(g)·u
    fn swiglu_all(g: &[f32], u: &[f32], y: &mut [f32]) {
        for ((yi, &gi), &ui) in y.iter_mut().zip(g).zip(u) {
            *yi = gi * simd::sigmoid(gi) * ui;
        }
    }
}

simd_kernel! {
    /// dg, du of y = silu(g)·u.
    fn swiglu_backward_all(g: &[f32], u: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32]) {
        let n = g.len().min(u.len()).min(dy.len()).min(dg.len()).min(du.len());
        for i in 0..n {
            let s = simd::sigmoid(g[i]);
            dg[i] = dy[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
            du[i] = dy[i] * g[i] * s;
        }
    }
}

/// Chunks of whole rows of width `c`, about CHUNK elements each.
fn chunk_len(c: usize) -> usize {
    c * (CHUNK / c.max(1)).max(1)
}

/// (dx, db) of y = gelu(x + b) for rows of x with upstream gradient dy.
fn gelu_backward(x: &[f32], b: &[f32], dy: &[f32], exact: bool) -> (Vec<f32>, Vec<f32>) {
    let c = b.len();
    // Each piece of rows sums its own db; pieces are added in order (deterministic).
    let (dx, parts) = filled(x.len(), chunk_len(c), |start, dxs| {
        let rows = start..start + dxs.len();
        gelu_backward_rows(&x[rows.clone()], b, &dy[rows], dxs, exact)
    });
    let mut db = vec![0f32; c];
    for p in parts {
        for (d, v) in db.iter_mut().zip(p) {
            *d += v;
        }
    }
    (dx, db)
}

struct BiasGeluOp {
    exact: bool,
}

impl CustomOp2 for BiasGeluOp {
    fn name(&self) -> &'static str {
        "rlhf-bias-gelu"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(sx, lx, "bias_gelu x")?;
        let b = f32_slice(sb, lb, "bias_gelu bias")?;
        let c = b.len();
        let exact = self.exact;
        let (y, _) = filled(x.len(), chunk_len(c), |start, ys| {
            gelu_rows(&x[start..start + ys.len()], b, ys, exact)
        });
        Ok((CpuStorage::F32(y), lx.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, db) = with_f32_all(&[x, b, dy], |a| {
            Ok(gelu_backward(a[0], a[1], a[2], self.exact))
        })?;
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(db, b.shape(), dev)?),
        ))
    }
}

/// gelu(x + bias) for x (..., C) and bias (C,), CPU f32. `exact` picks the erf form
/// (transformers' `gelu`), otherwise the tanh form (`gelu_new`, `gelu_pytorch_tanh`).
pub fn bias_gelu(x: &Tensor, bias: &Tensor, exact: bool) -> Result<Tensor> {
    let c = bias.elem_count();
    if x.dims().last() != Some(&c) {
        candle_core::bail!("bias_gelu: x {:?} does not end in the bias' {c}", x.dims());
    }
    x.contiguous()?
        .apply_op2(&bias.contiguous()?, BiasGeluOp { exact })
}

/// (dg, du) of y = silu(g)·u with upstream gradient dy.
fn swiglu_backward(g: &[f32], u: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let mut dg = zeros(g.len());
    let mut du = zeros(g.len());
    let run =
        |(((gs, us), dys), (dgs, dus)): SwiGluGrads| swiglu_backward_all(gs, us, dys, dgs, dus);
    if g.len() >= PARALLEL_MIN_WORK {
        g.par_chunks(CHUNK)
            .zip(u.par_chunks(CHUNK))
            .zip(dy.par_chunks(CHUNK))
            .zip(dg.par_chunks_mut(CHUNK).zip(du.par_chunks_mut(CHUNK)))
            .for_each(run);
    } else {
        run((((g, u), dy), (&mut dg, &mut du)));
    }
    (dg, du)
}

struct SwiGluOp;

/// ((gate, up), dy) chunks in, (dgate, dup) chunks out.
type SwiGluGrads<'a> = (
    ((&'a [f32], &'a [f32]), &'a [f32]),
    (&'a mut [f32], &'a mut [f32]),
);

impl CustomOp2 for SwiGluOp {
    fn name(&self) -> &'static str {
        "rlhf-swiglu"
    }

    fn cpu_fwd(
        &self,
        sg: &CpuStorage,
        lg: &Layout,
        su: &CpuStorage,
        lu: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = f32_slice(sg, lg, "swiglu gate")?;
        let u = f32_slice(su, lu, "swiglu up")?;
        let mut y = zeros(g.len());
        let run = |((gs, us), ys): ((&[f32], &[f32]), &mut [f32])| swiglu_all(gs, us, ys);
        if g.len() >= PARALLEL_MIN_WORK {
            g.par_chunks(CHUNK)
                .zip(u.par_chunks(CHUNK))
                .zip(y.par_chunks_mut(CHUNK))
                .for_each(run);
        } else {
            run(((g, u), &mut y));
        }
        Ok((CpuStorage::F32(y), lg.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dg, du) = with_f32_all(&[g, u, dy], |a| Ok(swiglu_backward(a[0], a[1], a[2])))?;
        let dev = g.device();
        Ok((
            Some(Tensor::from_vec(dg, g.shape(), dev)?),
            Some(Tensor::from_vec(du, u.shape(), dev)?),
        ))
    }
}

/// silu(gate) · up, element-wise, for two CPU f32 tensors of the same shape.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.dims() != up.dims() {
        candle_core::bail!(
            "swiglu: gate {:?} and up {:?} differ",
            gate.dims(),
            up.dims()
        );
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGluOp)
}
