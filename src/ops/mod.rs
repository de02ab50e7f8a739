//! CPU kernels with their own backward pass, as candle custom ops: the dense layer, fused LayerNorm,
//! RMSNorm, causal attention, GELU/SwiGLU and the LM head with its per-token
//! log-probabilities. The model code calls them through `model::layers`,
//! which falls back to the composite candle ops on other devices; the composite
//! versions are also the references the kernels are tested against.
//!
//! Parallel loops split work into fixed chunks and reduce partial sums in chunk order,
//! so results are bit-identical from run to run (resumed training depends on it).

pub mod activation;
pub mod amx;
pub mod attention;
pub mod dense;
pub mod lm_head;
pub mod lora;
pub mod matmul;
pub mod norm;
pub(crate) mod rows;
pub(crate) mod simd;

use candle_core::{CpuStorage, DType, Layout, Result, Storage, Tensor};
use rayon::prelude::*;
use std::cell::Cell;

thread_local! {
    static FUSED: Cell<bool> = const { Cell::new(true) };
    static ROW_INDEPENDENT: Cell<bool> = const { Cell::new(false) };
}

/// Whether the model code should run these kernels for `t`: a CPU f32 tensor, and not
/// inside `with_composite`.
pub fn fused_for(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32 && FUSED.with(Cell::get)
}

/// Runs `f` with the composite candle ops instead of the fused kernels on this thread
/// (the whole-model reference the kernels are tested against).
pub fn with_composite<R>(f: impl FnOnce() -> R) -> R {
    with_flag(&FUSED, false, f)
}

/// Runs `f` with a thread-local flag set to `value`, restoring it afterwards (also
/// when `f` panics).
fn with_flag<R>(
    flag: &'static std::thread::LocalKey<Cell<bool>>,
    value: bool,
    f: impl FnOnce() -> R,
) -> R {
    struct Restore(&'static std::thread::LocalKey<Cell<bool>>, bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            self.0.with(|c| c.set(self.1));
        }
    }
    let _restore = Restore(flag, flag.with(|c| c.replace(value)));
    f()
}

/// Whether `Linear` should run the skinny kernel for every row count on this thread
/// (inside `with_row_independent_products`).
pub fn row_independent_products() -> bool {
    ROW_INDEPENDENT.with(Cell::get)
}

/// Runs `f` with every dense-layer product of this thread on the skinny kernel
/// (`matmul::skinny_matmul`), whose bits do not depend on how many rows come
/// together: a prompt fed in one forward, in chunks or beside other sequences gives
/// the same hidden states. Inference only (serving, `rlhf generate`): it is also
/// 1.0–3.6× faster than gemm up to 256 rows on small layers (gemm packs the
/// weight on every call; `examples/bench_skinny ROWS`), while training keeps gemm.
pub fn with_row_independent_products<R>(f: impl FnOnce() -> R) -> R {
    with_flag(&ROW_INDEPENDENT, true, f)
}

/// Below this many multiply-adds a kernel runs on the calling thread: waking the
/// thread pool costs more than it saves (decoding steps on small models).
pub(crate) const PARALLEL_MIN_WORK: usize = 1 << 15;

/// The f32 data of a contiguous tensor argument.
pub(crate) fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&s.as_slice::<f32>()?[start..end]),
        None => candle_core::bail!("{what}: expected a contiguous f32 tensor"),
    }
}

/// Σ aᵢ·bᵢ with eight independent accumulators, so that the compiler vectorises it.
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut tail = 0f32;
    for (x, y) in ar.iter().zip(br) {
        tail += x * y;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// y += α·x
#[inline(always)]
pub(crate) fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += alpha * xi;
    }
}

