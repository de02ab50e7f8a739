//! HF model folders in and out: config.json, model.safetensors (or shards listed in
//! model.safetensors.index.json) and generation_config.json. Tokenizer files are read
//! and written by `data::tokenizer`.
//!
//! What we write loads in transformers' `AutoModelForCausalLM`: safetensors with
//! `{"format": "pt"}` metadata, HF tensor names and layouts, and a config.json that
//! keeps every key of the one we read.

use candle_core::{Device, Tensor};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::config::{token_id_list, ModelConfig};
use super::params::load_safetensors;
pub use super::params::save_safetensors;
use super::{lora, Backbone, CausalLm, Params};
use crate::data::tokenizer::Tokenizer;
use crate::error::{read_json, Error, Result};
// Re-exported for src/demo, which still imports them from here; new code takes them
// from `crate::io`.
use crate::io::write_json;

pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const WEIGHTS_INDEX_FILE: &str = "model.safetensors.index.json";
pub const GENERATION_CONFIG_FILE: &str = "generation_config.json";
/// The scalar head of a reward model or critic (`...ForSequenceClassification`).
pub const SCORE_WEIGHT: &str = "score.weight";

/// Whether a folder's config and tensors are a sequence classifier (a reward model
/// or a critic): a `score.weight` head or a `...ForSequenceClassification` class.
/// Returns what shows it, for messages.
pub fn scalar_head_evidence(
    config: &ModelConfig,
    tensors: &HashMap<String, Tensor>,
) -> Option<String> {
    let classes = architectures(config);
    let classifier = classes
        .iter()
        .any(|c| c.ends_with("ForSequenceClassification"));
    let head = tensors.contains_key(SCORE_WEIGHT);
    match (head, classifier) {
        (false, false) => None,
        (true, _) => Some(format!(
            "a reward model ({SCORE_WEIGHT}, architectures {classes:?})"
        )),
        (false, true) => Some(format!("a reward model (architectures {classes:?})")),
    }
}

/// config.json's `architectures` (empty when absent).
pub fn architectures(config: &ModelConfig) -> Vec<String> {
    config
        .raw
        .get("architectures")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// Reads and validates `DIR/config.json`.
pub fn read_config(dir: &Path) -> Result<ModelConfig> {
    let path = dir.join(CONFIG_FILE);
    let raw: Value = read_json(&path)?;
    if !raw.is_object() {
        return Err(Error::bad_file(&path, Some(1), "expected a JSON object"));
    }
    ModelConfig::from_json(raw, &path)
}

/// Reads every tensor of the folder's safetensors file(s), by HF name. Returns the
/// path to name in errors about the tensors (the single file or the index).
pub fn read_weights(dir: &Path, device: &Device) -> Result<(HashMap<String, Tensor>, PathBuf)> {
    let single = dir.join(WEIGHTS_FILE);
    let index = dir.join(WEIGHTS_INDEX_FILE);
    if single.exists() {
        return Ok((load_safetensors(&single, device)?, single));
    }
    if !index.exists() {
        let hint = if dir.join("pytorch_model.bin").exists() {
            " (pytorch_model.bin is not supported: convert it with transformers' save_pretrained(..., safe_serialization=True))"
        } else {
            ""
        };
        return Err(Error::read(
            &single,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE} in this folder{hint}"),
            ),
        ));
    }
    let idx: Value = read_json(&index)?;
    let map = idx
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| {
            Error::bad_file(
                &index,
                None,
                "field \"weight_map\" is missing or not an object",
            )
        })?;
    let mut shards: Vec<&str> = map.values().filter_map(Value::as_str).collect();
    shards.sort_unstable();
    shards.dedup();
    let mut tensors = HashMap::new();
    for shard in shards {
        tensors.extend(load_safetensors(&dir.join(shard), device)?);
    }
    Ok((tensors, index))
}

/// eos ids for generation: generation_config.json's (an int or a list) when present,
/// else config.json's.
/// Every id must be a token of the model's vocabulary (an eos the model cannot
/// produce would never stop a generation): an id outside it is an error naming the
/// file.
pub fn read_generation_eos(dir: &Path, config: &ModelConfig) -> Result<Vec<u32>> {
    let path = dir.join(GENERATION_CONFIG_FILE);
    let mut ids = eos_ids_in(
        &dir.join(CONFIG_FILE),
        config.raw.get("eos_token_id"),
        config,
    )?;
    if path.exists() {
        let gen: Value = read_json(&path)?;
        let from_gen = eos_ids_in(&path, gen.get("eos_token_id"), config)?;
        if !from_gen.is_empty() {
            ids = from_gen;
        }
    }
    Ok(ids)
}

