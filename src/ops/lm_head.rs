//! Per-token log-probabilities (and, for PPO's metrics, entropies) straight from the
//! final hidden states and the LM head, forward and backward, on CPU.
//!
//! The N × V logits are the largest tensor of a training step (2032 × 8192 floats for
//! the tiny shape, 508 × 50257 for GPT-2). As candle ops, logits, their log-softmax
//! and every gradient of them would each be a fresh N × V tensor (candle's backward
//! also zero-fills one per node before adding into it). Here:
//!   forward   logits = h Wᵀ (gemm) are turned into softmax probabilities p in place;
//!             out_i = l_i,t − lse_i, and H_i = lse_i − Σ_j p_ij l_ij when asked;
//!   backward  dl_ij = g_i (δ_jt − p_ij) overwrites p in place, then dh = dl W and
//!             dW = dlᵀ h (two gemms).
//! So one N × V buffer lives from the forward to the backward, and nothing else of
//! that size. Above `KEEP_MAX` logits the forward keeps nothing and works in chunks
//! of rows, and the backward recomputes each chunk's logits (one more h Wᵀ per chunk;
//! lse_i comes back as l_i,t − out_i): memory O(chunk × V) for any N.
//!
//! The entropy column is a metric: no gradient flows through it.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Mutex;

use super::simd::{self, max8, simd_kernel, sum8};
use super::{dot, f32_slice, gemm, with_f32_all, zeros};

/// The most logits (N·V) the forward keeps for the backward: 128 Mi floats, 512 MiB.
const KEEP_MAX: usize = 1 << 27;
/// Logits per chunk when nothing is kept (4 Mi floats, 16 MiB).
const CHUNK_LOGITS: usize = 1 << 22;

simd_kernel! {
    /// Turns a row of logits into softmax probabilities in place; returns lse. With
    /// `logits_copy`, the logits are first copied there (for the entropy).
    fn softmax_in_place(row: &mut [f32], logits_copy: Option<&mut Vec<f32>>) -> f32 {
        if let Some(copy) = logits_copy {
            copy.clear();
            copy.extend_from_slice(row);
        }
        let m = max8(row);
        for x in row.iter_mut() {
            *x = simd::exp(*x - m);
        }
        let s = sum8(row, |e| e);
        let inv = 1.0 / s;
        for x in row.iter_mut() {
            *x *= inv;
        }
        m + s.ln()
    }
}

simd_kernel! {
    /// The gradient of out_i = l_i,t − lse_i times g, from the probabilities p (in
    /// place): g (δ_jt − p_j).
    fn grad_from_probs(row: &mut [f32], target: usize, g: f32) {
        for x in row.iter_mut() {
            *x *= -g;
        }
        row[target] += g;
    }
}

simd_kernel! {
    /// The same gradient from the logits and lse (in place): g (δ_jt − e^{l_j − lse}).
    fn grad_from_logits(row: &mut [f32], lse: f32, target: usize, g: f32) {
        for x in row.iter_mut() {
            *x = -g * simd::exp(*x - lse);
        }
        row[target] += g;
    }
}

struct HeadLogprobsOp {
    with_entropy: bool,
    /// Softmax probabilities (N × V) from the forward, taken by the backward.
    kept: Mutex<Option<Vec<f32>>>,
    keep: bool,
    /// Logits per chunk when nothing is kept.
    chunk_logits: usize,
    /// Whether the weight wants a gradient: a frozen head (LoRA's base, tied to the
    /// embedding) skips the dW gemm, as much work as the forward's.
    weight_grad: bool,
}

impl HeadLogprobsOp {
    /// Rows per chunk when the probabilities are not kept.
    fn chunk_rows(&self, v: usize) -> usize {
        (self.chunk_logits / v).max(1)
    }

    /// (dh, dW) from the hidden states h, the weight w, the forward's output o and its
    /// gradient g, with the kept probabilities when there are any (dW only when
    /// `weight_grad`).
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        h: &[f32],
        w: &[f32],
        o: &[f32],
        g: &[f32],
        targets: &[u32],
        kept: Option<Vec<f32>>,
        (n, c, v): (usize, usize, usize),
    ) -> (Vec<f32>, Option<Vec<f32>>) {
        let cols = if self.with_entropy { 2 } else { 1 };
        let mut dh = zeros(n * c);
        let mut dw = self.weight_grad.then(|| zeros(v * c));
        let recompute = kept.is_none();
        let (chunk, mut buf) = match kept {
            Some(p) => (n.max(1), p),
            None => {
                let chunk = self.chunk_rows(v);
                (chunk, zeros(chunk.min(n) * v))
            }
        };
        for start in (0..n).step_by(chunk) {
            let rows = chunk.min(n - start);
            let d = &mut buf[..rows * v];
            let hc = &h[start * c..(start + rows) * c];
            if recompute {
                gemm(rows, v, c, d, false, hc, (c, 1), w, (1, c));
            }
            d.par_chunks_mut(v)
                .enumerate()
                .with_min_len(4)
                .for_each(|(r, row)| {
                    let i = start + r;
                    let t = targets[i] as usize;
                    let gi = g[i * cols];
                    if recompute {
                        let lse = row[t] - o[i * cols];
                        grad_from_logits(row, lse, t, gi);
                    } else {
                        grad_from_probs(row, t, gi);
                    }
                });
            // dh = dl W: (rows, V) · (V, C)
            let dhc = &mut dh[start * c..(start + rows) * c];
            gemm(rows, c, v, dhc, false, d, (v, 1), w, (c, 1));
            // dW += dlᵀ h: (V, rows) · (rows, C)
            if let Some(dw) = dw.as_mut() {
                gemm(v, c, rows, dw, start > 0, d, (1, v), hc, (c, 1));
            }
        }
        (dh, dw)
    }

    /// Turns a chunk of logit rows into probabilities and writes out (and entropy).
    fn finish_rows(&self, probs: &mut [f32], targets: &[u32], out: &mut [f32], v: usize) {
        let cols = if self.with_entropy { 2 } else { 1 };
        let with_entropy = self.with_entropy;
        probs
            .par_chunks_mut(v)
            .zip(out.par_chunks_mut(cols))
            .zip(targets.par_iter())
            .with_min_len(4)
            .for_each_init(Vec::new, |copy, ((row, o), &t)| {
                let lt = row[t as usize];
                let lse = softmax_in_place(row, with_entropy.then_some(copy));
                o[0] = lt - lse;
                if with_entropy {
                    o[1] = lse - dot(row, copy);
                }
            });
    }
}

