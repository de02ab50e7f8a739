//! y = x·Wᵀ for a handful of rows (a decoding step), W stored (out, in) as in HF
//! checkpoints. Each block of four W rows is read once and multiplied against every
//! x row while it sits in L1, three x rows at a time (twelve independent 8-wide FMA
//! chains: enough to keep both FMA units busy, where one x row at a time left them
//! waiting on the FMA latency; 1.4–1.8× faster at 16 rows). With AVX2+FMA (detected
//! at run time) the inner loop is 8-wide fused multiply-add; otherwise a portable
//! loop. Every output is one accumulator over k in order whatever the blocking, so
//! the bits do not depend on how many rows come together (tests/ops.rs checks them
//! against a scalar model of this arithmetic).
//!
//! With AVX-512 and two rows or more, the same arithmetic runs two x rows per
//! register: x is packed in pairs once per call (`Packed`), and each 16-lane
//! accumulator holds one output's 8 lanes for x row 2p in its low half and for row
//! 2p + 1 in its high half, against W's 8 floats broadcast to both halves, so every
//! output still gets the same 8-lane FMA chain, `hsum` and tail, and the same bits
//! (`tests::avx512_kernel_has_the_bits_of_the_avx2_kernel`), in half the FMA
//! instructions (1.2–1.6× faster at 8 rows, `examples/bench_skinny 8`). One row
//! stays on the AVX2 kernel: half of every 16-lane FMA would be empty. A full block's
//! 32 horizontal sums are taken together by one network of shuffles and adds that
//! pairs the lanes as `hsum` does (`sums_of_eight_rows`): the same bits, 28
//! shuffles where the 32 `hsum`s took 96.
//!
//! The gemm crate's general kernels pack the weight for every call, which for n ≤ 16
//! rows costs more than the product itself (measured: 2–3× slower on GPT-2 shapes).

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{dot, f32_slice, PARALLEL_MIN_WORK};

/// W rows per parallel task.
const ROWS_PER_TASK: usize = 64;

/// x rows the kernel takes at a time (a multiple of the AVX2 kernel's three-row
/// blocks, and even: the AVX-512 kernel's panels start on a pair).
const X_PANEL: usize = 96;

struct SkinnyMatmul;

/// x's rows in pairs for the AVX-512 kernel, packed once per product (every task
/// reads them); `None` where that kernel does not run.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
struct Packed(Option<Vec<f32>>);

impl Packed {
    fn new(x: &[f32], inner: usize, n: usize) -> Packed {
        #[cfg(target_arch = "x86_64")]
        if n >= 2 && avx512::available() {
            return Packed(Some(avx512::pack(x, inner, n)));
        }
        let _ = (x, inner, n);
        Packed(None)
    }
}

/// Columns `o0..o0 + rows` of y (n, out) = x · Wᵀ for the W rows in `w` (a slice of
/// `rows` whole rows), x (n, in) and `packed` its pairs; `y` points at the whole
/// (n, out) output.
fn kernel(w: &[f32], x: &[f32], packed: &Packed, inner: usize, n: usize, y: Columns) {
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
        y.o0 + w.len() / inner <= y.out,
        "skinny matmul: W rows past the output's columns"
    );
    assert!(n <= y.n, "skinny matmul: x rows past the output's rows");
    #[cfg(not(target_arch = "x86_64"))]
    let _ = packed;
    #[cfg(target_arch = "x86_64")]
    {
        if let Packed(Some(xp)) = packed {
            assert_eq!(
                xp.len(),
                n.div_ceil(2) * 2 * (inner / 8 * 8),
                "skinny matmul: x packed for another shape"
            );
            // SAFETY: `Packed::new` packs only where `avx512::available()`; xp has the
            // length of x's ceil(n/2) pairs (asserted: every read stays inside it;
            // that it holds x's rows is `cpu_fwd`'s doing), and as for the AVX2
            // kernel below.
            unsafe { avx512::kernel(w, x, xp, inner, n, y) };
            return;
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above); the kernel
            // reads W rows below w.len() / inner and x rows below n, which the asserts
            // above keep inside `w` and `x`, and writes columns o0..o0 + rows < out
            // of the n rows of y (`Columns`' contract).
            unsafe { avx2::kernel(w, x, inner, n, y) };
            return;
        }
    }
    for (o, wrow) in w.chunks(inner).enumerate() {
        for (b, xrow) in x.chunks(inner).take(n).enumerate() {
            // SAFETY: b < n and o0 + o < out (asserted above).
            unsafe { y.set(b, o, dot(wrow, xrow)) };
        }
    }
}

