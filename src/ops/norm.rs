//! Fused LayerNorm and RMSNorm over the last dimension, forward and backward.
//!
//! Backward, with x̂ = (x − μ)·r (LayerNorm) or x·r (RMSNorm), r the reciprocal
//! standard deviation (or RMS) of the row and g = dy·w:
//!   LayerNorm: dx = r·(g − mean(g) − x̂·mean(g·x̂)),  dw = Σ dy·x̂,  db = Σ dy
//!   RMSNorm:   dx = r·(g − x̂·mean(g·x̂)),            dw = Σ dy·x̂
//! (the standard derivation, e.g. llm.c's `layernorm_backward`).

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::simd::{self, simd_kernel};
use super::{f32_slice, filled, with_f32_all};

/// Rows per parallel chunk; fixed so that partial sums reduce in the same order.
const ROWS_PER_CHUNK: usize = 16;

/// Rows whose sums the AVX2 kernels carry together, one row per lane. A row's sum
/// over its C elements is one chain of dependent adds, which a row at a time leaves
/// the adder waiting on its latency; eight rows in the lanes of one vector take
/// eight chains at once, each still adding its row's elements in order (the same
/// bits as one row at a time).
const LANES: usize = 8;

#[derive(Clone, Copy)]
enum Kind {
    Layer,
    Rms,
}

/// (μ, r) of one row: its mean (0 for RMSNorm) and the reciprocal standard deviation
/// (or RMS), each sum taken over the row in order.
fn row_stats(kind: Kind, x: &[f32], eps: f32) -> (f32, f32) {
    let c = x.len() as f32;
    let mean = match kind {
        Kind::Layer => x.iter().sum::<f32>() / c,
        Kind::Rms => 0.0,
    };
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / c;
    (mean, 1.0 / (var + eps).sqrt())
}

/// (μ, r) of each row of `xs` (whole rows of width c): eight rows at once on AVX2
/// (`simd`), one at a time otherwise. The same bits either way.
fn block_stats(kind: Kind, xs: &[f32], c: usize, eps: f32, simd: bool) -> Vec<(f32, f32)> {
    #[cfg(target_arch = "x86_64")]
    if simd && c > 0 && xs.len() == LANES * c {
        // SAFETY: simd is only set where the CPU has AVX2 (`simd::has_avx2`); xs is
        // exactly LANES rows of c floats, as `avx2::stats` asserts.
        let (mean, r) = unsafe { avx2::stats(kind, xs, c, eps) };
        return mean.into_iter().zip(r).collect();
    }
    let _ = simd;
    xs.chunks(c).map(|x| row_stats(kind, x, eps)).collect()
}

/// (mean(g), mean(g·x̂)) of each row, g = dy·w and x̂ = (x − μ)·r, each sum in order.
fn block_grad_means(
    (xs, dys): (&[f32], &[f32]),
    w: &[f32],
    stats: &[(f32, f32)],
    simd: bool,
) -> Vec<(f32, f32)> {
    let c = w.len();
    #[cfg(target_arch = "x86_64")]
    if simd && c > 0 && xs.len() == LANES * c && dys.len() == LANES * c {
        // SAFETY: AVX2 is present where simd is set; xs and dy are LANES rows of
        // c = w.len() floats and stats has a pair per row, as `avx2::grad_means`
        // asserts.
        let (g, gx) = unsafe { avx2::grad_means(xs, dys, w, stats) };
        return g.into_iter().zip(gx).collect();
    }
    let _ = simd;
    xs.chunks(c)
        .zip(dys.chunks(c))
        .zip(stats)
        .map(|((x, dy), &(mean, r))| {
            let (mut mean_g, mut mean_gx) = (0f32, 0f32);
            for i in 0..c {
                let g = dy[i] * w[i];
                mean_g += g;
                mean_gx += g * ((x[i] - mean) * r);
            }
            (mean_g / c as f32, mean_gx / c as f32)
        })
        .collect()
}

