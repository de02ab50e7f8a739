//! Model configurations, deserialized directly from HF `config.json`.
//!
//! The raw JSON is kept beside the typed config so that keys we do not use survive a
//! load → save round trip (transformers reads them).

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::Path;

use crate::error::{Error, Result};

/// GPT-2 (`model_type: gpt2`): learned positions, LayerNorm, GELU (tanh), tied head.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Gpt2Config {
    pub vocab_size: usize,
    pub n_positions: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    /// MLP width; HF's default (None) means 4 · n_embd.
    #[serde(default)]
    pub n_inner: Option<usize>,
    #[serde(default = "default_ln_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "default_gelu_new")]
    pub activation_function: String,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<Value>,
}

fn default_ln_eps() -> f64 {
    1e-5
}
fn default_gelu_new() -> String {
    "gelu_new".into()
}
fn default_rms_eps() -> f64 {
    1e-6
}
fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_true() -> bool {
    true
}

impl Gpt2Config {
    pub fn mlp_width(&self) -> usize {
        self.n_inner.unwrap_or(4 * self.n_embd)
    }
}

/// Llama family (`llama`, `qwen2`): RoPE, RMSNorm, SwiGLU, grouped-query attention.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub max_position_embeddings: usize,
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub rope_scaling: Option<Value>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v (and o) projections in Llama; Qwen2 always has q/k/v bias.
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default = "default_silu")]
    pub hidden_act: String,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<Value>,
}

fn default_silu() -> String {
    "silu".into()
}

impl LlamaConfig {
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }
}

/// Which checkpoint family a folder holds; decides parameter names and blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Gpt2,
    Llama,
    Qwen2,
}

impl Arch {
    pub fn model_type(self) -> &'static str {
        match self {
            Arch::Gpt2 => "gpt2",
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
        }
    }
    pub fn causal_lm_class(self) -> &'static str {
        match self {
            Arch::Gpt2 => "GPT2LMHeadModel",
            Arch::Llama => "LlamaForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
        }
    }
}

/// A parsed config: the family-specific struct and the raw JSON it came from.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub arch: Arch,
    pub family: FamilyConfig,
    /// The whole config.json as read (or as built by `rlhf init`).
    pub raw: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub enum FamilyConfig {
    Gpt2(Gpt2Config),
    Llama(LlamaConfig),
}

