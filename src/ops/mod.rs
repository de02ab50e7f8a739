//! CPU kernels with their own backward pass, as candle custom ops: the dense layer, fused LayerNorm,
//! RMSNorm, causal attention, GELU/SwiGLU and the LM head with its per-token
//! log-probabilities. The model code calls them through `model::layers`,
//! which falls back to the composite candle ops on other devices; the composite
//! versions are also the references the kernels are tested against.
//!
//! Parallel loops split work into fixed chunks and reduce partial sums in chunk order,
//! so results are bit-identical from run to run (resumed training depends on it).

pub mod activation;
pub mod attention;
pub mod dense;
pub mod lm_head;
pub mod lora;
pub mod matmul;
pub mod norm;
pub(crate) mod rows;
pub(crate) mod simd;

use candle_core::{CpuStorage, DType, Layout, Result, Storage, Tensor};
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
/// row and column strides.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    accumulate: bool,
    a: &[f32],
    (a_rs, a_cs): (usize, usize),
    b: &[f32],
    (b_rs, b_cs): (usize, usize),
) {
    assert!(dst.len() >= m * n, "gemm: destination too small");
    assert!(m == 0 || k == 0 || a.len() > (m - 1) * a_rs + (k - 1) * a_cs);
    assert!(k == 0 || n == 0 || b.len() > (k - 1) * b_rs + (n - 1) * b_cs);
    let threads = rayon::current_num_threads();
    let par = if m * n * k >= 1 << 16 && threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above keep every access of the three matrices in bounds.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
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
