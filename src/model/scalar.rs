//! A backbone with a scalar head: the reward model (one score per sequence, read at
//! its last token: the end of the response as `data::reward_input` builds it) and PPO's critic (one value per token). On disk it
//! is transformers' `...ForSequenceClassification` with `num_labels = 1`: the
//! backbone's tensors plus `score.weight` (1, C), no bias.

use candle_core::{Device, Tensor, D};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::config::{Arch, ModelConfig};
use super::hf::{read_config, read_weights, save_safetensors, CONFIG_FILE, WEIGHTS_FILE};
use super::layers::Linear;
use super::lora;
use super::packed::Packed;
use super::params::{Init, ParamSpec, Params};
use super::{AttentionMask, Backbone};
use crate::data::reward_input::RewardInput;
use crate::data::tokenizer::Tokenizer;
use crate::error::{Error, Result};
use crate::io::write_json;

pub use super::hf::SCORE_WEIGHT;

/// Beside a reward model's adapter: the reward statistics (config.json holds them in
/// a full reward model's folder; an adapter folder has no config.json).
pub const REWARD_STATS_FILE: &str = "reward_normalization.json";

/// Hidden states → one scalar per position.
#[derive(Debug, Clone)]
pub struct ScalarHead {
    pub weight: Tensor, // (1, C)
}

impl ScalarHead {
    /// hidden: (B, T, C) → (B, T)
    pub fn forward(&self, hidden: &Tensor) -> Result<Tensor> {
        let out = Linear::new(self.weight.clone(), None).forward(hidden)?; // (B, T, 1)
        Ok(out.squeeze(D::Minus1)?)
    }
}

/// The mean and standard deviation of the rewards over the RM's training responses,
/// so that rewards can be normalised to mean 0 before RL (InstructGPT, §3.5).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RewardNormalization {
    pub mean: f64,
    pub std: f64,
}

impl RewardNormalization {
    pub fn apply(&self, raw: f64) -> f64 {
        (raw - self.mean) / self.std.max(1e-8)
    }
}

/// Sequences a model has run its forward pass on (several may share a packed row):
/// instrumentation that lets the tests count the forwards where they happen. A clone
/// starts from the count so far.
#[derive(Debug, Default)]
pub struct SequenceCounter(AtomicUsize);

impl SequenceCounter {
    pub fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }

    fn add(&self, n: usize) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
}

impl Clone for SequenceCounter {
    fn clone(&self) -> Self {
        SequenceCounter(AtomicUsize::new(self.get()))
    }
}

#[derive(Debug, Clone)]
pub struct ScalarModel {
    pub config: ModelConfig,
    pub params: Params,
    pub backbone: Backbone,
    pub head: ScalarHead,
    pub device: Device,
    /// Sequences forwarded so far (every `forward`, `score_last` included).
    pub sequences_forwarded: SequenceCounter,
}

/// The parameter table: the backbone's (no LM head) and `score.weight`.
pub fn scalar_specs(config: &ModelConfig) -> Vec<ParamSpec> {
    let c = config.hidden_size();
    let mut specs: Vec<ParamSpec> = Backbone::param_specs(config)
        .into_iter()
        .filter(|s| s.name != "lm_head.weight")
        .collect();
    specs.push(
        ParamSpec::new(
            SCORE_WEIGHT,
            &[1, c],
            Init::Normal(1.0 / (c as f64 + 1.0).sqrt()),
        )
        .decayed(),
    );
    specs
}

impl ScalarModel {
    pub fn from_params(config: ModelConfig, params: Params, device: &Device) -> Result<Self> {
        let backbone = Backbone::new(&config, &params, device)?;
        let head = ScalarHead {
            weight: params.get(SCORE_WEIGHT),
        };
        Ok(ScalarModel {
            config,
            params,
            backbone,
            head,
            device: device.clone(),
            sequences_forwarded: SequenceCounter::default(),
        })
    }

    /// The same model for inference: every tensor of the forward detached
    /// (`Backbone::detached`); `params` still holds the variables. The copy counts
    /// its own forwarded rows, from the original's count.
    pub fn detached(&self) -> Self {
        ScalarModel {
            config: self.config.clone(),
            params: self.params.clone(),
            backbone: self.backbone.detached(),
            head: ScalarHead {
                weight: self.head.weight.detach(),
            },
            device: self.device.clone(),
            sequences_forwarded: self.sequences_forwarded.clone(),
        }
    }

