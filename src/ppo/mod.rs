//! PPO against the reward model with a per-token KL penalty and the pretraining mix
//! (InstructGPT step 3, equation 2):
//!
//!   objective(φ) = E[r_θ(x, y) − β·log(π_φ(y|x) / π_SFT(y|x))] + γ·E_pretrain[log π_φ(x)]
//!
//! One iteration, as the paper reads:
//!   1. rollout — sample responses for a batch of prompts from the policy;
//!   2. rewards — score them with the frozen reward model (normalised), subtract
//!      β·KL to the frozen SFT model on every token;
//!   3. advantages — GAE over the critic's values, whitened over the batch;
//!   4. update — `ppo_epochs` passes of minibatches of the clipped surrogate, the
//!      clipped value loss and γ_ptx times the LM loss on pretraining text.
//!
//! Each minibatch update is one step of the shared training loop (one AdamW over the
//! actor and the critic, clipping, checkpoints, exact resume); an iteration is one
//! "epoch" of that loop. The rollout buffer and the KL controller are part of the
//! checkpointed state, and every sample draws from its own stream, named by the
//! prompt's place in the run (`rollout::sample_stream`): a run stopped anywhere
//! resumes bit for bit, and W data-parallel ranks train as one process with W times
//! the batch does.
//! Steps 1–3 run in the loop's `prepare_batch`, before the iteration's first update:
//! `time/rollout` and `time/scoring` time steps 1 and 2, `time/update` the
//! iteration's optimizer steps whole (forward, backward, clipping, AdamW, EMA).
//!
//! With `--use_peft` (`model::lora`) the actor and the critic each train an adapter;
//! the reference is the actor's base with its adapter switched off and a critic that
//! starts from the reward model shares that model's frozen weights: two copies of
//! weights in memory instead of four, and AdamW state for the adapters only.

pub mod advantage;
pub mod kl;
pub mod reward;
pub mod rollout;

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::data::prompts::Prompt;
use crate::data::text::read_documents;
use crate::error::{Error, Result};
use crate::generate::{generate_per_row, SamplingParams};
use crate::losses::{clipped_policy_loss, clipped_value_loss};
use crate::model::frozen::Frozen;
use crate::model::hf::{
    load_weights_into, read_weights, save_adapter_pretrained, save_pretrained, Pretrained,
};
use crate::model::lora::{is_adapter_dir, Adapter, LoraArgs, ADAPTER_WEIGHTS_FILE};
use crate::model::params::load_safetensors;
use crate::model::response::{logprobs_of, response_logprobs, values_of, ResponseBatch};
use crate::model::scalar::{
    attach_adapter, load_scalar, save_scalar, save_scalar_adapter, PretrainedScalar,
};
use crate::model::{CausalLm, Params};
use crate::rollout::policy::{
    policy_and_reference, run_scorer, scalar_on_policy_base, share_base_needs,
};
use crate::rollout::scorer::same_tokenizer;
use crate::rollout::stats::SampleStats;
use crate::rollout::{sample_stream, PromptSet};
use crate::settings::{
    at_least, at_least_opt, finite_f32, finite_f64, float, float_opt, invalid, Range, Settings,
};
use crate::train::args::{require, StageDefaults, TrainingArgs};
use crate::train::lm_task::{lm_loss_sum, text_rows, Row};
use crate::train::output_dir::check_stage;
use crate::train::schedule::LrSchedulerType;
use crate::train::trainer::{train, LossParts, TrainSummary, TrainTask};
use advantage::{gae, whiten};
use kl::{kl_per_token, KlController, KlEstimator};
use reward::{final_score, shaped_rewards};
use rollout::Experience;