/// Runs `f` on the f32 data of several CPU tensors at once, without copying them
/// (when they are contiguous): the backward passes' inputs.
pub(crate) fn with_f32_all<R>(ts: &[&Tensor], f: impl FnOnce(&[&[f32]]) -> Result<R>) -> Result<R> {
    let ts: Vec<Tensor> = ts.iter().map(|t| t.contiguous()).collect::<Result<_>>()?;
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(guards.len());
    for (storage, layout) in &guards {
        match &**storage {
            Storage::Cpu(s) => slices.push(f32_slice(s, layout, "tensor")?),
            _ => candle_core::bail!("CPU tensors only"),
        }
    }
    f(&slices)
}

/// dst (m × n, row-major) = [dst +] a (m × k) · b (k × n), each operand given by its
/// row and column strides: every product of training goes through here (gemm's
/// kernels, on the pool's threads above 2¹⁶ multiply-adds, or AMX tiles under
/// `--bf16`). Public for `examples/bench_gemm`; shapes and strides whose extents
/// overflow are refused (a panic), as are strides past `isize::MAX`.
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    accumulate: bool,
    a: &[f32],
    a_strides: (usize, usize),
    b: &[f32],
    b_strides: (usize, usize),
) {
    let len = m.checked_mul(n).expect("gemm: m·n overflows");
    assert!(dst.len() >= len, "gemm: destination too small");
    // SAFETY: dst holds m·n initialised floats (asserted).
    unsafe {
        gemm_raw(
            (m, n, k),
            dst.as_mut_ptr(),
            accumulate,
            (a, a_strides),
            (b, b_strides),
        )
    }
}

/// a (m × k) · b (k × n) into a new (m × n) row-major vector, whose memory is never
/// zero-filled first: without `accumulate`, gemm writes every element of its
/// destination (zeros when k = 0) and reads none. (`vec![0.0; m·n]` would be a
/// memset on the calling thread alone, while the pool's other threads wait.)
pub(crate) fn gemm_new(
    (m, n, k): (usize, usize, usize),
    (a, a_strides): (&[f32], (usize, usize)),
    (b, b_strides): (&[f32], (usize, usize)),
) -> Vec<f32> {
    gemm_into_spare(Vec::new(), (m, n, k), (a, a_strides), (b, b_strides))
}

/// `gemm_new` in the spare capacity of `dst` (emptied first): the tests hand it memory
/// full of NaN.
fn gemm_into_spare(
    mut dst: Vec<f32>,
    (m, n, k): (usize, usize, usize),
    (a, a_strides): (&[f32], (usize, usize)),
    (b, b_strides): (&[f32], (usize, usize)),
) -> Vec<f32> {
    let len = m.checked_mul(n).expect("gemm: m·n overflows");
    dst.clear();
    dst.reserve(len);
    // SAFETY: `dst` has room for m·n floats; gemm without `accumulate` writes all of
    // them before `set_len` makes them readable, and reads none.
    unsafe {
        gemm_raw(
            (m, n, k),
            dst.spare_capacity_mut()[..len].as_mut_ptr().cast(),
            false,
            (a, a_strides),
            (b, b_strides),
        );
        dst.set_len(len);
    }
    dst
}

