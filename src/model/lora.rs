//! LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"), in
//! PEFT's format: a dense layer's frozen weight W gains a trainable update
//! (α/r)·B·A (`layers::LoraBranch`), and only A and B (and, for a reward model or
//! critic, the score head: PEFT's `modules_to_save`) are trained.
//!
//! The base model is frozen by type: its backbone is built from detached tensors
//! (`Params::frozen`) that share the loaded variables' storage, so no optimizer, no
//! gradient buffer and no backward pass reaches them; the reference policy of PPO and
//! DPO is the same backbone with the branches left off (`without_adapters`), one copy
//! of the weights in memory.
//!
//! On disk an adapter is what `peft.PeftModel.save_pretrained` writes:
//! `adapter_config.json` and `adapter_model.safetensors`, whose keys are the module
//! names under `base_model.model.` (`base_model.model.transformer.h.0.attn.c_attn.lora_A.weight`,
//! A (r, in), B (out, r); GPT-2's Conv1D layers have the same A and B shapes as a
//! Linear, PEFT's `fan_in_fan_out` only transposes the merged update).

use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use super::config::{Arch, ModelConfig};
use super::layers::{DropoutKey, Linear, LoraBranch, LoraDropout};
use super::params::{load_safetensors, save_safetensors, Init, ParamSpec, Params};
use super::{Backbone, CausalLm};
use crate::error::{read_json, Error, Result};
use crate::io::write_json;
use crate::settings::{at_least, finite_f64, float, Range};

pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// The prefix of every key PEFT saves (`PeftModel.base_model.model`).
pub const KEY_PREFIX: &str = "base_model.model.";
/// `--lora_target_modules all-linear`: every dense layer but the output layer (PEFT's
/// `INCLUDE_LINEAR_LAYERS_SHORTHAND`).
pub const ALL_LINEAR: &str = "all-linear";

/// TRL's `ModelConfig` LoRA settings, with its flag names and defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clap::Args)]
#[command(rename_all = "snake_case")]
pub struct LoraArgs {
    /// Train LoRA adapters (saved in PEFT's format) on a frozen base model instead of
    /// every weight. TRL advises about 10× the full fine-tuning learning rate.
    #[arg(long)]
    #[serde(default)]
    pub use_peft: bool,
    /// LoRA rank r.
    #[arg(long, default_value_t = 16)]
    #[serde(default = "default_r")]
    pub lora_r: usize,
    /// LoRA α: the update is scaled by α / r.
    #[arg(long, default_value_t = 32.0, value_parser = finite_f64)]
    #[serde(default = "default_alpha")]
    pub lora_alpha: f64,
    /// Dropout on the adapters' input while a loss is trained (sft, rm train; the RL
    /// methods and DPO train without dropout, as TRL's PPO and DPO do).
    #[arg(long, default_value_t = 0.05, value_parser = finite_f64)]
    #[serde(default = "default_dropout")]
    pub lora_dropout: f64,
    /// The layers that get adapters: `all-linear`, or module names (a layer matches
    /// when its name ends with one: `c_attn`, `q_proj,v_proj`). Default: PEFT's per
    /// architecture (gpt2 `c_attn`; llama and qwen2 `q_proj,v_proj`).
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    #[serde(default, deserialize_with = "string_or_list")]
    pub lora_target_modules: Option<Vec<String>>,
}

fn default_r() -> usize {
    16
}
fn default_alpha() -> f64 {
    32.0
}
fn default_dropout() -> f64 {
    0.05
}

/// `lora_target_modules` in a config file: `"all-linear"`, `"q_proj,v_proj"` or a list.
fn string_or_list<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<Vec<String>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Option::<OneOrMany>::deserialize(d)? {
        None => None,
        Some(OneOrMany::One(s)) => Some(s.split(',').map(|t| t.trim().to_string()).collect()),
        Some(OneOrMany::Many(v)) => Some(v),
    })
}

impl Default for LoraArgs {
    fn default() -> Self {
        LoraArgs {
            use_peft: false,
            lora_r: default_r(),
            lora_alpha: default_alpha(),
            lora_dropout: default_dropout(),
            lora_target_modules: None,
        }
    }
}