pub const DEFAULTS: StageDefaults = StageDefaults {
    learning_rate: 1e-5,
    num_train_epochs: 1.0,
    lr_scheduler_type: LrSchedulerType::Constant,
};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clap::Args)]
#[command(rename_all = "snake_case")]
pub struct PpoArgs {
    /// The SFT model: the policy starts from it and it is the frozen reference.
    #[arg(long, visible_alias = "model")]
    pub model_name_or_path: Option<PathBuf>,
    /// The reward model folder (`rlhf rm train`), frozen.
    #[arg(long)]
    pub reward_model: Option<PathBuf>,
    /// A program that scores responses instead of a reward model: it reads JSONL
    /// {"prompt", "completion"} on stdin and prints one reward per line.
    #[arg(long, conflicts_with = "reward_model")]
    pub reward_cmd: Option<String>,
    /// Where the critic starts (default: the reward model, as InstructGPT does).
    #[arg(long)]
    pub value_model: Option<PathBuf>,
    /// Prompts JSONL (TRL's prompt-only format: "prompt" text or messages).
    #[arg(long, visible_alias = "data")]
    pub dataset: Option<PathBuf>,
    /// Pretraining text for PPO-ptx (.txt or JSONL "text", as `rlhf pretrain` reads).
    #[arg(long)]
    pub ptx_data: Option<PathBuf>,
    /// γ of equation 2 [default: 1.0 with --ptx_data]. The paper uses 27.8 on
    /// 175B models; on small models a smaller value is usually more stable.
    #[arg(long, value_parser = finite_f64)]
    pub ptx_coef: Option<f64>,
    /// Pretraining rows per update.
    #[arg(long, default_value_t = 4)]
    pub ptx_batch_size: usize,
    /// Prompts sampled per iteration.
    #[arg(long, default_value_t = 16)]
    pub rollout_batch_size: usize,
    /// Responses per update; must divide rollout_batch_size.
    #[arg(long, default_value_t = 4)]
    pub mini_batch_size: usize,
    /// Passes over each rollout.
    #[arg(long, default_value_t = 4)]
    pub ppo_epochs: usize,
    /// Iterations to run (default: num_train_epochs passes over the prompts).
    #[arg(long)]
    pub num_iterations: Option<usize>,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    #[arg(long, default_value_t = 1.0, value_parser = finite_f32)]
    pub temperature: f32,
    /// ε of the clipped surrogate.
    #[arg(long, default_value_t = 0.2, value_parser = finite_f64)]
    pub cliprange: f64,
    #[arg(long, default_value_t = 0.2, value_parser = finite_f64)]
    pub cliprange_value: f64,
    #[arg(long, default_value_t = 0.1, value_parser = finite_f64)]
    pub vf_coef: f64,
    #[arg(long, default_value_t = 1.0, value_parser = finite_f32)]
    pub gamma: f32,
    #[arg(long, default_value_t = 0.95, value_parser = finite_f32)]
    pub lam: f32,
    /// β, the KL coefficient (the paper's 0.02); the starting value when adaptive.
    #[arg(long, default_value_t = 0.02, value_parser = finite_f64)]
    pub kl_coef: f64,
    #[arg(long, value_enum, default_value_t = KlEstimator::K1)]
    pub kl_estimator: KlEstimator,
    /// Adapt β toward this KL per response (Ziegler et al.); fixed when unset.
    #[arg(long, value_parser = finite_f64)]
    pub adaptive_kl_target: Option<f64>,
    #[arg(long, default_value_t = 10_000.0, value_parser = finite_f64)]
    pub adaptive_kl_horizon: f64,
    /// Stop an iteration's updates early when the approximate KL between the new and
    /// the sampling policy exceeds 1.5× this.
    #[arg(long, value_parser = finite_f64)]
    pub target_kl: Option<f64>,
    /// Clip normalised scores to ±this.
    #[arg(long, value_parser = finite_f64)]
    pub reward_clip: Option<f64>,
    /// Subtracted from the score of a response cut at max_new_tokens without an eos.
    #[arg(long, value_parser = finite_f64)]
    pub missing_eos_penalty: Option<f64>,
    /// EMA decay of the policy weights, saved in OUTPUT_DIR/ema (the paper: 0.992).
    #[arg(long, value_parser = finite_f64)]
    pub ema: Option<f64>,
    /// A TOML or YAML file with any of these settings; flags override it.
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// LoRA: the policy and the critic each train an adapter (the critic's with its
    /// value head); the reference is the policy's base with its adapter switched off,
    /// and a critic that starts from the reward model shares its frozen weights.
    #[command(flatten)]
    #[serde(flatten)]
    pub lora: LoraArgs,
    /// With --use_peft: the reward model and the critic are adapters on the policy's
    /// own base, kept unmerged, so the four models hold one copy of the base weights.
    /// The reward model must be an adapter on --model (`rlhf rm train --use_peft`);
    /// the critic starts as a copy of it (or of --value_model, also such an adapter),
    /// with its rank and α.
    #[arg(long)]
    #[serde(default)]
    pub share_base: bool,
    #[command(flatten)]
    #[serde(flatten)]
    pub train: TrainingArgs,
}

impl Settings for PpoArgs {
    fn validate(&self) -> Result<()> {
        use Range::*;
        self.train.validate()?;
        self.lora.validate()?;
        share_base_needs(
            self.share_base,
            &self.lora,
            self.reward_model.as_deref(),
            self.reward_cmd.as_deref(),
        )?;
        let accumulation = self.train.gradient_accumulation_steps;
        if accumulation != 1 {
            return Err(invalid(
                "gradient_accumulation_steps",
                format!("must be 1 for ppo (use mini_batch_size), got {accumulation}"),
            ));
        }
        at_least("rollout_batch_size", self.rollout_batch_size, 1)?;
        at_least("mini_batch_size", self.mini_batch_size, 1)?;
        if !self.rollout_batch_size.is_multiple_of(self.mini_batch_size) {
            return Err(invalid(
                "mini_batch_size",
                format!(
                    "{} does not divide rollout_batch_size {}",
                    self.mini_batch_size, self.rollout_batch_size
                ),
            ));
        }
        at_least("ppo_epochs", self.ppo_epochs, 1)?;
        at_least_opt("num_iterations", self.num_iterations, 1)?;
        at_least("max_new_tokens", self.max_new_tokens, 1)?;
        at_least("ptx_batch_size", self.ptx_batch_size, 1)?;
        float_opt("ptx_coef", self.ptx_coef, AtLeast(0.0))?;
        // The ratio π_φ/π_old assumes responses sampled from π: no greedy decoding.
        float("temperature", self.temperature, Above(0.0))?;
        float("cliprange", self.cliprange, AtLeast(0.0))?;
        float("cliprange_value", self.cliprange_value, AtLeast(0.0))?;
        float("vf_coef", self.vf_coef, AtLeast(0.0))?;
        float("gamma", self.gamma, Closed(0.0, 1.0))?;
        float("lam", self.lam, Closed(0.0, 1.0))?;
        float("kl_coef", self.kl_coef, AtLeast(0.0))?;
        float_opt("adaptive_kl_target", self.adaptive_kl_target, Above(0.0))?;
        float("adaptive_kl_horizon", self.adaptive_kl_horizon, Above(0.0))?;
        float_opt("target_kl", self.target_kl, Above(0.0))?;
        float_opt("reward_clip", self.reward_clip, Above(0.0))?;
        float_opt(
            "missing_eos_penalty",
            self.missing_eos_penalty,
            AtLeast(0.0),
        )?;
        float_opt("ema", self.ema, HalfOpen(0.0, 1.0))
    }
}

