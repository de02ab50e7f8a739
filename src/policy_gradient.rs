//! The critic-free policy-gradient task GRPO and RLOO share. One iteration:
//!   1. sample G = `num_generations` responses for each of `rollout_batch_size`
//!      prompts from the policy (one batched call);
//!   2. score them (reward model or command) and read the log-probs of the sampling
//!      policy and of the frozen reference on every response token;
//!   3. turn each group's scores into one advantage per response, by the method's rule
//!      (`GroupMethod::advantages`: GRPO's group-normalised score, RLOO's leave-one-out
//!      baseline);
//!   4. `num_iterations` passes of minibatches of the clipped surrogate over the
//!      response tokens, the response's advantage on each of its tokens, plus β·k3 KL
//!      to the reference where the method puts its KL in the loss (GRPO).
//!
//! Each minibatch update is one step of the shared training loop and an iteration one
//! of its epochs, as in PPO. The batch of samples, the sampling RNG and the pending
//! metrics are checkpointed, so a run stopped anywhere resumes bit for bit.
//!
//! The loss averages over all response tokens of the minibatch (TRL's token-level
//! normalisation, `loss_type="dapo"`/`"bnpo"`), so long and short responses weigh by
//! their tokens.

use candle_core::Tensor;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::data::prompts::Prompt;
use crate::error::{Error, Result};
use crate::generate::{generate, SamplingParams};
use crate::losses::{clipped_policy_loss, k3_kl};
use crate::model::frozen::Frozen;
use crate::model::hf::Pretrained;
use crate::model::lora::{Adapter, LoraArgs};
use crate::model::response::{logprobs_of, response_logprobs, ResponseBatch};
use crate::model::{CausalLm, Params};
use crate::rollout::policy::{policy_and_reference, run_scorer, share_base_needs};
use crate::rollout::stats::{mean_std, SampleStats};
use crate::rollout::{PromptSet, Scorer};
use crate::settings::{at_least, finite_f32, finite_f64, float, invalid, Range, Settings};
use crate::train::args::{require, StageDefaults, TrainingArgs};
use crate::train::output_dir::check_stage;
use crate::train::schedule::LrSchedulerType;
use crate::train::trainer::{train, LossParts, TrainSummary, TrainTask};

/// TRL's GRPOConfig/RLOOConfig defaults: learning rate 1e-6, linear decay.
pub const DEFAULTS: StageDefaults = StageDefaults {
    learning_rate: 1e-6,
    num_train_epochs: 1.0,
    lr_scheduler_type: LrSchedulerType::Linear,
};

/// The settings GRPO and RLOO share (flattened into each command's own).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clap::Args)]
#[command(rename_all = "snake_case")]
pub struct GroupArgs {
    /// The SFT model: the policy starts from it and it is the frozen reference.
    #[arg(long, visible_alias = "model")]
    pub model_name_or_path: Option<PathBuf>,
    /// Prompts JSONL (TRL's prompt-only format: "prompt" text or messages).
    #[arg(long, visible_alias = "data")]
    pub dataset: Option<PathBuf>,
    /// The reward model folder (`rlhf rm train`), frozen.
    #[arg(long)]
    pub reward_model: Option<PathBuf>,
    /// A program that scores responses instead: it reads JSONL {"prompt",
    /// "completion"} on stdin and prints one reward per line, in order.
    #[arg(long, conflicts_with = "reward_model")]
    pub reward_cmd: Option<String>,
    /// G, the responses sampled per prompt.
    #[arg(long, default_value_t = 4)]
    pub num_generations: usize,
    /// Prompts per iteration (each brings G responses).
    #[arg(long, default_value_t = 8)]
    pub rollout_batch_size: usize,
    /// Responses per update; must divide rollout_batch_size × num_generations.
    #[arg(long, default_value_t = 8)]
    pub mini_batch_size: usize,
    /// μ, passes over each iteration's responses (TRL's `num_iterations`).
    #[arg(long, default_value_t = 1)]
    pub num_iterations: usize,
    /// Iterations to run (default: num_train_epochs passes over the prompts).
    #[arg(long)]
    pub max_iterations: Option<usize>,
    #[arg(long, visible_alias = "max_new_tokens", default_value_t = 64)]
    pub max_completion_length: usize,
    #[arg(long, default_value_t = 1.0, value_parser = finite_f32)]
    pub temperature: f32,
    /// ε of the clipped ratio.
    #[arg(long, default_value_t = 0.2, value_parser = finite_f64)]
    pub epsilon: f64,
    /// A TOML or YAML file with any of these settings; flags override it.
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// LoRA: the policy trains an adapter; the reference is its base with the adapter
    /// switched off (no second copy of the model).
    #[command(flatten)]
    #[serde(flatten)]
    pub lora: LoraArgs,
    /// With --use_peft: the reward model is an adapter on the policy's own base (from
    /// `rlhf rm train --use_peft --model SFT`), kept unmerged, so the policy, the
    /// reference and the reward model hold one copy of the base weights.
    #[arg(long)]
    #[serde(default)]
    pub share_base: bool,
    #[command(flatten)]
    #[serde(flatten)]
    pub train: TrainingArgs,
}