/// The (n, out) output, shared by the parallel tasks: each writes only its own
/// columns `o0..o0 + its W rows`, so no two tasks touch the same float.
#[derive(Clone, Copy)]
struct Columns {
    ptr: *mut f32,
    n: usize,
    out: usize,
    /// First column of this task.
    o0: usize,
}

// SAFETY: tasks write disjoint columns (see `Columns`), and the buffer outlives them
// (`cpu_fwd` joins every task before it returns the buffer).
unsafe impl Send for Columns {}
unsafe impl Sync for Columns {}

impl Columns {
    /// The same output, from column `o0`.
    fn from(self, o0: usize) -> Columns {
        Columns { o0, ..self }
    }

    /// y[b, o0 + o] = v.
    ///
    /// # Safety
    /// b < n and o0 + o < out, and no other task writes that column.
    #[inline(always)]
    unsafe fn set(self, b: usize, o: usize, v: f32) {
        debug_assert!(b < self.n && self.o0 + o < self.out);
        *self.ptr.add(b * self.out + self.o0 + o) = v;
    }
}

/// Four outputs (W rows o..o+4 at `wp` against the x row at `xr`) from their 8-lane
/// sums `s`: the scalar tail past the last whole 8 columns added one column at a
/// time (a multiply, then an add), then written to row `row` of y. Both SIMD kernels
/// end every output of a whole block of four W rows here.
///
/// # Safety
/// `wp` points at 4 rows of `inner` floats and `xr` at one; row < n and o + 4 ≤ this
/// task's columns of `y`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn finish(
    mut s: [f32; 4],
    wp: *const f32,
    xr: *const f32,
    inner: usize,
    o: usize,
    row: usize,
    y: Columns,
) {
    for kk in inner / 8 * 8..inner {
        let xv = *xr.add(kk);
        for (r, sr) in s.iter_mut().enumerate() {
            *sr += *wp.add(r * inner + kk) * xv;
        }
    }
    for (r, sr) in s.iter().enumerate() {
        y.set(row, o + r, *sr);
    }
}

