//! The reward model (InstructGPT step 2, equation 1): the SFT model with a scalar
//! head, trained on labelers' rankings of K responses per prompt.
//!
//! As the paper does, all C(K,2) comparisons of a prompt go into the same batch and
//! each of its K responses is forwarded once (K forwards, not 2·C(K,2)); the loss
//! of a prompt is −1/C(K,2) Σ log σ(r(x, y_w) − r(x, y_l)), averaged over the prompts
//! of the batch. Batches are made of prompts. After training, the mean and standard
//! deviation of the rewards over the training responses are stored with the model,
//! so that PPO can normalise rewards to mean 0.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::data::rankings::{load_rankings, PairTokenizing, Ranked};
use crate::error::{Error, Result};
use crate::losses::ranking_loss;
use crate::model::lora::{Adapter, LoraArgs};
use crate::model::params::Params;
use crate::model::scalar::{
    attach_adapter, load_scalar, save_scalar, save_scalar_adapter, PretrainedScalar,
    RewardNormalization,
};
use crate::settings::{at_least, finite_f64, float, Range, Settings};
use crate::sft::split_eval;
use crate::train::args::{require, StageDefaults, TrainingArgs};
use crate::train::order::EpochOrder;
use crate::train::output_dir::check_stage;
use crate::train::schedule::LrSchedulerType;
use crate::train::trainer::{train, LossParts, TrainSummary, TrainTask};

/// One epoch (the paper: more overfits), cosine schedule.
pub const DEFAULTS: StageDefaults = StageDefaults {
    learning_rate: 1e-5,
    num_train_epochs: 1.0,
    lr_scheduler_type: LrSchedulerType::Cosine,
};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clap::Args)]
#[command(rename_all = "snake_case")]
pub struct RmTrainArgs {
    /// The SFT model folder the reward model starts from (a new scalar head is added).
    #[arg(long, visible_alias = "model")]
    pub model_name_or_path: Option<PathBuf>,
    /// Rankings JSONL: {"prompt", "responses": [...], "ranking": [...]} or TRL's
    /// {"prompt", "chosen", "rejected"}.
    #[arg(long, visible_alias = "data")]
    pub dataset: Option<PathBuf>,
    #[arg(long)]
    pub eval_dataset: Option<PathBuf>,
    /// Fraction of the prompts held out (pairwise accuracy and loss).
    #[arg(long, default_value_t = 0.0, value_parser = finite_f64)]
    pub eval_split: f64,
    /// Prompts per batch; each brings its K responses and C(K,2) comparisons.
    /// (per_device_train_batch_size is not used by the reward model.)
    #[arg(long, default_value_t = 8)]
    pub prompts_per_batch: usize,
    /// Longest prompt + response in tokens (capped at the model's context).
    #[arg(long, default_value_t = 1024)]
    pub max_length: usize,
    /// Skip malformed rows (and report how many) instead of stopping.
    #[arg(long)]
    pub skip_invalid: bool,
    /// A TOML or YAML file with any of these settings; flags override it.
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    #[serde(flatten)]
    pub lora: LoraArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub train: TrainingArgs,
}

impl Settings for RmTrainArgs {
    fn validate(&self) -> Result<()> {
        self.train.validate()?;
        self.lora.validate()?;
        float("eval_split", self.eval_split, Range::HalfOpen(0.0, 1.0))?;
        at_least("prompts_per_batch", self.prompts_per_batch, 1)?;
        at_least("max_length", self.max_length, 1)
    }
}

/// Loss, pairwise accuracy and counts over a set of ranked prompts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RmEval {
    pub loss: f64,
    pub accuracy: f64,
    pub prompts: usize,
    pub pairs: usize,
}

/// The reward-model input of every response of `prompts`, prompt by prompt: what
/// the reward model forwards (K sequences per prompt).
fn sequences<'a>(prompts: impl Iterator<Item = &'a Ranked>) -> Vec<Vec<u32>> {
    prompts.flat_map(|r| r.inputs.iter().cloned()).collect()
}

pub struct RmTask {
    pub rm: PretrainedScalar,
    /// With `--use_peft`: the adapter (LoRA and the score head), the only trained
    /// tensors.
    pub adapter: Option<Adapter>,
    pub train_set: Vec<Ranked>,
    pub eval_set: Vec<Ranked>,
    pub prompts_per_batch: usize,
    order: EpochOrder,
}

impl RmTask {
    pub fn new(
        rm: PretrainedScalar,
        train_set: Vec<Ranked>,
        eval_set: Vec<Ranked>,
        prompts_per_batch: usize,
        seed: u64,
    ) -> Self {
        let order = EpochOrder::new(train_set.len(), seed);
        RmTask {
            rm,
            adapter: None,
            train_set,
            eval_set,
            prompts_per_batch,
            order,
        }
    }

