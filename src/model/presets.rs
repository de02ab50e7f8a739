//! Named model sizes for `rlhf init` (and pretraining from scratch). The vocabulary
//! size always comes from the tokenizer.

use super::config::{Arch, FamilyConfig, Gpt2Config, LlamaConfig, ModelConfig};
use crate::error::{Error, Result};

/// (name, layers, width, heads, kv heads, mlp width, context)
type Shape = (&'static str, usize, usize, usize, usize, usize, usize);

const GPT2_PRESETS: &[Shape] = &[
    ("nano", 2, 64, 4, 4, 256, 128),
    ("tiny", 4, 256, 4, 4, 1024, 256),
    ("gpt2", 12, 768, 12, 12, 3072, 1024),
    ("gpt2-medium", 24, 1024, 16, 16, 4096, 1024),
];

const LLAMA_PRESETS: &[Shape] = &[
    ("nano", 2, 64, 4, 2, 176, 128),
    ("tiny", 4, 256, 8, 4, 688, 256),
    ("smollm-135m", 30, 576, 9, 3, 1536, 2048),
    ("smollm-360m", 32, 960, 15, 5, 2560, 2048),
];

/// A randomly initialised model of a preset sized for `tokenizer` (embedding rows:
/// `vocab_size`, at least the tokenizer's), with its bos/eos ids in config.json.
pub fn init_for_tokenizer(
    arch: Arch,
    name: &str,
    tokenizer: &crate::data::tokenizer::Tokenizer,
    vocab_size: Option<usize>,
    seed: u64,
) -> Result<super::CausalLm> {
    let vocab = match vocab_size {
        Some(v) if v < tokenizer.vocab_size() => {
            return Err(Error::Invalid(format!(
                "vocab_size {v} is smaller than the tokenizer's {} tokens",
                tokenizer.vocab_size()
            )))
        }
        Some(v) => v,
        None => tokenizer.vocab_size(),
    };
    let config = preset(
        arch,
        name,
        vocab,
        tokenizer.bos_token_id(),
        tokenizer.eos_token_id(),
    )?;
    super::CausalLm::init(config, seed, &crate::device::default())
}

pub fn preset_names(arch: Arch) -> Vec<&'static str> {
    table(arch).iter().map(|p| p.0).collect()
}

fn table(arch: Arch) -> &'static [Shape] {
    match arch {
        Arch::Gpt2 => GPT2_PRESETS,
        Arch::Llama | Arch::Qwen2 => LLAMA_PRESETS,
    }
}

/// The config of a preset for a vocabulary; `eos`/`bos` are recorded in config.json.
pub fn preset(
    arch: Arch,
    name: &str,
    vocab_size: usize,
    bos: Option<u32>,
    eos: Option<u32>,
) -> Result<ModelConfig> {
    let &(_, layers, width, heads, kv_heads, mlp, ctx) =
        table(arch).iter().find(|p| p.0 == name).ok_or_else(|| {
            Error::Invalid(format!(
                "unknown preset {name:?} for {}; choose one of: {}",
                arch.model_type(),
                preset_names(arch).join(", ")
            ))
        })?;
    let eos_value = eos.map(serde_json::Value::from);
    let family = match arch {
        Arch::Gpt2 => FamilyConfig::Gpt2(Gpt2Config {
            vocab_size,
            n_positions: ctx,
            n_embd: width,
            n_layer: layers,
            n_head: heads,
            n_inner: Some(mlp),
            layer_norm_epsilon: 1e-5,
            activation_function: "gelu_new".into(),
            bos_token_id: bos,
            eos_token_id: eos_value,
        }),
        Arch::Llama | Arch::Qwen2 => FamilyConfig::Llama(LlamaConfig {
            vocab_size,
            hidden_size: width,
            intermediate_size: mlp,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: Some(kv_heads),
            head_dim: Some(width / heads),
            max_position_embeddings: ctx,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_scaling: None,
            tie_word_embeddings: true,
            attention_bias: false,
            mlp_bias: false,
            hidden_act: "silu".into(),
            bos_token_id: bos,
            eos_token_id: eos_value,
        }),
    };
    Ok(ModelConfig::from_family(arch, family))
}
