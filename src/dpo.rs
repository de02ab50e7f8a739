//! DPO (Rafailov et al. 2023, "Direct Preference Optimization"): the policy learns
//! from the comparisons directly, without a reward model or sampling. Its implicit
//! reward is β·log πθ(y|x)/π_ref(y|x), and the loss is the reward model's equation (1)
//! on that reward (`losses::dpo_loss`).
//!
//! As the reward model does with K-way rankings, all C(K,2) untied pairs of a prompt
//! go into its loss and each of its K responses is forwarded once. The reference
//! log-probs are computed once, before training, from the SFT model's weights (the
//! policy as loaded, before the training loop restores any checkpoint): no second
//! copy of the model is loaded or kept. On resume they are computed again from the
//! same folder, so a resumed run is the same run. With `--use_peft` the policy trains
//! an adapter and the reference is its base with the adapter switched off.
//!
//! A response's tokens are those the reward model reads after the prompt (`RewardInput`,
//! the one rule): for a conversation, the assistant turn as the chat template renders
//! it, its end-of-turn tokens included; for plain text, the response and the eos.
//! Metrics carry TRL's names: `rewards/chosen`, `rewards/rejected`, `rewards/margins`,
//! `rewards/accuracies`, `logps/chosen`, `logps/rejected`.

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::data::jsonl::parse_rows;
use crate::data::rankings::{ranked_from_row, PairTokenizing};
use crate::data::reward_input::RewardInput;
use crate::error::{Error, Result};
use crate::losses::{dpo_loss, DpoLossType};
use crate::model::hf::{load_pretrained, Pretrained};
use crate::model::lora::{reference_of, Adapter, LoraArgs};
use crate::model::params::Params;
use crate::model::response::{logprobs_of, response_logprobs, ResponseBatch};
use crate::settings::{at_least, finite_f64, float, Range, Settings};
use crate::sft::split_eval;
use crate::train::args::{require, StageDefaults, TrainingArgs};
use crate::train::order::EpochOrder;
use crate::train::output_dir::check_stage;
use crate::train::schedule::LrSchedulerType;
use crate::train::trainer::{train, LossParts, TrainSummary, TrainTask};