    /// Σ over `prompts` of each prompt's ranking loss, with one forward per response;
    /// also returns the rewards (one Vec per prompt) for accuracy.
    pub fn batch_loss_sum(
        &self,
        prompts: &[&Ranked],
    ) -> Result<(candle_core::Tensor, Vec<Vec<f32>>, usize)> {
        let seqs = sequences(prompts.iter().copied());
        let tokens = seqs.iter().map(Vec::len).sum();
        let rewards = self
            .rm
            .model
            .score_last(&seqs, self.rm.tokenizer.pad_token_id())?; // (ΣK,)
        let mut total: Option<candle_core::Tensor> = None;
        let mut per_prompt = vec![];
        let mut offset = 0;
        for r in prompts {
            let k = r.inputs.len();
            let rk = rewards.narrow(0, offset, k)?; // (K,)
            offset += k;
            let loss = ranking_loss(&rk, &r.pairs)?;
            total = Some(match total {
                Some(t) => (t + loss)?,
                None => loss,
            });
            per_prompt.push(rk.detach().to_vec1::<f32>()?);
        }
        let total = total.ok_or_else(|| Error::Invalid("empty reward-model batch".into()))?;
        Ok((total, per_prompt, tokens))
    }

    /// Mean loss over prompts and pairwise accuracy over all pairs of `set`.
    pub fn evaluate_set(&self, set: &[Ranked]) -> Result<RmEval> {
        let (mut loss, mut correct, mut pairs) = (0.0, 0usize, 0usize);
        for chunk in set.chunks(self.prompts_per_batch.max(1)) {
            let refs: Vec<&Ranked> = chunk.iter().collect();
            let (l, rewards, _) = self.batch_loss_sum(&refs)?;
            loss += l
                .detach()
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?;
            for (r, rw) in chunk.iter().zip(&rewards) {
                pairs += r.pairs.len();
                correct += r.pairs.iter().filter(|&&(w, l)| rw[w] > rw[l]).count();
            }
        }
        Ok(RmEval {
            loss: loss / set.len().max(1) as f64,
            accuracy: correct as f64 / pairs.max(1) as f64,
            prompts: set.len(),
            pairs,
        })
    }

    /// Mean and standard deviation of the rewards of every training response (the
    /// standard deviation as computed, before any floor).
    pub fn reward_statistics(&self) -> Result<RewardNormalization> {
        let mut all = vec![];
        for chunk in self.train_set.chunks(self.prompts_per_batch.max(1)) {
            let seqs = sequences(chunk.iter());
            let rewards = self
                .rm
                .model
                .score_last(&seqs, self.rm.tokenizer.pad_token_id())?;
            all.extend(
                rewards
                    .detach()
                    .to_dtype(candle_core::DType::F64)?
                    .to_vec1::<f64>()?,
            );
        }
        let n = all.len().max(1) as f64;
        let mean = all.iter().sum::<f64>() / n;
        let var = all.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n;
        Ok(RewardNormalization {
            mean,
            std: var.sqrt(),
        })
    }
}

impl TrainTask for RmTask {
    fn batches_per_epoch(&self) -> usize {
        self.order.batches(self.prompts_per_batch)
    }

    fn batch_weight(&self, epoch: usize, index: usize) -> Result<f64> {
        Ok(self.order.batch(epoch, index, self.prompts_per_batch).len() as f64)
    }

    fn batch_loss(&mut self, epoch: usize, index: usize) -> Result<LossParts> {
        let idx = self.order.batch(epoch, index, self.prompts_per_batch);
        let prompts: Vec<&Ranked> = idx.iter().map(|&i| &self.train_set[i]).collect();
        if let Some(a) = &self.adapter {
            a.set_dropout(Some((self.order.rank_seed(), epoch, index)));
        }
        let loss = self.batch_loss_sum(&prompts);
        if let Some(a) = &self.adapter {
            a.set_dropout(None);
        }
        let (sum, _, tokens) = loss?;
        Ok(LossParts { sum, tokens })
    }

    fn params(&self) -> &Params {
        match &self.adapter {
            Some(a) => &a.params,
            None => &self.rm.model.params,
        }
    }

    fn evaluate(&mut self) -> Result<BTreeMap<String, f64>> {
        if self.eval_set.is_empty() {
            return Ok(BTreeMap::new());
        }
        let e = self.evaluate_set(&self.eval_set)?;
        Ok(BTreeMap::from([
            ("loss".to_string(), e.loss),
            ("accuracy".to_string(), e.accuracy),
        ]))
    }

