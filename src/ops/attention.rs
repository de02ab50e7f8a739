//! Fused causal attention with padding mask and grouped-query heads, forward and
//! backward, on CPU. Scores, mask and softmax are never materialised as tensors: each
//! (batch, kv-head) task walks its query rows, so memory is O(S) per task, and the
//! backward recomputes the probabilities (as FlashAttention does) instead of storing
//! them.
//!
//! For query row t of a head: s_j = scale·q_t·k_j over the keys it may see (causal,
//! not padding), p = softmax(s), o_t = Σ_j p_j v_j. Backward with D_t = dO_t·o_t:
//!   dS_j = p_j (dO_t·v_j − D_t),  dq_t = scale Σ_j dS_j k_j,
//!   dk_j += scale dS_j q_t,        dv_j += p_j dO_t.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::collections::HashMap;
use std::sync::Arc;

use super::rows;
use super::simd::{self, simd_kernel};
use super::{axpy, dot, f32_slice, with_f32_all, zeros, PARALLEL_MIN_WORK};

/// Which keys each query may attend to. `segments[b·S + j]` is 0 for padding and an
/// example number otherwise; key j is visible to query t (at key index `offset + t`)
/// iff j ≤ offset + t and key j belongs to the query's example (for packed rows; an
/// unpacked row is one example) or to that example's parent: a shared prefix, whose
/// keys all come before the example's own (`parents`, from `AttentionMask::from_tree`).
///
/// The visible keys of every query are found once, when the mask is made, as runs of
/// consecutive keys (`KeyRuns`): every head of every layer, forward and backward,
/// reads them instead of scanning the row again. A padded or packed training row
/// gives one run per query; the server's interleaved rows give one run per prompt
/// and one per sampled token.
///
/// The fields are private: the runs are derived from the others at construction.
#[derive(Debug, Clone)]
pub struct CausalMask {
    batch: usize,
    keys: usize,
    queries: usize,
    runs: Arc<KeyRuns>,
}

/// The visible keys as half-open runs [start, end) of consecutive keys: each row's
/// runs of each example, grouped by example in increasing order, and for each query
/// (b·T + t) the runs of its example that start at or before it (`first`, `n`), the
/// last one cut at the query's own key. A padding query has none.
#[derive(Debug)]
struct KeyRuns {
    runs: Vec<(u32, u32)>,
    queries: Vec<(u32, u32)>, // (B·T): (first, n)
}

impl CausalMask {
    /// The mask of the last `queries` of `keys` positions of `batch` rows of
    /// `segments` (row-major, `batch · keys` ids). One pass over each row finds its
    /// examples' runs; a query then takes its example's runs up to itself.
    pub fn new(segments: Vec<u32>, batch: usize, keys: usize, queries: usize) -> Self {
        Self::with_parents(segments, &HashMap::new(), batch, keys, queries)
    }

    /// As `new`, where example `e` with `parents[e] = p` also sees all of `p`'s keys
    /// (a prefix it shares with other examples). The caller checks that `p` lies in
    /// the same row, wholly before `e`'s first key, and has no parent itself.
    pub fn with_parents(
        segments: Vec<u32>,
        parents: &HashMap<u32, u32>,
        batch: usize,
        keys: usize,
        queries: usize,
    ) -> Self {
        assert!(
            segments.len() == batch * keys && queries <= keys && keys <= u32::MAX as usize,
            "causal mask: {} segment ids for {batch} rows of {keys} keys, {queries} queries",
            segments.len()
        );
        let offset = keys - queries;
        let mut runs: Vec<(u32, u32)> = vec![];
        let mut per_query = Vec::with_capacity(batch * queries);
        let mut by_example: HashMap<u32, Vec<(u32, u32)>> = HashMap::new();
        for row in segments.chunks(keys.max(1)).take(batch) {
            by_example.clear();
            for (j, &seg) in row.iter().enumerate() {
                let list = by_example.entry(seg).or_default();
                match list.last_mut() {
                    Some(last) if last.1 as usize == j => last.1 += 1,
                    _ => list.push((j as u32, j as u32 + 1)),
                }
            }
            // Each example's runs (its parent's first), one group after another:
            // (first run, runs inherited from the parent).
            let mut first: HashMap<u32, (usize, usize)> = HashMap::with_capacity(by_example.len());
            for (&seg, list) in &by_example {
                if seg != 0 {
                    let f = runs.len();
                    let inherited = match parents.get(&seg).and_then(|p| by_example.get(p)) {
                        Some(prefix) => {
                            assert!(
                                prefix.last().is_some_and(|r| r.1 <= list[0].0),
                                "causal mask: example {seg}'s parent must come before it"
                            );
                            runs.extend_from_slice(prefix);
                            prefix.len()
                        }
                        None => 0,
                    };
                    first.insert(seg, (f, inherited));
                    runs.extend_from_slice(list);
                }
            }
            for (t, &seg) in row[offset..].iter().enumerate() {
                let me = (offset + t) as u32;
                per_query.push(match first.get(&seg) {
                    None => (0, 0), // padding
                    Some(&(f, inherited)) => {
                        let n = inherited + by_example[&seg].partition_point(|r| r.0 <= me);
                        (f as u32, n as u32)
                    }
                });
            }
        }
        CausalMask {
            batch,
            keys,
            queries,
            runs: Arc::new(KeyRuns {
                runs,
                queries: per_query,
            }),
        }
    }