impl LoraArgs {
    pub fn validate(&self) -> Result<()> {
        at_least("lora_r", self.lora_r, 1)?;
        float("lora_alpha", self.lora_alpha, Range::Above(0.0))?;
        float("lora_dropout", self.lora_dropout, Range::HalfOpen(0.0, 1.0))?;
        if let Some(t) = &self.lora_target_modules {
            if t.is_empty() || t.iter().any(|s| s.trim().is_empty()) {
                return Err(crate::settings::invalid(
                    "lora_target_modules",
                    format!("must be `all-linear` or module names, got {t:?}"),
                ));
            }
        }
        Ok(())
    }

    /// With `--use_peft`: a fresh adapter attached to `model`, loaded from `base_dir`
    /// (see `attach_to_causal_lm`); without: `None`, the model as it is.
    pub fn attach(
        &self,
        model: &mut CausalLm,
        base_dir: &Path,
        seed: u64,
    ) -> Result<Option<Adapter>> {
        self.check_base(base_dir, "--model")?;
        self.use_peft
            .then(|| attach_to_causal_lm(model, self, base_dir, seed))
            .transpose()
    }

    /// With `--use_peft`, an error when the model folder is itself an adapter: its
    /// new adapter would name a base that lacks the first one's update.
    pub fn check_base(&self, model_dir: &Path, flag: &str) -> Result<()> {
        if self.use_peft && is_adapter_dir(model_dir) {
            return Err(Error::Invalid(format!(
                "{flag} {}: --use_peft trains a new adapter on a base model, but this folder is an adapter; merge it first (`rlhf merge --model BASE --adapter {} --output_dir MERGED`) and train on the merged folder",
                model_dir.display(),
                model_dir.display()
            )));
        }
        Ok(())
    }
}

/// PEFT's `task_type`: which head the base model has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskType {
    CausalLm,
    /// A reward model or critic (`...ForSequenceClassification`): the score head is
    /// trained whole (`modules_to_save`).
    SeqCls,
}

impl TaskType {
    fn as_str(self) -> &'static str {
        match self {
            TaskType::CausalLm => "CAUSAL_LM",
            TaskType::SeqCls => "SEQ_CLS",
        }
    }
}

/// A dense layer of a model, by its module name.
#[derive(Debug, Clone, PartialEq)]
pub struct LinearModule {
    /// As PEFT names it: `transformer.h.0.attn.c_attn`.
    pub name: String,
    pub in_features: usize,
    pub out_features: usize,
}

/// Every dense layer of the backbone, in parameter order (the LM head and the
/// embeddings are not among them: PEFT's `all-linear` leaves the output layer out).
pub fn linear_modules(config: &ModelConfig) -> Vec<LinearModule> {
    Backbone::param_specs(config)
        .into_iter()
        .filter(|s| s.decay && s.shape.len() == 2 && s.name != "lm_head.weight")
        .filter_map(|s| {
            Some(LinearModule {
                name: s.name.strip_suffix(".weight")?.to_string(),
                in_features: s.shape[1],
                out_features: s.shape[0],
            })
        })
        .collect()
}

/// PEFT's default targets per architecture (`TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`).
pub fn default_target_modules(arch: Arch) -> Vec<String> {
    let names: &[&str] = match arch {
        Arch::Gpt2 => &["c_attn"],
        Arch::Llama | Arch::Qwen2 => &["q_proj", "v_proj"],
    };
    names.iter().map(|s| s.to_string()).collect()
}

/// The modules `targets` names (PEFT's rule: the name, or a name ending in `.target`),
/// and what adapter_config.json records for them (PEFT writes `all-linear` out as the
/// modules it found). An error when a target matches nothing.
pub fn select_modules(
    config: &ModelConfig,
    targets: Option<&[String]>,
) -> Result<(Vec<LinearModule>, Vec<String>)> {
    let all = linear_modules(config);
    let targets = targets.map_or_else(|| default_target_modules(config.arch), <[String]>::to_vec);
    if targets.iter().any(|t| t == ALL_LINEAR) {
        if targets.len() > 1 {
            return Err(crate::settings::invalid(
                "lora_target_modules",
                format!("`all-linear` stands alone, got {targets:?}"),
            ));
        }
        let names = all.iter().map(|m| m.name.clone()).collect();
        return Ok((all, names));
    }
    let matches = |m: &LinearModule, t: &str| m.name == t || m.name.ends_with(&format!(".{t}"));
    for t in &targets {
        if !all.iter().any(|m| matches(m, t)) {
            let mut short: Vec<&str> = all
                .iter()
                .filter_map(|m| m.name.rsplit('.').next())
                .collect();
            short.sort_unstable();
            short.dedup();
            return Err(crate::settings::invalid(
                "lora_target_modules",
                format!(
                    "{t:?} matches no dense layer of this {} model (its layers: {}, or all-linear)",
                    config.arch.model_type(),
                    short.join(", ")
                ),
            ));
        }
    }
    let picked = all
        .into_iter()
        .filter(|m| targets.iter().any(|t| matches(m, t)))
        .collect();
    Ok((picked, targets))
}