    fn save_model(&self, dir: &Path) -> Result<()> {
        self.save(dir)
    }

    fn load_model(&mut self, dir: &Path) -> Result<()> {
        match &self.adapter {
            Some(a) => a.load_weights(dir),
            None => crate::model::hf::load_weights_into(&self.rm.model.params, dir),
        }
    }
}

impl RmTask {
    /// The reward model's folder, or with `--use_peft` its adapter folder.
    pub fn save(&self, dir: &Path) -> Result<()> {
        match &self.adapter {
            Some(a) => save_scalar_adapter(&self.rm, a, dir),
            None => save_scalar(&self.rm, dir),
        }
    }
}

fn tokenizing(
    rm: &PretrainedScalar,
    max_length: usize,
    split_special_tokens: bool,
) -> Result<PairTokenizing<'_>> {
    let mut rule = rm.reward_input()?;
    rule.split_special_tokens = split_special_tokens;
    Ok(PairTokenizing {
        rule,
        max_length: max_length.min(rm.model.config.context_length()),
    })
}

/// `rlhf rm train`: trains, then stores the reward normalisation with the model.
pub fn train_rm(args: &RmTrainArgs) -> Result<(TrainSummary, RewardNormalization)> {
    let mut args = args.clone();
    args.train.fill_defaults(DEFAULTS);
    let args = &args;
    args.validate()?;
    let model_dir = require(
        &args.model_name_or_path,
        "--model_name_or_path (or --model)",
    )?;
    let dataset = require(&args.dataset, "--dataset (or --data)")?;
    check_stage(&args.train, &[("--model", Some(model_dir))])?;
    args.lora.check_base(model_dir, "--model")?;
    let mut rm = load_scalar(model_dir, &crate::device::default(), args.train.seed)?;
    let adapter = args
        .lora
        .use_peft
        .then(|| attach_adapter(&mut rm.model, &args.lora, model_dir, args.train.seed))
        .transpose()?;
    let cfg = tokenizing(&rm, args.max_length, false)?;
    let (all, skipped) = load_rankings(dataset, &cfg, args.skip_invalid)?;
    if skipped > 0 {
        crate::note!("{}: {skipped} invalid rows skipped", dataset.display());
    }
    let (train_set, eval_set) = match &args.eval_dataset {
        Some(p) => (all, load_rankings(p, &cfg, args.skip_invalid)?.0),
        None => split_eval(all, args.eval_split, args.train.seed),
    };
    let pairs: usize = train_set.iter().map(|r| r.pairs.len()).sum();
    crate::note!(
        "reward model: {} prompts, {pairs} comparisons",
        train_set.len()
    );
    let mut task = RmTask::new(
        rm,
        train_set,
        eval_set,
        args.prompts_per_batch,
        args.train.seed,
    );
    task.adapter = adapter;
    let resolved = serde_json::to_value(args).expect("args serialize");
    let summary = train(&mut task, &args.train, &resolved, "rm")?;
    let norm = task.reward_statistics()?;
    task.rm.normalization = Some(norm);
    let out = args.train.output_dir()?;
    // Saved either way, so that `rm eval` / `rm score` can inspect a degenerate model;
    // PPO refuses it (`check_normalization`). Rank 0 alone writes (every rank holds the
    // same weights and statistics).
    let comm = crate::distributed::current();
    if comm.is_main() {
        task.save(out)?;
    }
    comm.barrier()?;
    check_normalization(&norm).map_err(|msg| {
        Error::Invalid(format!(
            "{}: {msg}. The reward model gives (nearly) the same reward to every training response: the comparisons are likely degenerate (identical or near-identical chosen and rejected responses, or too few distinct ones), or the learning rate is too high. The model was saved for inspection (rlhf rm score); rlhf ppo refuses it",
            out.display()
        ))
    })?;
    Ok((summary, norm))
}

/// The smallest standard deviation of the training rewards a reward model may have:
/// PPO divides every score by it, so below this a tiny difference between two
/// responses becomes a reward of thousands.
pub const MIN_REWARD_STD: f64 = 1e-3;

/// Whether stored reward statistics can normalise scores: finite, and a standard
/// deviation of at least [`MIN_REWARD_STD`]. The error says what is wrong.
pub fn check_normalization(n: &RewardNormalization) -> std::result::Result<(), String> {
    if !n.mean.is_finite() || !n.std.is_finite() {
        return Err(format!(
            "the reward statistics are not finite (mean {}, std {})",
            n.mean, n.std
        ));
    }
    if n.std < MIN_REWARD_STD {
        return Err(format!(
            "the standard deviation of the training rewards is {:e}, below {MIN_REWARD_STD:e}: normalised scores would be multiplied by {:.0}",
            n.std,
            1.0 / n.std.max(f64::MIN_POSITIVE)
        ));
    }
    Ok(())
}