/// Where PPO's scores come from (the shared `rollout::Scorer`): the frozen reward
/// model, a command, or a function (tests, toy tasks).
pub use crate::rollout::{ScoreFn, Scorer as RewardSource};

/// Running sums of one iteration's update statistics.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct UpdateStats {
    /// Updates taken in this iteration.
    #[serde(default)]
    steps: usize,
    /// Of them, those with rows of this rank's (the means below are over these).
    n: usize,
    policy: f64,
    value: f64,
    ptx: f64,
    approxkl: f64,
    clipfrac: f64,
    ratio: f64,
    /// The minibatches' approx KL (over every rank's tokens) summed over the current
    /// PPO epoch, and their count (for --target_kl).
    epoch_approxkl: f64,
    epoch_n: usize,
    /// Wall time of the iteration's optimizer steps so far (forward, backward,
    /// clipping, AdamW, EMA), from the training loop.
    seconds: f64,
}

/// The checkpointed part of PPO's state.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct PpoState {
    iteration: Option<usize>,
    experience: Vec<Experience>,
    kl: KlController,
    early_stopped: bool,
    stats: UpdateStats,
    pending_metrics: BTreeMap<String, f64>,
}

pub struct PpoTask {
    pub actor: Pretrained,
    pub critic: PretrainedScalar,
    /// With `--use_peft`: the adapters of the actor and the critic (the only trained
    /// tensors; `actor.model` and `critic.model` carry their branches).
    pub adapters: Option<(Adapter, Adapter)>,
    reference: Frozen<CausalLm>,
    reward: RewardSource,
    prompts: PromptSet,
    ptx_rows: Vec<Row>,
    args: PpoArgs,
    /// Actor and critic parameters under one optimizer.
    union: Params,
    /// EMA of the actor's trained parameters (its adapter's with LoRA), in `vars()` order.
    pub ema: Option<Vec<Vec<f32>>>,
    kl: KlController,
    iteration: Option<usize>,
    experience: Vec<Experience>,
    early_stopped: bool,
    stats: UpdateStats,
    pending_metrics: BTreeMap<String, f64>,
}

impl PpoTask {
    /// The current iteration's rollout buffer.
    pub fn experience(&self) -> &[Experience] {
        &self.experience
    }

    fn n_minibatches(&self) -> usize {
        self.args.rollout_batch_size / self.args.mini_batch_size
    }

    fn pad(&self) -> u32 {
        self.actor.tokenizer.pad_token_id()
    }

