//! The dense layer y = x·Wᵀ + b as one op, forward and backward, on CPU.
//!
//! As candle ops the layer is a matmul against the transposed weight and a broadcast
//! add. Its backward then takes several full passes over (N, out) and (in, out)
//! buffers beyond the two products: the bias add's gradient copied into a zero-filled
//! buffer for the product, the bias gradient as a broadcast sum, and the weight's
//! gradient computed transposed, (in, out), then transposed back into the zero-filled
//! buffer of W. Here:
//!   forward   y starts as b in every row and the gemm adds x·Wᵀ into it (the bias
//!             in the product's epilogue, no second pass);
//!   backward  dx = dy·W, dW = dyᵀ·x straight in W's (out, in) layout, and db the
//!             column sums of dy, in one op.
//! The product's bits can differ from candle's in the last place (the bias enters the
//! accumulation before the last block of k instead of after it), so `Linear` runs it for every product
//! that goes through gemm, with or without a gradient: a policy's sampling, its
//! stored log-probs and its training forward give the same bits.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::cell::Cell;

use super::{f32_slice, gemm, gemm_new, with_f32_all};

thread_local! {
    /// Layers run through `dense` on this thread since it started: lets the tests see
    /// that the op, not the composite, ran (per thread, so that tests running in
    /// parallel do not count each other's calls).
    static CALLS: Cell<usize> = const { Cell::new(0) };
}

pub fn calls() -> usize {
    CALLS.with(Cell::get)
}

/// The op; the bias, when there is one, is its third argument.
struct Dense;

/// y (n, out) = [b +] x (n, in) · Wᵀ, W (out, in).
fn forward(
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    (n, inner, out): (usize, usize, usize),
) -> Vec<f32> {
    assert_eq!(x.len(), n * inner, "dense: x is not ({n}, {inner})");
    assert_eq!(w.len(), out * inner, "dense: W is not ({out}, {inner})");
    match b {
        Some(b) => {
            assert_eq!(b.len(), out, "dense: b is not ({out},)");
            let mut y = super::repeat_rows(b, n);
            gemm(n, out, inner, &mut y, true, x, (inner, 1), w, (1, inner));
            y
        }
        None => gemm_new((n, out, inner), (x, (inner, 1)), (w, (1, inner))),
    }
}

/// Columns of db per parallel task.
const DB_COLUMNS: usize = 64;

/// dx = dy·W (n, in), dW = dyᵀ·x (out, in) and db = Σ_rows dy (out,), each only when
/// asked.
struct Grads {
    dx: Option<Vec<f32>>,
    dw: Option<Vec<f32>>,
    db: Option<Vec<f32>>,
}

fn backward(
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    (n, inner, out): (usize, usize, usize),
    (want_dx, want_dw, want_db): (bool, bool, bool),
) -> Grads {
    assert_eq!(dy.len(), n * out, "dense: dy is not ({n}, {out})");
    let dx = want_dx.then(|| gemm_new((n, inner, out), (dy, (out, 1)), (w, (inner, 1))));
    let dw = want_dw.then(|| gemm_new((out, inner, n), (dy, (1, out)), (x, (inner, 1))));
    // Rows in order for every column: the same sum whatever the thread count. The
    // columns are split among the threads (one thread summing all of dy left the
    // others waiting).
    let db = want_db.then(|| {
        let mut db = vec![0f32; out];
        let sum_columns = |(block, dbc): (usize, &mut [f32])| {
            let first = block * DB_COLUMNS;
            for row in dy.chunks_exact(out) {
                super::axpy(1.0, &row[first..first + dbc.len()], dbc);
            }
        };
        if n * out >= super::PARALLEL_MIN_WORK {
            db.par_chunks_mut(DB_COLUMNS)
                .enumerate()
                .for_each(sum_columns);
        } else if out > 0 {
            sum_columns((0, &mut db));
        }
        db
    });
    Grads { dx, dw, db }
}