/// TRL's DPOConfig defaults: learning rate 1e-6, one epoch, linear decay.
pub const DEFAULTS: StageDefaults = StageDefaults {
    learning_rate: 1e-6,
    num_train_epochs: 1.0,
    lr_scheduler_type: LrSchedulerType::Linear,
};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clap::Args)]
#[command(rename_all = "snake_case")]
pub struct DpoArgs {
    /// The SFT model folder: the policy starts from it and it is the reference.
    #[arg(long, visible_alias = "model")]
    pub model_name_or_path: Option<PathBuf>,
    /// Comparisons JSONL: K-way {"prompt", "responses", "ranking"} or TRL's
    /// {"prompt", "chosen", "rejected"}.
    #[arg(long, visible_alias = "data")]
    pub dataset: Option<PathBuf>,
    #[arg(long)]
    pub eval_dataset: Option<PathBuf>,
    /// Fraction of the prompts held out (eval loss and reward accuracy).
    #[arg(long, default_value_t = 0.0, value_parser = finite_f64)]
    pub eval_split: f64,
    /// The strength of the KL constraint to the reference: higher stays closer.
    #[arg(long, default_value_t = 0.1, value_parser = finite_f64)]
    pub beta: f64,
    #[arg(long, value_enum, default_value_t = DpoLossType::Sigmoid)]
    pub loss_type: DpoLossType,
    /// Prompts per batch; each brings its K responses and C(K,2) comparisons.
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

impl Settings for DpoArgs {
    fn validate(&self) -> Result<()> {
        self.train.validate()?;
        self.lora.validate()?;
        float("eval_split", self.eval_split, Range::HalfOpen(0.0, 1.0))?;
        float("beta", self.beta, Range::Above(0.0))?;
        at_least("prompts_per_batch", self.prompts_per_batch, 1)?;
        at_least("max_length", self.max_length, 1)
    }
}

/// One prompt's K responses as the policy reads them, with their comparisons and
/// reference log-probs.
#[derive(Debug, Clone)]
pub struct Preference {
    /// prompt + response i, for each response.
    pub inputs: Vec<Vec<u32>>,
    /// Tokens of the prompt (a prefix of every input).
    pub prompt_len: usize,
    /// (winner, loser) pairs, ties dropped.
    pub pairs: Vec<(usize, usize)>,
    /// log π_ref(response i | prompt), summed over its tokens (averaged for IPO).
    pub ref_logps: Vec<f32>,
}

/// Parses a comparisons row: the reward model's parsing (`ranked_from_row`, its
/// comparisons between identical responses dropped and counted, as `rm train` does),
/// and the prompt's own tokens, which must begin every prompt + response sequence.
/// Returns the preference and the number of comparisons dropped.
pub fn preference_from_row(
    v: &Value,
    cfg: &PairTokenizing,
) -> std::result::Result<(Preference, usize), String> {
    let mut ranked = ranked_from_row(v, cfg)?;
    let dropped = ranked.drop_identical_pairs();
    if ranked.pairs.is_empty() {
        return Err("every comparison is between identical responses: nothing to learn".into());
    }
    let prompt = cfg.prompt(v.get("prompt").ok_or("field \"prompt\" is missing")?)?;
    let prompt_ids = prompt
        .tokenize(cfg.rule.tokenizer, cfg.rule.split_special_tokens)
        .map_err(|e| format!("field \"prompt\": {e}"))?;
    for (i, ids) in ranked.inputs.iter().enumerate() {
        if ids.len() <= prompt_ids.len() || !ids.starts_with(&prompt_ids) {
            return Err(format!(
                "response {i}: the prompt's tokens (with the generation prompt) do not begin \
                 prompt + response, so the response's tokens cannot be told apart"
            ));
        }
    }
    let preference = Preference {
        inputs: ranked.inputs,
        prompt_len: prompt_ids.len(),
        pairs: ranked.pairs,
        ref_logps: vec![],
    };
    Ok((preference, dropped))
}

/// The rows of a batch of preferences: (prompt, response) token slices, K per prompt.
fn rows<'a>(prefs: &[&'a Preference]) -> Vec<(&'a [u32], &'a [u32])> {
    prefs
        .iter()
        .flat_map(|p| p.inputs.iter().map(|ids| ids.split_at(p.prompt_len)))
        .collect()
}

/// Sums (or, for IPO, means) a flat (M,) tensor of token log-probs into one value per
/// response (R,). Gradients flow.
fn per_response(token_logps: &Tensor, lengths: &[usize], loss_type: DpoLossType) -> Result<Tensor> {
    let mut out = Vec::with_capacity(lengths.len());
    let mut at = 0;
    for &n in lengths {
        let s = token_logps.narrow(0, at, n)?.sum_all()?;
        out.push(match loss_type {
            DpoLossType::Sigmoid => s,
            DpoLossType::Ipo => (s / n as f64)?,
        });
        at += n;
    }
    Ok(Tensor::stack(&out, 0)?)
}

/// Sums of TRL's DPO statistics over pairs, for averaging.
#[derive(Debug, Clone, Copy, Default)]
struct PairStats {
    pairs: usize,
    chosen: f64,
    rejected: f64,
    correct: f64,
    logps_chosen: f64,
    logps_rejected: f64,
}

impl PairStats {
    fn add(&mut self, policy: &[f32], reference: &[f32], pairs: &[(usize, usize)], beta: f64) {
        let reward = |i: usize| beta * (policy[i] as f64 - reference[i] as f64);
        for &(w, l) in pairs {
            let (rw, rl) = (reward(w), reward(l));
            self.pairs += 1;
            self.chosen += rw;
            self.rejected += rl;
            self.correct += f64::from(u8::from(rw > rl));
            self.logps_chosen += policy[w] as f64;
            self.logps_rejected += policy[l] as f64;
        }
    }

    fn merge(&mut self, o: &PairStats) {
        self.pairs += o.pairs;
        self.chosen += o.chosen;
        self.rejected += o.rejected;
        self.correct += o.correct;
        self.logps_chosen += o.logps_chosen;
        self.logps_rejected += o.logps_rejected;
    }