simd_kernel! {
    /// y = x̂·w + b for one row (b = 0 for RMSNorm, added all the same).
    fn normalize_row(x: &[f32], stats: (f32, f32), w: &[f32], b: Option<&[f32]>, y: &mut [f32]) {
        let (mean, r) = stats;
        for i in 0..y.len().min(x.len()).min(w.len()) {
            y[i] = ((x[i] - mean) * r) * w[i] + b.map_or(0.0, |b| b[i]);
        }
    }
}

simd_kernel! {
    /// One row's dx, and its dy·x̂ and dy added into dw and db.
    fn row_backward(
        x_dy: (&[f32], &[f32]),
        w: &[f32],
        stats: (f32, f32),
        means: (f32, f32),
        dw: &mut [f32],
        db: &mut [f32],
        dx: &mut [f32],
    ) {
        let ((x, dy), (mean, r), (mean_g, mean_gx)) = (x_dy, stats, means);
        let c = w.len().min(x.len()).min(dy.len()).min(dw.len()).min(db.len()).min(dx.len());
        for i in 0..c {
            let xhat = (x[i] - mean) * r;
            dw[i] += dy[i] * xhat;
            db[i] += dy[i];
            dx[i] = r * (dy[i] * w[i] - mean_g - xhat * mean_gx);
        }
    }
}

/// Normalizes whole rows xs into ys, eight rows' statistics at a time on AVX2.
fn forward_rows(
    kind: Kind,
    (xs, ys): (&[f32], &mut [f32]),
    w: &[f32],
    b: Option<&[f32]>,
    eps: f32,
    simd: bool,
) {
    let c = w.len();
    let stats = block_stats(kind, xs, c, eps, simd);
    for ((x, y), st) in xs.chunks(c).zip(ys.chunks_mut(c)).zip(stats) {
        normalize_row(x, st, w, b, y);
    }
}

fn forward(kind: Kind, x: &[f32], w: &[f32], b: Option<&[f32]>, eps: f32) -> Vec<f32> {
    let c = w.len();
    let simd = simd::has_avx2();
    let (y, _) = filled(x.len(), LANES * c, |start, ys| {
        forward_rows(kind, (&x[start..start + ys.len()], ys), w, b, eps, simd)
    });
    y
}

