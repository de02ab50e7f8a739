//! The tokenizer of a model folder: HF `tokenizer.json`, the special tokens of
//! `tokenizer_config.json` (or `special_tokens_map.json`) and the chat template
//! (`chat_template.jinja` first, then `tokenizer_config.json`'s `chat_template`).

use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;

use super::chat_template::ChatTemplate;
use crate::error::{read_json, read_to_string, Error, Result};
use crate::io::{write_atomic, write_json};

pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
pub const SPECIAL_TOKENS_MAP_FILE: &str = "special_tokens_map.json";
pub const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";

const SPECIAL_TOKEN_KEYS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// `inner` with transformers' `split_special_tokens`: special-token strings in
    /// the text are encoded as text (built on first use).
    split: std::sync::OnceLock<tokenizers::Tokenizer>,
    /// tokenizer_config.json as read ({} when absent).
    config: Value,
    /// Special tokens by role (`bos_token` → "<s>"), also passed to chat templates.
    special_tokens: BTreeMap<String, String>,
    chat_template: Option<ChatTemplate>,
}

impl Tokenizer {
    /// Reads the tokenizer files of a model folder.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let mut tok = Self::from_file(&dir.join(TOKENIZER_FILE))?;
        let cfg_path = dir.join(TOKENIZER_CONFIG_FILE);
        if cfg_path.exists() {
            tok.config = read_json(&cfg_path)?;
        }
        let map_path = dir.join(SPECIAL_TOKENS_MAP_FILE);
        let map: Value = if map_path.exists() {
            read_json(&map_path)?
        } else {
            json!({})
        };
        for key in SPECIAL_TOKEN_KEYS {
            let v = tok.config.get(key).or_else(|| map.get(key));
            if let Some(s) = v.and_then(token_content) {
                tok.special_tokens.insert(key.to_string(), s);
            }
        }
        let jinja = dir.join(CHAT_TEMPLATE_FILE);
        let source = if jinja.exists() {
            Some((read_to_string(&jinja)?, jinja.display().to_string()))
        } else {
            template_from_config(&tok.config, &cfg_path)?
                .map(|s| (s, format!("{}: \"chat_template\"", cfg_path.display())))
        };
        if let Some((src, origin)) = source {
            tok.chat_template = Some(ChatTemplate::from_origin(&src, &origin)?);
        }
        Ok(tok)
    }

    /// A model folder's tokenizer files, or a bare tokenizer.json; a bare file gets the
    /// conventional roles it lacks (see `fill_conventional_roles`).
    pub fn from_path(path: &Path) -> Result<Self> {
        if path.is_dir() {
            return Self::from_dir(path);
        }
        let mut t = Self::from_file(path)?;
        t.fill_conventional_roles();
        Ok(t)
    }

    /// Sets the eos and pad roles when missing, from tokens that conventionally play
    /// them (`<|endoftext|>`, `</s>`, `<|im_end|>`, `<eos>`; `<|pad|>`).
    pub fn fill_conventional_roles(&mut self) {
        if self.special_token("eos_token").is_none() {
            if let Some(t) = ["<|endoftext|>", "</s>", "<|im_end|>", "<eos>"]
                .into_iter()
                .find(|t| self.token_to_id(t).is_some())
            {
                self.set_special_token("eos_token", t);
            }
        }
        if self.special_token("pad_token").is_none() && self.token_to_id("<|pad|>").is_some() {
            self.set_special_token("pad_token", "<|pad|>");
        }
    }

    /// The id of the bos role, when the tokenizer has one.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.special_token("bos_token")
            .and_then(|t| self.token_to_id(t))
    }

    /// Reads a bare tokenizer.json (no special-token roles, no chat template).
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(Error::read(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "file not found"),
            ));
        }
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::bad_file(path, None, format!("not a valid tokenizer.json: {e}")))?;
        Ok(Tokenizer {
            inner,
            split: Default::default(),
            config: json!({}),
            special_tokens: BTreeMap::new(),
            chat_template: None,
        })
    }

    /// Trains a byte-level BPE tokenizer (GPT-2 style) on `docs` with HF tokenizers'
    /// trainer; `special` tokens get the first ids.
    pub fn train_bpe(docs: &[String], vocab_size: usize, special: &[&str]) -> Result<Self> {
        use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
        use tokenizers::models::TrainerWrapper;
        use tokenizers::pre_tokenizers::byte_level::ByteLevel;
        let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .min_frequency(2)
            .show_progress(false)
            .special_tokens(
                special
                    .iter()
                    .map(|s| tokenizers::AddedToken::from(s.to_string(), true))
                    .collect(),
            )
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build()
            .into();
        let mut inner = tokenizers::Tokenizer::new(BPE::default());
        inner.with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)));
        inner.with_decoder(Some(ByteLevel::default()));
        inner
            .train(&mut trainer, docs.iter())
            .map_err(|e| Error::Tokenizer(format!("training BPE: {e}")))?;
        Ok(Tokenizer {
            inner,
            split: Default::default(),
            config: json!({}),
            special_tokens: BTreeMap::new(),
            chat_template: None,
        })
    }

    /// The tokenizer.json serialization (to compare two tokenizers).
    pub fn to_json(&self) -> Result<String> {
        self.inner
            .to_string(false)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// Number of ids the tokenizer can produce (added tokens included).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        self.encode_with(text, add_special_tokens, false)
    }

    /// [`Tokenizer::encode`] with transformers' `split_special_tokens`: when true,
    /// special-token strings in `text` (`<|im_end|>`) are encoded as the text they
    /// spell, never as the special ids (what user-written text needs, so that it
    /// cannot close a turn or open a system message). The tokenizer's own
    /// additions (`add_special_tokens`: a BOS) are still made.
    pub fn encode_with(
        &self,
        text: &str,
        add_special_tokens: bool,
        split_special_tokens: bool,
    ) -> Result<Vec<u32>> {
        let inner = if split_special_tokens {
            self.split.get_or_init(|| {
                let mut t = self.inner.clone();
                t.set_encode_special_tokens(true);
                t
            })
        } else {
            &self.inner
        };
        let enc = inner
            .encode(text, add_special_tokens)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The special added tokens (`<|im_start|>`, `<|endoftext|>`, ...) as (text, id).
    pub fn special_added_tokens(&self) -> Vec<(String, u32)> {
        let mut v: Vec<(String, u32)> = self
            .inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, t)| (t.content, id))
            .collect();
        v.sort();
        v
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The text of a special token by role, e.g. `special_token("eos_token")`.
    pub fn special_token(&self, role: &str) -> Option<&str> {
        self.special_tokens.get(role).map(String::as_str)
    }

    pub fn eos_token_id(&self) -> Option<u32> {
        self.special_token("eos_token")
            .and_then(|t| self.token_to_id(t))
    }

    /// The id used to pad batches: pad_token, else eos_token, else 0.
    pub fn pad_token_id(&self) -> u32 {
        self.special_token("pad_token")
            .and_then(|t| self.token_to_id(t))
            .or_else(|| self.eos_token_id())
            .unwrap_or(0)
    }

    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// Sets special-token roles (used when a folder is first written).
    pub fn set_special_token(&mut self, role: &str, token: &str) {
        self.special_tokens
            .insert(role.to_string(), token.to_string());
    }

    pub fn set_chat_template(&mut self, template: Option<ChatTemplate>) {
        self.chat_template = template;
    }

    /// Renders a conversation with the chat template.
    pub fn apply_chat_template(
        &self,
        messages: &Value,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let t = self.chat_template.as_ref().ok_or_else(|| {
            Error::Template(
                "this tokenizer has no chat template (no chat_template.jinja and no \"chat_template\" in tokenizer_config.json)"
                    .into(),
            )
        })?;
        t.render(messages, add_generation_prompt, &self.special_tokens)
    }

    /// Writes tokenizer.json, tokenizer_config.json (special tokens and chat template)
    /// into `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let text = self
            .inner
            .to_string(false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        write_atomic(&dir.join(TOKENIZER_FILE), text.as_bytes())?;
        let mut cfg = match &self.config {
            Value::Object(o) => o.clone(),
            _ => Default::default(),
        };
        for (k, v) in &self.special_tokens {
            cfg.insert(k.clone(), Value::from(v.clone()));
        }
        cfg.entry("tokenizer_class")
            .or_insert_with(|| "PreTrainedTokenizerFast".into());
        match &self.chat_template {
            Some(t) => {
                cfg.insert("chat_template".into(), t.source().into());
            }
            None => {
                cfg.remove("chat_template");
            }
        }
        // transformers reads chat_template.jinja first; ours lives in the config.
        let stale = dir.join(CHAT_TEMPLATE_FILE);
        if stale.exists() {
            std::fs::remove_file(&stale).map_err(|e| Error::write(&stale, e))?;
        }
        write_json(&dir.join(TOKENIZER_CONFIG_FILE), &Value::Object(cfg))
    }
}

/// A special token in tokenizer_config.json: a string or an AddedToken object.
fn token_content(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// `chat_template` may be a string or a list of {name, template} (the "default" one).
fn template_from_config(cfg: &Value, path: &Path) -> Result<Option<String>> {
    match cfg.get("chat_template") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(list)) => {
            let named = |name: &str| {
                list.iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some(name))
                    .and_then(|t| t.get("template"))
                    .and_then(Value::as_str)
                    .map(str::to_string)
            };
            Ok(named("default").or_else(|| {
                list.first()
                    .and_then(|t| t.get("template"))
                    .and_then(Value::as_str)
                    .map(str::to_string)
            }))
        }
        Some(_) => Err(Error::bad_file(
            path,
            None,
            "field \"chat_template\" must be a string or a list of {name, template}",
        )),
    }
}