    fn metrics(&self) -> BTreeMap<String, f64> {
        if self.pairs == 0 {
            return BTreeMap::new();
        }
        let n = self.pairs as f64;
        BTreeMap::from([
            ("rewards/chosen".into(), self.chosen / n),
            ("rewards/rejected".into(), self.rejected / n),
            ("rewards/margins".into(), (self.chosen - self.rejected) / n),
            ("rewards/accuracies".into(), self.correct / n),
            ("logps/chosen".into(), self.logps_chosen / n),
            ("logps/rejected".into(), self.logps_rejected / n),
        ])
    }
}

pub struct DpoTask {
    pub policy: Pretrained,
    /// With `--use_peft`: the adapter on `policy.model`, the only trained tensors; the
    /// reference is the same base with the adapter switched off.
    pub adapter: Option<Adapter>,
    pub train_set: Vec<Preference>,
    pub eval_set: Vec<Preference>,
    pub beta: f64,
    pub loss_type: DpoLossType,
    pub prompts_per_batch: usize,
    order: EpochOrder,
    stats: PairStats,
}

impl DpoTask {
    /// Fills every preference's reference log-probs, then builds the task. `policy`
    /// must hold the SFT model's weights, as it does when loaded: the training loop
    /// restores a checkpoint's weights only later, in `train`, so the reference is the
    /// SFT model on a fresh run and on a resumed one alike, and no second copy of the
    /// model is loaded.
    ///
    /// With an adapter (attached to `policy.model`), the reference is the base with
    /// the adapter switched off (`lora::reference_of`): the same weights, no copy.
    pub fn new(
        policy: Pretrained,
        adapter: Option<Adapter>,
        mut train_set: Vec<Preference>,
        mut eval_set: Vec<Preference>,
        args: &DpoArgs,
    ) -> Result<Self> {
        let pad = policy.tokenizer.pad_token_id();
        let reference = match adapter {
            Some(_) => Some(reference_of(&policy.model)?),
            None => None,
        };
        let reference = reference.as_ref().unwrap_or(&policy.model);
        for set in [&mut train_set, &mut eval_set] {
            for chunk in set.chunks_mut(args.prompts_per_batch) {
                let refs: Vec<&Preference> = chunk.iter().collect();
                let batch = ResponseBatch::new(&rows(&refs), pad, &reference.device)?;
                let (per_row, _) = response_logprobs(reference, &batch, false)?; // detached
                let flat: Vec<f32> = per_row.concat();
                let flat = Tensor::from_vec(flat, batch.targets.dim(0)?, &Device::Cpu)?;
                let mut logps =
                    per_response(&flat, &batch.lengths, args.loss_type)?.to_vec1::<f32>()?;
                for p in chunk.iter_mut() {
                    p.ref_logps = logps.drain(..p.inputs.len()).collect();
                }
            }
        }
        let order = EpochOrder::new(train_set.len(), args.train.seed);
        Ok(DpoTask {
            policy,
            adapter,
            train_set,
            eval_set,
            beta: args.beta,
            loss_type: args.loss_type,
            prompts_per_batch: args.prompts_per_batch,
            order,
            stats: PairStats::default(),
        })
    }

    /// Σ over `prefs` of each prompt's DPO loss (one forward per response), its
    /// statistics, and the tokens forwarded.
    fn loss_sum(&self, prefs: &[&Preference]) -> Result<(Tensor, PairStats, usize)> {
        let model = &self.policy.model;
        let batch = ResponseBatch::new(
            &rows(prefs),
            self.policy.tokenizer.pad_token_id(),
            &model.device,
        )?;
        let tokens = prefs.iter().flat_map(|p| &p.inputs).map(Vec::len).sum();
        let (token_logps, _) = logprobs_of(model, &batch, false)?; // (M,)
        let logps = per_response(&token_logps, &batch.lengths, self.loss_type)?; // (R,)
        let detached: Vec<f32> = logps.detach().to_vec1()?;
        let (mut total, mut stats, mut at) = (None::<Tensor>, PairStats::default(), 0);
        for p in prefs {
            let k = p.inputs.len();
            let reference = Tensor::from_vec(p.ref_logps.clone(), k, &model.device)?;
            let loss = dpo_loss(
                &logps.narrow(0, at, k)?,
                &reference,
                &p.pairs,
                self.beta,
                self.loss_type,
            )?;
            stats.add(&detached[at..at + k], &p.ref_logps, &p.pairs, self.beta);
            total = Some(match total {
                Some(t) => (t + loss)?,
                None => loss,
            });
            at += k;
        }
        let total = total.ok_or_else(|| Error::Invalid("empty DPO batch".into()))?;
        Ok((total, stats, tokens))
    }
}

