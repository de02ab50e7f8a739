//! The Llama family (Touvron et al. 2023): RoPE, RMSNorm, SwiGLU MLP, grouped-query
//! attention, tied or untied head. `qwen2` is the same network with a bias on the
//! q/k/v projections; this covers SmolLM, TinyLlama and Qwen2.x checkpoints.
//! Parameter names follow transformers' `LlamaForCausalLM`.

use candle_core::{DType, Device, Tensor, D};
use serde_json::Value;

use super::config::{Arch, LlamaConfig};
use super::kv_cache::KvCache;
use super::layers::{attention, embed, split_heads, swiglu, Linear, RmsNorm};
use super::mask::AttentionMask;
use super::params::{Init, ParamSpec, Params};
use crate::error::Result;

const INIT_STD: f64 = 0.02;

/// Whether q/k/v carry a bias: always for Qwen2, `attention_bias` for Llama.
fn qkv_bias(arch: Arch, cfg: &LlamaConfig) -> bool {
    arch == Arch::Qwen2 || cfg.attention_bias
}

/// The parameter table of a Llama-family model, head included when untied.
pub fn param_specs(arch: Arch, cfg: &LlamaConfig) -> Vec<ParamSpec> {
    let (h, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let (q_out, kv_out) = (
        cfg.num_attention_heads * cfg.head_dim(),
        cfg.kv_heads() * cfg.head_dim(),
    );
    let mut specs = vec![ParamSpec::new(
        "model.embed_tokens.weight",
        &[v, h],
        Init::Normal(INIT_STD),
    )];
    for l in 0..cfg.num_hidden_layers {
        let n = |s: &str| format!("model.layers.{l}.{s}");
        let mut lin = |name: &str, out: usize, inp: usize, bias: bool| {
            specs.push(
                ParamSpec::new(
                    n(&format!("{name}.weight")),
                    &[out, inp],
                    Init::Normal(INIT_STD),
                )
                .decayed(),
            );
            if bias {
                specs.push(ParamSpec::new(
                    n(&format!("{name}.bias")),
                    &[out],
                    Init::Zeros,
                ));
            }
        };
        let qkv_b = qkv_bias(arch, cfg);
        lin("self_attn.q_proj", q_out, h, qkv_b);
        lin("self_attn.k_proj", kv_out, h, qkv_b);
        lin("self_attn.v_proj", kv_out, h, qkv_b);
        lin(
            "self_attn.o_proj",
            h,
            q_out,
            cfg.attention_bias && arch == Arch::Llama,
        );
        lin("mlp.gate_proj", i, h, cfg.mlp_bias);
        lin("mlp.up_proj", i, h, cfg.mlp_bias);
        lin("mlp.down_proj", h, i, cfg.mlp_bias);
        specs.push(ParamSpec::new(
            n("input_layernorm.weight"),
            &[h],
            Init::Ones,
        ));
        specs.push(ParamSpec::new(
            n("post_attention_layernorm.weight"),
            &[h],
            Init::Ones,
        ));
    }
    specs.push(ParamSpec::new("model.norm.weight", &[h], Init::Ones));
    if !cfg.tie_word_embeddings {
        specs.push(ParamSpec::new("lm_head.weight", &[v, h], Init::Normal(INIT_STD)).decayed());
    }
    specs
}

#[derive(Debug, Clone)]
struct Layer {
    input_layernorm: RmsNorm,
    q_proj: Linear, // (nh·hd, H)
    k_proj: Linear, // (nkv·hd, H)
    v_proj: Linear, // (nkv·hd, H)
    o_proj: Linear, // (H, nh·hd)
    post_attention_layernorm: RmsNorm,
    gate_proj: Linear, // (I, H)
    up_proj: Linear,   // (I, H)
    down_proj: Linear, // (H, I)
}

#[derive(Debug, Clone)]
pub struct Llama {
    n_heads: usize,
    n_kv_heads: usize,
    inv_freq: Tensor,     // (1, 1, hd/2)
    embed_tokens: Tensor, // (V, H)
    layers: Vec<Layer>,
    norm: RmsNorm,
}

impl Llama {
    pub fn new(cfg: &LlamaConfig, p: &Params, device: &Device) -> Result<Self> {
        let eps = cfg.rms_norm_eps;
        let norm = |name: String| RmsNorm {
            weight: p.get(&name),
            eps,
        };
        let lin = |name: String| {
            let bias_name = format!("{name}.bias");
            let bias = p.var(&bias_name).map(|_| p.get(&bias_name));
            Linear::new(p.get(&format!("{name}.weight")), bias)
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|l| {
                let n = |s: &str| format!("model.layers.{l}.{s}");
                Layer {
                    input_layernorm: norm(n("input_layernorm.weight")),
                    q_proj: lin(n("self_attn.q_proj")),
                    k_proj: lin(n("self_attn.k_proj")),
                    v_proj: lin(n("self_attn.v_proj")),
                    o_proj: lin(n("self_attn.o_proj")),
                    post_attention_layernorm: norm(n("post_attention_layernorm.weight")),
                    gate_proj: lin(n("mlp.gate_proj")),
                    up_proj: lin(n("mlp.up_proj")),
                    down_proj: lin(n("mlp.down_proj")),
                }
            })
            .collect();
        let inv_freq = rope_inv_freq(cfg);
        let half = inv_freq.len();
        Ok(Llama {
            n_heads: cfg.num_attention_heads,
            n_kv_heads: cfg.kv_heads(),
            inv_freq: Tensor::from_vec(inv_freq, (1, 1, half), device)?,
            embed_tokens: p.get("model.embed_tokens.weight"),
            layers,
            norm: norm("model.norm.weight".into()),
        })
    }

    pub fn token_embedding(&self) -> &Tensor {
        &self.embed_tokens
    }

    /// The same model with every tensor detached (see `Backbone::detached`).
    pub fn detached(&self) -> Self {
        Llama {
            n_heads: self.n_heads,
            n_kv_heads: self.n_kv_heads,
            inv_freq: self.inv_freq.detach(),
            embed_tokens: self.embed_tokens.detach(),
            layers: self
                .layers
                .iter()
                .map(|l| Layer {
                    input_layernorm: l.input_layernorm.detached(),
                    q_proj: l.q_proj.detached(),
                    k_proj: l.k_proj.detached(),
                    v_proj: l.v_proj.detached(),
                    o_proj: l.o_proj.detached(),
                    post_attention_layernorm: l.post_attention_layernorm.detached(),
                    gate_proj: l.gate_proj.detached(),
                    up_proj: l.up_proj.detached(),
                    down_proj: l.down_proj.detached(),
                })
                .collect(),
            norm: self.norm.detached(),
        }
    }

    /// A copy whose dense layers are `f(module name, layer)`, the names as PEFT
    /// writes them (`model.layers.0.self_attn.q_proj`); every other tensor is shared.
    pub fn map_linears(&self, f: &dyn Fn(&str, &Linear) -> Result<Linear>) -> Result<Self> {
        let mut out = self.clone();
        for (l, layer) in out.layers.iter_mut().enumerate() {
            let n = |s: &str| format!("model.layers.{l}.{s}");
            layer.q_proj = f(&n("self_attn.q_proj"), &layer.q_proj)?;
            layer.k_proj = f(&n("self_attn.k_proj"), &layer.k_proj)?;
            layer.v_proj = f(&n("self_attn.v_proj"), &layer.v_proj)?;
            layer.o_proj = f(&n("self_attn.o_proj"), &layer.o_proj)?;
            layer.gate_proj = f(&n("mlp.gate_proj"), &layer.gate_proj)?;
            layer.up_proj = f(&n("mlp.up_proj"), &layer.up_proj)?;
            layer.down_proj = f(&n("mlp.down_proj"), &layer.down_proj)?;
        }
        Ok(out)
    }

    /// ids: (B, T) → final hidden states (B, T, H).
    pub fn forward(
        &self,
        ids: &Tensor,
        mask: &AttentionMask,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (cos, sin) = self.rope_tables(&mask.position_ids)?; // (B, 1, T, hd) each
        let mut x = embed(&self.embed_tokens, ids)?; // (B, T, H)
        for (i, layer) in self.layers.iter().enumerate() {
            let h = layer.input_layernorm.forward(&x)?; // (B, T, H)
            let q = split_heads(&layer.q_proj.forward(&h)?, self.n_heads)?; // (B, nh, T, hd)
            let k = split_heads(&layer.k_proj.forward(&h)?, self.n_kv_heads)?; // (B, nkv, T, hd)
            let v = split_heads(&layer.v_proj.forward(&h)?, self.n_kv_heads)?; // (B, nkv, T, hd)
            let q = apply_rope(&q, &cos, &sin)?;
            let k = apply_rope(&k, &cos, &sin)?;
            let (k, v) = match cache.as_deref_mut() {
                Some(cache) => cache.append(i, &k, &v)?, // (B, nkv, S, hd) each
                None => (k, v),
            };
            let y = attention(&q, &k, &v, mask)?; // (B, T, nh·hd)
            x = (x + layer.o_proj.forward(&y)?)?;
            let h = layer.post_attention_layernorm.forward(&x)?; // (B, T, H)
            let gate = layer.gate_proj.forward(&h)?; // (B, T, I)
            let up = layer.up_proj.forward(&h)?; // (B, T, I)
            x = (x + layer.down_proj.forward(&swiglu(&gate, &up)?)?)?;
        }
        self.norm.forward(&x)
    }

    /// cos and sin of position · inv_freq, duplicated over both halves of the head
    /// (transformers' `rotate_half` layout). position_ids: (B, T) → (B, 1, T, hd) each.
    fn rope_tables(&self, position_ids: &Tensor) -> Result<(Tensor, Tensor)> {
        let pos = position_ids.to_dtype(DType::F32)?.unsqueeze(D::Minus1)?; // (B, T, 1)
        let freqs = pos.broadcast_mul(&self.inv_freq)?; // (B, T, hd/2)
        let emb = Tensor::cat(&[&freqs, &freqs], D::Minus1)?.unsqueeze(1)?; // (B, 1, T, hd)
        Ok((emb.cos()?, emb.sin()?))
    }
}

/// x·cos + rotate_half(x)·sin, with rotate_half(x) = [-x₂, x₁].
/// x: (B, n, T, hd), cos/sin: (B, 1, T, hd).
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?; // (B, n, T, hd/2)
    let x2 = x.narrow(D::Minus1, half, half)?; // (B, n, T, hd/2)
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?; // (B, n, T, hd)
    Ok((x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?)?)
}

