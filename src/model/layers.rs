//! Building blocks shared by the model families, written from composite candle ops so
//! that every one of them has a backward pass.
//!
//! candle 0.11's fused `ops::layer_norm`, `ops::rms_norm` and `ops::softmax_last_dim`
//! have no backward (gradients silently stop there), so none of them is used here.
//! On CPU, the norms and attention run as fused kernels with their own backward
//! (`crate::ops`); the composite versions stay as their references and serve other
//! devices.

use candle_core::{Tensor, D};

use super::mask::AttentionMask;
use crate::error::Result;
use crate::ops;

/// Up to this many rows, `Linear` uses the skinny kernel instead of gemm.
const SKINNY_ROWS: usize = 16;

/// A dense layer `y = x Wᵀ + b`, with a LoRA branch when adapters are attached.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,       // (out, in)
    pub bias: Option<Tensor>, // (out,)
    pub lora: Option<LoraBranch>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear {
            weight,
            bias,
            lora: None,
        }
    }

    /// The same layer with every tensor detached (storage shared, nothing copied).
    pub fn detached(&self) -> Self {
        Linear {
            weight: self.weight.detach(),
            bias: self.bias.as_ref().map(Tensor::detach),
            lora: self.lora.as_ref().map(|l| LoraBranch {
                a: l.a.detach(),
                b: l.b.detach(),
                ..l.clone()
            }),
        }
    }

    /// x: (..., in) → (..., out)
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let inner = dims[dims.len() - 1];
        let x2 = x.reshape((rows, inner))?; // (N, in)
        let fused = crate::ops::fused_for(x);
        // x·Wᵀ + b, one way for every path below, so that a pass with a gradient and
        // one without (sampling, stored log-probs) give the same bits.
        let base = |x2: &Tensor, bias: Option<&Tensor>| -> Result<Tensor> {
            let skinny = rows <= SKINNY_ROWS || ops::row_independent_products();
            let y = if skinny && fused {
                // Few rows (a decoding step), or inference asking for bits that do
                // not depend on the row count: stream the weight once (ops::matmul).
                ops::matmul::skinny_matmul(x2, &self.weight)? // (N, out)
            } else if fused {
                // The bias in the gemm's epilogue; one backward for x, W and b.
                return Ok(ops::dense::dense(x2, &self.weight, bias)?); // (N, out)
            } else {
                crate::device::matmul(x2, &self.weight.t()?)? // (N, out)
            };
            Ok(match bias {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            })
        };
        // A constant weight and bias (LoRA's base). A trainable bias on a constant
        // weight (no model builds one today) takes the general path: above 16 rows
        // `dense` gives W no gradient and the bits of a pass without gradients; on
        // the skinny path W's gradient is computed and dropped.
        let frozen =
            fused && !self.weight.track_op() && self.bias.as_ref().is_none_or(|b| !b.track_op());
        // This micro-batch's dropout on the LoRA branch, drawn once for the layer.
        let dropout = self.lora.as_ref().and_then(|l| l.dropout.current());
        let with_branch = |y: Tensor, x2: &Tensor, lora: Option<&LoraBranch>| {
            Ok::<_, crate::error::Error>(match lora {
                Some(l) => (y + l.forward_with(x2, dropout)?)?, // (N, out)
                None => y,
            })
        };
        let fused_lora = self
            .lora
            .as_ref()
            .filter(|l| frozen && (x2.track_op() || l.a.track_op() || l.b.track_op()));
        let y = if let Some(lora) = fused_lora {
            // LoRA in a pass that will be differentiated: the value from detached
            // inputs (the composite's arithmetic, op for op), joined to the graph as
            // one op that keeps none of the branch's intermediates.
            let xd = x2.detach();
            let constant = self.detached();
            let y = with_branch(base(&xd, self.bias.as_ref())?, &xd, constant.lora.as_ref())?;
            ops::lora::lora_linear(&x2, y, &self.weight, &lora.a, &lora.b, lora.scale, dropout)?
        } else if frozen && x2.track_op() {
            // A frozen weight (LoRA's base) in a pass that will be differentiated: the
            // same product, with a backward that gives x its gradient and W none.
            let y = base(&x2.detach(), self.bias.as_ref())?;
            let y = ops::matmul::with_frozen_weight_grad(&x2, &y, &self.weight)?;
            with_branch(y, &x2, self.lora.as_ref())?
        } else {
            with_branch(base(&x2, self.bias.as_ref())?, &x2, self.lora.as_ref())?
        };
        let mut out_dims = dims;
        *out_dims.last_mut().expect("non-empty") = self.weight.dim(0)?;
        Ok(y.reshape(out_dims)?)
    }
}

/// The low-rank update of LoRA (Hu et al. 2021, eq. 3), as PEFT computes it:
/// Δy = (α/r) · B A dropout(x), with A (r, in) and B (out, r) trainable and the layer's
/// own weight frozen. B starts at zero, so a fresh adapter leaves the model unchanged.
#[derive(Debug, Clone)]
pub struct LoraBranch {
    pub a: Tensor, // (r, in)
    pub b: Tensor, // (out, r)
    /// α / r (α / √r with rsLoRA).
    pub scale: f64,
    pub dropout: LoraDropout,
}