    /// ids: (B, T) → a scalar per position (B, T).
    pub fn forward(&self, ids: &Tensor, mask: &AttentionMask) -> Result<Tensor> {
        self.sequences_forwarded.add(mask.sequences);
        let hidden = self.backbone.forward(ids, mask, None)?; // (B, T, C)
        self.head.forward(&hidden)
    }

    /// The score of each sequence at its last token (where `RewardInput` puts the end
    /// of the response), in one packed batch (`model::packed`; sequences that begin
    /// alike, such as K responses to one prompt, share that prefix when that saves
    /// enough): seqs → (N,).
    pub fn score_last(&self, seqs: &[Vec<u32>], pad: u32) -> Result<Tensor> {
        if let Some(i) = seqs.iter().position(Vec::is_empty) {
            return Err(Error::Invalid(format!("sequence {i} to score is empty")));
        }
        let parts: Vec<(&[u32], &[u32])> = seqs.iter().map(|s| (&s[..], &[][..])).collect();
        let packed = Packed::new(&parts, pad, &self.device)?;
        let last: Vec<u32> = seqs
            .iter()
            .enumerate()
            .map(|(i, s)| packed.flat(i, s.len() - 1) as u32)
            .collect();
        let scores = self.forward(&packed.ids, &packed.mask)?; // (R, W)
        let n = last.len();
        let last = Tensor::from_vec(last, n, &self.device)?;
        Ok(scores.flatten_all()?.index_select(&last, 0)?) // (N,)
    }
}

/// A scalar model folder loaded whole.
#[derive(Debug, Clone)]
pub struct PretrainedScalar {
    pub model: ScalarModel,
    pub tokenizer: Tokenizer,
    pub eos_token_ids: Vec<u32>,
    /// Present once a reward model has been trained.
    pub normalization: Option<RewardNormalization>,
    /// Whether `score.weight` was initialised here (the folder had no head).
    pub fresh_head: bool,
}

impl PretrainedScalar {
    /// The id that ends every scored response: the tokenizer's eos, else the first
    /// eos of the generation config.
    pub fn eos(&self) -> Result<u32> {
        super::hf::end_token(&self.tokenizer, &self.eos_token_ids)
    }

    /// Where this model reads the reward: `RewardInput` with its tokenizer and eos ids.
    pub fn reward_input(&self) -> Result<RewardInput<'_>> {
        Ok(RewardInput {
            tokenizer: &self.tokenizer,
            eos: self.eos()?,
            eos_ids: &self.eos_token_ids,
            split_special_tokens: false,
        })
    }
}

/// Loads a scalar model from a `...ForSequenceClassification` folder, or from a
/// causal-LM folder (an SFT model) with a freshly initialised head (seeded).
///
/// An adapter folder loads as its base with the adapter merged and, for a reward
/// model's adapter (SEQ_CLS), the score head it saved (`modules_to_save`).
pub fn load_scalar(dir: &Path, device: &Device, seed: u64) -> Result<PretrainedScalar> {
    super::hf::ensure_model_dir(dir)?;
    if lora::is_adapter_dir(dir) {
        let adapter = lora::AdapterFile::read(dir)?;
        let mut p = load_scalar(&adapter.base(None)?, device, seed)?;
        apply_adapter(&mut p, &adapter)?;
        let tok_dir = super::hf::tokenizer_dir(dir)?;
        (p.tokenizer, p.eos_token_ids) = super::hf::read_tokenizer_for(&tok_dir, &p.model.config)?;
        return Ok(p);
    }
    let config = read_config(dir)?;
    let (tensors, source) = read_weights(dir, device)?;
    let fresh_head = !tensors.contains_key(SCORE_WEIGHT);
    let params =
        Params::from_hf_or_init(scalar_specs(&config), tensors, &source, device, seed, |n| {
            n == SCORE_WEIGHT
        })?;
    let normalization = config
        .raw
        .get("rlhf")
        .and_then(|r| r.get("reward_normalization"))
        .map(|v| serde_json::from_value(v.clone()))
        .transpose()
        .map_err(|e| {
            Error::bad_file(
                &dir.join(CONFIG_FILE),
                None,
                format!("rlhf.reward_normalization: {e}"),
            )
        })?;
    let (tokenizer, eos_token_ids) = super::hf::read_tokenizer_for(dir, &config)?;
    let model = ScalarModel::from_params(config, params, device)?;
    Ok(PretrainedScalar {
        model,
        tokenizer,
        eos_token_ids,
        normalization,
        fresh_head,
    })
}