/// One chunk of rows' dx (into dxs), and its own (dw, db): rows in order, eight rows'
/// sums at a time on AVX2.
fn backward_chunk(
    kind: Kind,
    (xs, dys, dxs): (&[f32], &[f32], &mut [f32]),
    w: &[f32],
    eps: f32,
    simd: bool,
) -> (Vec<f32>, Vec<f32>) {
    let c = w.len();
    let mut dw = vec![0f32; c];
    let mut db = vec![0f32; c];
    let blocks = xs
        .chunks(LANES * c)
        .zip(dys.chunks(LANES * c))
        .zip(dxs.chunks_mut(LANES * c));
    for ((xb, dyb), dxb) in blocks {
        let stats = block_stats(kind, xb, c, eps, simd);
        let means = block_grad_means((xb, dyb), w, &stats, simd);
        let rows = xb.chunks(c).zip(dyb.chunks(c)).zip(dxb.chunks_mut(c));
        for (((x, dy), dx), (st, (mean_g, mean_gx))) in rows.zip(stats.into_iter().zip(means)) {
            // RMSNorm has no mean to subtract: its dx has no mean(g) term.
            let mean_g = match kind {
                Kind::Layer => mean_g,
                Kind::Rms => 0.0,
            };
            row_backward((x, dy), w, st, (mean_g, mean_gx), &mut dw, &mut db, dx);
        }
    }
    (dw, db)
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
    let simd = simd::has_avx2();
    // Each piece of rows accumulates its own (dw, db); pieces are summed in order.
    let (dx, partials) = filled(x.len(), ROWS_PER_CHUNK * c, |start, dxs| {
        let rows = start..start + dxs.len();
        backward_chunk(kind, (&x[rows.clone()], &dy[rows], dxs), w, eps, simd)
    });
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

/// The sums of `row_stats` and `block_grad_means` for eight rows at once, one row per
/// lane: each block of eight columns is loaded row by row and transposed, so that lane
/// j adds row j's elements in order. No fused multiply-add: every product is rounded
/// before it is added, as in the scalar code.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Kind, LANES};
    use std::arch::x86_64::*;

    /// An 8×8 transpose: lane j of out[k] is lane k of r[j].
    #[inline(always)]
    unsafe fn transpose(r: [__m256; 8]) -> [__m256; 8] {
        let t0 = _mm256_unpacklo_ps(r[0], r[1]);
        let t1 = _mm256_unpackhi_ps(r[0], r[1]);
        let t2 = _mm256_unpacklo_ps(r[2], r[3]);
        let t3 = _mm256_unpackhi_ps(r[2], r[3]);
        let t4 = _mm256_unpacklo_ps(r[4], r[5]);
        let t5 = _mm256_unpackhi_ps(r[4], r[5]);
        let t6 = _mm256_unpacklo_ps(r[6], r[7]);
        let t7 = _mm256_unpackhi_ps(r[6], r[7]);
        let s0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let s1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let s2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let s3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let s4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let s5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let s6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let s7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        [
            _mm256_permute2f128_ps::<0x20>(s0, s4),
            _mm256_permute2f128_ps::<0x20>(s1, s5),
            _mm256_permute2f128_ps::<0x20>(s2, s6),
            _mm256_permute2f128_ps::<0x20>(s3, s7),
            _mm256_permute2f128_ps::<0x31>(s0, s4),
            _mm256_permute2f128_ps::<0x31>(s1, s5),
            _mm256_permute2f128_ps::<0x31>(s2, s6),
            _mm256_permute2f128_ps::<0x31>(s3, s7),
        ]
    }

    /// Columns i..i + 8 of the eight rows of width c at p: lane j of out[k] is
    /// element i + k of row j. Needs i + 8 ≤ c.
    #[inline(always)]
    unsafe fn columns(p: *const f32, c: usize, i: usize) -> [__m256; 8] {
        transpose(std::array::from_fn(|j| _mm256_loadu_ps(p.add(j * c + i))))
    }

    /// Column i of the eight rows (past the last whole block of eight columns).
    #[inline(always)]
    unsafe fn column(p: *const f32, c: usize, i: usize) -> __m256 {
        let at = |j: usize| *p.add(j * c + i);
        _mm256_setr_ps(at(0), at(1), at(2), at(3), at(4), at(5), at(6), at(7))
    }

    /// `acc` folded with f over every column of the eight rows at p, in order.
    #[inline(always)]
    unsafe fn fold(
        p: *const f32,
        c: usize,
        mut acc: __m256,
        mut f: impl FnMut(__m256, usize, __m256) -> __m256,
    ) -> __m256 {
        let mut i = 0;
        while i + 8 <= c {
            for (k, col) in columns(p, c, i).into_iter().enumerate() {
                acc = f(acc, i + k, col);
            }
            i += 8;
        }
        while i < c {
            acc = f(acc, i, column(p, c, i));
            i += 1;
        }
        acc
    }

    fn lanes(v: __m256) -> [f32; 8] {
        // SAFETY: an __m256 is eight f32s.
        unsafe { std::mem::transmute::<__m256, [f32; 8]>(v) }
    }

    /// (μ, r) of the eight rows of `x` (LANES rows of width c), as `row_stats`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn stats(kind: Kind, x: &[f32], c: usize, eps: f32) -> ([f32; 8], [f32; 8]) {
        assert!(
            c > 0 && x.len() == LANES * c,
            "norm: {} floats are not 8 rows of {c}",
            x.len()
        );
        let p = x.as_ptr();
        let n = _mm256_set1_ps(c as f32);
        // Σ starts at −0.0, as `Iterator::sum` does for floats.
        let neg_zero = _mm256_set1_ps(-0.0);
        let mean = match kind {
            Kind::Layer => _mm256_div_ps(fold(p, c, neg_zero, |s, _, v| _mm256_add_ps(s, v)), n),
            Kind::Rms => _mm256_setzero_ps(),
        };
        let sq = fold(p, c, neg_zero, |s, _, v| {
            let d = _mm256_sub_ps(v, mean);
            _mm256_add_ps(s, _mm256_mul_ps(d, d))
        });
        let var = _mm256_div_ps(sq, n);
        let r = _mm256_div_ps(
            _mm256_set1_ps(1.0),
            _mm256_sqrt_ps(_mm256_add_ps(var, _mm256_set1_ps(eps))),
        );
        (lanes(mean), lanes(r))
    }

    /// (mean(g), mean(g·x̂)) of the eight rows, as `block_grad_means`' scalar loop.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn grad_means(
        x: &[f32],
        dy: &[f32],
        w: &[f32],
        stats: &[(f32, f32)],
    ) -> ([f32; 8], [f32; 8]) {
        let c = w.len();
        assert!(
            c > 0 && x.len() == LANES * c && dy.len() == LANES * c && stats.len() == LANES,
            "norm: the backward's block is not 8 rows of {c}"
        );
        let mean = _mm256_setr_ps(
            stats[0].0, stats[1].0, stats[2].0, stats[3].0, stats[4].0, stats[5].0, stats[6].0,
            stats[7].0,
        );
        let r = _mm256_setr_ps(
            stats[0].1, stats[1].1, stats[2].1, stats[3].1, stats[4].1, stats[5].1, stats[6].1,
            stats[7].1,
        );
        let (px, pdy) = (x.as_ptr(), dy.as_ptr());
        let (mut sum_g, mut sum_gx) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut step = |i: usize, xv: __m256, dyv: __m256| {
            let g = _mm256_mul_ps(dyv, _mm256_set1_ps(w[i]));
            sum_g = _mm256_add_ps(sum_g, g);
            let xhat = _mm256_mul_ps(_mm256_sub_ps(xv, mean), r);
            sum_gx = _mm256_add_ps(sum_gx, _mm256_mul_ps(g, xhat));
        };
        let mut i = 0;
        while i + 8 <= c {
            let (xs, dys) = (columns(px, c, i), columns(pdy, c, i));
            for k in 0..8 {
                step(i + k, xs[k], dys[k]);
            }
            i += 8;
        }
        while i < c {
            step(i, column(px, c, i), column(pdy, c, i));
            i += 1;
        }
        let n = _mm256_set1_ps(c as f32);
        (
            lanes(_mm256_div_ps(sum_g, n)),
            lanes(_mm256_div_ps(sum_gx, n)),
        )
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// Rows of width c: random ones, with a row of +0.0, one of −0.0 (whose sums start
    /// at −0.0, as `Iterator::sum`'s), a constant one and a large-valued one among them.
    fn rows(rng: &mut rand_chacha::ChaCha8Rng, n: usize, c: usize) -> Vec<f32> {
        let mut x: Vec<f32> = (0..n * c).map(|_| rng.random_range(-3.0..3.0)).collect();
        let special: [&dyn Fn(usize) -> f32; 4] =
            [&|_| 0.0, &|_| -0.0, &|_| 1.25, &|i| 1e4 * (i as f32 - 3.0)];
        for (row, f) in x.chunks_mut(c).skip(1).step_by(2).zip(special) {
            for (i, v) in row.iter_mut().enumerate() {
                *v = f(i);
            }
        }
        x
    }

    /// Eight rows in the lanes of one vector give each row the bits of the row-at-a-
    /// time loop: statistics, outputs and all three gradients, for widths with and
    /// without a tail past the last block of eight columns and for partial blocks.
    #[test]
    fn eight_rows_at_once_have_the_bits_of_one_row_at_a_time() {
        if !simd::has_avx2() {
            eprintln!("skipped: this CPU has no AVX2 + FMA");
            return;
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        for kind in [Kind::Layer, Kind::Rms] {
            for c in [1, 5, 8, 13, 64, 256] {
                let w: Vec<f32> = (0..c).map(|_| rng.random_range(-2.0..2.0)).collect();
                let b: Vec<f32> = (0..c).map(|_| rng.random_range(-1.0..1.0)).collect();
                let bias = matches!(kind, Kind::Layer).then_some(b.as_slice());
                for n in [1, 7, 8, 9, 16] {
                    let x = rows(&mut rng, n, c);
                    let dy: Vec<f32> = (0..n * c).map(|_| rng.random_range(-1.0..1.0)).collect();
                    let what = format!("c {c}, {n} rows");
                    let [s1, s0] = [true, false].map(|simd| {
                        x.chunks(LANES * c)
                            .flat_map(|xs| block_stats(kind, xs, c, 1e-5, simd))
                            .flat_map(|(m, r)| [m.to_bits(), r.to_bits()])
                            .collect::<Vec<_>>()
                    });
                    assert_eq!(s1, s0, "statistics, {what}");
                    let [y1, y0] = [true, false].map(|simd| {
                        let mut y = vec![f32::NAN; n * c];
                        for (xs, ys) in x.chunks(LANES * c).zip(y.chunks_mut(LANES * c)) {
                            forward_rows(kind, (xs, ys), &w, bias, 1e-5, simd);
                        }
                        bits(&y)
                    });
                    assert_eq!(y1, y0, "forward, {what}");
                    let [g1, g0] = [true, false].map(|simd| {
                        let mut dx = vec![f32::NAN; n * c];
                        let (dw, db) = backward_chunk(kind, (&x, &dy, &mut dx), &w, 1e-5, simd);
                        [bits(&dx), bits(&dw), bits(&db)]
                    });
                    assert_eq!(g1, g0, "backward, {what}");
                }
            }
        }
    }
    /// `norms_keep_the_bits_of_the_row_at_a_time_code`'s fingerprints, computed by
    /// the row-at-a-time code (commit 8568150's src/ops/norm.rs with that test).
    const GOLDEN: [u64; 4] = [
        17715739819960714597,
        16432332572031053164,
        3890305694518907227,
        4196033069534974589,
    ];

    /// FNV-1a over the floats' bits.
    fn fingerprint(vs: &[&[f32]]) -> u64 {
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for x in vs.iter().flat_map(|v| v.iter()) {
            for byte in x.to_bits().to_le_bytes() {
                h = (h ^ byte as u64).wrapping_mul(0x0100_0000_01b3);
            }
        }
        h
    }

    /// LayerNorm and RMSNorm keep the bits of the row-at-a-time code they replaced
    /// (the fingerprints below are that code's, at commit 8568150): outputs and all
    /// three gradients, on the pool (≥ PARALLEL_MIN_WORK floats) and off it, with
    /// negative weights and rows whose dy is +0.0 or −0.0.
    #[test]
    fn norms_keep_the_bits_of_the_row_at_a_time_code() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let mut got = vec![];
        for kind in [Kind::Layer, Kind::Rms] {
            for (n, c) in [(160, 256), (37, 13)] {
                let x = rows(&mut rng, n, c);
                let w: Vec<f32> = (0..c).map(|_| rng.random_range(-2.0..2.0)).collect();
                let b: Vec<f32> = (0..c).map(|_| rng.random_range(-1.0..1.0)).collect();
                let mut dy: Vec<f32> = (0..n * c).map(|_| rng.random_range(-1.0..1.0)).collect();
                dy[..c].fill(0.0);
                dy[2 * c..3 * c].fill(-0.0);
                let bias = matches!(kind, Kind::Layer).then_some(b.as_slice());
                let y = forward(kind, &x, &w, bias, 1e-5);
                let (dx, dw, db) = backward(kind, &x, &w, &dy, 1e-5);
                got.push(fingerprint(&[&y, &dx, &dw, &db]));
            }
        }
        assert_eq!(got, GOLDEN);
    }
}