impl Settings for GroupArgs {
    fn validate(&self) -> Result<()> {
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
                format!("must be 1 here (use mini_batch_size), got {accumulation}"),
            ));
        }
        at_least("num_generations", self.num_generations, 2)?;
        at_least("rollout_batch_size", self.rollout_batch_size, 1)?;
        at_least("mini_batch_size", self.mini_batch_size, 1)?;
        let responses = self.rollout_batch_size * self.num_generations;
        if !responses.is_multiple_of(self.mini_batch_size) {
            return Err(invalid(
                "mini_batch_size",
                format!(
                    "{} does not divide rollout_batch_size × num_generations = {responses}",
                    self.mini_batch_size
                ),
            ));
        }
        at_least("num_iterations", self.num_iterations, 1)?;
        crate::settings::at_least_opt("max_iterations", self.max_iterations, 1)?;
        at_least("max_completion_length", self.max_completion_length, 1)?;
        // The ratio π/π_old assumes responses sampled from π: no greedy decoding.
        float("temperature", self.temperature, Range::Above(0.0))?;
        float("epsilon", self.epsilon, Range::AtLeast(0.0))
    }
}

/// What makes a critic-free method itself.
pub trait GroupMethod {
    /// The command's name (progress bar, logs).
    fn name(&self) -> &'static str;
    /// One advantage per response from the iteration's scores and each response's
    /// summed KL estimate (k1) to the reference; responses come in groups of `group`
    /// consecutive ones per prompt.
    fn advantages(&self, scores: &[f64], kl: &[f64], group: usize) -> Vec<f64>;
    /// β of the k3 KL penalty added to the loss on every token (0: none).
    fn kl_loss_coef(&self) -> f64;
}

/// One sampled response and what the update needs of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub prompt: Vec<u32>,
    pub response: Vec<u32>,
    /// log π_old(token), the sampling policy's.
    pub logprobs: Vec<f32>,
    /// log π_ref(token), the frozen SFT model's.
    pub ref_logprobs: Vec<f32>,
    pub score: f64,
    pub advantage: f64,
}

/// Running sums of one iteration's update statistics.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct UpdateStats {
    n: usize,
    loss: f64,
    kl: f64,
    clip: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct GroupState {
    iteration: Option<usize>,
    samples: Vec<Sample>,
    rng_seed: [u8; 32],
    rng_word_pos: String,
    stats: UpdateStats,
    pending_metrics: BTreeMap<String, f64>,
}

pub struct GroupTask<M: GroupMethod> {
    pub method: M,
    pub policy: Pretrained,
    /// With `--use_peft`: the policy's adapter, the only trained tensors.
    pub adapter: Option<Adapter>,
    reference: Frozen<CausalLm>,
    scorer: Scorer,
    prompts: PromptSet,
    args: GroupArgs,
    rng: ChaCha8Rng,
    iteration: Option<usize>,
    samples: Vec<Sample>,
    stats: UpdateStats,
    pending_metrics: BTreeMap<String, f64>,
}