    /// Steps 1–3 of an iteration: sample, score and compute advantages.
    fn rollout(&mut self, iteration: usize) -> Result<()> {
        let t0 = Instant::now();
        // 1. Rollout: the iteration's prompts, a deterministic walk over shuffled epochs,
        // each sampled with its own stream (named by its place in the walk), so that W
        // ranks with r prompts each sample what one process with W·r prompts samples.
        let r = self.args.rollout_batch_size;
        let picked = self.prompts.pick(iteration, r);
        let mut streams: Vec<ChaCha8Rng> = self
            .prompts
            .positions(iteration, r)
            .map(|g| sample_stream(self.args.train.seed, g))
            .collect();
        let prompts: Vec<Vec<u32>> = picked
            .iter()
            .map(|&i| self.prompts.prompts[i].1.clone())
            .collect();
        let params = SamplingParams {
            max_new_tokens: self.args.max_new_tokens,
            temperature: self.args.temperature,
            eos_token_ids: self.actor.eos_token_ids.clone(),
            ..Default::default()
        };
        let samples = generate_per_row(
            &self.actor.model,
            &self.actor.tokenizer,
            &prompts,
            &params,
            &mut streams,
        )?;
        let rollout_s = t0.elapsed().as_secs_f64();

        // 2. Scoring: old and reference log-probs, values, reward-model scores.
        let t1 = Instant::now();
        let rows: Vec<(&[u32], &[u32])> = samples
            .iter()
            .map(|c| (c.prompt_tokens.as_slice(), c.tokens.as_slice()))
            .collect();
        let pad = self.pad();
        // One packed batch serves the policy, the reference and the critic.
        let batch = ResponseBatch::new(&rows, pad, &self.actor.model.device)?
            .with_temperature(self.args.temperature);
        let (logprobs, entropies) = response_logprobs(&self.actor.model, &batch, true)?;
        let entropies = entropies.unwrap_or_default();
        let ref_logprobs = self.reference.response_logprobs(&batch)?;
        let values = batch.split(&values_of(&self.critic.model.detached(), &batch)?)?;
        let ended: Vec<bool> = samples
            .iter()
            .map(|c| c.finish_reason == crate::generate::FinishReason::Eos)
            .collect();
        let prompts: Vec<&Prompt> = picked.iter().map(|&i| &self.prompts.prompts[i].0).collect();
        let raw_scores = self.reward.scores(&prompts, &samples)?;
        let scoring_s = t1.elapsed().as_secs_f64();

        // 3. Rewards and advantages.
        let beta = self.kl.beta() as f32;
        let mut exps = vec![];
        let (mut kl_sum, mut ent_sum, mut non_score, mut score_sum, mut len_sum) =
            (0.0, 0.0, 0.0, 0.0, 0.0);
        for (i, c) in samples.iter().enumerate() {
            let kl: Vec<f32> = logprobs[i]
                .iter()
                .zip(&ref_logprobs[i])
                .map(|(&a, &b)| kl_per_token(a, b, self.args.kl_estimator))
                .collect();
            let score = final_score(
                raw_scores[i],
                self.args.reward_clip,
                ended[i],
                self.args.missing_eos_penalty,
            );
            let rewards = shaped_rewards(score, &kl, beta);
            let (advantages, returns) = gae(&rewards, &values[i], self.args.gamma, self.args.lam);
            kl_sum += kl.iter().map(|&x| x as f64).sum::<f64>();
            ent_sum += entropies
                .get(i)
                .map_or(0.0, |e| e.iter().map(|&x| x as f64).sum::<f64>());
            non_score += -(beta as f64) * kl.iter().map(|&x| x as f64).sum::<f64>();
            score_sum += score as f64;
            len_sum += c.tokens.len() as f64;
            exps.push(Experience {
                prompt: c.prompt_tokens.clone(),
                response: c.tokens.clone(),
                logprobs: logprobs[i].clone(),
                ref_logprobs: ref_logprobs[i].clone(),
                values: values[i].clone(),
                score,
                rewards,
                advantages,
                returns,
                ended: ended[i],
            });
        }
        // In a data-parallel run the batch is every rank's rollouts: whitening, the KL
        // controller and the reported means use statistics summed over ranks.
        let comm = crate::distributed::current();
        let mut advs: Vec<Vec<f32>> = exps.iter().map(|e| e.advantages.clone()).collect();
        whiten(&mut advs, comm.as_ref())?;
        for (e, a) in exps.iter_mut().zip(advs) {
            e.advantages = a;
        }
        // The objective's means are over every rank's samples; the throughput and the
        // samples' lengths and end tokens (below) are this rank's.
        let mut sums = [kl_sum, ent_sum, non_score, score_sum];
        comm.all_reduce_sum_f64(&mut sums)?;
        let [kl_sum, ent_sum, non_score, score_sum] = sums;
        let nb = (r * comm.world_size()) as f64;
        let sample_stats = SampleStats::of(&samples, &self.actor.eos_token_ids);
        let mean_kl = kl_sum / nb;
        self.kl.update(mean_kl, r * comm.world_size());
        let tokens: f64 = len_sum + exps.iter().map(|e| e.prompt.len() as f64).sum::<f64>();
        self.pending_metrics = BTreeMap::from([
            ("objective/kl".to_string(), mean_kl),
            ("objective/entropy".to_string(), ent_sum / nb),
            ("objective/non_score_reward".to_string(), non_score / nb),
            ("objective/scores".to_string(), score_sum / nb),
            (
                "objective/rlhf_reward".to_string(),
                (score_sum + non_score) / nb,
            ),
            (
                "val/mean_response_length".to_string(),
                sample_stats.mean_length,
            ),
            ("val/num_eos".to_string(), sample_stats.num_eos as f64),
            ("time/rollout".to_string(), rollout_s),
            ("time/scoring".to_string(), scoring_s),
            (
                "time/rollout_tokens_per_second".to_string(),
                len_sum / rollout_s.max(1e-9),
            ),
            (
                "time/scoring_tokens_per_second".to_string(),
                tokens / scoring_s.max(1e-9),
            ),
        ]);
        // Which end token the responses stop with (a policy gaming the reward
        // model's end token shows here).
        for (id, share) in sample_stats.end_token_shares {
            self.pending_metrics
                .insert(format!("val/end_token/{id}"), share);
        }
        self.experience = exps;
        self.iteration = Some(iteration);
        self.early_stopped = false;
        self.stats = UpdateStats::default();
        Ok(())
    }