/// Merges an adapter into a loaded scalar model: the LoRA updates into the backbone,
/// the score head it saved (SEQ_CLS `modules_to_save`) and its reward statistics.
pub fn apply_adapter(p: &mut PretrainedScalar, adapter: &lora::AdapterFile) -> Result<()> {
    adapter.merge_into(&p.model.params, &p.model.config)?;
    if let Some(score) = adapter.saved_module(SCORE_WEIGHT) {
        let var = p
            .model
            .params
            .var(SCORE_WEIGHT)
            .expect("a scalar model has a head");
        if score.dims() != var.dims() {
            return Err(Error::TensorShape {
                path: adapter.dir.join(lora::ADAPTER_WEIGHTS_FILE),
                name: format!("{}{SCORE_WEIGHT}", lora::KEY_PREFIX),
                expected: var.dims().to_vec(),
                got: score.dims().to_vec(),
            });
        }
        var.set(
            &score
                .to_dtype(candle_core::DType::F32)?
                .to_device(&p.model.device)?,
        )?;
        p.fresh_head = false;
    }
    if let Some(n) = reward_stats(adapter)? {
        p.normalization = Some(n);
    }
    Ok(())
}

/// The reward statistics saved beside a reward model's adapter, if any.
fn reward_stats(adapter: &lora::AdapterFile) -> Result<Option<RewardNormalization>> {
    let stats = adapter.dir.join(REWARD_STATS_FILE);
    if !stats.is_file() {
        return Ok(None);
    }
    let v: serde_json::Value = crate::error::read_json(&stats)?;
    serde_json::from_value(v["reward_normalization"].clone())
        .map(Some)
        .map_err(|e| Error::bad_file(&stats, None, format!("reward_normalization: {e}")))
}

/// A reward model's adapter (SEQ_CLS, score head saved) on a base model the caller
/// already holds, left unmerged (`--share_base`): the base's frozen backbone (shared,
/// not copied) with the adapter's branches, the saved score head, the reward
/// statistics and the tokenizer of the adapter's folder. The adapter's tensors become
/// fresh variables (returned as the `Adapter`): a critic trains them further; a
/// reward model is frozen by `Frozen`. `params` holds the base's variables and the head.
pub fn scalar_adapter_on(
    file: &lora::AdapterFile,
    base: &super::CausalLm,
    dropout: f64,
) -> Result<(PretrainedScalar, lora::Adapter)> {
    let dir = file.dir.as_path();
    let config = &base.config;
    let Some(score) = file
        .saved_module(SCORE_WEIGHT)
        .filter(|_| file.is_seq_cls())
    else {
        return Err(Error::WrongModelKind {
            path: dir.to_path_buf(),
            expected: "a reward model's adapter (task_type SEQ_CLS with its score head, as `rlhf rm train --use_peft` writes)".into(),
            found: format!(
                "an adapter with task_type {} and {} score head",
                file.task_type.as_deref().unwrap_or("unset"),
                if file.saved_module(SCORE_WEIGHT).is_some() { "a" } else { "no" }
            ),
        });
    };
    let spec = scalar_specs(config)
        .into_iter()
        .find(|s| s.name == SCORE_WEIGHT)
        .expect("the specs list the head");
    if score.dims() != spec.shape.as_slice() {
        return Err(Error::TensorShape {
            path: dir.join(lora::ADAPTER_WEIGHTS_FILE),
            name: format!("{}{SCORE_WEIGHT}", lora::KEY_PREFIX),
            expected: spec.shape.clone(),
            got: score.dims().to_vec(),
        });
    }
    let head = candle_core::Var::from_tensor(
        &score
            .to_dtype(candle_core::DType::F32)?
            .to_device(&base.device)?,
    )?;
    let head_spec = ParamSpec {
        name: format!("{}{SCORE_WEIGHT}", lora::KEY_PREFIX),
        ..spec.clone()
    };
    let adapter = lora::Adapter::from_file(
        file,
        config,
        lora::TaskType::SeqCls,
        vec![(head_spec, head.clone())],
        dropout,
        &base.device,
    )?;
    let backbone = adapter.attach(&lora::without_adapters(&base.backbone)?)?;
    let mut parts: Vec<(ParamSpec, candle_core::Var)> = base
        .params
        .vars()
        .into_iter()
        .filter(|(s, _)| s.name != "lm_head.weight")
        .map(|(s, v)| (s.clone(), v.clone()))
        .collect();
    parts.push((spec, head.clone()));
    let (tokenizer, eos_token_ids) =
        super::hf::read_tokenizer_for(&super::hf::tokenizer_dir(dir)?, config)?;
    let model = ScalarModel {
        config: config.clone(),
        params: Params::from_vars(parts),
        backbone,
        head: ScalarHead {
            weight: head.as_tensor().clone(),
        },
        device: base.device.clone(),
        sequences_forwarded: SequenceCounter::default(),
    };
    let p = PretrainedScalar {
        model,
        tokenizer,
        eos_token_ids,
        normalization: reward_stats(file)?,
        fresh_head: false,
    };
    Ok((p, adapter))
}