fn key_a(module: &str) -> String {
    format!("{KEY_PREFIX}{module}.lora_A.weight")
}
fn key_b(module: &str) -> String {
    format!("{KEY_PREFIX}{module}.lora_B.weight")
}

/// The α/r of a module (α/√r with rsLoRA).
fn scale(alpha: f64, r: usize, rslora: bool) -> f64 {
    if rslora {
        alpha / (r as f64).sqrt()
    } else {
        alpha / r as f64
    }
}

/// A trainable adapter: its settings as adapter_config.json records them, its
/// parameters under PEFT's key names, and the dropout key its layers share.
#[derive(Debug, Clone)]
pub struct Adapter {
    pub task_type: TaskType,
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    /// As written to adapter_config.json.
    pub target_modules: Vec<String>,
    /// The base model folder, as written to adapter_config.json.
    pub base_model_name_or_path: String,
    /// A and B of each module (PEFT's keys), then any whole module trained beside them.
    pub params: Params,
    /// The dense layers that carry a branch.
    pub modules: Vec<LinearModule>,
    pub dropout_key: DropoutKey,
}

impl Adapter {
    /// A fresh adapter on `modules`: A ~ U(±1/√in) (PEFT's kaiming-uniform with
    /// a = √5), B = 0, so the model starts as the base. `extra` are whole tensors
    /// trained beside it (a reward model's score head), given with their PEFT keys.
    pub fn init(
        args: &LoraArgs,
        task_type: TaskType,
        (modules, target_modules): (Vec<LinearModule>, Vec<String>),
        base_model_name_or_path: String,
        extra: Vec<(ParamSpec, Var)>,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let r = args.lora_r;
        let mut specs = vec![];
        for m in &modules {
            let bound = 1.0 / (m.in_features as f64).sqrt();
            specs.push(
                ParamSpec::new(key_a(&m.name), &[r, m.in_features], Init::Uniform(bound)).decayed(),
            );
            specs.push(ParamSpec::new(key_b(&m.name), &[m.out_features, r], Init::Zeros).decayed());
        }
        let lora = Params::init(specs, seed, device)?;
        let mut parts: Vec<(ParamSpec, Var)> = lora
            .vars()
            .into_iter()
            .map(|(s, v)| (s.clone(), v.clone()))
            .collect();
        parts.extend(extra);
        Ok(Adapter {
            task_type,
            r,
            alpha: args.lora_alpha,
            dropout: args.lora_dropout,
            target_modules,
            base_model_name_or_path,
            params: Params::from_vars(parts),
            modules,
            dropout_key: DropoutKey::default(),
        })
    }

    /// The adapter a folder holds, as fresh variables (copies of its tensors on
    /// `device`): to go on training it, or to attach it unmerged to a base the caller
    /// already holds (`--share_base`). `extra` as for `init`. Every module must have
    /// the same rank (no `rank_pattern`); an rsLoRA adapter is carried as plain LoRA
    /// with the same scale (α' = α·√r, so α'/r = α/√r).
    pub fn from_file(
        file: &AdapterFile,
        config: &ModelConfig,
        task_type: TaskType,
        extra: Vec<(ParamSpec, Var)>,
        dropout: f64,
        device: &Device,
    ) -> Result<Self> {
        let pairs = file.pairs(config)?;
        let Some(r) = pairs.first().map(|(_, a, _)| a.dims()[0]) else {
            return Err(Error::bad_file(
                &file.weights_path(),
                None,
                "no lora_A/lora_B tensors: nothing to attach",
            ));
        };
        if let Some((m, a, _)) = pairs.iter().find(|(_, a, _)| a.dims()[0] != r) {
            return Err(Error::bad_file(
                &file.weights_path(),
                None,
                format!(
                    "module {:?} has rank {} where the others have {r}: adapters with per-module ranks (rank_pattern) cannot be attached unmerged; merge it instead",
                    m.name,
                    a.dims()[0]
                ),
            ));
        }
        let alpha = if file.use_rslora {
            file.alpha * (r as f64).sqrt()
        } else {
            file.alpha
        };
        let mut parts = vec![];
        let mut modules = vec![];
        for (m, a, b) in pairs {
            for (key, t) in [(key_a(&m.name), a), (key_b(&m.name), b)] {
                let spec = ParamSpec::new(key, t.dims(), Init::Zeros).decayed();
                parts.push((spec, Var::from_tensor(&t.to_device(device)?)?));
            }
            modules.push(m);
        }
        parts.extend(extra);
        Ok(Adapter {
            task_type,
            r,
            alpha,
            dropout,
            target_modules: modules.iter().map(|m| m.name.clone()).collect(),
            base_model_name_or_path: base_name(&file.base(None)?),
            params: Params::from_vars(parts),
            modules,
            dropout_key: DropoutKey::default(),
        })
    }