fn dims(x: &Layout, w: &Layout) -> Result<(usize, usize, usize)> {
    let (n, inner) = x.shape().dims2()?;
    let (out, w_inner) = w.shape().dims2()?;
    if inner != w_inner {
        candle_core::bail!("dense: x {:?} and W {:?} do not fit", x.dims(), w.dims());
    }
    Ok((n, inner, out))
}

impl Dense {
    fn grads(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>, dy: &Tensor) -> Result<Grads> {
        let (n, inner) = x.dims2()?;
        let out = w.dim(0)?;
        let want = (x.track_op(), w.track_op(), b.is_some_and(Tensor::track_op));
        with_f32_all(&[x, w, dy], |a| {
            Ok(backward(a[0], a[1], a[2], (n, inner, out), want))
        })
    }
}

fn tensor(v: Option<Vec<f32>>, shape: &[usize], like: &Tensor) -> Result<Option<Tensor>> {
    v.map(|v| Tensor::from_vec(v, shape, like.device()))
        .transpose()
}

/// Both ops' forward on candle's storages: (n, out) from x (n, in), W (out, in) and b.
fn cpu_forward(
    (sx, lx): (&CpuStorage, &Layout),
    (sw, lw): (&CpuStorage, &Layout),
    bias: Option<(&CpuStorage, &Layout)>,
) -> Result<(CpuStorage, Shape)> {
    let d = dims(lx, lw)?;
    let b = bias
        .map(|(sb, lb)| f32_slice(sb, lb, "dense b"))
        .transpose()?;
    let x = f32_slice(sx, lx, "dense x")?;
    let y = forward(x, f32_slice(sw, lw, "dense W")?, b, d);
    Ok((CpuStorage::F32(y), Shape::from((d.0, d.2))))
}

impl CustomOp2 for Dense {
    fn name(&self) -> &'static str {
        "rlhf-dense"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_forward((sx, lx), (sw, lw), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = self.grads(x, w, None, dy)?;
        Ok((tensor(g.dx, x.dims(), x)?, tensor(g.dw, w.dims(), w)?))
    }
}

impl CustomOp3 for Dense {
    fn name(&self) -> &'static str {
        "rlhf-dense-bias"
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
        cpu_forward((sx, lx), (sw, lw), Some((sb, lb)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = self.grads(x, w, Some(b), dy)?;
        Ok((
            tensor(g.dx, x.dims(), x)?,
            tensor(g.dw, w.dims(), w)?,
            tensor(g.db, b.dims(), b)?,
        ))
    }
}

/// x (n, in) · Wᵀ [+ b] with W (out, in) and b (out,) → (n, out), as one op with its
/// own backward. CPU f32.
pub fn dense(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    CALLS.with(|c| c.set(c.get() + 1));
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    match b {
        Some(b) => x.apply_op3(&w, &b.contiguous()?, Dense),
        None => x.apply_op2(&w, Dense),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// db is each column's sum over the rows in order, as one thread adding row after
    /// row gives it, whichever way the columns are split among threads.
    #[test]
    fn the_bias_gradient_sums_rows_in_order_in_every_column() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
        // Below and above the parallel threshold; column counts around the block.
        for &(n, out) in &[
            (3, 0),
            (3, 5),
            (600, 63),
            (600, 64),
            (700, 65),
            (40, 1000),
            (1024, 768),
        ] {
            let dy: Vec<f32> = (0..n * out)
                .map(|_| rng.random_range(-1.0f32..1.0) * 10f32.powi(rng.random_range(-4..4)))
                .collect();
            let g = backward(&[], &[], &dy, (n, 0, out), (false, false, true));
            let mut want = vec![0f32; out];
            if out > 0 {
                for row in dy.chunks_exact(out) {
                    for (w, &v) in want.iter_mut().zip(row) {
                        *w += v;
                    }
                }
            }
            let got = g.db.expect("db");
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "({n}, {out})");
        }
    }
}