impl LoraBranch {
    /// x: (N, in) → Δy (N, out)
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, self.dropout.current())
    }

    /// As `forward`, with this dropout (read once by the caller).
    fn forward_with(&self, x: &Tensor, dropout: Option<ops::lora::Dropout>) -> Result<Tensor> {
        let x = match dropout {
            Some(d) => d.apply(x)?,
            None => x.clone(),
        }; // (N, in)
        let h = x.matmul(&self.a.t()?)?; // (N, r)
        Ok((h.matmul(&self.b.t()?)? * self.scale)?)
    }

    /// The dense update (α/r)·B·A: (out, in), what merging adds to the weight.
    pub fn delta(&self) -> Result<Tensor> {
        Ok((self.b.matmul(&self.a)? * self.scale)?)
    }
}

/// Dropout on the input of a LoRA branch (PEFT's `lora_dropout`), on only while a
/// training loss is computed. Its masks are a pure function of a key the training
/// task sets per micro-batch and of the layer, so a run is reproducible and a resumed
/// run draws the same masks without any saved random state.
#[derive(Debug, Clone)]
pub struct LoraDropout {
    pub p: f64,
    /// Distinct per layer.
    pub layer: u64,
    pub key: DropoutKey,
}

/// The key of the current micro-batch's dropout masks, shared by every LoRA layer of a
/// model; `None` (the default) is no dropout: evaluation, sampling, scoring.
#[derive(Debug, Clone, Default)]
pub struct DropoutKey(std::sync::Arc<std::sync::Mutex<Option<u64>>>);

impl DropoutKey {
    pub fn set(&self, key: Option<u64>) {
        *self.0.lock().expect("dropout key") = key;
    }

    pub fn get(&self) -> Option<u64> {
        *self.0.lock().expect("dropout key")
    }
}

impl LoraDropout {
    /// This micro-batch's dropout: `Some` when a key is set and p > 0.
    pub fn current(&self) -> Option<ops::lora::Dropout> {
        let key = self.key.get().filter(|_| self.p > 0.0)?;
        Some(ops::lora::Dropout {
            p: self.p,
            seed: ops::lora::splitmix64(key ^ ops::lora::splitmix64(self.layer)),
        })
    }
}

/// LayerNorm over the last dimension (GPT-2).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Tensor, // (C,)
    pub bias: Tensor,   // (C,)
    pub eps: f64,
}

impl LayerNorm {
    pub fn detached(&self) -> Self {
        LayerNorm {
            weight: self.weight.detach(),
            bias: self.bias.detach(),
            eps: self.eps,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if crate::ops::fused_for(x) {
            return Ok(ops::norm::layer_norm(
                x,
                &self.weight,
                &self.bias,
                self.eps,
            )?);
        }
        self.forward_composite(x)
    }

    /// The same computation from candle ops (the kernel's reference; other devices).
    pub fn forward_composite(&self, x: &Tensor) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?; // (..., 1)
        let xc = x.broadcast_sub(&mean)?; // (..., C)
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?; // (..., 1)
        let xn = xc.broadcast_div(&(var + self.eps)?.sqrt()?)?; // (..., C)
        Ok(xn.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)?)
    }
}

/// RMSNorm over the last dimension (Llama family).
#[derive(Debug, Clone)]
pub struct RmsNorm {
    pub weight: Tensor, // (C,)
    pub eps: f64,
}

impl RmsNorm {
    pub fn detached(&self) -> Self {
        RmsNorm {
            weight: self.weight.detach(),
            eps: self.eps,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if crate::ops::fused_for(x) {
            return Ok(ops::norm::rms_norm(x, &self.weight, self.eps)?);
        }
        self.forward_composite(x)
    }

    /// The same computation from candle ops (the kernel's reference; other devices).
    pub fn forward_composite(&self, x: &Tensor) -> Result<Tensor> {
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?; // (..., 1)
        let xn = x.broadcast_div(&(ms + self.eps)?.sqrt()?)?; // (..., C)
        Ok(xn.broadcast_mul(&self.weight)?)
    }
}

/// gelu(x + bias): GPT-2's MLP activation with c_fc's bias folded in. `exact` is the
/// erf form (`gelu`), otherwise the tanh form (`gelu_new`). x: (..., M), bias: (M,).
/// On CPU this is the fused kernel of `ops::activation`.
pub fn bias_gelu(x: &Tensor, bias: &Tensor, exact: bool) -> Result<Tensor> {
    if crate::ops::fused_for(x) {
        return Ok(ops::activation::bias_gelu(x, bias, exact)?);
    }
    bias_gelu_composite(x, bias, exact)
}

/// `bias_gelu` from candle ops (the kernel's reference; other devices).
pub fn bias_gelu_composite(x: &Tensor, bias: &Tensor, exact: bool) -> Result<Tensor> {
    let z = x.broadcast_add(bias)?;
    Ok(if exact { z.gelu_erf()? } else { z.gelu()? })
}

/// silu(gate) · up: the Llama MLP's SwiGLU. gate, up: (..., I). On CPU this is the
/// fused kernel of `ops::activation`.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if crate::ops::fused_for(gate) {
        return Ok(ops::activation::swiglu(gate, up)?);
    }
    swiglu_composite(gate, up)
}