    /// `base` (a frozen backbone) with this adapter's branches on its dense layers.
    pub fn attach(&self, base: &Backbone) -> Result<Backbone> {
        let index: HashMap<&str, usize> = self
            .modules
            .iter()
            .enumerate()
            .map(|(i, m)| (m.name.as_str(), i))
            .collect();
        base.map_linears(&|name, lin| {
            let Some(&i) = index.get(name) else {
                return Ok(lin.clone());
            };
            Ok(Linear {
                lora: Some(LoraBranch {
                    a: self.params.get(&key_a(name)),
                    b: self.params.get(&key_b(name)),
                    scale: scale(self.alpha, self.r, false),
                    dropout: LoraDropout {
                        p: self.dropout,
                        layer: i as u64,
                        key: self.dropout_key.clone(),
                    },
                }),
                ..lin.clone()
            })
        })
    }

    /// Writes adapter_config.json and adapter_model.safetensors into `dir` (created if
    /// needed), as PEFT's `save_pretrained` does.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::write(dir, e))?;
        let modules_to_save = match self.task_type {
            TaskType::CausalLm => Value::Null,
            TaskType::SeqCls => json!(["classifier", "score"]),
        };
        let config = json!({
            "alpha_pattern": {},
            "base_model_name_or_path": self.base_model_name_or_path,
            "bias": "none",
            "fan_in_fan_out": self.modules.iter().any(|m| m.name.starts_with("transformer.h.")),
            "inference_mode": true,
            "init_lora_weights": true,
            "layers_pattern": null,
            "layers_to_transform": null,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "modules_to_save": modules_to_save,
            "peft_type": "LORA",
            "r": self.r,
            "rank_pattern": {},
            "revision": null,
            "target_modules": self.target_modules,
            "task_type": self.task_type.as_str(),
            "use_dora": false,
            "use_rslora": false,
        });
        write_json(&dir.join(ADAPTER_CONFIG_FILE), &config)?;
        save_safetensors(&self.params.to_hf()?, &dir.join(ADAPTER_WEIGHTS_FILE))
    }

    /// Reads the weights `save` wrote back into this adapter's variables, in place
    /// (how a checkpoint is restored).
    pub fn load_weights(&self, dir: &Path) -> Result<()> {
        let path = dir.join(ADAPTER_WEIGHTS_FILE);
        let dev = self.params.device();
        let tensors = load_safetensors(&path, &dev)?;
        let loaded = Params::from_hf(self.params.specs.clone(), tensors, &path, &dev)?;
        for ((_, dst), (_, src)) in self.params.vars().into_iter().zip(loaded.vars()) {
            dst.set(src.as_tensor())?;
        }
        Ok(())
    }

    /// Sets the dropout key of the micro-batch about to be trained (a pure function
    /// of the seed and the batch), or `None` for no dropout.
    pub fn set_dropout(&self, key: Option<(u64, usize, usize)>) {
        self.dropout_key.set(key.map(|(seed, epoch, index)| {
            seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ ((epoch as u64) << 32) ^ index as u64
        }));
    }
}

/// The backbone with every LoRA branch left off: the base model, sharing its weights.
pub fn without_adapters(backbone: &Backbone) -> Result<Backbone> {
    backbone.map_linears(&|_, lin| {
        Ok(Linear {
            lora: None,
            ..lin.clone()
        })
    })
}

/// Attaches a fresh adapter to a causal LM: its weights become constants (shared with
/// the loaded variables), the adapter's A and B the only trainable tensors.
/// `base_dir` is the folder the model was loaded from (adapter_config.json names it).
pub fn attach_to_causal_lm(
    model: &mut CausalLm,
    args: &LoraArgs,
    base_dir: &Path,
    seed: u64,
) -> Result<Adapter> {
    let picked = select_modules(&model.config, args.lora_target_modules.as_deref())?;
    let adapter = Adapter::init(
        args,
        TaskType::CausalLm,
        picked,
        base_name(base_dir),
        vec![],
        seed,
        &model.device,
    )?;
    let base = Backbone::new(&model.config, &model.params.frozen(), &model.device)?;
    model.backbone = adapter.attach(&base)?;
    model.lm_head.weight = model.lm_head.weight.detach();
    Ok(adapter)
}

