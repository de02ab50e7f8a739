//! One vector against many rows of a matrix, as attention reads its keys and values:
//! `dots` scores a query against the visible keys, `add_weighted_rows` sums the
//! visible values by their weights into an output row.
//!
//! `ops::dot` and `ops::axpy` do the same one row at a time, and what the compiler
//! makes of them is latency-bound: a query's score against one key of 64 floats is
//! one chain of eight dependent adds, and `y += α·x` loads and stores `y` for every
//! row. Written with AVX2 intrinsics (the compiler spread a four-row version of
//! `dot` over 128-bit lanes, session 15), eight keys are scored at once on eight
//! independent chains (four, session 16–19, left the adds waiting on their latency),
//! and the output row stays in registers across all the rows.
//!
//! **The bits are those of `dot` and `axpy`**, so nothing that calls them moves:
//! each lane accumulates `acc + x·y` (a multiply, then an add: no FMA, as the
//! compiler builds `dot`) in the same order, and the eight lanes are summed as `dot`
//! sums them, ((a0 + a4) + (a1 + a5)) + ((a2 + a6) + (a3 + a7)). Where AVX2 is
//! missing or the row length is not a multiple of 8, the same loops run through
//! `dot` and `axpy`. The tests check the AVX2 path (on a CPU that has it) and the
//! fallback bit for bit against them.

use super::{axpy, dot};

/// `out[i] = scale · dot(a, m[base + keys[i]·n ..][..n])` for every i, where n =
/// `a.len()`: the bits of `dot`, times `scale`. `out` is cleared first.
#[inline]
pub(crate) fn dots(
    a: &[f32],
    m: &[f32],
    base: usize,
    keys: &[usize],
    scale: f32,
    out: &mut Vec<f32>,
) {
    let n = a.len();
    assert!(
        in_bounds(m.len(), base, keys, n),
        "dots: a row is past the matrix"
    );
    out.clear();
    #[cfg(target_arch = "x86_64")]
    if n.is_multiple_of(8) && super::simd::has_avx2() {
        out.resize(keys.len(), 0.0);
        // SAFETY: the CPU has AVX2 and FMA; `base` and every row read lie in `m` (asserted
        // above), `a` and each row have n floats, and `out` has one slot per key.
        unsafe { avx2::dots(a, m, base, keys, scale, out) };
        return;
    }
    out.extend(
        keys.iter()
            .map(|&j| scale * dot(a, &m[base + j * n..][..n])),
    );
}

/// `y += w[i] · m[base + keys[i]·n ..][..n]` for i in order, n = `y.len()`: the bits
/// of one `axpy` per row.
#[inline]
pub(crate) fn add_weighted_rows(w: &[f32], m: &[f32], base: usize, keys: &[usize], y: &mut [f32]) {
    let n = y.len();
    assert_eq!(w.len(), keys.len(), "add_weighted_rows: one weight per row");
    assert!(
        in_bounds(m.len(), base, keys, n),
        "add_weighted_rows: a row is past the matrix"
    );
    #[cfg(target_arch = "x86_64")]
    if n.is_multiple_of(8) && super::simd::has_avx2() {
        // SAFETY: the CPU has AVX2 and FMA; `base` and every row read lie in `m` (asserted
        // above) and have n floats, as `y` has.
        unsafe { avx2::add_weighted_rows(w, m, base, keys, y) };
        return;
    }
    for (&j, &wi) in keys.iter().zip(w) {
        axpy(wi, &m[base + j * n..][..n], y);
    }
}