/// The eos ids of one file's `eos_token_id` (an int, a list of ints or null), each
/// checked against the vocabulary.
fn eos_ids_in(path: &Path, v: Option<&Value>, config: &ModelConfig) -> Result<Vec<u32>> {
    let vocab = config.vocab_size();
    let list: Vec<&Value> = match v {
        None | Some(Value::Null) => vec![],
        Some(Value::Array(a)) => a.iter().collect(),
        Some(one) => vec![one],
    };
    let ids = token_id_list(v);
    for x in list {
        match x.as_u64() {
            Some(id) if (id as usize) < vocab && ids.contains(&(id as u32)) => {}
            _ => {
                return Err(Error::bad_file(
                    path,
                    None,
                    format!(
                        "eos_token_id {x} is not a token id of the vocabulary (0..{vocab}, config.json's vocab_size)"
                    ),
                ))
            }
        }
    }
    Ok(ids)
}

/// Reads an HF folder's weights into existing parameters (same specs), in place:
/// how a checkpoint is restored.
pub fn load_weights_into(params: &Params, dir: &Path) -> Result<()> {
    let dev = params.device();
    let (tensors, source) = read_weights(dir, &dev)?;
    let loaded = Params::from_hf(params.specs.clone(), tensors, &source, &dev)?;
    for ((_, dst), (_, src)) in params.vars().into_iter().zip(loaded.vars()) {
        dst.set(src.as_tensor())?;
    }
    Ok(())
}

/// A clear error when a model folder does not exist.
pub fn ensure_model_dir(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    Err(Error::read(
        dir,
        std::io::Error::new(std::io::ErrorKind::NotFound, "model folder not found"),
    ))
}

/// Loads a causal LM from an HF folder, checking every tensor's name and shape.
///
/// A reward model's folder (a score head) is refused: generating from it or training
/// it as a policy would silently drop its head (and use an untrained LM head).
///
/// An adapter folder (adapter_config.json) loads as its base model with the adapter
/// merged into the weights: what `rlhf merge` writes.
pub fn load_causal_lm(dir: &Path, device: &Device) -> Result<CausalLm> {
    ensure_model_dir(dir)?;
    if lora::is_adapter_dir(dir) {
        let adapter = lora::AdapterFile::read(dir)?;
        if adapter.is_seq_cls() {
            return Err(Error::WrongModelKind {
                path: dir.to_path_buf(),
                expected: "a causal LM or its adapter (task_type CAUSAL_LM)".into(),
                found: "this is a reward model's adapter (task_type SEQ_CLS)".into(),
            });
        }
        let model = load_causal_lm(&adapter.base(None)?, device)?;
        adapter.merge_into(&model.params, &model.config)?;
        return Ok(model);
    }
    let config = read_config(dir)?;
    let (tensors, source) = read_weights(dir, device)?;
    if let Some(found) = scalar_head_evidence(&config, &tensors) {
        return Err(Error::WrongModelKind {
            path: dir.to_path_buf(),
            expected: format!(
                "a causal LM ({}, e.g. an SFT model); a reward model goes to --reward_model or `rlhf rm score`",
                config.arch.causal_lm_class()
            ),
            found: format!("this is {found}"),
        });
    }
    let params = Params::from_hf(Backbone::param_specs(&config), tensors, &source, device)?;
    CausalLm::from_params(config, params, device)
}

/// Writes config.json and model.safetensors for a causal LM into `dir` (created if
/// needed). Each file is written to a temporary name and renamed into place.
pub fn save_causal_lm(model: &CausalLm, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::write(dir, e))?;
    let mut config = model.config.raw.clone();
    if let Some(obj) = config.as_object_mut() {
        obj.insert(
            "architectures".into(),
            Value::from(vec![model.config.arch.causal_lm_class()]),
        );
        // Weights are written in f32: say so under both the old and the new key.
        obj.insert("dtype".into(), "float32".into());
        if obj.contains_key("torch_dtype") {
            obj.insert("torch_dtype".into(), "float32".into());
        }
        obj.insert(
            "tie_word_embeddings".into(),
            model.config.tie_word_embeddings().into(),
        );
    }
    write_json(&dir.join(CONFIG_FILE), &config)?;
    save_safetensors(&model.params.to_hf()?, &dir.join(WEIGHTS_FILE))
}

/// A model folder loaded whole: model, tokenizer and the eos ids to stop on.
#[derive(Debug, Clone)]
pub struct Pretrained {
    pub model: CausalLm,
    pub tokenizer: Tokenizer,
    /// generation_config.json's (or config.json's) eos ids plus the tokenizer's eos.
    pub eos_token_ids: Vec<u32>,
}

/// Loads model and tokenizer from an HF folder, and checks that they fit each other.
pub fn load_pretrained(dir: &Path, device: &Device) -> Result<Pretrained> {
    let model = load_causal_lm(dir, device)?;
    let (tokenizer, eos_token_ids) = read_tokenizer_for(&tokenizer_dir(dir)?, &model.config)?;
    Ok(Pretrained {
        model,
        tokenizer,
        eos_token_ids,
    })
}