    /// Rows (B).
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Key positions per row (S: cached and new).
    pub fn keys(&self) -> usize {
        self.keys
    }

    /// Query positions per row (T: the last T of the S keys).
    pub fn queries(&self) -> usize {
        self.queries
    }

    /// Query `t` of row `b`'s runs of visible keys, in increasing order.
    fn runs(&self, b: usize, t: usize) -> impl Iterator<Item = (u32, u32)> + '_ {
        let (first, n) = self.runs.queries[b * self.queries + t];
        let me = (self.keys - self.queries + t) as u32;
        self.runs.runs[first as usize..(first + n) as usize]
            .iter()
            .map(move |&(s, e)| (s, e.min(me + 1)))
    }

    /// The keys query `t` of row `b` sees, in increasing order.
    pub fn visible(&self, b: usize, t: usize) -> impl Iterator<Item = usize> + '_ {
        self.runs(b, t).flat_map(|(s, e)| s as usize..e as usize)
    }

    /// `visible(b, t)` into `keys` (cleared first).
    fn visible_into(&self, b: usize, t: usize, keys: &mut Vec<usize>) {
        keys.clear();
        for (s, e) in self.runs(b, t) {
            keys.extend(s as usize..e as usize);
        }
    }
}

/// Where one operand's rows lie in its buffer: row r of head h of batch row b starts
/// at `base + b·sb + h·sh + r·sr`, and its hd floats are consecutive. The kernels
/// read q, k and v and write their results through these, so they run on the heads
/// of a (B, nh, T, hd) tensor and on the columns of a dense layer's (B, T, 3·nh·hd)
/// output alike, with no copy between.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Rows {
    base: usize,
    sb: usize,
    sh: usize,
    sr: usize,
}

impl Rows {
    /// (B, heads, rows, hd), contiguous: the layout after `split_heads`.
    fn heads_first(heads: usize, rows: usize, hd: usize) -> Self {
        Rows {
            base: 0,
            sb: heads * rows * hd,
            sh: rows * hd,
            sr: hd,
        }
    }

    /// Columns `col..` of (B, rows, width), head h's row r at column col + h·hd of
    /// row r: the layout a dense layer writes, (B, T, nh·hd).
    fn interleaved(rows: usize, width: usize, col: usize, hd: usize) -> Self {
        Rows {
            base: col,
            sb: rows * width,
            sh: hd,
            sr: width,
        }
    }

    #[inline(always)]
    fn at(&self, b: usize, h: usize, r: usize) -> usize {
        self.base + b * self.sb + h * self.sh + r * self.sr
    }

    /// Whether the hd-wide rows (b, h, r), b < nb, h < nh, r < nr, lie apart: no two
    /// share a float. Taken smallest stride first, each stride must clear the span of
    /// the dimensions below it.
    fn apart(&self, nb: usize, nh: usize, nr: usize, hd: usize) -> bool {
        let mut dims = [(self.sh, nh), (self.sr, nr), (self.sb, nb)];
        dims.sort_unstable();
        let mut span = Some(hd);
        for (stride, n) in dims {
            if n > 1 {
                span = span
                    .filter(|&s| s <= stride)
                    .and_then(|s| stride.checked_mul(n - 1)?.checked_add(s));
            }
        }
        span.is_some()
    }
}

struct Dims {
    b: usize,
    nh: usize,
    nkv: usize,
    t: usize,
    s: usize,
    hd: usize,
    /// q's rows (B, nh, T), k's and v's (B, nkv, S), and those of the output and its
    /// gradient (B, nh, T).
    q: Rows,
    k: Rows,
    v: Rows,
    o: Rows,
}

/// A buffer that the tasks of one call fill at once, each writing only rows that no
/// other task writes (checked with `Rows::apart` before the tasks start).
struct Shared<'a> {
    ptr: *mut f32,
    len: usize,
    _buf: std::marker::PhantomData<&'a mut [f32]>,
}

// SAFETY: the buffer is reached only through `row`, whose callers keep to rows no
// other thread touches.
unsafe impl Send for Shared<'_> {}
unsafe impl Sync for Shared<'_> {}

impl<'a> Shared<'a> {
    fn new(buf: &'a mut [f32]) -> Self {
        Shared {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
            _buf: std::marker::PhantomData,
        }
    }