impl TrainTask for DpoTask {
    fn batches_per_epoch(&self) -> usize {
        self.order.batches(self.prompts_per_batch)
    }

    fn batch_weight(&self, epoch: usize, index: usize) -> Result<f64> {
        Ok(self.order.batch(epoch, index, self.prompts_per_batch).len() as f64)
    }

    fn batch_loss(&mut self, epoch: usize, index: usize) -> Result<LossParts> {
        let idx = self.order.batch(epoch, index, self.prompts_per_batch);
        let prefs: Vec<&Preference> = idx.iter().map(|&i| &self.train_set[i]).collect();
        let (sum, stats, tokens) = self.loss_sum(&prefs)?;
        self.stats.merge(&stats);
        Ok(LossParts { sum, tokens })
    }

    fn params(&self) -> &Params {
        match &self.adapter {
            Some(a) => &a.params,
            None => &self.policy.model.params,
        }
    }

    fn evaluate(&mut self) -> Result<BTreeMap<String, f64>> {
        if self.eval_set.is_empty() {
            return Ok(BTreeMap::new());
        }
        let (mut loss, mut all) = (0.0, PairStats::default());
        for chunk in self.eval_set.chunks(self.prompts_per_batch) {
            let refs: Vec<&Preference> = chunk.iter().collect();
            let (l, s, _) = self.loss_sum(&refs)?;
            loss += l
                .detach()
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?;
            all.merge(&s);
        }
        let mut m = all.metrics();
        m.insert("loss".into(), loss / self.eval_set.len() as f64);
        Ok(m)
    }

    fn save_model(&self, dir: &Path) -> Result<()> {
        crate::model::hf::save_trained(&self.policy, self.adapter.as_ref(), dir)
    }

    fn load_model(&mut self, dir: &Path) -> Result<()> {
        crate::model::hf::load_trained(&self.policy, self.adapter.as_ref(), dir)
    }

    fn take_metrics(&mut self) -> BTreeMap<String, f64> {
        std::mem::take(&mut self.stats).metrics()
    }
}

/// `rlhf dpo`: trains the policy on comparisons against the frozen SFT model.
pub fn run(args: &DpoArgs) -> Result<TrainSummary> {
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
    let mut policy = load_pretrained(model_dir, &crate::device::default())?;
    let adapter = args
        .lora
        .attach(&mut policy.model, model_dir, args.train.seed)?;
    let eos = policy
        .eos()
        .map_err(|e| Error::Invalid(format!("{}: {e}", model_dir.display())))?;
    let cfg = PairTokenizing {
        rule: RewardInput {
            tokenizer: &policy.tokenizer,
            eos,
            eos_ids: &policy.eos_token_ids,
            split_special_tokens: false,
        },
        max_length: args.max_length.min(policy.model.config.context_length()),
    };
    let load = |path: &Path| -> Result<Vec<Preference>> {
        let mut identical = 0;
        let (prefs, skipped) = parse_rows(path, args.skip_invalid, |v, _| {
            preference_from_row(v, &cfg).map(|(p, dropped)| {
                identical += dropped;
                p
            })
        })?;
        if skipped > 0 {
            crate::note!("{}: {skipped} invalid rows skipped", path.display());
        }
        if identical > 0 {
            crate::note!(
                "{}: {identical} comparisons between identical responses dropped",
                path.display()
            );
        }
        Ok(prefs)
    };
    let all = load(dataset)?;
    let (train_set, eval_set) = match &args.eval_dataset {
        Some(p) => (all, load(p)?),
        None => split_eval(all, args.eval_split, args.train.seed),
    };
    let pairs: usize = train_set.iter().map(|p| p.pairs.len()).sum();
    crate::note!("dpo: {} prompts, {pairs} comparisons", train_set.len());
    let mut task = DpoTask::new(policy, adapter, train_set, eval_set, args)?;
    let resolved = serde_json::to_value(args).expect("args serialize");
    train(&mut task, &args.train, &resolved, "dpo")
}