    /// The rollout rows of minibatch `mb` in PPO epoch `pe` of the current iteration,
    /// as indices into this rank's rollouts.
    ///
    /// Minibatches are cut from one shuffle of the whole batch, every rank's rollouts
    /// (rank k's are rows k·r … k·r + r − 1 of it), so that the W ranks' minibatch is
    /// the one a process holding the whole batch takes. Each rank updates on the rows
    /// it sampled: `mini_batch_size` of them on average, between none and W times that.
    fn minibatch(&self, iteration: usize, pe: usize, mb: usize) -> Vec<usize> {
        let comm = crate::distributed::current();
        let (rank, world) = (comm.rank(), comm.world_size());
        let local = self.experience.len();
        let mut order: Vec<usize> = (0..local * world).collect();
        let key = self.args.train.seed
            ^ ((iteration as u64) << 20)
            ^ (pe as u64).wrapping_mul(0x9E37_79B9);
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(key));
        let size = self.args.mini_batch_size * world;
        order[mb * size..(mb + 1) * size]
            .iter()
            .filter(|&&g| g / local == rank)
            .map(|&g| g % local)
            .collect()
    }

    /// Step 4 for one minibatch: clipped surrogate + vf_coef·value loss + γ·ptx loss.
    ///
    /// The surrogate and the value loss are means over the minibatch's response
    /// tokens, the ptx loss a mean over its text's tokens. In a data-parallel run the
    /// means are over every rank's tokens: rank k returns W·(its tokens / all tokens)
    /// times its own means, the trainer divides by the step's total weight (W: each
    /// rank weighs 1) and sums the ranks' gradients, which gives the global means.
    /// With one process both factors are exactly 1.
    fn update_loss(&mut self, iteration: usize, index: usize) -> Result<LossParts> {
        let n_mb = self.n_minibatches();
        let (pe, mb) = (index / n_mb, index % n_mb);
        let picked = self.minibatch(iteration, pe, mb);
        let exps: Vec<&Experience> = picked.iter().map(|&i| &self.experience[i]).collect();
        let rows: Vec<(&[u32], &[u32])> = exps
            .iter()
            .map(|e| (e.prompt.as_slice(), e.response.as_slice()))
            .collect();
        let dev = self.actor.model.device.clone();
        let comm = crate::distributed::current();

        // The clipped surrogate and value losses over this rank's share of the
        // minibatch (none where every row of it is another rank's).
        let mut ppo = None;
        let response_tokens: usize = exps.iter().map(|e| e.response.len()).sum();
        if !exps.is_empty() {
            let batch = ResponseBatch::new(&rows, self.pad(), &dev)?
                .with_temperature(self.args.temperature);
            let flat = |f: &dyn Fn(&Experience) -> &Vec<f32>| -> Result<Tensor> {
                let v: Vec<f32> = exps.iter().flat_map(|e| f(e).iter().copied()).collect();
                let n = v.len();
                Ok(Tensor::from_vec(v, n, &dev)?)
            };
            let old_logp = flat(&|e| &e.logprobs)?; // (M,)
            let advantages = flat(&|e| &e.advantages)?; // (M,)
            let returns = flat(&|e| &e.returns)?; // (M,)
            let old_values = flat(&|e| &e.values)?; // (M,)

            let (logp, _) = logprobs_of(&self.actor.model, &batch, false)?; // (M,)
            let (pg_loss, pstats) =
                clipped_policy_loss(&logp, &old_logp, &advantages, self.args.cliprange)?;
            let values = values_of(&self.critic.model, &batch)?; // (M,)
            let vf_loss =
                clipped_value_loss(&values, &old_values, &returns, self.args.cliprange_value)?;
            ppo = Some((pg_loss, vf_loss, pstats));
        }

        // γ·ptx: each rank of a data-parallel run reads its own ptx rows.
        let mut ptx = None;
        let mut ptx_tokens = 0;
        let ptx_coef = self.ptx_coef();
        if ptx_coef > 0.0 && !self.ptx_rows.is_empty() {
            let step = iteration * self.batches_per_epoch() + index;
            let step = step * comm.world_size() + comm.rank();
            let k = self.args.ptx_batch_size.min(self.ptx_rows.len());
            let rows: Vec<&Row> = (0..k)
                .map(|i| &self.ptx_rows[(step * k + i) % self.ptx_rows.len()])
                .collect();
            let (sum, n, _) = lm_loss_sum(&self.actor.model, self.pad(), &rows)?;
            ptx_tokens = n;
            ptx = Some((sum / n.max(1) as f64)?);
        }

        // This rank's shares of the minibatch's response tokens and ptx tokens, and
        // its approx KL weighted by its tokens (for the minibatch's token mean).
        let local_kl = ppo
            .as_ref()
            .map_or(0.0, |(_, _, p)| p.approxkl * response_tokens as f64);
        let mut counts = [response_tokens as f64, ptx_tokens as f64, local_kl];
        comm.all_reduce_sum_f64(&mut counts)?;
        // The minibatch's approx KL over every rank's tokens (one process: its own).
        let minibatch_kl = match (&ppo, comm.world_size()) {
            (Some((_, _, p)), 1) => p.approxkl,
            _ => counts[2] / counts[0].max(1.0),
        };
        let world = comm.world_size() as f64;
        let share = |local: usize, all: f64| {
            if all > 0.0 {
                world * local as f64 / all
            } else {
                0.0
            }
        };
        let scaled = |t: Tensor, factor: f64| -> Result<Tensor> {
            Ok(if factor == 1.0 { t } else { (t * factor)? })
        };
        let scalar = |t: &Tensor| -> Result<f64> {
            Ok(t.detach()
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?)
        };
        let mut total: Option<Tensor> = None;
        let s = &mut self.stats;
        s.steps += 1;
        if let Some((pg_loss, vf_loss, pstats)) = ppo {
            s.n += 1;
            s.policy += scalar(&pg_loss)?;
            s.value += scalar(&vf_loss)?;
            s.approxkl += pstats.approxkl;
            s.clipfrac += pstats.clipfrac;
            s.ratio += pstats.ratio;
            let loss = (&pg_loss + (&vf_loss * self.args.vf_coef)?)?;
            total = Some(scaled(loss, share(response_tokens, counts[0]))?);
        }
        if let Some(ptx) = ptx {
            s.ptx += scalar(&ptx)?;
            let term = scaled((ptx * ptx_coef)?, share(ptx_tokens, counts[1]))?;
            total = Some(match total {
                Some(t) => (t + term)?,
                None => term,
            });
        }
        s.epoch_approxkl += minibatch_kl;
        s.epoch_n += 1;
        if mb + 1 == n_mb {
            if let Some(target) = self.args.target_kl {
                // Every rank of a data-parallel run stops on the same, global, figure.
                if s.epoch_approxkl / s.epoch_n as f64 > 1.5 * target {
                    self.early_stopped = true;
                }
            }
            s.epoch_approxkl = 0.0;
            s.epoch_n = 0;
        }
        let sum = match total {
            Some(t) => t,
            // Nothing of this minibatch is this rank's: it adds no gradient.
            None => Tensor::zeros((), candle_core::DType::F32, &dev)?,
        };
        let tokens = rows.iter().map(|(p, r)| p.len() + r.len()).sum();
        Ok(LossParts { sum, tokens })
    }

    fn ptx_coef(&self) -> f64 {
        match (self.args.ptx_coef, &self.args.ptx_data) {
            (Some(c), _) => c,
            (None, Some(_)) => 1.0,
            (None, None) => 0.0,
        }
    }

    fn finish_iteration_metrics(&mut self) {
        let s = &self.stats;
        let n = s.n.max(1) as f64;
        let m = &mut self.pending_metrics;
        m.insert("loss/policy".into(), s.policy / n);
        m.insert("loss/value".into(), s.value / n);
        // ptx rows are read at every update, also where this rank had no rollout rows.
        m.insert("loss/ptx".into(), s.ptx / s.steps.max(1) as f64);
        m.insert("policy/approxkl".into(), s.approxkl / n);
        m.insert("policy/clipfrac".into(), s.clipfrac / n);
        m.insert("val/ratio".into(), s.ratio / n);
        m.insert("time/update".into(), s.seconds);
        m.insert("beta".into(), self.kl.beta());
        m.insert(
            "policy/early_stopped".into(),
            f64::from(u8::from(self.early_stopped)),
        );
    }

    fn ema_pretrained(&self, ema: &[Vec<f32>]) -> Result<Pretrained> {
        let dev = &self.actor.model.device;
        let params = Params::from_flat(self.actor.model.params.specs.clone(), ema, dev)?;
        Ok(Pretrained {
            model: CausalLm::from_params(self.actor.model.config.clone(), params, dev)?,
            tokenizer: self.actor.tokenizer.clone(),
            eos_token_ids: self.actor.eos_token_ids.clone(),
        })
    }
}