    /// The n floats at `off`, which must lie in the buffer (asserted).
    ///
    /// # Safety
    /// While the slice lives, no other slice of this buffer overlaps it.
    #[inline(always)]
    #[allow(clippy::mut_from_ref)]
    unsafe fn row(&self, off: usize, n: usize) -> &mut [f32] {
        assert!(
            off.checked_add(n).is_some_and(|e| e <= self.len),
            "attention: a row past its buffer"
        );
        std::slice::from_raw_parts_mut(self.ptr.add(off), n)
    }
}

/// Where the backward writes dq, dk and dv: a buffer each, or one buffer for all three.
struct Grads<'a> {
    dq: (&'a Shared<'a>, Rows),
    dk: (&'a Shared<'a>, Rows),
    dv: (&'a Shared<'a>, Rows),
}

struct AttentionOp {
    mask: CausalMask,
    scale: f32,
}

/// Softmax probabilities of query row `t` over its visible keys, into `probs`
/// (indices in `keys`; key j's row at `kbase + j·hd`). Returns nothing if the row sees
/// no key (a padding query).
#[inline(always)]
fn row_probs(
    q_row: &[f32],
    k: &[f32],
    keys: &[usize],
    kbase: usize,
    scale: f32,
    probs: &mut Vec<f32>,
) {
    rows::dots(q_row, k, kbase, keys, scale, probs);
    let max = probs.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
    for p in probs.iter_mut() {
        *p = simd::exp(*p - max);
    }
    let inv = 1.0 / simd::sum8(probs, |p| p);
    probs.iter_mut().for_each(|p| *p *= inv);
}

/// Rows (b, h, 0..n) of an operand as one run of n·hd floats: where they are if they
/// lie end to end, else copied into `buf`. Returns the floats and the run's start.
/// Rows spaced out by a dense layer's whole width fall into few cache sets, so keys
/// and values read once per query are read from a copy instead.
#[inline(always)]
fn run_of_rows<'a>(
    m: &'a [f32],
    rows: &Rows,
    (b, h, n, hd): (usize, usize, usize, usize),
    buf: &'a mut Vec<f32>,
) -> (&'a [f32], usize) {
    let base = rows.at(b, h, 0);
    if rows.sr == hd {
        return (m, base);
    }
    buf.clear();
    buf.reserve(n * hd);
    for r in 0..n {
        buf.extend_from_slice(&m[base + r * rows.sr..][..hd]);
    }
    (buf, 0)
}

simd_kernel! {
    /// Output rows of one (batch, query head) `bh`.
    fn forward_head(op: &AttentionOp, q: &[f32], k: &[f32], v: &[f32], d: &Dims, bh: usize, out: &Shared) {
        let rep = d.nh / d.nkv;
        let (b, h) = (bh / d.nh, bh % d.nh);
        let (mut kbuf, mut vbuf) = (Vec::new(), Vec::new());
        let (k, kbase) = run_of_rows(k, &d.k, (b, h / rep, d.s, d.hd), &mut kbuf);
        let (v, vbase) = run_of_rows(v, &d.v, (b, h / rep, d.s, d.hd), &mut vbuf);
        let mut probs = Vec::with_capacity(d.s);
        let mut keys = Vec::with_capacity(d.s);
        for t in 0..d.t {
            op.mask.visible_into(b, t, &mut keys);
            if keys.is_empty() {
                continue; // a padding query: output 0, never read
            }
            let qrow = &q[d.q.at(b, h, t)..][..d.hd];
            row_probs(qrow, k, &keys, kbase, op.scale, &mut probs);
            // SAFETY: only this task writes head h of batch row b, and the output's
            // rows lie apart (asserted in `forward`).
            let orow = unsafe { out.row(d.o.at(b, h, t), d.hd) };
            rows::add_weighted_rows(&probs, v, vbase, &keys, orow);
        }
    }
}

