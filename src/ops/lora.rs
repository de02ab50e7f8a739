//! LoRA's dense layer as one op (Hu et al. 2021, eq. 3, as PEFT computes it):
//! y = x·Wᵀ + b + (α/r)·(dropout(x)·Aᵀ)·Bᵀ, with W and b the frozen base and A, B the
//! adapter. Written from candle ops, the branch kept five (N, in) or (N, out)
//! intermediates per layer alive until the backward (the dropout mask and its
//! product, x·Aᵀ, its product with Bᵀ, the scaled update, the sum) beside the base
//! product and its copy: most of a LoRA run's activation memory. Here the graph
//! keeps only the inputs (x, A, B) and the output; the backward recomputes the
//! dropout mask (a pure function of its seed) and the small x·Aᵀ (N, r).

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Layers run through `lora_linear` since the start: instrumentation that lets the
/// tests see that the fused op, not the composite branch, ran.
static FUSED_CALLS: AtomicUsize = AtomicUsize::new(0);

pub fn fused_calls() -> usize {
    FUSED_CALLS.load(Ordering::Relaxed)
}

/// One micro-batch's dropout on a layer's input: element i is zeroed with
/// probability `p` and the others scaled by 1/(1 − p), from a hash of (seed, i).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dropout {
    pub p: f64,
    pub seed: u64,
}

/// SplitMix64: a counter-based hash, so element i's draw needs no state.
pub fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Dropout {
    /// The mask of `n` elements: 0 or 1/(1 − p) each.
    pub fn mask(&self, n: usize) -> Vec<f32> {
        let keep = 1.0 / (1.0 - self.p) as f32;
        // A draw in [0, 1) from the top 24 bits of each element's hash.
        let threshold = (self.p * (1u64 << 24) as f64) as u64;
        (0..n as u64)
            .map(|i| {
                let u = splitmix64(self.seed.wrapping_add(i)) >> 40;
                if u < threshold {
                    0.0
                } else {
                    keep
                }
            })
            .collect()
    }

    /// The mask as a tensor shaped like `x`.
    fn mask_like(&self, x: &Tensor) -> Result<Tensor> {
        Tensor::from_vec(self.mask(x.elem_count()), x.shape(), x.device())
    }

    /// x ⊙ mask.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        x * self.mask_like(x)?
    }
}

struct LoraLinear {
    weight: Tensor, // (out, in), frozen
    /// The forward's value, computed from detached inputs; handed over (and dropped
    /// here) when the op runs, so that the graph does not hold a second copy.
    y: Mutex<Option<Tensor>>, // (N, out)
    scale: f64,
    dropout: Option<Dropout>,
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "rlhf-lora-linear"
    }

    fn cpu_fwd(
        &self,
        _s1: &CpuStorage,
        _l1: &Layout,
        _s2: &CpuStorage,
        _l2: &Layout,
        _s3: &CpuStorage,
        _l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let Some(y) = self.y.lock().expect("lora y").take() else {
            candle_core::bail!("lora linear: the op's value was already taken");
        };
        let shape = y.shape().clone();
        Ok((CpuStorage::F32(y.flatten_all()?.to_vec1::<f32>()?), shape))
    }

    /// The gradients the composite branch would get, op for op as candle's backward
    /// computes them: gs = s·dy; for h·Bᵀ, dh = gs·B and dB = (hᵀ·gs)ᵀ; for
    /// xd·Aᵀ, dxd = dh·A and dA = (xdᵀ·dh)ᵀ; dx = dy·W + mask ⊙ dxd.
    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (x_needs_grad, a_needs_grad, b_needs_grad) = (x.track_op(), a.track_op(), b.track_op());
        let (x, a, b) = (x.detach(), a.detach(), b.detach());
        let mask = self.dropout.map(|d| d.mask_like(&x)).transpose()?;
        let xd = match &mask {
            Some(m) => (&x * m)?,
            None => x.clone(),
        }; // (N, in)
        let gs = dy.affine(self.scale, 0.0)?; // (N, out)
        let dh = gs.matmul(&b)?; // (N, r)
        let db = if b_needs_grad {
            let h = xd.matmul(&a.t()?)?; // (N, r)
            Some(h.t()?.matmul(&gs)?.t()?) // (out, r)
        } else {
            None
        };
        let da = if a_needs_grad {
            Some(xd.t()?.matmul(&dh)?.t()?) // (r, in)
        } else {
            None
        };
        let dx = if x_needs_grad {
            let dxd = dh.matmul(&a)?; // (N, in)
            let dx_lora = match &mask {
                Some(m) => (dxd * m)?,
                None => dxd,
            };
            Some((dy.matmul(&self.weight)? + dx_lora)?) // (N, in)
        } else {
            None
        };
        Ok((dx, da, db))
    }
}

/// LoRA's layer output `y` (N, out), computed elsewhere from x, A and B detached,
/// joined to the graph of x (N, in), A (r, in) and B (out, r) with LoRA's gradients;
/// W (out, in) and the bias are constants. CPU f32.
pub fn lora_linear(
    x: &Tensor,
    y: Tensor,
    weight: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    dropout: Option<Dropout>,
) -> Result<Tensor> {
    if weight.track_op() || y.track_op() {
        candle_core::bail!("lora linear: W and y must be constants");
    }
    FUSED_CALLS.fetch_add(1, Ordering::Relaxed);
    x.apply_op3(
        a,
        b,
        LoraLinear {
            weight: weight.clone(),
            y: Mutex::new(Some(y)),
            scale,
            dropout,
        },
    )
}