/// Where a model folder's tokenizer is: the folder itself, or for an adapter folder
/// without tokenizer files, its base model's folder.
pub fn tokenizer_dir(dir: &Path) -> Result<PathBuf> {
    let mut dir = dir.to_path_buf();
    // An adapter's base may itself be an adapter folder only through a merged copy,
    // so one step suffices; the loop guards a chain all the same.
    for _ in 0..8 {
        if !lora::is_adapter_dir(&dir) || dir.join("tokenizer.json").is_file() {
            return Ok(dir);
        }
        dir = lora::AdapterFile::read(&dir)?.base(None)?;
    }
    Ok(dir)
}

/// Writes an adapter folder: adapter_config.json and adapter_model.safetensors (what
/// `peft.PeftModel.from_pretrained` reads), plus the tokenizer and
/// generation_config.json, so the folder serves every command as a model folder.
pub fn save_adapter_pretrained(p: &Pretrained, adapter: &lora::Adapter, dir: &Path) -> Result<()> {
    adapter.save(dir)?;
    save_tokenizer_files(p, dir)
}

/// A trained policy's folder: its adapter folder with `--use_peft`, else the whole model.
pub fn save_trained(p: &Pretrained, adapter: Option<&lora::Adapter>, dir: &Path) -> Result<()> {
    match adapter {
        Some(a) => save_adapter_pretrained(p, a, dir),
        None => save_pretrained(p, dir),
    }
}

/// Restores the weights `save_trained` wrote into the trained tensors, in place (how a
/// checkpoint is restored).
pub fn load_trained(p: &Pretrained, adapter: Option<&lora::Adapter>, dir: &Path) -> Result<()> {
    match adapter {
        Some(a) => a.load_weights(dir),
        None => load_weights_into(&p.model.params, dir),
    }
}

/// The folder's tokenizer, checked against the model's embedding, and the eos ids to
/// stop on: generation_config.json's (or config.json's) plus the tokenizer's eos.
pub fn read_tokenizer_for(dir: &Path, config: &ModelConfig) -> Result<(Tokenizer, Vec<u32>)> {
    let tokenizer = Tokenizer::from_dir(dir)?;
    if tokenizer.vocab_size() > config.vocab_size() {
        return Err(Error::TokenizerTooLarge {
            tokenizer: tokenizer.vocab_size(),
            embedding: config.vocab_size(),
        });
    }
    let mut eos_token_ids = read_generation_eos(dir, config)?;
    if let Some(id) = tokenizer.eos_token_id() {
        if !eos_token_ids.contains(&id) {
            eos_token_ids.push(id);
        }
    }
    Ok((tokenizer, eos_token_ids))
}

/// Writes a whole HF folder: config, weights, tokenizer files and
/// generation_config.json (with the eos ids).
pub fn save_pretrained(p: &Pretrained, dir: &Path) -> Result<()> {
    save_causal_lm(&p.model, dir)?;
    save_tokenizer_files(p, dir)
}

/// The tokenizer files and generation_config.json of a model folder.
fn save_tokenizer_files(p: &Pretrained, dir: &Path) -> Result<()> {
    p.tokenizer.save(dir)?;
    write_generation_config(
        dir,
        &p.model.config,
        &p.eos_token_ids,
        p.tokenizer.pad_token_id(),
    )
}

/// Writes generation_config.json: the eos ids (an int when there is one), the pad id
/// and the config's bos id when it has one.
pub fn write_generation_config(
    dir: &Path,
    config: &ModelConfig,
    eos_token_ids: &[u32],
    pad: u32,
) -> Result<()> {
    let eos: Value = match eos_token_ids {
        [one] => (*one).into(),
        many => many.to_vec().into(),
    };
    let mut gen = serde_json::Map::new();
    if let Some(bos) = config.raw.get("bos_token_id").filter(|v| !v.is_null()) {
        gen.insert("bos_token_id".into(), bos.clone());
    }
    gen.insert("eos_token_id".into(), eos);
    gen.insert("pad_token_id".into(), pad.into());
    write_json(&dir.join(GENERATION_CONFIG_FILE), &Value::Object(gen))
}

/// The token that ends a response or separates documents: the tokenizer's eos, else
/// the first eos id of the generation config.
pub fn end_token(tokenizer: &Tokenizer, eos_token_ids: &[u32]) -> Result<u32> {
    tokenizer
        .eos_token_id()
        .or_else(|| eos_token_ids.first().copied())
        .ok_or_else(|| {
            Error::Invalid("the tokenizer has no eos_token (and the model no eos_token_id)".into())
        })
}

impl Pretrained {
    /// See `end_token`.
    pub fn eos(&self) -> Result<u32> {
        end_token(&self.tokenizer, &self.eos_token_ids)
    }
}