/// RoPE inverse frequencies θ^(-2i/d), with `linear` or `llama3` scaling applied as
/// transformers' `ROPE_INIT_FUNCTIONS` do.
fn rope_inv_freq(cfg: &LlamaConfig) -> Vec<f32> {
    let d = cfg.head_dim();
    let base: Vec<f64> = (0..d / 2)
        .map(|i| 1.0 / cfg.rope_theta.powf((2 * i) as f64 / d as f64))
        .collect();
    let Some(scaling) = cfg.rope_scaling.as_ref().filter(|s| !s.is_null()) else {
        return base.iter().map(|&f| f as f32).collect();
    };
    let num = |k: &str, default: f64| scaling.get(k).and_then(Value::as_f64).unwrap_or(default);
    let kind = scaling
        .get("rope_type")
        .or_else(|| scaling.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let factor = num("factor", 1.0);
    let scaled: Vec<f64> = match kind {
        "linear" => base.iter().map(|f| f / factor).collect(),
        "llama3" => {
            let (low, high) = (num("low_freq_factor", 1.0), num("high_freq_factor", 4.0));
            let orig = num("original_max_position_embeddings", 8192.0);
            let (low_wavelen, high_wavelen) = (orig / low, orig / high);
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (orig / wavelen - low) / (high - low);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
        _ => base,
    };
    scaled.iter().map(|&f| f as f32).collect()
}