impl<M: GroupMethod> GroupTask<M> {
    /// The current iteration's samples.
    pub fn samples(&self) -> &[Sample] {
        &self.samples
    }

    fn n_minibatches(&self) -> usize {
        self.args.rollout_batch_size * self.args.num_generations / self.args.mini_batch_size
    }

    /// Steps 1–3: sample G responses per prompt, score them, and compute advantages.
    fn rollout(&mut self, iteration: usize) -> Result<()> {
        let g = self.args.num_generations;
        let picked = self.prompts.pick(iteration, self.args.rollout_batch_size);
        // Each prompt G times, consecutively: a group is G consecutive responses.
        let ids: Vec<Vec<u32>> = picked
            .iter()
            .flat_map(|&i| std::iter::repeat_n(self.prompts.prompts[i].1.clone(), g))
            .collect();
        let params = SamplingParams {
            max_new_tokens: self.args.max_completion_length,
            temperature: self.args.temperature,
            eos_token_ids: self.policy.eos_token_ids.clone(),
            ..Default::default()
        };
        let completions = generate(
            &self.policy.model,
            &self.policy.tokenizer,
            &ids,
            &params,
            &mut self.rng,
        )?;
        let prompts: Vec<&Prompt> = picked
            .iter()
            .flat_map(|&i| std::iter::repeat_n(&self.prompts.prompts[i].0, g))
            .collect();
        let scores = self.scorer.scores(&prompts, &completions)?;

        let rows: Vec<(&[u32], &[u32])> = completions
            .iter()
            .map(|c| (c.prompt_tokens.as_slice(), c.tokens.as_slice()))
            .collect();
        let batch = ResponseBatch::new(
            &rows,
            self.policy.tokenizer.pad_token_id(),
            &self.policy.model.device,
        )?
        .with_temperature(self.args.temperature);
        let (logprobs, entropies) = response_logprobs(&self.policy.model, &batch, true)?;
        let ref_logprobs = self.reference.response_logprobs(&batch)?;
        let kl: Vec<f64> = logprobs
            .iter()
            .zip(&ref_logprobs)
            .map(|(a, b)| a.iter().zip(b).map(|(&x, &y)| (x - y) as f64).sum())
            .collect();
        let advantages = self.method.advantages(&scores, &kl, g);

        let n = completions.len() as f64;
        let stats = SampleStats::of(&completions, &self.policy.eos_token_ids);
        let group_stds: Vec<f64> = scores.chunks(g).map(|s| mean_std(s).1).collect();
        let tokens: f64 = completions.iter().map(|c| c.tokens.len() as f64).sum();
        let entropy: f64 = entropies
            .unwrap_or_default()
            .iter()
            .flatten()
            .map(|&x| x as f64)
            .sum::<f64>()
            / tokens.max(1.0);
        let truncated = (completions.len() - stats.num_eos) as f64;
        self.pending_metrics = BTreeMap::from([
            ("reward".into(), scores.iter().sum::<f64>() / n),
            ("reward_std".into(), mean_std(&scores).1),
            (
                "frac_reward_zero_std".into(),
                group_stds.iter().filter(|&&s| s == 0.0).count() as f64 / group_stds.len() as f64,
            ),
            ("kl".into(), kl.iter().sum::<f64>() / n),
            ("entropy".into(), entropy),
            ("completions/mean_length".into(), stats.mean_length),
            ("completions/clipped_ratio".into(), truncated / n),
        ]);
        for (id, share) in stats.end_token_shares {
            self.pending_metrics
                .insert(format!("completions/end_token/{id}"), share);
        }
        self.samples = completions
            .into_iter()
            .zip(logprobs)
            .zip(ref_logprobs)
            .zip(scores.iter().zip(&advantages))
            .map(|(((c, lp), rlp), (&score, &advantage))| Sample {
                prompt: c.prompt_tokens,
                response: c.tokens,
                logprobs: lp,
                ref_logprobs: rlp,
                score,
                advantage,
            })
            .collect();
        self.iteration = Some(iteration);
        self.stats = UpdateStats::default();
        Ok(())
    }

