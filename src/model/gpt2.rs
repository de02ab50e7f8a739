//! GPT-2 (Radford et al. 2019): learned positions, pre-LayerNorm blocks, GELU (tanh),
//! LM head tied to the token embedding. Parameter names follow transformers'
//! `GPT2LMHeadModel`; its Conv1D weights are `[in, out]` on disk (see `params.rs`).

use candle_core::Tensor;

use super::config::Gpt2Config;
use super::kv_cache::KvCache;
use super::layers::{attention, attention_qkv, bias_gelu, embed, split_qkv, LayerNorm, Linear};
use super::mask::AttentionMask;
use super::params::{Init, ParamSpec, Params};
use crate::error::Result;

const INIT_STD: f64 = 0.02;

/// The parameter table of a GPT-2 backbone (the head is tied: no extra tensor).
pub fn param_specs(cfg: &Gpt2Config) -> Vec<ParamSpec> {
    let (c, v, p, m) = (cfg.n_embd, cfg.vocab_size, cfg.n_positions, cfg.mlp_width());
    // GPT-2 scales residual projections by 1/√(2·n_layer) at init (paper, §2.3).
    let proj_std = INIT_STD / (2.0 * cfg.n_layer as f64).sqrt();
    let mut specs = vec![
        ParamSpec::new("transformer.wte.weight", &[v, c], Init::Normal(INIT_STD)),
        ParamSpec::new("transformer.wpe.weight", &[p, c], Init::Normal(INIT_STD)),
    ];
    for i in 0..cfg.n_layer {
        let n = |s: &str| format!("transformer.h.{i}.{s}");
        let conv = |name: &str, out: usize, inp: usize, std: f64| {
            ParamSpec::new(n(name), &[out, inp], Init::Normal(std))
                .decayed()
                .transposed_on_disk()
        };
        specs.extend([
            ParamSpec::new(n("ln_1.weight"), &[c], Init::Ones),
            ParamSpec::new(n("ln_1.bias"), &[c], Init::Zeros),
            conv("attn.c_attn.weight", 3 * c, c, INIT_STD),
            ParamSpec::new(n("attn.c_attn.bias"), &[3 * c], Init::Zeros),
            conv("attn.c_proj.weight", c, c, proj_std),
            ParamSpec::new(n("attn.c_proj.bias"), &[c], Init::Zeros),
            ParamSpec::new(n("ln_2.weight"), &[c], Init::Ones),
            ParamSpec::new(n("ln_2.bias"), &[c], Init::Zeros),
            conv("mlp.c_fc.weight", m, c, INIT_STD),
            ParamSpec::new(n("mlp.c_fc.bias"), &[m], Init::Zeros),
            conv("mlp.c_proj.weight", c, m, proj_std),
            ParamSpec::new(n("mlp.c_proj.bias"), &[c], Init::Zeros),
        ]);
    }
    specs.extend([
        ParamSpec::new("transformer.ln_f.weight", &[c], Init::Ones),
        ParamSpec::new("transformer.ln_f.bias", &[c], Init::Zeros),
    ]);
    specs
}

#[derive(Debug, Clone)]
struct Block {
    ln_1: LayerNorm,
    c_attn: Linear, // (3C, C)
    c_proj: Linear, // (C, C)
    ln_2: LayerNorm,
    c_fc: Linear,      // (M, C), without its bias: the activation adds it
    c_fc_bias: Tensor, // (M,)
    mlp_proj: Linear,  // (C, M)
}

#[derive(Debug, Clone)]
pub struct Gpt2 {
    n_head: usize,
    /// `activation_function: gelu` is the exact (erf) GELU; the others are tanh.
    exact_gelu: bool,
    wte: Tensor, // (V, C)
    wpe: Tensor, // (P, C)
    blocks: Vec<Block>,
    ln_f: LayerNorm,
}