simd_kernel! {
    /// dq rows of the query heads of one (batch, kv head) `g`, and its dk, dv rows.
    #[allow(clippy::too_many_arguments)]
    fn backward_group(
        op: &AttentionOp,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        o: &[f32],
        dout: &[f32],
        d: &Dims,
        g: usize,
        grads: &Grads,
    ) {
        let rep = d.nh / d.nkv;
        let (b, kvh) = (g / d.nkv, g % d.nkv);
        let (mut kbuf, mut vbuf) = (Vec::new(), Vec::new());
        let (k, kbase) = run_of_rows(k, &d.k, (b, kvh, d.s, d.hd), &mut kbuf);
        let (v, vbase) = run_of_rows(v, &d.v, (b, kvh, d.s, d.hd), &mut vbuf);
        let ((dq, dq_rows), (dk, dk_rows), (dv, dv_rows)) = (grads.dq, grads.dk, grads.dv);
        // This kv head's dk and dv rows (S, hd) each, summed here and written out once
        // at the end.
        let (mut dk_run, mut dv_run) = (vec![0f32; d.s * d.hd], vec![0f32; d.s * d.hd]);
        let mut probs = Vec::with_capacity(d.s);
        let mut ds = Vec::with_capacity(d.s);
        let mut keys = Vec::with_capacity(d.s);
        for r in 0..rep {
            let h = kvh * rep + r;
            for t in 0..d.t {
                op.mask.visible_into(b, t, &mut keys);
                if keys.is_empty() {
                    continue;
                }
                let (qoff, ooff) = (d.q.at(b, h, t), d.o.at(b, h, t));
                let (qrow, orow, drow) = (
                    &q[qoff..][..d.hd],
                    &o[ooff..][..d.hd],
                    &dout[ooff..][..d.hd],
                );
                row_probs(qrow, k, &keys, kbase, op.scale, &mut probs);
                let dsum = dot(drow, orow);
                // dS_j = p_j (dO_t·v_j − D_t) · scale, then dq_t = Σ_j dS_j k_j.
                rows::dots(drow, v, vbase, &keys, 1.0, &mut ds);
                for (s, &p) in ds.iter_mut().zip(&probs) {
                    *s = p * (*s - dsum) * op.scale;
                }
                // SAFETY: only this task writes the dq rows of its query heads in
                // batch row b, and they lie apart from every other row written
                // (asserted by `backward`'s callers, as its contract asks).
                let dqrow = unsafe { dq.row(dq_rows.at(b, h, t), d.hd) };
                rows::add_weighted_rows(&ds, k, kbase, &keys, dqrow);
                for ((&j, &p), &s) in keys.iter().zip(&probs).zip(&ds) {
                    axpy(s, qrow, &mut dk_run[j * d.hd..][..d.hd]);
                    axpy(p, drow, &mut dv_run[j * d.hd..][..d.hd]);
                }
            }
        }
        for j in 0..d.s {
            let run = j * d.hd..(j + 1) * d.hd;
            // SAFETY: as for dq: only this task writes kv head kvh's rows of batch row b.
            unsafe { dk.row(dk_rows.at(b, kvh, j), d.hd) }.copy_from_slice(&dk_run[run.clone()]);
            unsafe { dv.row(dv_rows.at(b, kvh, j), d.hd) }.copy_from_slice(&dv_run[run]);
        }
    }
}

impl AttentionOp {
    /// The output, rows laid out as `d.o` in a buffer of B·nh·T·hd floats.
    fn forward(&self, q: &[f32], k: &[f32], v: &[f32], d: &Dims) -> Vec<f32> {
        let mut out = zeros(d.b * d.nh * d.t * d.hd);
        assert!(
            d.o.apart(d.b, d.nh, d.t, d.hd),
            "attention: output rows overlap"
        );
        let shared = Shared::new(&mut out);
        // One task per (batch, query head): no two write the same output row.
        let task = |bh: usize| forward_head(self, q, k, v, d, bh, &shared);
        let work = d.b * d.nh * d.t * d.s * d.hd;
        if work >= PARALLEL_MIN_WORK {
            (0..d.b * d.nh).into_par_iter().for_each(task);
        } else {
            (0..d.b * d.nh).for_each(task);
        }
        out
    }

    /// Writes dq, dk and dv, given the inputs [q, k, v, o, dout] (o the output, dout
    /// its gradient), into `grads`' zeroed buffers (a padding query's dq stays 0).
    ///
    /// # Safety
    /// The rows of `grads` (dq (B, nh, T), dk and dv (B, nkv, S)) lie apart from each
    /// other, within and across the three (the callers assert it with `Rows::apart`).
    unsafe fn backward(&self, [q, k, v, o, dout]: [&[f32]; 5], d: &Dims, grads: &Grads) {
        // One task per (batch, kv head): it owns that head's dk/dv rows and the dq
        // rows of the query heads that share it, so no two tasks write the same place.
        let task = |g: usize| backward_group(self, q, k, v, o, dout, d, g, grads);
        let work = d.b * d.nh * d.t * d.s * d.hd;
        if work >= PARALLEL_MIN_WORK {
            (0..d.b * d.nkv).into_par_iter().for_each(task);
        } else {
            (0..d.b * d.nkv).for_each(task);
        }
    }

    /// (dq, dk, dv) given [q, k, v, o, dout], each in its own buffer laid out
    /// (B, heads, rows, hd).
    fn backward_heads_first(
        &self,
        inputs: [&[f32]; 5],
        d: &Dims,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (q_rows, kv_rows) = (
            Rows::heads_first(d.nh, d.t, d.hd),
            Rows::heads_first(d.nkv, d.s, d.hd),
        );
        let mut dq = zeros(d.b * d.nh * d.t * d.hd);
        let mut dk = zeros(d.b * d.nkv * d.s * d.hd);
        let mut dv = zeros(d.b * d.nkv * d.s * d.hd);
        // Three buffers: each apart within itself is enough.
        assert!(q_rows.apart(d.b, d.nh, d.t, d.hd) && kv_rows.apart(d.b, d.nkv, d.s, d.hd));
        let (sq, sk, sv) = (
            Shared::new(&mut dq),
            Shared::new(&mut dk),
            Shared::new(&mut dv),
        );
        let grads = Grads {
            dq: (&sq, q_rows),
            dk: (&sk, kv_rows),
            dv: (&sv, kv_rows),
        };
        // SAFETY: three buffers, each one's rows apart (asserted above).
        unsafe { self.backward(inputs, d, &grads) };
        (dq, dk, dv)
    }
}