    /// The samples of minibatch `mb` in pass `pass` of the current iteration.
    fn minibatch(&self, iteration: usize, pass: usize, mb: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.samples.len()).collect();
        let key = self.args.train.seed
            ^ ((iteration as u64) << 20)
            ^ (pass as u64).wrapping_mul(0x9E37_79B9);
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(key));
        let size = self.args.mini_batch_size;
        order[mb * size..(mb + 1) * size].to_vec()
    }

    /// Step 4 for one minibatch: the clipped surrogate with each response's advantage
    /// on its tokens, plus β·k3 to the reference.
    fn update_loss(&mut self, iteration: usize, index: usize) -> Result<LossParts> {
        let n_mb = self.n_minibatches();
        let picked = self.minibatch(iteration, index / n_mb, index % n_mb);
        let samples: Vec<&Sample> = picked.iter().map(|&i| &self.samples[i]).collect();
        let rows: Vec<(&[u32], &[u32])> = samples
            .iter()
            .map(|s| (s.prompt.as_slice(), s.response.as_slice()))
            .collect();
        let dev = self.policy.model.device.clone();
        let batch = ResponseBatch::new(&rows, self.policy.tokenizer.pad_token_id(), &dev)?
            .with_temperature(self.args.temperature);
        let flat = |f: &dyn Fn(&Sample) -> Vec<f32>| -> Result<Tensor> {
            let v: Vec<f32> = samples.iter().flat_map(|s| f(s)).collect();
            let n = v.len();
            Ok(Tensor::from_vec(v, n, &dev)?)
        };
        let old_logp = flat(&|s| s.logprobs.clone())?; // (M,)
        let ref_logp = flat(&|s| s.ref_logprobs.clone())?; // (M,)
        let advantages = flat(&|s| vec![s.advantage as f32; s.response.len()])?; // (M,)

        let (logp, _) = logprobs_of(&self.policy.model, &batch, false)?; // (M,)
        let (pg_loss, pstats) =
            clipped_policy_loss(&logp, &old_logp, &advantages, self.args.epsilon)?;
        let kl = k3_kl(&logp, &ref_logp)?.mean_all()?; // scalar
        let beta = self.method.kl_loss_coef();
        let total = if beta > 0.0 {
            (&pg_loss + (&kl * beta)?)?
        } else {
            pg_loss
        };
        let scalar = |t: &Tensor| -> Result<f64> {
            Ok(t.detach()
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?)
        };
        let s = &mut self.stats;
        s.n += 1;
        s.loss += scalar(&total)?;
        s.kl += scalar(&kl)?;
        s.clip += pstats.clipfrac;
        let tokens = rows.iter().map(|(p, r)| p.len() + r.len()).sum();
        Ok(LossParts { sum: total, tokens })
    }
}

impl<M: GroupMethod> TrainTask for GroupTask<M> {
    fn batches_per_epoch(&self) -> usize {
        self.args.num_iterations * self.n_minibatches()
    }

    /// Steps 1–3 run before the iteration's first update, outside its timing.
    fn prepare_batch(&mut self, iteration: usize, _index: usize) -> Result<()> {
        if self.iteration != Some(iteration) {
            self.rollout(iteration)?;
        }
        Ok(())
    }

    fn batch_weight(&self, _iteration: usize, _index: usize) -> Result<f64> {
        Ok(1.0)
    }

    fn batch_loss(&mut self, iteration: usize, index: usize) -> Result<LossParts> {
        self.prepare_batch(iteration, index)?; // a no-op inside the training loop
        self.update_loss(iteration, index)
    }

    fn params(&self) -> &Params {
        match &self.adapter {
            Some(a) => &a.params,
            None => &self.policy.model.params,
        }
    }

    fn evaluate(&mut self) -> Result<BTreeMap<String, f64>> {
        Ok(BTreeMap::new())
    }

    fn save_model(&self, dir: &Path) -> Result<()> {
        crate::model::hf::save_trained(&self.policy, self.adapter.as_ref(), dir)
    }

