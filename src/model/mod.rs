//! Models: backbones (one file per family), heads, the KV cache and HF import/export.
//!
//! A model is a `Backbone` (token ids → final hidden states) plus a head. The LM head
//! maps hidden states to next-token logits; the reward and value models put a scalar
//! head on the same backbone.

pub mod config;
pub mod frozen;
pub mod gpt2;
pub mod hf;
pub mod kv_cache;
pub mod layers;
pub mod llama;
pub mod lora;
pub mod mask;
pub mod packed;
pub mod params;
pub mod presets;
pub mod response;
pub mod scalar;

use candle_core::{Device, IndexOp, Tensor};

pub use config::{Arch, FamilyConfig, ModelConfig};
pub use kv_cache::KvCache;
pub use mask::AttentionMask;
pub use params::{ParamSpec, Params};

use crate::error::Result;

/// The transformer body of any supported family.
#[derive(Debug, Clone)]
pub enum Backbone {
    Gpt2(gpt2::Gpt2),
    Llama(llama::Llama),
}

impl Backbone {
    /// The parameter table for a config (backbone, and the LM head when untied).
    pub fn param_specs(cfg: &ModelConfig) -> Vec<ParamSpec> {
        match &cfg.family {
            FamilyConfig::Gpt2(c) => gpt2::param_specs(c),
            FamilyConfig::Llama(c) => llama::param_specs(cfg.arch, c),
        }
    }

    pub fn new(cfg: &ModelConfig, params: &Params, device: &Device) -> Result<Self> {
        Ok(match &cfg.family {
            FamilyConfig::Gpt2(c) => Backbone::Gpt2(gpt2::Gpt2::new(c, params)),
            FamilyConfig::Llama(c) => Backbone::Llama(llama::Llama::new(c, params, device)?),
        })
    }

    /// ids: (B, T) → final hidden states (B, T, C). With a cache, the ids are the new
    /// tokens and `mask` covers cached + new positions.
    pub fn forward(
        &self,
        ids: &Tensor,
        mask: &AttentionMask,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        match self {
            Backbone::Gpt2(m) => m.forward(ids, mask, cache),
            Backbone::Llama(m) => m.forward(ids, mask, cache),
        }
    }

    /// A copy whose dense layers are `f(module name, layer)` (how LoRA attaches its
    /// branches); every other tensor is shared, not copied.
    pub fn map_linears(
        &self,
        f: &dyn Fn(&str, &layers::Linear) -> Result<layers::Linear>,
    ) -> Result<Self> {
        Ok(match self {
            Backbone::Gpt2(m) => Backbone::Gpt2(m.map_linears(f)?),
            Backbone::Llama(m) => Backbone::Llama(m.map_linears(f)?),
        })
    }

    /// The same model with every tensor detached: storage shared with the original
    /// (nothing copied; an optimizer step on it shows here), and no op of a forward
    /// through it is recorded for a backward pass. What inference runs on (sampling,
    /// scoring, the frozen models): through trainable weights candle keeps every
    /// intermediate of a forward alive until its output is dropped, which on PPO's
    /// scoring pass over a whole rollout batch was most of the run's peak memory.
    pub fn detached(&self) -> Self {
        match self {
            Backbone::Gpt2(m) => Backbone::Gpt2(m.detached()),
            Backbone::Llama(m) => Backbone::Llama(m.detached()),
        }
    }

    pub fn token_embedding(&self) -> &Tensor {
        match self {
            Backbone::Gpt2(m) => m.token_embedding(),
            Backbone::Llama(m) => m.token_embedding(),
        }
    }
}

/// Hidden states → next-token logits. Tied heads share the embedding tensor, so its
/// gradient collects both uses.
#[derive(Debug, Clone)]
pub struct LmHead {
    pub weight: Tensor, // (V, C)
}

impl LmHead {
    /// hidden: (B, T, C) → logits (B, T, V)
    pub fn forward(&self, hidden: &Tensor) -> Result<Tensor> {
        layers::Linear::new(self.weight.clone(), None).forward(hidden)
    }

    /// log p(target) of each row: hidden (N, C), targets (N,) u32 → (N,). On CPU the
    /// logits are never a tensor (`ops::lm_head`).
    pub fn token_logprobs(&self, hidden: &Tensor, targets: &Tensor) -> Result<Tensor> {
        if crate::ops::fused_for(hidden) {
            return Ok(crate::ops::lm_head::head_logprobs(
                hidden,
                &self.weight,
                targets,
                false,
            )?);
        }
        crate::losses::token_logprobs(&self.forward(hidden)?, targets)
    }

    /// `token_logprobs` and the softmax entropy of each row (detached): (N,) each.
    pub fn token_logprobs_and_entropy(
        &self,
        hidden: &Tensor,
        targets: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        if crate::ops::fused_for(hidden) {
            let both = crate::ops::lm_head::head_logprobs(hidden, &self.weight, targets, true)?; // (N, 2)
            return Ok((both.i((.., 0))?, both.i((.., 1))?.detach()));
        }
        let logits = self.forward(hidden)?; // (N, V)
        Ok((
            crate::losses::token_logprobs(&logits, targets)?,
            crate::losses::entropy(&logits)?,
        ))
    }
}

/// A causal language model: backbone + LM head, with its parameters and config.
#[derive(Debug, Clone)]
pub struct CausalLm {
    pub config: ModelConfig,
    pub params: Params,
    pub backbone: Backbone,
    pub lm_head: LmHead,
    pub device: Device,
}

impl CausalLm {
    /// Assembles a model from parameters that match `Backbone::param_specs(&config)`.
    pub fn from_params(config: ModelConfig, params: Params, device: &Device) -> Result<Self> {
        let backbone = Backbone::new(&config, &params, device)?;
        let weight = if config.tie_word_embeddings() {
            backbone.token_embedding().clone()
        } else {
            params.get("lm_head.weight")
        };
        Ok(CausalLm {
            config,
            params,
            backbone,
            lm_head: LmHead { weight },
            device: device.clone(),
        })
    }

    /// A randomly initialised model, reproducible from `seed`.
    pub fn init(config: ModelConfig, seed: u64, device: &Device) -> Result<Self> {
        let params = Params::init(Backbone::param_specs(&config), seed, device)?;
        Self::from_params(config, params, device)
    }

    /// ids: (B, T) → logits (B, T, V)
    pub fn forward(
        &self,
        ids: &Tensor,
        mask: &AttentionMask,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let hidden = self.backbone.forward(ids, mask, cache)?; // (B, T, C)
        self.lm_head.forward(&hidden)
    }

    /// The same model for inference: every tensor of the forward detached
    /// (`Backbone::detached`); `params` still holds the variables, for saving.
    pub fn detached(&self) -> Self {
        CausalLm {
            config: self.config.clone(),
            params: self.params.clone(),
            backbone: self.backbone.detached(),
            lm_head: LmHead {
                weight: self.lm_head.weight.detach(),
            },
            device: self.device.clone(),
        }
    }

    /// A fresh, empty KV cache sized for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.config.num_layers())
    }
}