impl TrainTask for PpoTask {
    fn batches_per_epoch(&self) -> usize {
        self.args.ppo_epochs * self.n_minibatches()
    }

    /// Steps 1–3 run before the iteration's first update, outside its timing.
    fn prepare_batch(&mut self, iteration: usize, _index: usize) -> Result<()> {
        if self.iteration != Some(iteration) {
            self.rollout(iteration)?;
        }
        Ok(())
    }

    fn batch_weight(&self, iteration: usize, _index: usize) -> Result<f64> {
        let stopped = self.iteration == Some(iteration) && self.early_stopped;
        Ok(if stopped { 0.0 } else { 1.0 })
    }

    fn batch_loss(&mut self, iteration: usize, index: usize) -> Result<LossParts> {
        self.prepare_batch(iteration, index)?; // a no-op inside the training loop
        self.update_loss(iteration, index)
    }

    fn params(&self) -> &Params {
        &self.union
    }

    fn evaluate(&mut self) -> Result<BTreeMap<String, f64>> {
        Ok(BTreeMap::new())
    }

    fn save_model(&self, dir: &Path) -> Result<()> {
        let Some((actor, critic)) = &self.adapters else {
            save_pretrained(&self.actor, dir)?;
            save_scalar(&self.critic, &dir.join("critic"))?;
            if let Some(ema) = &self.ema {
                save_pretrained(&self.ema_pretrained(ema)?, &dir.join("ema"))?;
            }
            return Ok(());
        };
        save_adapter_pretrained(&self.actor, actor, dir)?;
        save_scalar_adapter(&self.critic, critic, &dir.join("critic"))?;
        if let Some(ema) = &self.ema {
            let params = Params::from_flat(actor.params.specs.clone(), ema, &Device::Cpu)?;
            let ema_adapter = Adapter {
                params,
                ..actor.clone()
            };
            save_adapter_pretrained(&self.actor, &ema_adapter, &dir.join("ema"))?;
        }
        Ok(())
    }