    fn load_model(&mut self, dir: &Path) -> Result<()> {
        crate::model::hf::load_trained(&self.policy, self.adapter.as_ref(), dir)
    }

    fn state(&self) -> Value {
        let s = GroupState {
            iteration: self.iteration,
            samples: self.samples.clone(),
            rng_seed: self.rng.get_seed(),
            rng_word_pos: self.rng.get_word_pos().to_string(),
            stats: self.stats.clone(),
            pending_metrics: self.pending_metrics.clone(),
        };
        serde_json::to_value(s).expect("the state serializes")
    }

    fn load_state(&mut self, state: &Value) -> Result<()> {
        let s: GroupState = serde_json::from_value(state.clone()).map_err(|e| {
            Error::Invalid(format!("{} state in checkpoint: {e}", self.method.name()))
        })?;
        self.iteration = s.iteration;
        self.samples = s.samples;
        let mut rng = ChaCha8Rng::from_seed(s.rng_seed);
        rng.set_word_pos(
            s.rng_word_pos
                .parse()
                .map_err(|_| Error::Invalid("checkpoint state: bad RNG position".into()))?,
        );
        self.rng = rng;
        self.stats = s.stats;
        self.pending_metrics = s.pending_metrics;
        Ok(())
    }

    fn take_metrics(&mut self) -> BTreeMap<String, f64> {
        // Reported once per iteration, after its last update.
        if self.stats.n == self.batches_per_epoch() && !self.pending_metrics.is_empty() {
            let s = &self.stats;
            let n = s.n as f64;
            let m = &mut self.pending_metrics;
            m.insert("loss".into(), s.loss / n);
            m.insert("clip_ratio/region_mean".into(), s.clip / n);
            m.insert("kl_loss".into(), s.kl / n);
            return std::mem::take(&mut self.pending_metrics);
        }
        BTreeMap::new()
    }
}

/// Builds the task (every check before any training) and runs it to the end.
pub fn run<M: GroupMethod>(
    method: M,
    args: &GroupArgs,
    resolved: &Value,
    scorer_override: Option<Scorer>,
) -> Result<(TrainSummary, GroupTask<M>)> {
    let mut args = args.clone();
    args.train.fill_defaults(DEFAULTS);
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
        ],
    )?;
    let dev = crate::device::default();
    let (policy, adapter, reference) =
        policy_and_reference(sft, &args.lora, args.train.seed, &dev)?;
    let scorer = run_scorer(
        scorer_override,
        (args.reward_model.as_deref(), args.reward_cmd.as_deref()),
        args.share_base,
        (sft, &policy),
        &args.lora,
    )?;
    let prompts = PromptSet::load(
        data,
        &policy.tokenizer,
        policy.model.config.context_length(),
        args.max_completion_length,
        &scorer,
        args.train.seed,
    )?;
    let iterations = args.max_iterations.unwrap_or_else(|| {
        // Each iteration walks rollout_batch_size prompts on every rank.
        let per_iteration = args.rollout_batch_size * crate::distributed::current().world_size();
        ((args.train.epochs() * prompts.len() as f64) / per_iteration as f64)
            .ceil()
            .max(1.0) as usize
    });
    let mut task = GroupTask {
        method,
        reference,
        policy,
        adapter,
        scorer,
        prompts,
        args: args.clone(),
        rng: crate::rollout::sampling_rng(args.train.seed),
        iteration: None,
        samples: vec![],
        stats: UpdateStats::default(),
        pending_metrics: BTreeMap::new(),
    };
    args.train.max_steps = (iterations * task.batches_per_epoch()) as i64;
    task.args = args.clone();
    let name = task.method.name();
    crate::note!(
        "{name}: {iterations} iterations of {} prompts × {} responses, {} updates each",
        args.rollout_batch_size,
        args.num_generations,
        task.batches_per_epoch()
    );
    let mut resolved = resolved.clone();
    if let Some(o) = resolved.as_object_mut() {
        o.insert("max_steps".into(), args.train.max_steps.into());
    }
    let summary = train(&mut task, &args.train, &resolved, name)?;
    Ok((summary, task))
}