/// Loads a trained reward model (a folder with `score.weight`).
pub fn load_reward_model(dir: &Path) -> Result<PretrainedScalar> {
    let rm = load_scalar(dir, &crate::device::default(), 0)?;
    if rm.fresh_head {
        let classes = crate::model::hf::architectures(&rm.model.config);
        return Err(Error::WrongModelKind {
            path: dir.to_path_buf(),
            expected: "a reward model (a ...ForSequenceClassification folder with score.weight, written by `rlhf rm train`)".into(),
            found: format!(
                "this is a causal LM without a score head (no score.weight; architectures {classes:?})"
            ),
        });
    }
    Ok(rm)
}

/// `rlhf rm eval`: loss and pairwise accuracy on a rankings file.
/// `split_special_tokens`: special-token strings in prompts and responses are
/// encoded as text (`Tokenizer::encode_chat`).
pub fn eval_rm(
    model: &Path,
    data: &Path,
    max_length: usize,
    batch: usize,
    split_special_tokens: bool,
) -> Result<RmEval> {
    let rm = load_reward_model(model)?;
    let cfg = tokenizing(&rm, max_length, split_special_tokens)?;
    let (set, _) = load_rankings(data, &cfg, false)?;
    RmTask::new(rm, vec![], vec![], batch, 0).evaluate_set(&set)
}

/// `rlhf rm score`: rewards for JSONL rows of {"prompt", "response"}; each row comes
/// back with "reward" (the head's output at the last token of `RewardInput::ids`, as
/// transformers' sequence classifier computes it on the same ids) and, for a trained
/// reward model, "reward_normalized" ((r − mean) / std). `split_special_tokens`: as
/// for `eval_rm`.
pub fn score_rm(
    model: &Path,
    data: &Path,
    max_length: usize,
    batch: usize,
    split_special_tokens: bool,
) -> Result<Vec<serde_json::Value>> {
    let rm = load_reward_model(model)?;
    let cfg = tokenizing(&rm, max_length, split_special_tokens)?;
    let lines = crate::data::jsonl::read_jsonl(data)?;
    let mut seqs = vec![];
    for l in &lines {
        let bad = |m: String| Error::bad_file(data, Some(l.number), m);
        let p = l
            .value
            .get("prompt")
            .ok_or_else(|| bad("field \"prompt\" is missing".into()))?;
        let r = l
            .value
            .get("response")
            .ok_or_else(|| bad("field \"response\" is missing".into()))?;
        let prompt = cfg.prompt(p).map_err(bad)?;
        seqs.push(cfg.input(&prompt, r, "field \"response\"").map_err(bad)?);
    }
    let mut out = vec![];
    for (r, l) in rewards(&rm, &seqs, batch)?.into_iter().zip(&lines) {
        let mut row = l.value.as_object().cloned().unwrap_or_default();
        row.insert("reward".into(), r.into());
        if let Some(n) = rm.normalization {
            row.insert("reward_normalized".into(), n.apply(r).into());
        }
        out.push(serde_json::Value::Object(row));
    }
    Ok(out)
}

/// The raw reward of each sequence (`RewardInput::ids`), `batch` per forward pass.
fn rewards(rm: &PretrainedScalar, seqs: &[Vec<u32>], batch: usize) -> Result<Vec<f64>> {
    let pad = rm.tokenizer.pad_token_id();
    let mut out = Vec::with_capacity(seqs.len());
    for chunk in seqs.chunks(batch.max(1)) {
        out.extend(
            rm.model
                .score_last(chunk, pad)?
                .to_dtype(candle_core::DType::F64)?
                .to_vec1::<f64>()?,
        );
    }
    Ok(out)
}

/// Raw rewards of (prompt, response) values (a prompt is text or messages, a
/// response text or an assistant message), as `rlhf rm score --split_special_tokens`
/// computes them (the pairs come from outside: a special-token string in them is
/// text); an error names the pair's index.
pub fn score_values(
    rm: &PretrainedScalar,
    pairs: &[(serde_json::Value, serde_json::Value)],
    max_length: usize,
    batch: usize,
) -> Result<Vec<f64>> {
    let cfg = tokenizing(rm, max_length, true)?;
    let mut seqs = Vec::with_capacity(pairs.len());
    for (i, (p, r)) in pairs.iter().enumerate() {
        let bad = |m: String| Error::Invalid(format!("pair {i}: {m}"));
        let prompt = cfg.prompt(p).map_err(bad)?;
        seqs.push(cfg.input(&prompt, r, "response").map_err(bad)?);
    }
    rewards(rm, &seqs, batch)
}