/// The W rows past the last whole block of four, one `dot` per output (both SIMD
/// kernels).
///
/// # Safety
/// `inner > 0`, `w` is whole rows of `inner`, n ≤ y's rows, and y's columns from
/// its first take `w`'s rows, none written by another task (`kernel` asserts the
/// sizes).
#[cfg(target_arch = "x86_64")]
unsafe fn remainder_rows(w: &[f32], x: &[f32], inner: usize, n: usize, y: Columns) {
    let rows = w.len() / inner;
    for o in rows / 4 * 4..rows {
        let wrow = &w[o * inner..(o + 1) * inner];
        for b in 0..n {
            // SAFETY: b < n ≤ y's rows and o0 + o < out (the contract above).
            unsafe { y.set(b, o, dot(wrow, &x[b * inner..(b + 1) * inner])) };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::Columns;
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn hsum(v: __m256) -> f32 {
        let hi = _mm256_extractf128_ps(v, 1);
        let lo = _mm256_castps256_ps128(v);
        let s = _mm_add_ps(hi, lo);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// Outputs of W rows o..o+4 against x rows b..b+NB: one 8-wide accumulator per
    /// output, running over k in order, then `hsum` and the scalar tail — the same
    /// arithmetic for every output whatever NB is, so the result does not depend on
    /// how the x rows are blocked. NB > 1 gives 4·NB independent FMA chains, enough to
    /// hide the FMA latency, and loads each W vector once for NB rows.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `wp` points at 4 rows of `inner` floats, `xp` at NB
    /// rows of `inner` floats; b + NB ≤ n and o + 4 ≤ this task's columns of `y`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn block<const NB: usize>(
        wp: *const f32,
        xp: *const f32,
        inner: usize,
        o: usize,
        b: usize,
        y: Columns,
    ) {
        let full = inner / 8 * 8;
        let mut acc = [[_mm256_setzero_ps(); NB]; 4];
        let mut k = 0;
        while k < full {
            let mut xv = [_mm256_setzero_ps(); NB];
            for (j, v) in xv.iter_mut().enumerate() {
                *v = _mm256_loadu_ps(xp.add(j * inner + k));
            }
            for (r, row) in acc.iter_mut().enumerate() {
                let wv = _mm256_loadu_ps(wp.add(r * inner + k));
                for (a, x) in row.iter_mut().zip(&xv) {
                    *a = _mm256_fmadd_ps(wv, *x, *a);
                }
            }
            k += 8;
        }
        // j picks the column of acc (its second axis), and the x row.
        #[allow(clippy::needless_range_loop)]
        for j in 0..NB {
            let s = [
                hsum(acc[0][j]),
                hsum(acc[1][j]),
                hsum(acc[2][j]),
                hsum(acc[3][j]),
            ];
            super::finish(s, wp, xp.add(j * inner), inner, o, b + j, y);
        }
    }

    /// # Safety
    /// The CPU has AVX2 and FMA; `inner > 0`, `w` is whole rows of `inner`, `x`
    /// holds at least `n * inner` floats and `y` has room for `w`'s rows as columns
    /// (`super::kernel` asserts these).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn kernel(w: &[f32], x: &[f32], inner: usize, n: usize, y: Columns) {
        let rows = w.len() / inner;
        // x rows in panels of X_PANEL, so that a panel stays in cache while every W
        // block of this task passes over it (many rows: a long prompt).
        let mut b0 = 0;
        while b0 < n {
            let end = (b0 + super::X_PANEL).min(n);
            let mut o = 0;
            while o + 4 <= rows {
                let wp = w.as_ptr().add(o * inner);
                let mut b = b0;
                while b + 3 <= end {
                    block::<3>(wp, x.as_ptr().add(b * inner), inner, o, b, y);
                    b += 3;
                }
                match end - b {
                    2 => block::<2>(wp, x.as_ptr().add(b * inner), inner, o, b, y),
                    1 => block::<1>(wp, x.as_ptr().add(b * inner), inner, o, b, y),
                    _ => {}
                }
                o += 4;
            }
            b0 = end;
        }
        // SAFETY: this kernel's own contract.
        super::remainder_rows(w, x, inner, n, y);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::avx2::hsum;
    use super::Columns;
    use std::arch::x86_64::*;

    /// AVX-512F, AVX2 and FMA on this CPU (`hsum` is the AVX2 kernel's).
    pub(super) fn available() -> bool {
        std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
    }

    /// Outputs of W rows o..o+4 against x rows b..b+nb (nb ≤ 2·NP), the rows taken
    /// in pairs from `xp`, x's first `full` columns packed pair by pair (`pack`).
    /// Accumulator [r][p]'s low half is avx2's accumulator for (W row r, x row 2p),
    /// its high half the one for row 2p + 1: the same FMAs lane for lane, then the
    /// same `hsum` (for a full block of eight rows, `sums_of_eight_rows`: the same
    /// additions) and scalar tail (read from `x`), so the same bits.
    ///
    /// # Safety
    /// The CPU has AVX-512F, AVX2 and FMA; `wp` points at 4 rows of `inner` floats,
    /// `xp` at NP packed pairs (2·full floats each), `x` at nb rows of `inner`
    /// floats; b + nb ≤ n and o + 4 ≤ this task's columns of `y`.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block<const NP: usize>(
        wp: *const f32,
        xp: *const f32,
        x: *const f32,
        inner: usize,
        nb: usize,
        o: usize,
        b: usize,
        y: Columns,
    ) {
        let full = inner / 8 * 8;
        let mut acc = [[_mm512_setzero_ps(); NP]; 4];
        let mut k = 0;
        while k < full {
            let mut xv = [_mm512_setzero_ps(); NP];
            for (p, v) in xv.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(xp.add(p * 2 * full + 2 * k));
            }
            for (r, row) in acc.iter_mut().enumerate() {
                // vbroadcastf64x4 (AVX-512F; the f32x8 form is AVX-512DQ's): a move.
                let w8 = _mm256_castps_pd(_mm256_loadu_ps(wp.add(r * inner + k)));
                let wv = _mm512_castpd_ps(_mm512_broadcast_f64x4(w8));
                for (a, xr) in row.iter_mut().zip(&xv) {
                    *a = _mm512_fmadd_ps(wv, *xr, *a);
                }
            }
            k += 8;
        }
        if NP == 4 && nb == 8 {
            // v[i], i = 4·r + p: W row r, x rows 2p (lanes 0..8) and 2p + 1 (8..16).
            let s = sums_of_eight_rows(std::array::from_fn(|i| acc[i / 4][i % 4]));
            for (j, sj) in s.iter().enumerate() {
                super::finish(*sj, wp, x.add(j * inner), inner, o, b + j, y);
            }
            return;
        }
        for j in 0..nb {
            let half = |v: __m512| {
                if j % 2 == 0 {
                    _mm512_castps512_ps256(v)
                } else {
                    _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))
                }
            };
            let p = j / 2;
            let s = [
                hsum(half(acc[0][p])),
                hsum(half(acc[1][p])),
                hsum(half(acc[2][p])),
                hsum(half(acc[3][p])),
            ];
            super::finish(s, wp, x.add(j * inner), inner, o, b + j, y);
        }
    }

    /// `hsum` of every half of a full block's sixteen accumulators (v[4·W row + pair]),
    /// as s[x row][W row], in 42 shuffles and adds instead of 32 `hsum`s (at GPT-2
    /// tiny's width of 256 an output's 16 FMAs met 3–4 `hsum` shuffles on the port
    /// that runs half of them).
    /// The adds pair the lanes as `hsum` does, each sum ((l0+l4)+(l2+l6)) +
    /// ((l1+l5)+(l3+l7)), so the bits are `hsum`'s (an add's operands commute
    /// exactly): first each 4-lane chunk (one output's lanes 0..4 or 4..8) meets
    /// its other half, then lanes k and k + 2 of a chunk, then lanes k and k + 1.
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn sums_of_eight_rows(v: [__m512; 16]) -> [[f32; 4]; 8] {
        // w[m]'s chunk c: output (v[2m + c/2], half c % 2), lanes k + (k + 4).
        let w: [__m512; 8] = std::array::from_fn(|m| {
            let (a, b) = (v[2 * m], v[2 * m + 1]);
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0xDD>(a, b),
                _mm512_shuffle_f32x4::<0x88>(a, b),
            )
        });
        // z[q]'s chunk c: w[2q]'s chunk c summed to lanes 0..2, w[2q + 1]'s to 2..4.
        let z: [__m512; 4] = std::array::from_fn(|q| {
            let (a, b) = (w[2 * q], w[2 * q + 1]);
            _mm512_add_ps(
                _mm512_shuffle_ps::<0x44>(a, b),
                _mm512_shuffle_ps::<0xEE>(a, b),
            )
        });
        // f[h]'s lane 4c + j: the whole sum of w[4h + j]'s chunk c.
        let mut lanes = [0f32; 32];
        for h in 0..2 {
            let (a, b) = (z[2 * h], z[2 * h + 1]);
            let f = _mm512_add_ps(
                _mm512_shuffle_ps::<0x88>(a, b),
                _mm512_shuffle_ps::<0xDD>(a, b),
            );
            _mm512_storeu_ps(lanes.as_mut_ptr().add(16 * h), f);
        }
        let mut s = [[0f32; 4]; 8];
        for (l, &sum) in lanes.iter().enumerate() {
            let (h, c, j) = (l / 16, l % 16 / 4, l % 4);
            let i = 2 * (4 * h + j) + c / 2; // v's index
            s[2 * (i % 4) + c % 2][i / 4] = sum;
        }
        s
    }

    /// x's first `full` columns, two rows interleaved eight floats at a time: pair p
    /// holds rows 2p and 2p + 1 as [row 2p k..k+8, row 2p+1 k..k+8] for each k, the
    /// high half of a last odd row zero (its outputs are not written).
    pub(super) fn pack(x: &[f32], inner: usize, n: usize) -> Vec<f32> {
        let full = inner / 8 * 8;
        let mut xp = vec![0f32; n.div_ceil(2) * 2 * full];
        for (j, row) in x.chunks(inner).take(n).enumerate() {
            let pair = &mut xp[j / 2 * 2 * full..][..2 * full];
            for (c, v) in row[..full].chunks_exact(8).enumerate() {
                pair[c * 16 + j % 2 * 8..][..8].copy_from_slice(v);
            }
        }
        xp
    }

    /// # Safety
    /// The CPU has AVX-512F, AVX2 and FMA (`available`); `inner > 0`, `w` is whole
    /// rows of `inner`, `x` holds at least `n * inner` floats, `xp` is as long as
    /// `pack(x, inner, n)` and `y` has room for n rows and `w`'s rows as columns
    /// (`super::kernel` asserts these; that `xp` holds x's rows is `cpu_fwd`'s
    /// doing, and only the values depend on it).
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn kernel(
        w: &[f32],
        x: &[f32],
        xp: &[f32],
        inner: usize,
        n: usize,
        y: Columns,
    ) {
        let rows = w.len() / inner;
        let full = inner / 8 * 8;
        // Panels of X_PANEL x rows (even, so a panel starts on a pair), as avx2's.
        const { assert!(super::X_PANEL.is_multiple_of(2)) };
        let mut b0 = 0;
        while b0 < n {
            let end = (b0 + super::X_PANEL).min(n);
            let mut o = 0;
            while o + 4 <= rows {
                let wp = w.as_ptr().add(o * inner);
                let mut b = b0;
                while b < end {
                    let nb = (end - b).min(8);
                    let (xpb, xb) = (xp.as_ptr().add(b * full), x.as_ptr().add(b * inner));
                    match nb.div_ceil(2) {
                        4 => block::<4>(wp, xpb, xb, inner, nb, o, b, y),
                        3 => block::<3>(wp, xpb, xb, inner, nb, o, b, y),
                        2 => block::<2>(wp, xpb, xb, inner, nb, o, b, y),
                        _ => block::<1>(wp, xpb, xb, inner, nb, o, b, y),
                    }
                    b += nb;
                }
                o += 4;
            }
            b0 = end;
        }
        // SAFETY: this kernel's own contract.
        super::remainder_rows(w, x, inner, n, y);
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
        let mut y = vec![0f32; n * out]; // (n, out)
        let packed = Packed::new(x, inner, n);
        let columns = Columns {
            ptr: y.as_mut_ptr(),
            n,
            out,
            o0: 0,
        };
        if out * inner * n >= PARALLEL_MIN_WORK * 8 {
            w.par_chunks(ROWS_PER_TASK * inner)
                .enumerate()
                .for_each(|(t, wc)| {
                    let o0 = t * ROWS_PER_TASK;
                    kernel(wc, x, &packed, inner, n, columns.from(o0))
                });
        } else {
            kernel(w, x, &packed, inner, n, columns);
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

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// y (n, out) = x·Wᵀ by one of the kernels, on a single task.
    fn product(avx512: bool, w: &[f32], x: &[f32], inner: usize, n: usize) -> Vec<f32> {
        let out = w.len() / inner;
        let mut y = vec![f32::NAN; n * out];
        let columns = Columns {
            ptr: y.as_mut_ptr(),
            n,
            out,
            o0: 0,
        };
        // SAFETY: the caller checks the CPU's features; w is `out` whole rows, x
        // `n` rows packed by `pack`, and y (n, out) takes every column.
        unsafe {
            if avx512 {
                avx512::kernel(w, x, &avx512::pack(x, inner, n), inner, n, columns)
            } else {
                avx2::kernel(w, x, inner, n, columns)
            }
        };
        y
    }

    #[test]
    fn avx512_kernel_has_the_bits_of_the_avx2_kernel() {
        if !avx512::available() {
            eprintln!("skipped: this CPU has no AVX-512F");
            return;
        }
        let mut seed = 0x2545_f491_u32;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            (seed as f32 / u32::MAX as f32 - 0.5) * 4.0
        };
        // Row counts on both sides of a pair, a block of eight and a panel of 96;
        // widths with and without a tail; outputs with and without a remainder row.
        for &n in &[1, 2, 3, 7, 8, 9, 15, 16, 17, 97, 100] {
            for &inner in &[1, 7, 8, 9, 24, 31, 256] {
                for &out in &[1, 4, 5, 11, 64] {
                    let w: Vec<f32> = (0..out * inner).map(|_| next()).collect();
                    let x: Vec<f32> = (0..n * inner).map(|_| next()).collect();
                    let a = product(false, &w, &x, inner, n);
                    let b = product(true, &w, &x, inner, n);
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&a), bits(&b), "n {n}, inner {inner}, out {out}");
                    assert!(a.iter().all(|v| v.is_finite()), "every output written");
                }
            }
        }
    }
}
