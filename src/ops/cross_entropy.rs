//! Per-token log-probabilities log softmax(logits)[target] (the cross-entropy of every
//! LM loss and PPO's ratios) and the softmax entropy, fused: one pass per row instead
//! of candle's max / sub / exp / sum / log / gather chain, each of which writes an
//! N × V tensor.
//!
//! Forward, row i:  lse_i = m_i + log Σ_j e^{l_ij − m_i},  out_i = l_i,t − lse_i.
//! Backward: ∂out_i/∂l_ij = δ_{j,t} − p_ij with p_ij = e^{l_ij − lse_i}, and lse_i is
//! recovered as l_i,t − out_i, so nothing but the output is kept from the forward.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::simd::{self, max8, simd_kernel, sum8};
use super::{f32_slice, with_f32, PARALLEL_MIN_WORK};

/// Rows per parallel task.
const ROWS: usize = 8;

simd_kernel! {
    /// log Σ_j e^{x_j}, with the max taken out first. `scratch` holds the exponentials
    /// (a map loop and a plain sum vectorise better than one fused reduction).
    fn log_sum_exp(x: &[f32], scratch: &mut Vec<f32>) -> f32 {
        let m = max8(x);
        if m == f32::NEG_INFINITY {
            return m;
        }
        scratch.clear();
        scratch.extend(x.iter().map(|&v| simd::exp(v - m)));
        m + sum8(scratch, |e| e).ln()
    }
}

simd_kernel! {
    /// d_j = −g·e^{l_j − lse} (the target's +g is added by the caller).
    fn softmax_grad_row(l: &[f32], lse: f32, g: f32, d: &mut [f32]) {
        for (dj, &lj) in d.iter_mut().zip(l) {
            *dj = -g * simd::exp(lj - lse);
        }
    }
}

simd_kernel! {
    /// The entropy lse − Σ p·l of one row of logits.
    fn entropy_row(l: &[f32], scratch: &mut Vec<f32>) -> f32 {
        let lse = log_sum_exp(l, scratch);
        scratch.clear();
        scratch.extend(l.iter().map(|&x| simd::exp(x - lse) * x));
        lse - sum8(scratch, |e| e)
    }
}

/// f(row, scratch) for every row, in parallel for large inputs; each task has its own
/// scratch buffer.
fn for_rows<T: Send>(
    v: usize,
    n_rows: usize,
    f: impl Fn(usize, &mut Vec<f32>) -> T + Sync + Send,
) -> Vec<T> {
    if n_rows * v >= PARALLEL_MIN_WORK {
        (0..n_rows)
            .into_par_iter()
            .with_min_len(ROWS)
            .map_init(|| Vec::with_capacity(v), |scratch, i| f(i, scratch))
            .collect()
    } else {
        let mut scratch = Vec::with_capacity(v);
        (0..n_rows).map(|i| f(i, &mut scratch)).collect()
    }
}

struct TokenLogprobsOp;

impl CustomOp2 for TokenLogprobsOp {
    fn name(&self) -> &'static str {
        "rlhf-token-logprobs"
    }

    fn cpu_fwd(
        &self,
        sl: &CpuStorage,
        ll: &Layout,
        st: &CpuStorage,
        lt: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let logits = f32_slice(sl, ll, "token_logprobs logits")?;
        let (n, v) = ll.shape().dims2()?;
        let targets = match lt.contiguous_offsets() {
            Some((a, b)) => &st.as_slice::<u32>()?[a..b],
            None => candle_core::bail!("token_logprobs: targets must be contiguous u32"),
        };
        if let Some(&bad) = targets.iter().find(|&&t| t as usize >= v) {
            candle_core::bail!("token_logprobs: target {bad} outside the vocabulary of {v}");
        }
        let out = for_rows(v, n, |i, scratch| {
            let row = &logits[i * v..(i + 1) * v];
            row[targets[i] as usize] - log_sum_exp(row, scratch)
        });
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        out: &Tensor,
        dout: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, v) = logits.dims2()?;
        let targets: Vec<u32> = targets.to_vec1()?;
        let dlogits = with_f32(logits, |l| {
            with_f32(out, |o| {
                with_f32(dout, |g| {
                    let mut d = vec![0f32; n * v];
                    let row = |(i, dr): (usize, &mut [f32])| {
                        let lr = &l[i * v..(i + 1) * v];
                        let t = targets[i] as usize;
                        let lse = lr[t] - o[i];
                        let gi = g[i];
                        softmax_grad_row(lr, lse, gi, dr);
                        dr[t] += gi;
                    };
                    if n * v >= PARALLEL_MIN_WORK {
                        d.par_chunks_mut(v)
                            .enumerate()
                            .with_min_len(ROWS)
                            .for_each(row);
                    } else {
                        d.chunks_mut(v).enumerate().for_each(row);
                    }
                    Ok(d)
                })
            })
        })?;
        Ok((
            Some(Tensor::from_vec(dlogits, (n, v), logits.device())?),
            None,
        ))
    }
}

/// log softmax(logits)[target] per row: logits (N, V) f32, targets (N,) u32 → (N,),
/// on CPU, differentiable in the logits.
pub fn token_logprobs(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    logits
        .contiguous()?
        .apply_op2(&targets.contiguous()?, TokenLogprobsOp)
}

/// The softmax entropy H = lse − Σ p·l of each row: logits (N, V) → (N,), on CPU, not
/// differentiable (a metric).
pub fn entropy(logits: &Tensor) -> Result<Tensor> {
    let (n, v) = logits.dims2()?;
    let h = with_f32(logits, |l| {
        Ok(for_rows(v, n, |i, scratch| {
            entropy_row(&l[i * v..(i + 1) * v], scratch)
        }))
    })?;
    Tensor::from_vec(h, n, logits.device())
}