/// The causal LM with its adapters switched off: the frozen base, for PPO's and
/// DPO's reference (no second copy of the weights).
pub fn reference_of(model: &CausalLm) -> Result<CausalLm> {
    let mut reference = model.clone();
    reference.backbone = without_adapters(&model.backbone)?;
    Ok(reference)
}

/// What adapter_config.json records as the base: the folder's absolute path (so that
/// `PeftModel.from_pretrained` finds it from any working directory).
pub fn base_name(base_dir: &Path) -> String {
    std::fs::canonicalize(base_dir)
        .unwrap_or_else(|_| base_dir.to_path_buf())
        .display()
        .to_string()
}

/// Whether a folder holds an adapter (adapter_config.json) rather than a model.
pub fn is_adapter_dir(dir: &Path) -> bool {
    dir.join(ADAPTER_CONFIG_FILE).is_file()
}

/// An adapter folder as read from disk (PEFT's or ours).
#[derive(Debug, Clone)]
pub struct AdapterFile {
    pub dir: PathBuf,
    /// `base_model_name_or_path`, resolved against the adapter folder when relative.
    pub base_dir: PathBuf,
    pub task_type: Option<String>,
    pub alpha: f64,
    pub use_rslora: bool,
    /// Every tensor by its key (`base_model.model.` prefix included).
    pub tensors: HashMap<String, Tensor>,
}