    fn load_model(&mut self, dir: &Path) -> Result<()> {
        let ema_dir = dir.join("ema");
        match &self.adapters {
            Some((actor, critic)) => {
                actor.load_weights(dir)?;
                critic.load_weights(&dir.join("critic"))?;
                if self.ema.is_some() {
                    let path = ema_dir.join(ADAPTER_WEIGHTS_FILE);
                    let tensors = load_safetensors(&path, &Device::Cpu)?;
                    let specs = actor.params.specs.clone();
                    self.ema = Some(Params::from_hf(specs, tensors, &path, &Device::Cpu)?.flat()?);
                }
            }
            None => {
                load_weights_into(&self.actor.model.params, dir)?;
                load_weights_into(&self.critic.model.params, &dir.join("critic"))?;
                if self.ema.is_some() {
                    let (tensors, source) = read_weights(&ema_dir, &Device::Cpu)?;
                    let specs = self.actor.model.params.specs.clone();
                    self.ema =
                        Some(Params::from_hf(specs, tensors, &source, &Device::Cpu)?.flat()?);
                }
            }
        }
        Ok(())
    }

    fn state(&self) -> Value {
        let s = PpoState {
            iteration: self.iteration,
            experience: self.experience.clone(),
            kl: self.kl.clone(),
            early_stopped: self.early_stopped,
            stats: self.stats.clone(),
            pending_metrics: self.pending_metrics.clone(),
        };
        serde_json::to_value(s).expect("PPO state serializes")
    }

    fn load_state(&mut self, state: &Value) -> Result<()> {
        let s: PpoState = serde_json::from_value(state.clone())
            .map_err(|e| Error::Invalid(format!("PPO state in checkpoint: {e}")))?;
        self.iteration = s.iteration;
        self.experience = s.experience;
        self.kl = s.kl;
        self.early_stopped = s.early_stopped;
        self.stats = s.stats;
        if self.stats.steps == 0 {
            // A checkpoint from before `steps` existed: every update counted in `n`.
            self.stats.steps = self.stats.n;
        }
        self.pending_metrics = s.pending_metrics;
        Ok(())
    }

    fn after_update(&mut self) -> Result<()> {
        if let (Some(decay), Some(ema)) = (self.args.ema, self.ema.as_mut()) {
            let d = decay as f32;
            let params = match &self.adapters {
                Some((a, _)) => &a.params,
                None => &self.actor.model.params,
            };
            for (e, (_, var)) in ema.iter_mut().zip(params.vars()) {
                let w = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
                for (a, b) in e.iter_mut().zip(w) {
                    *a = d * *a + (1.0 - d) * b;
                }
            }
        }
        Ok(())
    }

    /// `time/update`: the whole optimizer step, not only the loss's forward.
    fn record_step_seconds(&mut self, seconds: f64) {
        self.stats.seconds += seconds;
    }

    fn take_metrics(&mut self) -> BTreeMap<String, f64> {
        // Reported once per iteration, after its last update.
        let done = self.stats.steps == self.batches_per_epoch()
            || (self.early_stopped && self.stats.epoch_n == 0);
        if done && !self.pending_metrics.is_empty() {
            self.finish_iteration_metrics();
            return std::mem::take(&mut self.pending_metrics);
        }
        BTreeMap::new()
    }
}