/// The dims of q (B, nh, T, hd) and of k, v (B, nkv, S, hd) in buffers of `cap` ≥ S
/// rows per head, with the output and its gradient (B, T, nh·hd): rows as a dense
/// layer reads them.
fn heads_first_dims(q: &Shape, k: &Shape, cap: usize) -> Result<Dims> {
    let (b, nh, t, hd) = q.dims4()?;
    let (_, nkv, s, _) = k.dims4()?;
    let kv = Rows::heads_first(nkv, cap, hd);
    Ok(Dims {
        b,
        nh,
        nkv,
        t,
        s,
        hd,
        q: Rows::heads_first(nh, t, hd),
        k: kv,
        v: kv,
        o: Rows::interleaved(t, nh * hd, 0, hd),
    })
}

/// q (B, nh, T, hd), k and v (B, nkv, S, hd) → (B, T, nh·hd).
impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "rlhf-causal-attention"
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
        sv: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let q = f32_slice(sq, lq, "attention q")?;
        let (k, cap_k) = kv_slice(sk, lk, "attention k")?;
        let (v, cap_v) = kv_slice(sv, lv, "attention v")?;
        if cap_k != cap_v {
            candle_core::bail!("attention: k and v buffers differ in capacity");
        }
        let d = heads_first_dims(lq.shape(), lk.shape(), cap_k)?;
        Ok((
            CpuStorage::F32(self.forward(q, k, v, &d)),
            Shape::from((d.b, d.t, d.nh * d.hd)),
        ))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        dout: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // k and v are made contiguous for the backward (`with_f32_all`): cap = S.
        let d = heads_first_dims(q.shape(), k.shape(), k.dim(2)?)?;
        let (dq, dk, dv) = with_f32_all(&[q, k, v, o, dout], |a| {
            Ok(self.backward_heads_first([a[0], a[1], a[2], a[3], a[4]], &d))
        })?;
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), dev)?),
            Some(Tensor::from_vec(dk, k.shape(), dev)?),
            Some(Tensor::from_vec(dv, v.shape(), dev)?),
        ))
    }
}

/// Attention straight on a dense layer's output: qkv (B, T, 3·nh·hd), q, k and v side
/// by side in each row (GPT-2's `c_attn`), → (B, T, nh·hd). The heads are read and
/// their gradients written in place, where `split_heads` and `merge_heads` would copy
/// each of them twice (once each way) and the backward of `narrow` would pad each
/// gradient with zeros and add the three.
struct QkvAttentionOp {
    op: AttentionOp,
    heads: usize,
}

/// The dims of qkv (B, T, 3·nh·hd) with `nh` heads: q, k and v in columns 0..C,
/// C..2C and 2C..3C of each row (C = nh·hd), the output (B, T, C).
fn qkv_dims(shape: &Shape, nh: usize) -> Result<Dims> {
    let (b, t, width) = shape.dims3()?;
    if nh == 0 || !width.is_multiple_of(3 * nh) {
        candle_core::bail!("attention: qkv rows of {width} do not hold 3 × {nh} heads");
    }
    let (c, hd) = (width / 3, width / 3 / nh);
    Ok(Dims {
        b,
        nh,
        nkv: nh,
        t,
        s: t,
        hd,
        q: Rows::interleaved(t, width, 0, hd),
        k: Rows::interleaved(t, width, c, hd),
        v: Rows::interleaved(t, width, 2 * c, hd),
        o: Rows::interleaved(t, c, 0, hd),
    })
}