fn classification_class(arch: Arch) -> &'static str {
    match arch {
        Arch::Gpt2 => "GPT2ForSequenceClassification",
        Arch::Llama => "LlamaForSequenceClassification",
        Arch::Qwen2 => "Qwen2ForSequenceClassification",
    }
}

/// Writes the folder as transformers' `...ForSequenceClassification` (num_labels 1),
/// with the reward normalisation in config.json under `rlhf.reward_normalization`.
pub fn save_scalar(p: &PretrainedScalar, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::write(dir, e))?;
    let mut config = p.model.config.raw.clone();
    if let Some(obj) = config.as_object_mut() {
        obj.insert(
            "architectures".into(),
            json!([classification_class(p.model.config.arch)]),
        );
        obj.insert("id2label".into(), json!({"0": "LABEL_0"}));
        obj.insert("label2id".into(), json!({"LABEL_0": 0}));
        // transformers reads the score at the last token that is not padding.
        obj.insert("pad_token_id".into(), p.tokenizer.pad_token_id().into());
        obj.insert("dtype".into(), "float32".into());
        if obj.contains_key("torch_dtype") {
            obj.insert("torch_dtype".into(), "float32".into());
        }
        let mut rlhf = obj.get("rlhf").cloned().unwrap_or(json!({}));
        if let (Some(n), Some(r)) = (p.normalization, rlhf.as_object_mut()) {
            r.insert(
                "reward_normalization".into(),
                serde_json::to_value(n).expect("serializes"),
            );
        }
        if rlhf.as_object().is_some_and(|r| !r.is_empty()) {
            obj.insert("rlhf".into(), rlhf);
        }
    }
    write_json(&dir.join(CONFIG_FILE), &config)?;
    save_safetensors(&p.model.params.to_hf()?, &dir.join(WEIGHTS_FILE))?;
    p.tokenizer.save(dir)?;
    super::hf::write_generation_config(
        dir,
        &p.model.config,
        &p.eos_token_ids,
        p.tokenizer.pad_token_id(),
    )
}

/// Attaches a fresh adapter to a scalar model (a reward model or critic): its backbone
/// becomes the frozen base with LoRA branches, and the score head is trained whole
/// (PEFT's SEQ_CLS `modules_to_save`). `base_dir` is the folder it was loaded from.
pub fn attach_adapter(
    model: &mut ScalarModel,
    args: &lora::LoraArgs,
    base_dir: &Path,
    seed: u64,
) -> Result<lora::Adapter> {
    let picked = lora::select_modules(&model.config, args.lora_target_modules.as_deref())?;
    let score = model
        .params
        .var(SCORE_WEIGHT)
        .expect("a scalar model has a head")
        .clone();
    let spec = scalar_specs(&model.config)
        .into_iter()
        .find(|s| s.name == SCORE_WEIGHT)
        .expect("the specs list the head");
    let head = ParamSpec {
        name: format!("{}{SCORE_WEIGHT}", lora::KEY_PREFIX),
        ..spec
    };
    let adapter = lora::Adapter::init(
        args,
        lora::TaskType::SeqCls,
        picked,
        lora::base_name(base_dir),
        vec![(head, score)],
        seed,
        &model.device,
    )?;
    let base = Backbone::new(&model.config, &model.params.frozen(), &model.device)?;
    model.backbone = adapter.attach(&base)?;
    Ok(adapter)
}

/// Writes a scalar model's adapter folder: the adapter (score head included), the
/// reward statistics, the tokenizer and generation_config.json.
pub fn save_scalar_adapter(
    p: &PretrainedScalar,
    adapter: &lora::Adapter,
    dir: &Path,
) -> Result<()> {
    adapter.save(dir)?;
    if let Some(n) = p.normalization {
        write_json(
            &dir.join(REWARD_STATS_FILE),
            &json!({ "reward_normalization": n }),
        )?;
    }
    p.tokenizer.save(dir)?;
    super::hf::write_generation_config(
        dir,
        &p.model.config,
        &p.eos_token_ids,
        p.tokenizer.pad_token_id(),
    )
}