impl CustomOp3 for HeadLogprobsOp {
    fn name(&self) -> &'static str {
        "rlhf-lm-head-logprobs"
    }

    fn cpu_fwd(
        &self,
        sh: &CpuStorage,
        lh: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        st: &CpuStorage,
        lt: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let h = f32_slice(sh, lh, "lm head hidden")?;
        let w = f32_slice(sw, lw, "lm head weight")?;
        let (n, c) = lh.shape().dims2()?;
        let (v, cw) = lw.shape().dims2()?;
        if c != cw {
            candle_core::bail!("lm head: hidden width {c} but weight ({v}, {cw})");
        }
        let targets = match lt.contiguous_offsets() {
            Some((a, b)) => &st.as_slice::<u32>()?[a..b],
            None => candle_core::bail!("lm head: targets must be contiguous u32"),
        };
        if targets.len() != n {
            candle_core::bail!("lm head: {n} rows but {} targets", targets.len());
        }
        if let Some(&bad) = targets.iter().find(|&&t| t as usize >= v) {
            candle_core::bail!("lm head: target {bad} outside the vocabulary of {v}");
        }
        let cols = if self.with_entropy { 2 } else { 1 };
        let mut out = vec![0f32; n * cols];
        let chunk = if self.keep {
            n.max(1)
        } else {
            self.chunk_rows(v)
        };
        let mut probs = zeros(chunk.min(n) * v);
        for start in (0..n).step_by(chunk) {
            let rows = chunk.min(n - start);
            let p = &mut probs[..rows * v];
            // logits = h Wᵀ: (rows, C) · (C, V)
            gemm(rows, v, c, p, false, &h[start * c..], (c, 1), w, (1, c));
            self.finish_rows(
                p,
                &targets[start..start + rows],
                &mut out[start * cols..(start + rows) * cols],
                v,
            );
        }
        if self.keep {
            *self.kept.lock().expect("lm head stash") = Some(probs);
        }
        let shape = if self.with_entropy {
            Shape::from((n, 2))
        } else {
            Shape::from(n)
        };
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(
        &self,
        hidden: &Tensor,
        weight: &Tensor,
        targets: &Tensor,
        out: &Tensor,
        dout: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, c) = hidden.dims2()?;
        let v = weight.dim(0)?;
        let targets: Vec<u32> = targets.to_vec1()?;
        let kept = self.kept.lock().expect("lm head stash").take();
        let (dh, dw) = with_f32_all(&[hidden, weight, out, dout], |a| {
            Ok(self.backward(a[0], a[1], a[2], a[3], &targets, kept, (n, c, v)))
        })?;
        let dev = hidden.device();
        Ok((
            Some(Tensor::from_vec(dh, (n, c), dev)?),
            dw.map(|dw| Tensor::from_vec(dw, (v, c), dev)).transpose()?,
            None,
        ))
    }
}

/// log softmax(h Wᵀ)[target] for each row, without materialising more than one N × V
/// buffer: hidden (N, C), weight (V, C), targets (N,) u32 → (N,), or (N, 2) with the
/// softmax entropy in column 1 when `with_entropy` (no gradient through it). CPU f32.
pub fn head_logprobs(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    with_entropy: bool,
) -> Result<Tensor> {
    head_logprobs_with_limits(
        hidden,
        weight,
        targets,
        with_entropy,
        KEEP_MAX,
        CHUNK_LOGITS,
    )
}

/// `head_logprobs` with explicit memory limits: the forward keeps its N × V
/// probabilities for the backward only up to `keep_max` logits, and otherwise works
/// in chunks of `chunk_logits` (tests use small limits to reach the chunked path).
pub fn head_logprobs_with_limits(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    with_entropy: bool,
    keep_max: usize,
    chunk_logits: usize,
) -> Result<Tensor> {
    let (n, _) = hidden.dims2()?;
    let v = weight.dim(0)?;
    // Keep the probabilities only when a backward will use them.
    let keep = (hidden.track_op() || weight.track_op()) && n * v <= keep_max;
    hidden.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &targets.contiguous()?,
        HeadLogprobsOp {
            with_entropy,
            kept: Mutex::new(None),
            keep,
            chunk_logits,
            weight_grad: weight.track_op(),
        },
    )
}