impl AdapterFile {
    /// Reads adapter_config.json and adapter_model.safetensors, refusing what this
    /// crate cannot apply (DoRA, trained biases, per-module α).
    pub fn read(dir: &Path) -> Result<Self> {
        let config_path = dir.join(ADAPTER_CONFIG_FILE);
        let cfg: Value = read_json(&config_path)?;
        let bad = |msg: String| Error::bad_file(&config_path, None, msg);
        let peft_type = cfg
            .get("peft_type")
            .and_then(Value::as_str)
            .unwrap_or("LORA");
        if peft_type != "LORA" {
            return Err(bad(format!(
                "peft_type {peft_type:?}: only LORA adapters are supported"
            )));
        }
        if cfg.get("use_dora").and_then(Value::as_bool) == Some(true) {
            return Err(bad("use_dora: DoRA adapters are not supported".into()));
        }
        let bias = cfg.get("bias").and_then(Value::as_str).unwrap_or("none");
        if bias != "none" || cfg.get("lora_bias").and_then(Value::as_bool) == Some(true) {
            return Err(bad(format!(
                "bias {bias:?}: only adapters without trained biases (\"none\") are supported"
            )));
        }
        if cfg
            .get("alpha_pattern")
            .and_then(Value::as_object)
            .is_some_and(|o| !o.is_empty())
        {
            return Err(bad(
                "alpha_pattern: per-module lora_alpha is not supported".into()
            ));
        }
        let alpha = cfg
            .get("lora_alpha")
            .and_then(Value::as_f64)
            .ok_or_else(|| bad("field \"lora_alpha\" is missing or not a number".into()))?;
        let base = cfg
            .get("base_model_name_or_path")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                bad(
                    "field \"base_model_name_or_path\" is missing: it names the base model folder"
                        .into(),
                )
            })?;
        let base_dir = if Path::new(base).is_absolute() {
            PathBuf::from(base)
        } else {
            dir.join(base)
        };
        let weights = dir.join(ADAPTER_WEIGHTS_FILE);
        let tensors = load_safetensors(&weights, &Device::Cpu)?;
        Ok(AdapterFile {
            dir: dir.to_path_buf(),
            base_dir,
            task_type: cfg
                .get("task_type")
                .and_then(Value::as_str)
                .map(str::to_string),
            alpha,
            use_rslora: cfg.get("use_rslora").and_then(Value::as_bool) == Some(true),
            tensors,
        })
    }

    /// The base model folder, which must exist; `base_override` (`rlhf merge
    /// --model`) replaces the one adapter_config.json names.
    pub fn base(&self, base_override: Option<&Path>) -> Result<PathBuf> {
        if let Some(b) = base_override {
            return Ok(b.to_path_buf());
        }
        if !self.base_dir.is_dir() {
            return Err(Error::bad_file(
                &self.dir.join(ADAPTER_CONFIG_FILE),
                None,
                format!(
                    "base_model_name_or_path: no model folder at {} (a relative path is read from the adapter's folder; `rlhf merge --model BASE` names another)",
                    self.base_dir.display()
                ),
            ));
        }
        if std::fs::canonicalize(&self.base_dir).ok() == std::fs::canonicalize(&self.dir).ok() {
            return Err(Error::bad_file(
                &self.dir.join(ADAPTER_CONFIG_FILE),
                None,
                "base_model_name_or_path names the adapter's own folder",
            ));
        }
        Ok(self.base_dir.clone())
    }

    /// Whether this adapter was saved for a sequence classifier (PEFT's SEQ_CLS).
    pub fn is_seq_cls(&self) -> bool {
        self.task_type.as_deref() == Some("SEQ_CLS")
    }

    fn weights_path(&self) -> PathBuf {
        self.dir.join(ADAPTER_WEIGHTS_FILE)
    }

    /// The (module, A, B) pairs, each checked against the model's dense layers.
    fn pairs(&self, config: &ModelConfig) -> Result<Vec<(LinearModule, Tensor, Tensor)>> {
        let modules: BTreeMap<String, LinearModule> = linear_modules(config)
            .into_iter()
            .map(|m| (m.name.clone(), m))
            .collect();
        let path = self.weights_path();
        let mut out = vec![];
        for (key, a) in &self.tensors {
            let Some(name) = key
                .strip_prefix(KEY_PREFIX)
                .and_then(|k| k.strip_suffix(".lora_A.weight"))
            else {
                continue;
            };
            let module = modules.get(name).ok_or_else(|| {
                Error::bad_file(
                    &path,
                    None,
                    format!("tensor {key:?}: the base model has no dense layer {name:?}"),
                )
            })?;
            let b = self
                .tensors
                .get(&key_b(name))
                .ok_or_else(|| Error::MissingTensor {
                    path: path.clone(),
                    name: key_b(name),
                })?;
            let r = a.dim(0)?;
            let check = |t: &Tensor, key: String, expected: Vec<usize>| {
                if t.dims() != expected.as_slice() {
                    return Err(Error::TensorShape {
                        path: path.clone(),
                        name: key,
                        expected,
                        got: t.dims().to_vec(),
                    });
                }
                Ok(())
            };
            check(a, key.clone(), vec![r, module.in_features])?;
            check(b, key_b(name), vec![module.out_features, r])?;
            out.push((
                module.clone(),
                a.to_dtype(candle_core::DType::F32)?,
                b.to_dtype(candle_core::DType::F32)?,
            ));
        }
        let lora_b = self
            .tensors
            .keys()
            .filter(|k| k.ends_with(".lora_B.weight"))
            .count();
        if lora_b != out.len() {
            return Err(Error::bad_file(
                &path,
                None,
                format!("{} lora_A tensors but {lora_b} lora_B tensors", out.len()),
            ));
        }
        out.sort_by(|x, y| x.0.name.cmp(&y.0.name));
        Ok(out)
    }

    /// Adds each module's (α/r)·B·A to its weight in `params` (the base model's, HF
    /// names, loaded as variables): what PEFT's `merge_and_unload` does.
    pub fn merge_into(&self, params: &Params, config: &ModelConfig) -> Result<()> {
        for (module, a, b) in self.pairs(config)? {
            let r = a.dim(0)?;
            let dev = params
                .get(&format!("{}.weight", module.name))
                .device()
                .clone();
            let branch = LoraBranch {
                a: a.to_device(&dev)?,
                b: b.to_device(&dev)?,
                scale: scale(self.alpha, r, self.use_rslora),
                dropout: LoraDropout {
                    p: 0.0,
                    layer: 0,
                    key: DropoutKey::default(),
                },
            };
            let var = params
                .var(&format!("{}.weight", module.name))
                .expect("module from the model's own specs");
            let merged = (var.as_tensor() + branch.delta()?)?; // (out, in)
            var.set(&merged)?;
        }
        Ok(())
    }

    /// A whole module PEFT saved beside the adapter (`modules_to_save`), by its HF
    /// name (`score.weight`).
    pub fn saved_module(&self, hf_name: &str) -> Option<&Tensor> {
        self.tensors.get(&format!("{KEY_PREFIX}{hf_name}"))
    }
}