impl ModelConfig {
    /// Parses an HF config.json value; `path` is only used in error messages.
    pub fn from_json(raw: Value, path: &Path) -> Result<Self> {
        let model_type = raw
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::bad_file(path, None, "field \"model_type\" is missing"))?
            .to_string();
        let bad = |e: serde_json::Error| Error::bad_file(path, None, e.to_string());
        let (arch, family) = match model_type.as_str() {
            "gpt2" => (
                Arch::Gpt2,
                FamilyConfig::Gpt2(serde_json::from_value(raw.clone()).map_err(bad)?),
            ),
            "llama" | "qwen2" => {
                let mut cfg: LlamaConfig = serde_json::from_value(raw.clone()).map_err(bad)?;
                // transformers ≥ 5 writes `rope_parameters` {rope_theta, rope_type, ...}
                // in place of `rope_theta` and `rope_scaling`.
                if let Some(rp) = raw.get("rope_parameters").filter(|v| v.is_object()) {
                    if let Some(theta) = rp.get("rope_theta").and_then(Value::as_f64) {
                        cfg.rope_theta = theta;
                    }
                    if cfg.rope_scaling.as_ref().is_none_or(Value::is_null) {
                        cfg.rope_scaling = Some(rp.clone());
                    }
                }
                let arch = if model_type == "qwen2" {
                    Arch::Qwen2
                } else {
                    Arch::Llama
                };
                if arch == Arch::Qwen2 && raw.get("tie_word_embeddings").is_none() {
                    // Qwen2Config's default differs from LlamaConfig's.
                    cfg.tie_word_embeddings = false;
                }
                (arch, FamilyConfig::Llama(cfg))
            }
            other => {
                return Err(Error::UnknownModelType {
                    path: path.to_path_buf(),
                    model_type: other.to_string(),
                })
            }
        };
        let cfg = ModelConfig { arch, family, raw };
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Builds a config for a family from its typed struct (used by `rlhf init`).
    pub fn from_family(arch: Arch, family: FamilyConfig) -> Self {
        let mut raw = match &family {
            FamilyConfig::Gpt2(c) => serde_json::to_value(c).expect("config serializes"),
            FamilyConfig::Llama(c) => serde_json::to_value(c).expect("config serializes"),
        };
        let obj = raw.as_object_mut().expect("config is an object");
        obj.insert("model_type".into(), arch.model_type().into());
        obj.insert(
            "architectures".into(),
            Value::from(vec![arch.causal_lm_class()]),
        );
        obj.insert("dtype".into(), "float32".into());
        if arch == Arch::Gpt2 {
            obj.insert("tie_word_embeddings".into(), true.into());
        }
        ModelConfig { arch, family, raw }
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let bad = |msg: String| Err(Error::bad_file(path, None, msg));
        match &self.family {
            FamilyConfig::Gpt2(c) => {
                if c.n_head == 0 || c.n_embd % c.n_head != 0 {
                    return bad(format!(
                        "n_embd ({}) must be a multiple of n_head ({})",
                        c.n_embd, c.n_head
                    ));
                }
                if !matches!(
                    c.activation_function.as_str(),
                    "gelu_new" | "gelu_pytorch_tanh" | "gelu"
                ) {
                    return bad(format!(
                        "activation_function {:?} is not supported (gelu_new, gelu_pytorch_tanh, gelu)",
                        c.activation_function
                    ));
                }
            }
            FamilyConfig::Llama(c) => {
                if c.num_attention_heads == 0 || c.kv_heads() == 0 {
                    return bad("num_attention_heads and num_key_value_heads must be > 0".into());
                }
                if c.num_attention_heads % c.kv_heads() != 0 {
                    return bad(format!(
                        "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                        c.num_attention_heads,
                        c.kv_heads()
                    ));
                }
                if c.head_dim() % 2 != 0 {
                    return bad(format!("head_dim ({}) must be even for RoPE", c.head_dim()));
                }
                if c.hidden_act != "silu" {
                    return bad(format!(
                        "hidden_act {:?} is not supported (silu)",
                        c.hidden_act
                    ));
                }
                if let Some(scaling) = &c.rope_scaling {
                    if !scaling.is_null() {
                        let kind = scaling
                            .get("rope_type")
                            .or_else(|| scaling.get("type"))
                            .and_then(Value::as_str)
                            .unwrap_or("?");
                        if !matches!(kind, "default" | "llama3" | "linear") {
                            return bad(format!(
                                "rope_scaling type {kind:?} is not supported (default, linear, llama3)"
                            ));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    pub fn vocab_size(&self) -> usize {
        match &self.family {
            FamilyConfig::Gpt2(c) => c.vocab_size,
            FamilyConfig::Llama(c) => c.vocab_size,
        }
    }

    pub fn hidden_size(&self) -> usize {
        match &self.family {
            FamilyConfig::Gpt2(c) => c.n_embd,
            FamilyConfig::Llama(c) => c.hidden_size,
        }
    }

    pub fn num_layers(&self) -> usize {
        match &self.family {
            FamilyConfig::Gpt2(c) => c.n_layer,
            FamilyConfig::Llama(c) => c.num_hidden_layers,
        }
    }

    /// The longest sequence (prompt + response) the model can take.
    pub fn context_length(&self) -> usize {
        match &self.family {
            FamilyConfig::Gpt2(c) => c.n_positions,
            FamilyConfig::Llama(c) => c.max_position_embeddings,
        }
    }

    pub fn tie_word_embeddings(&self) -> bool {
        match &self.family {
            FamilyConfig::Gpt2(_) => self
                .raw
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(default_true()),
            FamilyConfig::Llama(c) => c.tie_word_embeddings,
        }
    }

    /// eos ids from config.json (an int or a list); generation_config.json may add more.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        token_id_list(self.raw.get("eos_token_id"))
    }
}

/// Reads a token-id field that may be an int, a list of ints or null.
pub fn token_id_list(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64().map(|x| x as u32))
            .collect(),
        _ => vec![],
    }
}