/// `swiglu` from candle ops (the kernel's reference; other devices).
pub fn swiglu_composite(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    Ok((gate.silu()? * up)?)
}

/// Softmax over the last dimension. The max is detached: softmax is shift-invariant,
/// so the gradient is unchanged and no gradient flows through the max.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach(); // (..., 1)
    let e = x.broadcast_sub(&max)?.exp()?; // (..., N)
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// Causal scaled dot-product attention under a padding mask. Grouped-query attention:
/// k and v may have fewer heads than q; each kv head serves `n_heads / n_kv_heads`
/// query heads. On CPU this is the fused kernel of `ops::attention`.
///
/// q: (B, nh, T, hd), k, v: (B, nkv, S, hd) → (B, T, nh·hd), the heads merged
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &AttentionMask) -> Result<Tensor> {
    if crate::ops::fused_for(q) {
        return Ok(ops::attention::causal_attention(q, k, v, &mask.causal)?);
    }
    merge_heads(&attention_composite(q, k, v, &mask.bias(q.device())?)?)
}

/// `attention` on a dense layer's output that holds q, k and v side by side, each
/// with `n_heads` heads (GPT-2's `c_attn`); without a KV cache. On CPU the fused
/// kernel reads the heads where they are.
///
/// qkv: (B, T, 3C) → (B, T, C)
pub fn attention_qkv(qkv: &Tensor, n_heads: usize, mask: &AttentionMask) -> Result<Tensor> {
    if crate::ops::fused_for(qkv) {
        return Ok(ops::attention::causal_attention_qkv(
            qkv,
            n_heads,
            &mask.causal,
        )?);
    }
    let (q, k, v) = split_qkv(qkv, n_heads)?;
    attention(&q, &k, &v, mask)
}

/// q, k and v, each (B, nh, T, hd), from a dense layer's output (B, T, 3C) that holds
/// them side by side (GPT-2's `c_attn`).
pub fn split_qkv(qkv: &Tensor, n_heads: usize) -> Result<(Tensor, Tensor, Tensor)> {
    let c = qkv.dim(2)? / 3;
    let third = |j: usize| split_heads(&qkv.narrow(2, j * c, c)?, n_heads);
    Ok((third(0)?, third(1)?, third(2)?))
}

/// Attention from candle ops with an additive bias (B, 1, T, S): the fused kernel's
/// reference, and the path on other devices.
///
/// q: (B, nh, T, hd), k, v: (B, nkv, S, hd) → (B, nh, T, hd)
pub fn attention_composite(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (k, v) = (&k.contiguous()?, &v.contiguous()?);
    let (_, n_heads, _, head_dim) = q.dims4()?;
    let n_kv = k.dim(1)?;
    let k = repeat_kv(k, n_heads / n_kv)?; // (B, nh, S, hd)
    let v = repeat_kv(v, n_heads / n_kv)?; // (B, nh, S, hd)
    let scale = 1.0 / (head_dim as f64).sqrt();
    let scores = (crate::device::matmul(q, &k.t()?)? * scale)?.broadcast_add(bias)?; // (B, nh, T, S)
    let probs = softmax_last_dim(&scores)?; // (B, nh, T, S)
    Ok(crate::device::matmul(&probs, &v)?)
}

/// (B, nkv, S, hd) → (B, nkv·rep, S, hd), each kv head repeated `rep` times in place.
fn repeat_kv(x: &Tensor, rep: usize) -> Result<Tensor> {
    if rep == 1 {
        return Ok(x.clone());
    }
    let (b, n_kv, s, hd) = x.dims4()?;
    Ok(x.unsqueeze(2)?
        .expand((b, n_kv, rep, s, hd))?
        .reshape((b, n_kv * rep, s, hd))?)
}

/// (B, T, nh·hd) → (B, nh, T, hd)
pub fn split_heads(x: &Tensor, n_heads: usize) -> Result<Tensor> {
    let (b, t, c) = x.dims3()?;
    Ok(x.reshape((b, t, n_heads, c / n_heads))?
        .transpose(1, 2)?
        .contiguous()?)
}

/// (B, nh, T, hd) → (B, T, nh·hd)
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, nh, t, hd) = x.dims4()?;
    Ok(x.transpose(1, 2)?.reshape((b, t, nh * hd))?)
}

/// Looks up rows of an embedding table: ids (B, T) → (B, T, C).
pub fn embed(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let (b, t) = ids.dims2()?;
    let c = table.dim(1)?;
    Ok(table
        .index_select(&ids.flatten_all()?, 0)?
        .reshape((b, t, c))?)
}