impl CustomOp1 for QkvAttentionOp {
    fn name(&self) -> &'static str {
        "rlhf-causal-attention-qkv"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = qkv_dims(l.shape(), self.heads)?;
        let qkv = f32_slice(s, l, "attention qkv")?;
        Ok((
            CpuStorage::F32(self.op.forward(qkv, qkv, qkv, &d)),
            Shape::from((d.b, d.t, d.nh * d.hd)),
        ))
    }

    fn bwd(&self, qkv: &Tensor, o: &Tensor, dout: &Tensor) -> Result<Option<Tensor>> {
        let d = qkv_dims(qkv.shape(), self.heads)?;
        let mut dqkv = zeros(qkv.elem_count());
        // dq, dk and dv share one buffer: as heads 0..nh, nh..2nh and 2nh..3nh of one
        // (B, T, 3·nh) layout, their rows lie apart together.
        let (c, all) = (
            d.nh * d.hd,
            Rows::interleaved(d.t, 3 * d.nh * d.hd, 0, d.hd),
        );
        let heads_from = |base: usize| Rows { base, ..all };
        assert!(
            d.q == heads_from(0) && d.k == heads_from(c) && d.v == heads_from(2 * c),
            "attention: q, k and v are not consecutive heads of qkv"
        );
        assert!(all.apart(d.b, 3 * d.nh, d.t, d.hd));
        let shared = Shared::new(&mut dqkv);
        let grads = Grads {
            dq: (&shared, d.q),
            dk: (&shared, d.k),
            dv: (&shared, d.v),
        };
        with_f32_all(&[qkv, o, dout], |a| {
            // SAFETY: dq, dk and dv are heads 0..nh, nh..2nh and 2nh..3nh of `all`,
            // whose rows lie apart (both asserted above).
            unsafe { self.op.backward([a[0], a[0], a[0], a[1], a[2]], &d, &grads) };
            Ok(())
        })?;
        Ok(Some(Tensor::from_vec(dqkv, qkv.shape(), qkv.device())?))
    }
}

/// k or v (B, nkv, S, hd), either contiguous or the first S rows of a buffer
/// (B, nkv, cap, hd) (a KV cache's prefix): its data from the first element, and cap.
fn kv_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<(&'a [f32], usize)> {
    let dims = l.dims();
    if l.is_contiguous() {
        return Ok((f32_slice(s, l, what)?, dims[2]));
    }
    let st = l.stride();
    let hd = dims[3];
    let prefix_of_buffer = st[3] == 1
        && st[2] == hd
        && st[1].is_multiple_of(hd)
        && st[1] / hd >= dims[2]
        && st[0] == dims[1] * st[1];
    if !prefix_of_buffer {
        candle_core::bail!(
            "{what}: expected a contiguous tensor or a KV-cache prefix, got strides {st:?}"
        );
    }
    Ok((&s.as_slice::<f32>()?[l.start_offset()..], st[1] / hd))
}

fn check_mask(mask: &CausalMask, b: usize, t: usize, s: usize) -> Result<()> {
    if mask.batch != b || mask.keys != s || mask.queries != t {
        candle_core::bail!(
            "attention: mask is for (B={}, T={}, S={}), tensors are (B={b}, T={t}, S={s})",
            mask.batch,
            mask.queries,
            mask.keys
        );
    }
    Ok(())
}