/// Whether `base` and every row `base + j·n .. + n` for j in `keys` lie within a
/// matrix of `len` floats (checked arithmetic: no wrap-around lets a row slip past).
fn in_bounds(len: usize, base: usize, keys: &[usize], n: usize) -> bool {
    let end = keys.iter().max().map_or(Some(base), |&j| {
        j.checked_add(1)
            .and_then(|r| r.checked_mul(n))
            .and_then(|e| e.checked_add(base))
    });
    base <= len && end.is_some_and(|e| e <= len)
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// The eight lanes of `acc` summed as `ops::dot` sums its accumulators:
    /// s = lo + hi = [a0+a4, a1+a5, a2+a6, a3+a7], then (s0 + s1) + (s2 + s3), for
    /// four accumulators at once (two rounds of `hadd`, whose pairs are those).
    #[inline(always)]
    unsafe fn sum4(acc: [__m256; 4]) -> __m128 {
        let s = acc.map(|a| _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1)));
        _mm_hadd_ps(_mm_hadd_ps(s[0], s[1]), _mm_hadd_ps(s[2], s[3]))
    }

    /// See `super::dots`; n = a.len() is a multiple of 8 and `out` has keys.len() slots.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dots(
        a: &[f32],
        m: &[f32],
        base: usize,
        keys: &[usize],
        scale: f32,
        out: &mut [f32],
    ) {
        let n = a.len();
        let (pa, pm) = (a.as_ptr(), m.as_ptr().add(base));
        // `dot` then adds its (empty) tail, +0.0: that changes no bit here, since lanes
        // that start at +0.0 never sum to −0.0, so it is left out.
        let scale4 = _mm_set1_ps(scale);
        // Eight keys at a time: eight independent add chains (four left the adds
        // waiting on their latency), the query's chunk loaded once for all eight.
        let mut octets = keys.chunks_exact(8);
        let mut o8 = out.chunks_exact_mut(8);
        for (js, os) in (&mut octets).zip(&mut o8) {
            keys_block::<8>(pa, pm, n, js, scale4, os);
        }
        let (keys, out) = (octets.remainder(), o8.into_remainder());
        let mut quads = keys.chunks_exact(4);
        let mut o = out.chunks_exact_mut(4);
        for (js, os) in (&mut quads).zip(&mut o) {
            keys_block::<4>(pa, pm, n, js, scale4, os);
        }
        for (&j, os) in quads.remainder().iter().zip(o.into_remainder()) {
            let row = pm.add(j * n);
            let mut acc = _mm256_setzero_ps();
            for c in (0..n).step_by(8) {
                let y = _mm256_loadu_ps(row.add(c));
                acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_loadu_ps(pa.add(c)), y));
            }
            *os = scale * _mm_cvtss_f32(sum4([acc; 4]));
        }
    }

    /// The scores of the N keys `js` (N a multiple of 4), one add chain each, summed
    /// four at a time by `sum4`, times `scale4`, into `os`.
    #[inline(always)]
    unsafe fn keys_block<const N: usize>(
        pa: *const f32,
        pm: *const f32,
        n: usize,
        js: &[usize],
        scale4: __m128,
        os: &mut [f32],
    ) {
        let rows: [*const f32; N] = std::array::from_fn(|r| pm.add(js[r] * n));
        let mut acc = [_mm256_setzero_ps(); N];
        for c in (0..n).step_by(8) {
            let x = _mm256_loadu_ps(pa.add(c));
            for r in 0..N {
                let y = _mm256_loadu_ps(rows[r].add(c));
                acc[r] = _mm256_add_ps(acc[r], _mm256_mul_ps(x, y));
            }
        }
        for (g, out) in os[..N].chunks_exact_mut(4).enumerate() {
            let s = sum4([acc[4 * g], acc[4 * g + 1], acc[4 * g + 2], acc[4 * g + 3]]);
            _mm_storeu_ps(out.as_mut_ptr(), _mm_mul_ps(scale4, s));
        }
    }

    /// See `super::add_weighted_rows`; n = y.len() is a multiple of 8. The output is
    /// taken up to 64 floats (eight registers) at a time, each block held in
    /// registers while every row is added to it.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn add_weighted_rows(
        w: &[f32],
        m: &[f32],
        base: usize,
        keys: &[usize],
        y: &mut [f32],
    ) {
        let n = y.len();
        let pm = m.as_ptr().add(base);
        let mut c = 0;
        while c + 64 <= n {
            block::<8>(w, pm.add(c), n, keys, y.as_mut_ptr().add(c));
            c += 64;
        }
        while c < n {
            block::<1>(w, pm.add(c), n, keys, y.as_mut_ptr().add(c));
            c += 8;
        }
    }

    /// y[..8·V] += Σ_i w[i] · row_i[..8·V] in order, row i at `m + keys[i]·n`.
    #[inline(always)]
    unsafe fn block<const V: usize>(
        w: &[f32],
        m: *const f32,
        n: usize,
        keys: &[usize],
        y: *mut f32,
    ) {
        let mut acc: [__m256; V] = std::array::from_fn(|v| _mm256_loadu_ps(y.add(8 * v)));
        for (&j, &wi) in keys.iter().zip(w) {
            let (wv, row) = (_mm256_set1_ps(wi), m.add(j * n));
            for (v, a) in acc.iter_mut().enumerate() {
                *a = _mm256_add_ps(*a, _mm256_mul_ps(wv, _mm256_loadu_ps(row.add(8 * v))));
            }
        }
        for (v, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(y.add(8 * v), *a);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Row lengths on the AVX2 path (multiples of 8, below, at and past one block of
    /// 64) and off it; key lists of 0–20 keys (every length mod 8, past two blocks of
    /// eight), repeats and gaps among them;
    /// values with signed zeros and a wide range of magnitudes.
    #[test]
    fn dots_and_weighted_rows_have_the_bits_of_dot_and_axpy() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let mut cases = 0;
        for &n in &[8usize, 16, 24, 64, 72, 128, 136, 12, 5] {
            for nkeys in 0..21 {
                let rows = 20;
                let base = rng.random_range(0..3) * n;
                let value = |rng: &mut rand_chacha::ChaCha8Rng| -> f32 {
                    match rng.random_range(0..10) {
                        0 => 0.0,
                        1 => -0.0,
                        _ => rng.random_range(-1.0f32..1.0) * 10f32.powi(rng.random_range(-6..6)),
                    }
                };
                let m: Vec<f32> = (0..base + rows * n).map(|_| value(&mut rng)).collect();
                let a: Vec<f32> = (0..n).map(|_| value(&mut rng)).collect();
                let keys: Vec<usize> = (0..nkeys).map(|_| rng.random_range(0..rows)).collect();
                let w: Vec<f32> = (0..nkeys).map(|_| value(&mut rng)).collect();
                let scale = rng.random_range(0.1f32..2.0);

                let mut got = vec![1.0; 3];
                dots(&a, &m, base, &keys, scale, &mut got);
                let want: Vec<f32> = keys
                    .iter()
                    .map(|&j| scale * dot(&a, &m[base + j * n..][..n]))
                    .collect();
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "dots, n = {n}, {nkeys} keys");

                let mut y: Vec<f32> = (0..n).map(|_| value(&mut rng)).collect();
                let mut want = y.clone();
                add_weighted_rows(&w, &m, base, &keys, &mut y);
                for (&j, &wi) in keys.iter().zip(&w) {
                    axpy(wi, &m[base + j * n..][..n], &mut want);
                }
                assert_eq!(
                    bits(&y),
                    bits(&want),
                    "add_weighted_rows, n = {n}, {nkeys} keys"
                );
                cases += 1;
            }
        }
        assert_eq!(cases, 9 * 21);
    }

    #[test]
    #[should_panic(expected = "past the matrix")]
    fn a_base_past_the_matrix_is_refused_even_without_keys() {
        dots(&[1.0; 8], &[0.0; 8], 9, &[], 1.0, &mut vec![]);
    }

    #[test]
    #[should_panic(expected = "past the matrix")]
    fn a_row_past_the_matrix_is_refused() {
        add_weighted_rows(&[1.0], &[0.0; 16], 8, &[1], &mut [0.0; 8]);
    }
}