impl Gpt2 {
    pub fn new(cfg: &Gpt2Config, p: &Params) -> Self {
        let eps = cfg.layer_norm_epsilon;
        let ln = |name: &str| LayerNorm {
            weight: p.get(&format!("{name}.weight")),
            bias: p.get(&format!("{name}.bias")),
            eps,
        };
        let lin = |name: &str| {
            Linear::new(
                p.get(&format!("{name}.weight")),
                Some(p.get(&format!("{name}.bias"))),
            )
        };
        let blocks = (0..cfg.n_layer)
            .map(|i| {
                let n = |s: &str| format!("transformer.h.{i}.{s}");
                Block {
                    ln_1: ln(&n("ln_1")),
                    c_attn: lin(&n("attn.c_attn")),
                    c_proj: lin(&n("attn.c_proj")),
                    ln_2: ln(&n("ln_2")),
                    c_fc: Linear::new(p.get(&n("mlp.c_fc.weight")), None),
                    c_fc_bias: p.get(&n("mlp.c_fc.bias")),
                    mlp_proj: lin(&n("mlp.c_proj")),
                }
            })
            .collect();
        Gpt2 {
            n_head: cfg.n_head,
            exact_gelu: cfg.activation_function == "gelu",
            wte: p.get("transformer.wte.weight"),
            wpe: p.get("transformer.wpe.weight"),
            blocks,
            ln_f: ln("transformer.ln_f"),
        }
    }

    /// A copy whose dense layers are `f(module name, layer)`, the names as PEFT
    /// writes them (`transformer.h.0.attn.c_attn`); every other tensor is shared.
    pub fn map_linears(&self, f: &dyn Fn(&str, &Linear) -> Result<Linear>) -> Result<Self> {
        let mut out = self.clone();
        for (i, block) in out.blocks.iter_mut().enumerate() {
            let n = |s: &str| format!("transformer.h.{i}.{s}");
            block.c_attn = f(&n("attn.c_attn"), &block.c_attn)?;
            block.c_proj = f(&n("attn.c_proj"), &block.c_proj)?;
            block.c_fc = f(&n("mlp.c_fc"), &block.c_fc)?;
            block.mlp_proj = f(&n("mlp.c_proj"), &block.mlp_proj)?;
        }
        Ok(out)
    }

    /// The same model with every tensor detached (see `Backbone::detached`).
    pub fn detached(&self) -> Self {
        Gpt2 {
            n_head: self.n_head,
            exact_gelu: self.exact_gelu,
            wte: self.wte.detach(),
            wpe: self.wpe.detach(),
            blocks: self
                .blocks
                .iter()
                .map(|b| Block {
                    ln_1: b.ln_1.detached(),
                    c_attn: b.c_attn.detached(),
                    c_proj: b.c_proj.detached(),
                    ln_2: b.ln_2.detached(),
                    c_fc: b.c_fc.detached(),
                    c_fc_bias: b.c_fc_bias.detach(),
                    mlp_proj: b.mlp_proj.detached(),
                })
                .collect(),
            ln_f: self.ln_f.detached(),
        }
    }

    /// The token embedding, which is also the LM head's weight (tied).
    pub fn token_embedding(&self) -> &Tensor {
        &self.wte
    }

    /// ids: (B, T) → final hidden states (B, T, C).
    pub fn forward(
        &self,
        ids: &Tensor,
        mask: &AttentionMask,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let tok = embed(&self.wte, ids)?; // (B, T, C)
        let pos = embed(&self.wpe, &mask.position_ids)?; // (B, T, C)
        let mut x = (tok + pos)?; // (B, T, C)
        for (i, block) in self.blocks.iter().enumerate() {
            let h = block.ln_1.forward(&x)?; // (B, T, C)
            let qkv = block.c_attn.forward(&h)?; // (B, T, 3C)
            let y = match cache.as_deref_mut() {
                Some(cache) => {
                    let (q, k, v) = split_qkv(&qkv, self.n_head)?; // (B, nh, T, hd) each
                    let (k, v) = cache.append(i, &k, &v)?; // (B, nh, S, hd) each
                    attention(&q, &k, &v, mask)? // (B, T, C)
                }
                None => attention_qkv(&qkv, self.n_head, mask)?, // (B, T, C)
            };
            x = (x + block.c_proj.forward(&y)?)?;
            let h = block.ln_2.forward(&x)?; // (B, T, C)
            let h = block.c_fc.forward(&h)?; // (B, T, M)
            let h = bias_gelu(&h, &block.c_fc_bias, self.exact_gelu)?; // (B, T, M)
            x = (x + block.mlp_proj.forward(&h)?)?;
        }
        self.ln_f.forward(&x)
    }
}