/// Causal attention. q: (B, nh, T, hd), k, v: (B, nkv, S, hd) → (B, T, nh·hd), the
/// heads merged.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &CausalMask) -> Result<Tensor> {
    let (b, nh, t, hd) = q.dims4()?;
    let (bk, nkv, s, hdk) = k.dims4()?;
    if b != bk || hd != hdk || nh % nkv != 0 || v.dims() != k.dims() {
        candle_core::bail!(
            "attention: q {:?}, k {:?}, v {:?} do not fit",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    check_mask(mask, b, t, s)?;
    let op = AttentionOp {
        mask: mask.clone(),
        scale: 1.0 / (hd as f32).sqrt(),
    };
    // k and v may be a KV cache's prefix (read in place); see `kv_slice`.
    let kv = |t: &Tensor| -> Result<Tensor> {
        let st = t.stride();
        let hd = t.dim(3)?;
        let prefix =
            st[3] == 1 && st[2] == hd && st[1].is_multiple_of(hd) && st[0] == t.dim(1)? * st[1];
        if t.is_contiguous() || prefix {
            Ok(t.clone())
        } else {
            t.contiguous()
        }
    };
    q.contiguous()?.apply_op3(&kv(k)?, &kv(v)?, op)
}

/// Causal attention on a dense layer's output qkv (B, T, 3·C), q, k and v in columns
/// 0..C, C..2C and 2C..3C of each row, with `heads` heads of C / heads → (B, T, C).
/// The same bits as `split_heads` of each third into `causal_attention`, forward and
/// backward, without the copies.
pub fn causal_attention_qkv(qkv: &Tensor, heads: usize, mask: &CausalMask) -> Result<Tensor> {
    let d = qkv_dims(qkv.shape(), heads)?;
    check_mask(mask, d.b, d.t, d.s)?;
    let op = QkvAttentionOp {
        op: AttentionOp {
            mask: mask.clone(),
            scale: 1.0 / (d.hd as f32).sqrt(),
        },
        heads,
    };
    qkv.contiguous()?.apply_op1(op)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// The definition: key j is visible to query t iff j ≤ offset + t and key j is
    /// of the query's example, which is not padding.
    fn scanned(row: &[u32], me: usize) -> Vec<usize> {
        let seg = row[me];
        (0..=me).filter(|&j| seg != 0 && row[j] == seg).collect()
    }

    #[test]
    fn key_runs_give_the_keys_of_a_scan() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let mut runs_seen = 0;
        for _ in 0..300 {
            let batch = rng.random_range(1..4);
            let keys = rng.random_range(1..40);
            // Runs of one id, padding (0) among them, ids coming back (interleaved
            // serving rows, packed training rows).
            let mut segments = Vec::with_capacity(batch * keys);
            for _ in 0..batch {
                let mut id = rng.random_range(0..4u32);
                for _ in 0..keys {
                    if rng.random_bool(0.3) {
                        id = rng.random_range(0..4);
                    }
                    segments.push(id);
                }
            }
            let queries = rng.random_range(1..=keys);
            let mask = CausalMask::new(segments.clone(), batch, keys, queries);
            let mut buf = vec![];
            for b in 0..batch {
                let row = &segments[b * keys..(b + 1) * keys];
                for t in 0..queries {
                    let want = scanned(row, keys - queries + t);
                    assert_eq!(mask.visible(b, t).collect::<Vec<_>>(), want);
                    mask.visible_into(b, t, &mut buf);
                    assert_eq!(buf, want);
                    runs_seen += mask.runs(b, t).count();
                }
            }
        }
        assert!(runs_seen > 1000, "the cases should hold many runs");
    }

    #[test]
    fn a_shared_prefix_is_seen_by_each_continuation_and_nothing_else() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let mut inherited = 0;
        for _ in 0..200 {
            let batch = rng.random_range(1..3);
            let mut parents = HashMap::new();
            let mut segments = vec![];
            let mut next = 1u32;
            let mut rows = vec![];
            for _ in 0..batch {
                // Items one after another: a plain example, or a prefix followed by
                // its continuations (interleaved among themselves), with padding.
                let mut row = vec![];
                while row.len() < 30 {
                    let prefix = next;
                    next += 1;
                    row.extend(std::iter::repeat_n(prefix, rng.random_range(1..5)));
                    let children: Vec<u32> =
                        (0..rng.random_range(0..4)).map(|k| next + k).collect();
                    next += children.len() as u32;
                    for &c in &children {
                        parents.insert(c, prefix);
                    }
                    for _ in 0..rng.random_range(0..10) {
                        if let Some(&c) = children.get(rng.random_range(0..children.len().max(1))) {
                            row.push(c);
                        }
                    }
                    if rng.random_bool(0.3) {
                        row.push(0);
                    }
                }
                row.truncate(30);
                rows.push(row);
            }
            for row in &rows {
                segments.extend_from_slice(row);
            }
            let queries = rng.random_range(1..=30);
            let mask = CausalMask::with_parents(segments, &parents, batch, 30, queries);
            for (b, row) in rows.iter().enumerate() {
                for t in 0..queries {
                    let me = 30 - queries + t;
                    let seg = row[me];
                    let parent = parents.get(&seg).copied();
                    let want: Vec<usize> = (0..=me)
                        .filter(|&j| seg != 0 && (row[j] == seg || Some(row[j]) == parent))
                        .collect();
                    assert_eq!(mask.visible(b, t).collect::<Vec<_>>(), want);
                    inherited += usize::from(parent.is_some_and(|p| row.contains(&p)));
                }
            }
        }
        assert!(inherited > 500, "the cases should hold many continuations");
    }

    #[test]
    fn rows_lie_apart_in_the_layouts_used_and_not_when_they_overlap() {
        let (nb, nh, t, hd) = (3, 4, 5, 8);
        let c = nh * hd;
        assert!(Rows::heads_first(nh, t, hd).apart(nb, nh, t, hd));
        assert!(Rows::interleaved(t, c, 0, hd).apart(nb, nh, t, hd));
        // q, k and v of one (B, T, 3C) buffer, together: 3·nh heads of one layout.
        assert!(Rows::interleaved(t, 3 * c, 0, hd).apart(nb, 3 * nh, t, hd));
        // More heads than a row holds, heads narrower than hd, batch rows too close.
        assert!(!Rows::interleaved(t, c, 0, hd).apart(nb, nh + 1, t, hd));
        assert!(!Rows::interleaved(t, c, 0, hd).apart(nb, nh, t, hd + 1));
        let mut close = Rows::heads_first(nh, t, hd);
        close.sb -= 1;
        assert!(!close.apart(nb, nh, t, hd));
        // One batch row: its stride does not matter.
        assert!(close.apart(1, nh, t, hd));
        // Strides that overflow are refused, not wrapped.
        let huge = Rows {
            base: 0,
            sb: usize::MAX,
            sh: hd,
            sr: c,
        };
        assert!(!huge.apart(3, nh, t, hd));
    }

    #[test]
    fn a_padded_or_packed_row_has_one_run_per_query() {
        let mask = CausalMask::new(vec![0, 0, 1, 1, 1, 2, 2], 1, 7, 7);
        let per_query: Vec<usize> = (0..7).map(|t| mask.runs(0, t).count()).collect();
        assert_eq!(per_query, [0, 0, 1, 1, 1, 1, 1]);
        assert_eq!(mask.runs(0, 6).collect::<Vec<_>>(), [(5, 7)]);
    }

    /// The kernels as they were written before `ops::rows` (one `dot` or `axpy` per
    /// key): the forward and backward must give their bits exactly.
    fn reference(
        op: &AttentionOp,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        dout: &[f32],
        d: &Dims,
    ) -> [Vec<f32>; 4] {
        let rep = d.nh / d.nkv;
        let mut o = vec![0f32; q.len()];
        let (mut dq, mut dk, mut dv) = (
            vec![0f32; q.len()],
            vec![0f32; k.len()],
            vec![0f32; v.len()],
        );
        for b in 0..d.b {
            for h in 0..d.nh {
                let kbase = d.k.at(b, h / rep, 0);
                for t in 0..d.t {
                    let keys: Vec<usize> = op.mask.visible(b, t).collect();
                    let off = d.q.at(b, h, t);
                    let (qrow, drow) = (&q[off..][..d.hd], &dout[off..][..d.hd]);
                    let mut probs = vec![];
                    let mut max = f32::NEG_INFINITY;
                    for &j in &keys {
                        let s = op.scale * dot(qrow, &k[kbase + j * d.hd..][..d.hd]);
                        max = max.max(s);
                        probs.push(s);
                    }
                    for p in probs.iter_mut() {
                        *p = simd::exp(*p - max);
                    }
                    let inv = 1.0 / simd::sum8(&probs, |p| p);
                    probs.iter_mut().for_each(|p| *p *= inv);
                    for (&j, &p) in keys.iter().zip(&probs) {
                        axpy(p, &v[kbase + j * d.hd..][..d.hd], &mut o[off..][..d.hd]);
                    }
                    // This row's backward, now that its output is whole.
                    let dsum = dot(drow, &o[off..][..d.hd]);
                    for (&j, &p) in keys.iter().zip(&probs) {
                        let at = kbase + j * d.hd;
                        let ds = p * (dot(drow, &v[at..][..d.hd]) - dsum) * op.scale;
                        axpy(ds, &k[at..][..d.hd], &mut dq[off..][..d.hd]);
                        axpy(ds, qrow, &mut dk[at..][..d.hd]);
                        axpy(p, drow, &mut dv[at..][..d.hd]);
                    }
                }
            }
        }
        [o, dq, dk, dv]
    }

    #[test]
    fn forward_and_backward_have_the_bits_of_one_dot_and_axpy_per_key() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        // (B, nh, nkv, T, S, hd): head sizes on the AVX2 path (64, 72, 16) and off it
        // (12), grouped-query heads, queries that are the last T < S keys (as after a
        // KV cache; the cache's wider buffer is tested in tests/models.rs), packed and
        // padded rows.
        for &(b, nh, nkv, t, s, hd) in &[
            (2, 4, 4, 9, 9, 64),
            (1, 4, 2, 5, 13, 16),
            (3, 2, 1, 7, 7, 12),
            (1, 2, 2, 30, 30, 72),
        ] {
            let segments: Vec<u32> = (0..b * s)
                .map(|i| {
                    if i % s < 2 && i / s == 1 {
                        0
                    } else {
                        1 + (i % s >= s / 2) as u32 * (i / s) as u32
                    }
                })
                .collect();
            let op = AttentionOp {
                mask: CausalMask::new(segments, b, s, t),
                scale: 1.0 / (hd as f32).sqrt(),
            };
            let (q_rows, kv_rows) = (Rows::heads_first(nh, t, hd), Rows::heads_first(nkv, s, hd));
            let d = Dims {
                b,
                nh,
                nkv,
                t,
                s,
                hd,
                q: q_rows,
                k: kv_rows,
                v: kv_rows,
                o: q_rows,
            };
            let mut draw = |len: usize| -> Vec<f32> {
                (0..len).map(|_| rng.random_range(-2.0f32..2.0)).collect()
            };
            let (q, k, v, dout) = (
                draw(b * nh * t * hd),
                draw(b * nkv * s * hd),
                draw(b * nkv * s * hd),
                draw(b * nh * t * hd),
            );
            let [o_ref, dq_ref, dk_ref, dv_ref] = reference(&op, &q, &k, &v, &dout, &d);
            let o = op.forward(&q, &k, &v, &d);
            let (dq, dk, dv) = op.backward_heads_first([&q, &k, &v, &o, &dout], &d);
            let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            for (name, got, want) in [
                ("o", &o, &o_ref),
                ("dq", &dq, &dq_ref),
                ("dk", &dk, &dk_ref),
                ("dv", &dv, &dv_ref),
            ] {
                assert_eq!(
                    bits(got),
                    bits(want),
                    "{name} for (B, nh, nkv, T, S, hd) = {:?}",
                    (b, nh, nkv, t, s, hd)
                );
            }
            assert!(o.iter().any(|&x| x != 0.0) && dk.iter().any(|&x| x != 0.0));
        }
    }
}