/// Builds the PPO task from settings (all checks happen here, before any training).
pub fn build(args: &PpoArgs, reward_override: Option<RewardSource>) -> Result<PpoTask> {
    args.validate()?;
    let sft = require(
        &args.model_name_or_path,
        "--model_name_or_path (or --model)",
    )?;
    let data = require(&args.dataset, "--dataset (or --data)")?;
    check_stage(
        &args.train,
        &[
            ("--model", Some(sft)),
            ("--reward_model", args.reward_model.as_deref()),
            ("--value_model", args.value_model.as_deref()),
        ],
    )?;
    let dev = crate::device::default();
    let (actor, actor_adapter, reference) =
        policy_and_reference(sft, &args.lora, args.train.seed, &dev)?;
    let reward = run_scorer(
        reward_override,
        (args.reward_model.as_deref(), args.reward_cmd.as_deref()),
        args.share_base,
        (sft, &actor),
        &args.lora,
    )?;
    let (critic_flag, critic_dir) = match (&args.value_model, &args.reward_model) {
        (Some(v), _) => ("--value_model", v.as_path()),
        (None, Some(r)) => ("--reward_model", r.as_path()),
        (None, None) => ("--model", sft),
    };
    let (critic, critic_adapter) = if args.share_base {
        // The critic starts as a trainable copy of the reward model's adapter and
        // head, on the policy's base like the reward model.
        let (c, a) = scalar_on_policy_base(critic_dir, critic_flag, sft, &actor.model, &args.lora)?;
        (c, Some(a))
    } else {
        // A LoRA critic that starts from the reward model shares its frozen weights.
        let shared = match (&reward, args.value_model.is_none(), args.lora.use_peft) {
            (RewardSource::Model(rm), true, true) => Some(rm.share_backbone()?),
            _ => None,
        };
        let mut critic = match shared {
            Some(c) => c,
            None => load_scalar(critic_dir, &dev, args.train.seed)?,
        };
        let adapter = match actor_adapter {
            Some(_) => {
                if critic_flag == "--reward_model" && is_adapter_dir(critic_dir) {
                    return Err(Error::Invalid(format!(
                        "--reward_model {} is an adapter: with --use_peft the critic starts from it, so add --share_base (the reward model and the critic on the policy's base; the adapter must be on --model), or merge it first (`rlhf merge --adapter {} --output_dir MERGED`)",
                        critic_dir.display(),
                        critic_dir.display()
                    )));
                }
                args.lora.check_base(critic_dir, critic_flag)?;
                Some(attach_adapter(
                    &mut critic.model,
                    &args.lora,
                    critic_dir,
                    args.train.seed + 1,
                )?)
            }
            None => None,
        };
        (critic, adapter)
    };
    same_tokenizer(&actor.tokenizer, &critic.tokenizer, "value model")?;
    let adapters = actor_adapter.zip(critic_adapter);

    let context = actor.model.config.context_length();
    let prompts = PromptSet::load(
        data,
        &actor.tokenizer,
        context,
        args.max_new_tokens,
        &reward,
        args.train.seed,
    )?;
    let ptx_rows = match &args.ptx_data {
        Some(p) => {
            let block = context.min(128);
            let rows = text_rows(&read_documents(p)?, &actor.tokenizer, actor.eos()?, block)?;
            if rows.is_empty() {
                return Err(Error::bad_file(
                    p,
                    None,
                    format!("shorter than one block of {block} tokens"),
                ));
            }
            rows
        }
        None => vec![],
    };
    let union = match &adapters {
        Some((a, c)) => Params::union(&[("actor", &a.params), ("critic", &c.params)]),
        None => Params::union(&[
            ("actor", &actor.model.params),
            ("critic", &critic.model.params),
        ]),
    };
    let ema = match &adapters {
        Some((a, _)) => args.ema.map(|_| a.params.flat()).transpose()?,
        None => args.ema.map(|_| actor.model.params.flat()).transpose()?,
    };
    let kl = match args.adaptive_kl_target {
        Some(target) => KlController::Adaptive {
            beta: args.kl_coef,
            target,
            horizon: args.adaptive_kl_horizon,
        },
        None => KlController::Fixed { beta: args.kl_coef },
    };
    Ok(PpoTask {
        actor,
        critic,
        adapters,
        reference,
        reward,
        prompts,
        ptx_rows,
        args: args.clone(),
        union,
        ema,
        kl,
        iteration: None,
        experience: vec![],
        early_stopped: false,
        stats: UpdateStats::default(),
        pending_metrics: BTreeMap::new(),
    })
}

/// `rlhf ppo`: runs PPO to the end (or to --stop_after_steps) and writes the policy
/// (plus `ema/` and `critic/`) to output_dir.
pub fn run(
    args: &PpoArgs,
    reward_override: Option<RewardSource>,
) -> Result<(TrainSummary, PpoTask)> {
    let mut args = args.clone();
    args.train.fill_defaults(DEFAULTS);
    let mut task = build(&args, reward_override)?;
    let iterations = match args.num_iterations {
        Some(n) => n,
        None => {
            // Each iteration walks rollout_batch_size prompts on every rank.
            let per_iteration =
                args.rollout_batch_size * crate::distributed::current().world_size();
            ((args.train.epochs() * task.prompts.len() as f64) / per_iteration as f64)
                .ceil()
                .max(1.0) as usize
        }
    };
    args.train.max_steps = (iterations * task.batches_per_epoch()) as i64;
    task.args = args.clone();
    let resolved = serde_json::to_value(&args).expect("args serialize");
    crate::note!(
        "ppo: {iterations} iterations of {} prompts, {} updates each (ptx γ = {})",
        args.rollout_batch_size,
        task.batches_per_epoch(),
        task.ptx_coef()
    );
    let summary = train(&mut task, &args.train, &resolved, "ppo")?;
    Ok((summary, task))
}

/// A short JSON summary of a run's last iteration metrics (from metrics.jsonl).
pub fn last_metrics(output_dir: &Path) -> Result<Value> {
    let path = output_dir.join(crate::train::metrics::METRICS_FILE);
    let text = crate::error::read_to_string(&path)?;
    let last = text
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v.get("objective/scores").is_some());
    Ok(last.unwrap_or(json!({})))
}