/// dst = [dst +] a · b through the gemm crate, on the pool's threads when the
/// product is large enough; in bf16 on AMX tiles under `--bf16` on the CPU (`amx`).
///
/// # Safety
/// `dst` points to m·n floats, initialised if `accumulate`.
unsafe fn gemm_raw(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    accumulate: bool,
    (a, (a_rs, a_cs)): (&[f32], (usize, usize)),
    (b, (b_rs, b_cs)): (&[f32], (usize, usize)),
) {
    // The last element of a (rows × cols) operand, in checked arithmetic: no
    // wrap-around lets a read slip past the slice.
    let last = |rows: usize, cols: usize, (rs, cs): (usize, usize)| {
        (rows - 1)
            .checked_mul(rs)
            .and_then(|r| (cols - 1).checked_mul(cs).and_then(|c| r.checked_add(c)))
    };
    assert!(m == 0 || k == 0 || last(m, k, (a_rs, a_cs)).is_some_and(|e| e < a.len()));
    assert!(k == 0 || n == 0 || last(k, n, (b_rs, b_cs)).is_some_and(|e| e < b.len()));
    assert!(
        [a_rs, a_cs, b_rs, b_cs]
            .iter()
            .all(|&s| isize::try_from(s).is_ok()),
        "gemm: a stride past isize::MAX"
    );
    // Under `--bf16` on the CPU every product here runs on AMX, whatever its size: a
    // row's precision must not depend on how many rows share its call (PPO's old
    // log-probs are scored in chunks, its new ones in one call).
    if amx::autocast() {
        // SAFETY: autocast on the CPU is set only where `amx::available()`; the asserts
        // above and the caller's contract are `amx::gemm`'s.
        unsafe {
            amx::gemm(
                (m, n, k),
                dst,
                accumulate,
                (a, (a_rs, a_cs)),
                (b, (b_rs, b_cs)),
            )
        };
        return;
    }
    let threads = rayon::current_num_threads();
    let par = if m.saturating_mul(n).saturating_mul(k) >= 1 << 16 && threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above keep every read of a and b in bounds; the caller
    // gives m·n floats at dst.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

/// `row` repeated `n` times, written by all of the pool's threads when large (as
/// `zeros`; `[T]::repeat` copies on the calling thread alone).
pub(crate) fn repeat_rows(row: &[f32], n: usize) -> Vec<f32> {
    let c = row.len();
    let len = c.checked_mul(n).expect("repeat_rows: length overflows");
    if len < PARALLEL_MIN_WORK {
        return row.repeat(n);
    }
    repeat_rows_into_spare(Vec::new(), row, n)
}

/// `repeat_rows` in the spare capacity of `v` (emptied first), on the pool.
fn repeat_rows_into_spare(mut v: Vec<f32>, row: &[f32], n: usize) -> Vec<f32> {
    let c = row.len();
    let len = c.checked_mul(n).expect("repeat_rows: length overflows");
    v.clear();
    if len == 0 {
        return v;
    }
    v.reserve(len);
    let rows_per_piece = (ZERO_PIECE / c).max(1);
    v.spare_capacity_mut()[..len]
        .par_chunks_mut(rows_per_piece * c)
        .for_each(|piece| {
            for out in piece.chunks_exact_mut(c) {
                for (o, &x) in out.iter_mut().zip(row) {
                    o.write(x);
                }
            }
        });
    // SAFETY: the pieces cover the first len floats, each a whole number of rows of
    // c (len is a multiple of c), and every float of every row was written above.
    unsafe { v.set_len(len) };
    v
}

/// Floats per piece of `zeros`' parallel fill.
const ZERO_PIECE: usize = 1 << 14;

/// n zeros, written by all of the pool's threads when n is large. `vec![0.0; n]` is
/// one memset (and the first touch of fresh pages) on the calling thread while the
/// pool's other threads wait: in a training step these serial fills were about 3 %
/// of the CPU time, all of it on one thread (BENCHMARKS.md, session 17).
pub(crate) fn zeros(n: usize) -> Vec<f32> {
    if n < PARALLEL_MIN_WORK {
        return vec![0f32; n];
    }
    zeros_into_spare(Vec::new(), n)
}

/// Sets every float of `buf` to zero, on all of the pool's threads when it is large
/// (as `zeros`, for a buffer that is reused).
pub(crate) fn clear(buf: &mut [f32]) {
    if buf.len() < PARALLEL_MIN_WORK {
        buf.fill(0.0);
    } else {
        buf.par_chunks_mut(ZERO_PIECE)
            .for_each(|piece| piece.fill(0.0));
    }
}

/// A new vector of n floats that `fill(start, piece)` writes piece by piece: pieces
/// of `piece_len` floats (the last one shorter) beginning at float `start`, on all
/// of the pool's threads when n is large. Each piece is zeroed just before `fill`
/// gets it, on the same thread, so it is still in cache when `fill` writes it:
/// one pass over the memory where `zeros` and then a kernel make two. Returns each
/// piece's result, in order.
pub(crate) fn filled<R: Send>(
    n: usize,
    piece_len: usize,
    fill: impl Fn(usize, &mut [f32]) -> R + Sync,
) -> (Vec<f32>, Vec<R>) {
    filled_in_spare(Vec::new(), n, piece_len, fill)
}

/// `filled` in the spare capacity of `v` (emptied first).
fn filled_in_spare<R: Send>(
    mut v: Vec<f32>,
    n: usize,
    piece_len: usize,
    fill: impl Fn(usize, &mut [f32]) -> R + Sync,
) -> (Vec<f32>, Vec<R>) {
    let piece_len = piece_len.max(1);
    v.clear();
    v.reserve(n);
    let run = |(i, piece): (usize, &mut [std::mem::MaybeUninit<f32>])| {
        piece.fill(std::mem::MaybeUninit::new(0.0));
        // SAFETY: every float of `piece` was written just above.
        let piece = unsafe { &mut *(piece as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]) };
        fill(i * piece_len, piece)
    };
    let spare = &mut v.spare_capacity_mut()[..n];
    let results: Vec<R> = if n >= PARALLEL_MIN_WORK {
        spare
            .par_chunks_mut(piece_len)
            .enumerate()
            .map(run)
            .collect()
    } else {
        spare.chunks_mut(piece_len).enumerate().map(run).collect()
    };
    // SAFETY: `run` zeroed every piece, and the pieces cover the first n floats of
    // the spare capacity (indexing it asserted that there are n).
    unsafe { v.set_len(n) };
    (v, results)
}

