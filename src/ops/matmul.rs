//! y = x·Wᵀ for a handful of rows (a decoding step), W stored (out, in) as in HF
//! checkpoints. Memory-bound on W: each block of four W rows is read once and
//! multiplied against every x row while it sits in L1. With AVX2+FMA (detected at run
//! time) the inner loop is 8-wide fused multiply-add; otherwise a portable loop.
//!
//! The gemm crate's general kernels pack the weight for every call, which for n ≤ 16
//! rows costs more than the product itself (measured: 2–3× slower on GPT-2 shapes).

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{dot, f32_slice, PARALLEL_MIN_WORK};

/// W rows per parallel task.
const ROWS_PER_TASK: usize = 64;

struct SkinnyMatmul;

/// yt (rows, n) = W (rows, in) · xᵀ for the W rows in `w` (a slice of whole rows),
/// x (n, in).
fn kernel(w: &[f32], x: &[f32], inner: usize, n: usize, yt: &mut [f32]) {
    assert!(
        inner > 0 && w.len().is_multiple_of(inner),
        "skinny matmul: W holds {} floats, not whole rows of {inner}",
        w.len()
    );
    assert!(
        x.len() >= n * inner,
        "skinny matmul: x holds {} floats, {n} rows of {inner} need {}",
        x.len(),
        n * inner
    );
    assert!(
        yt.len() >= w.len() / inner * n,
        "skinny matmul: output too small"
    );
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above); the kernel
            // reads W rows below w.len() / inner and x rows below n, which the asserts
            // above keep inside `w` and `x`.
            unsafe { avx2::kernel(w, x, inner, n, yt) };
            return;
        }
    }
    for (o, wrow) in w.chunks(inner).enumerate() {
        for (b, xrow) in x.chunks(inner).enumerate() {
            yt[o * n + b] = dot(wrow, xrow);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let hi = _mm256_extractf128_ps(v, 1);
        let lo = _mm256_castps256_ps128(v);
        let s = _mm_add_ps(hi, lo);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// # Safety
    /// The CPU has AVX2 and FMA; `inner > 0`, `w` is whole rows of `inner` and `x`
    /// holds at least `n * inner` floats (`super::kernel` asserts these).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn kernel(w: &[f32], x: &[f32], inner: usize, n: usize, yt: &mut [f32]) {
        let rows = w.len() / inner;
        let full = inner / 8 * 8;
        let mut o = 0;
        while o + 4 <= rows {
            let wp = w.as_ptr().add(o * inner);
            for b in 0..n {
                let xp = x.as_ptr().add(b * inner);
                let (mut a0, mut a1, mut a2, mut a3) = (
                    _mm256_setzero_ps(),
                    _mm256_setzero_ps(),
                    _mm256_setzero_ps(),
                    _mm256_setzero_ps(),
                );
                let mut k = 0;
                while k < full {
                    let xv = _mm256_loadu_ps(xp.add(k));
                    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(wp.add(k)), xv, a0);
                    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(wp.add(inner + k)), xv, a1);
                    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(wp.add(2 * inner + k)), xv, a2);
                    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(wp.add(3 * inner + k)), xv, a3);
                    k += 8;
                }
                let mut s = [hsum(a0), hsum(a1), hsum(a2), hsum(a3)];
                for kk in full..inner {
                    let xv = *xp.add(kk);
                    for (r, sr) in s.iter_mut().enumerate() {
                        *sr += *wp.add(r * inner + kk) * xv;
                    }
                }
                for (r, sr) in s.iter().enumerate() {
                    yt[(o + r) * n + b] = *sr;
                }
            }
            o += 4;
        }
        for o in o..rows {
            let wrow = &w[o * inner..(o + 1) * inner];
            for b in 0..n {
                yt[o * n + b] = super::dot(wrow, &x[b * inner..(b + 1) * inner]);
            }
        }
    }
}

impl CustomOp2 for SkinnyMatmul {
    fn name(&self) -> &'static str {
        "rlhf-skinny-matmul"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, inner) = lx.shape().dims2()?;
        let (out, _) = lw.shape().dims2()?;
        let x = f32_slice(sx, lx, "skinny matmul x")?;
        let w = f32_slice(sw, lw, "skinny matmul w")?;
        let mut yt = vec![0f32; out * n];
        if out * inner * n >= PARALLEL_MIN_WORK * 8 {
            w.par_chunks(ROWS_PER_TASK * inner)
                .zip(yt.par_chunks_mut(ROWS_PER_TASK * n))
                .for_each(|(wc, yc)| kernel(wc, x, inner, n, yc));
        } else {
            kernel(w, x, inner, n, &mut yt);
        }
        // (out, n) → (n, out)
        let mut y = vec![0f32; n * out];
        for o in 0..out {
            for b in 0..n {
                y[b * out + o] = yt[o * n + b];
            }
        }
        Ok((CpuStorage::F32(y), Shape::from((n, out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = dy.matmul(w)?; // (n, out)·(out, in) = (n, in)
        let dw = dy.t()?.matmul(x)?; // (out, n)·(n, in) = (out, in)
        Ok((Some(dx), Some(dw)))
    }
}

/// x (n, in) · Wᵀ with W (out, in) → (n, out), for CPU f32 tensors and small n.
pub fn skinny_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (n, inner) = x.dims2()?;
    let (out, w_inner) = w.dims2()?;
    if inner != w_inner {
        candle_core::bail!(
            "skinny matmul: x {:?} and W {:?} do not fit",
            x.dims(),
            w.dims()
        );
    }
    if inner == 0 {
        return Tensor::zeros((n, out), x.dtype(), x.device()); // empty sums
    }
    x.contiguous()?.apply_op2(&w.contiguous()?, SkinnyMatmul)
}

/// y = x·Wᵀ computed elsewhere (`y`, from x detached) through a weight that is a
/// constant (LoRA's frozen base), given x's gradient path: the backward gives x
/// dy·W and computes nothing for W. candle's own matmul would compute dW = dyᵀ·x for
/// every frozen layer (as much work as the forward) and hold it until the step ends.
/// The forward is a copy of `y`, so the values are those of the plain product, bit
/// for bit.
struct FrozenWeightGrad {
    weight: Tensor, // (out, in)
}

impl CustomOp2 for FrozenWeightGrad {
    fn name(&self) -> &'static str {
        "rlhf-frozen-weight-grad"
    }

    fn cpu_fwd(
        &self,
        _sx: &CpuStorage,
        _lx: &Layout,
        sy: &CpuStorage,
        ly: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = f32_slice(sy, ly, "frozen weight y")?;
        Ok((CpuStorage::F32(y.to_vec()), ly.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _y: &Tensor,
        _res: &Tensor,
        dres: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(dres.matmul(&self.weight)?), None)) // (n, out)·(out, in) = (n, in)
    }
}

/// `y` (n, out) = x (n, in)·Wᵀ, computed from x detached, joined to x's graph with
/// the gradient dy·W for x and none for the constant W. CPU f32.
pub fn with_frozen_weight_grad(x: &Tensor, y: &Tensor, w: &Tensor) -> Result<Tensor> {
    if w.track_op() || y.track_op() {
        candle_core::bail!("frozen weight grad: W and y must be constants");
    }
    x.apply_op2(&y.contiguous()?, FrozenWeightGrad { weight: w.clone() })
}