/// `zeros` in the spare capacity of `v` (emptied first), on the pool: `filled` with
/// nothing written after the zeroing.
fn zeros_into_spare(v: Vec<f32>, n: usize) -> Vec<f32> {
    filled_in_spare(v, n, ZERO_PIECE, |_, _| ()).0
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    #[should_panic(expected = "m·n overflows")]
    fn gemm_refuses_a_destination_whose_size_wraps() {
        gemm(
            1 << 32,
            1 << 32,
            1,
            &mut [],
            false,
            &[1.0],
            (0, 0),
            &[1.0],
            (0, 0),
        );
    }

    #[test]
    fn gemm_refuses_operand_extents_that_wrap_or_strides_past_isize() {
        let run = |a_strides: (usize, usize), b_strides: (usize, usize)| {
            std::panic::catch_unwind(|| {
                let mut dst = [0f32; 3];
                gemm(
                    3, 1, 1, &mut dst, false, &[1.0; 4], a_strides, &[1.0; 4], b_strides,
                );
            })
            .is_err()
        };
        assert!(!run((1, 1), (1, 1)), "a product that fits runs");
        assert!(run((1 << 63, 1), (1, 1)), "(m − 1)·stride wraps to 0");
        assert!(run((1, 1), (1, usize::MAX)), "a stride past isize::MAX");
        assert!(run((2, 1), (1, 1)), "a read past a");
    }

    /// Empty, with room for n floats that all hold NaN: a fill into its spare capacity
    /// that leaves a float unwritten shows it.
    fn nan_memory(n: usize) -> Vec<f32> {
        let mut v = vec![f32::NAN; n];
        v.clear();
        v
    }

    /// `gemm_new` writes what `gemm` writes into a zeroed buffer, bit for bit, also
    /// where gemm takes its special paths (k = 0, one row, one column, tiny) and where
    /// it runs on the pool; also into memory full of NaN.
    #[test]
    fn gemm_new_writes_every_element_as_gemm_does() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(21);
        for &(m, n, k) in &[
            (0, 3, 4),
            (3, 0, 4),
            (5, 7, 0),
            (5, 7, 1),
            (6, 3, 2),
            (1, 9, 5),
            (9, 1, 5),
            (4, 4, 4),
            (33, 17, 65),
            (128, 96, 64),
        ] {
            for transposed_a in [false, true] {
                let a: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
                let b: Vec<f32> = (0..k * n).map(|_| rng.random_range(-1.0..1.0)).collect();
                let a_st = if transposed_a { (1, m) } else { (k, 1) };
                let mut want = vec![0f32; m * n];
                gemm(m, n, k, &mut want, false, &a, a_st, &b, (n, 1));
                let what = format!("({m}, {n}, {k}), a transposed: {transposed_a}");
                let got = gemm_new((m, n, k), (&a, a_st), (&b, (n, 1)));
                assert_eq!(bits(&got), bits(&want), "{what}");
                let got = gemm_into_spare(nan_memory(m * n), (m, n, k), (&a, a_st), (&b, (n, 1)));
                assert_eq!(bits(&got), bits(&want), "{what}, into NaN");
            }
        }
    }

    #[test]
    fn zeros_and_repeated_rows_fill_every_element() {
        let sizes = [
            0,
            1,
            1000,
            PARALLEL_MIN_WORK - 1,
            PARALLEL_MIN_WORK,
            3 * ZERO_PIECE + 5,
        ];
        for n in sizes {
            for z in [zeros(n), zeros_into_spare(nan_memory(n), n)] {
                assert_eq!(z.len(), n);
                assert!(z.iter().all(|x| x.to_bits() == 0), "zeros({n})");
            }
        }
        // Rows that divide a piece, that do not, wider than a piece; few and many.
        for c in [1, 3, 256, 1000, ZERO_PIECE + 7] {
            for n in [0, 1, 5, PARALLEL_MIN_WORK / c + 1, 3 * ZERO_PIECE / c + 2] {
                let row: Vec<f32> = (0..c).map(|i| i as f32 - 0.5).collect();
                let want = bits(&row.repeat(n));
                assert_eq!(bits(&repeat_rows(&row, n)), want, "{n} rows of {c}");
                let got = repeat_rows_into_spare(nan_memory(c * n), &row, n);
                assert_eq!(bits(&got), want, "{n} rows of {c}, into NaN");
            }
        }
    }

    /// `filled` hands each piece over zeroed, once, at its own start (pieces in order,
    /// the last one shorter), and returns the pieces' results in order; what `fill`
    /// leaves unwritten stays zero even in memory that held NaN.
    #[test]
    fn filled_hands_out_every_piece_once_zeroed_and_in_order() {
        for n in [0, 1, 1000, PARALLEL_MIN_WORK - 1, PARALLEL_MIN_WORK + 3] {
            for piece_len in [0, 1, 7, ZERO_PIECE, n.max(1)] {
                let fill = |start: usize, piece: &mut [f32]| {
                    assert!(piece.iter().all(|x| x.to_bits() == 0), "zeroed");
                    // Every other float written: the rest must stay zero.
                    for (i, v) in piece.iter_mut().enumerate().step_by(2) {
                        *v = (start + i) as f32;
                    }
                    (start, piece.len())
                };
                for (v, parts) in [
                    filled(n, piece_len, fill),
                    filled_in_spare(nan_memory(n), n, piece_len, fill),
                ] {
                    // A piece length of 0 means pieces of one float.
                    let len = piece_len.max(1);
                    let want: Vec<(usize, usize)> =
                        (0..n).step_by(len).map(|s| (s, len.min(n - s))).collect();
                    assert_eq!(parts, want, "pieces of {piece_len} in {n}");
                    let expect: Vec<f32> = (0..n)
                        .map(|i| if (i % len) % 2 == 0 { i as f32 } else { 0.0 })
                        .collect();
                    assert_eq!(bits(&v), bits(&expect), "{n} floats, pieces of {piece_len}");
                }
            }
        }
    }
}
