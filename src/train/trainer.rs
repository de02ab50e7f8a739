//! The shared training loop: pretraining, SFT, the reward model and PPO's updates all
//! run through `train`. A task supplies micro-batch losses; the loop owns gradient
//! accumulation, clipping, AdamW, the schedule, non-finite handling, logging,
//! evaluation, checkpoints and exact resume.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use super::args::TrainingArgs;
use super::checkpoint;
use super::metrics::MetricsWriter;
use super::optimizer::{AdamW, AdamWConfig, GradAccumulator};
use super::output_dir::{self, Start};
use super::schedule::lr_factor;
use crate::error::{read_json, Error, Result};
use crate::io::write_json;
use crate::model::hf::save_safetensors;
use crate::model::Params;

pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const TRAINER_STATE_FILE: &str = "trainer_state.json";
pub const TRAINING_ARGS_FILE: &str = "training_args.json";

/// One micro-batch's loss as numerator and the size it is averaged over. The loop
/// divides each numerator by the total `count` of the optimizer step's micro-batches,
/// so accumulating 4 batches of B equals one batch of 4B.
pub struct LossParts {
    pub sum: Tensor, // scalar
    /// Tokens processed (for tokens/s).
    pub tokens: usize,
}

/// What a training stage provides to the loop.
pub trait TrainTask {
    /// Micro-batches in one epoch.
    fn batches_per_epoch(&self) -> usize;
    /// Work micro-batch `index` of `epoch` needs before its step, that belongs to no
    /// single update (PPO samples and scores its rollout here). Called for each of a
    /// step's micro-batches before their weights are read, and kept out of the step's
    /// timing (`record_step_seconds`).
    fn prepare_batch(&mut self, _epoch: usize, _index: usize) -> Result<()> {
        Ok(())
    }
    /// The averaging weight of micro-batch `index` of `epoch` (e.g. its target tokens).
    fn batch_weight(&self, epoch: usize, index: usize) -> Result<f64>;
    /// The loss numerator of micro-batch `index` of `epoch`.
    fn batch_loss(&mut self, epoch: usize, index: usize) -> Result<LossParts>;
    fn params(&self) -> &Params;
    /// Held-out metrics (names without the `eval/` prefix); empty when there is no
    /// eval set.
    fn evaluate(&mut self) -> Result<BTreeMap<String, f64>>;
    /// Writes the model as an HF folder.
    fn save_model(&self, dir: &Path) -> Result<()>;
    /// Restores the weights written by `save_model` (the default reads the HF folder
    /// into `params()`).
    fn load_model(&mut self, dir: &Path) -> Result<()> {
        crate::model::hf::load_weights_into(self.params(), dir)
    }
    /// Extra state to checkpoint (RNG streams, controllers); `Null` when none.
    fn state(&self) -> Value {
        Value::Null
    }
    fn load_state(&mut self, _state: &Value) -> Result<()> {
        Ok(())
    }
    /// Called after every optimizer update (e.g. to update an EMA of the weights).
    fn after_update(&mut self) -> Result<()> {
        Ok(())
    }
    /// The wall time of the optimizer step just taken: its micro-batches' losses,
    /// backward passes, clipping, AdamW and `after_update` (everything after
    /// `prepare_batch`, before logging and checkpoints). Called for every step,
    /// skipped ones included, before `take_metrics`.
    fn record_step_seconds(&mut self, _seconds: f64) {}
    /// Metrics the task gathered since the last call, logged at the current step.
    fn take_metrics(&mut self) -> BTreeMap<String, f64> {
        BTreeMap::new()
    }
}

/// What is saved in trainer_state.json and restored on resume.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Completed optimizer steps (including skipped non-finite ones).
    pub global_step: u64,
    pub total_steps: u64,
    pub skipped_nonfinite_steps: u64,
    pub consecutive_nonfinite: u64,
    pub tokens_seen: u64,
    #[serde(default)]
    pub task: Value,
    /// The ranks of the data-parallel run that wrote it (absent: one process). A run
    /// resumes only with the same number: each rank's shard and state depend on it.
    #[serde(default, skip_serializing_if = "is_one_process")]
    pub world_size: u64,
}

fn is_one_process(world_size: &u64) -> bool {
    *world_size <= 1
}

/// Summary of a finished run.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub state: TrainerState,
    pub last_loss: f64,
    pub eval: BTreeMap<String, f64>,
    pub resumed_from: Option<u64>,
    /// Wall time of this call to `train`, from its start to the final model written
    /// (what a benchmark compares with a peer's whole training call).
    pub seconds: f64,
}

fn adamw_config(args: &TrainingArgs) -> AdamWConfig {
    AdamWConfig {
        beta1: args.adam_beta1,
        beta2: args.adam_beta2,
        eps: args.adam_epsilon,
        weight_decay: args.weight_decay,
    }
}

/// Runs the loop to the end, resuming from the newest valid checkpoint in the output
/// folder when there is one (unless `overwrite_output_dir`; a folder holding a model
/// and no checkpoint is refused: see `output_dir`). `args` has its stage
/// defaults filled; `resolved_config` is saved beside every checkpoint.
pub fn train(
    task: &mut dyn TrainTask,
    args: &TrainingArgs,
    resolved_config: &Value,
    label: &str,
) -> Result<TrainSummary> {
    let call_start = Instant::now();
    let out = args.output_dir()?.to_path_buf();
    let nb = task.batches_per_epoch();
    if nb == 0 {
        return Err(Error::Invalid("the training set yields no batch".into()));
    }
    let accum = args.gradient_accumulation_steps;
    let total_steps = if args.max_steps > 0 {
        args.max_steps as u64
    } else {
        ((args.epochs() * nb as f64) / accum as f64).ceil().max(1.0) as u64
    };
    let warmup = if args.warmup_steps > 0 {
        args.warmup_steps
    } else {
        (args.warmup_ratio * total_steps as f64).ceil() as usize
    };

    // Data parallelism (`crate::distributed`): every rank runs this loop on its shard
    // of each batch; gradients and statistics are summed over ranks before the
    // update, so that every rank applies the same update; rank 0 alone writes.
    let comm = crate::distributed::current();
    let main = comm.is_main();
    let parallel = comm.world_size() > 1;
    let mut opt = AdamW::new(task.params(), adamw_config(args))?;
    let mut state = TrainerState {
        total_steps,
        ..Default::default()
    };
    let mut resumed_from = None;
    // Resume, start over, or refuse the folder (`output_dir`'s rules), before
    // anything is written; the folder is created only now, with the data and the
    // settings checked.
    // With several ranks, rank 0 claims the folder first (it may clean it), then the
    // others read what it left, before anyone writes.
    let start = if main {
        let start = output_dir::claim(&out, args.overwrite_output_dir);
        comm.barrier()?;
        start?
    } else {
        comm.barrier()?;
        output_dir::claim(&out, false)?
    };
    comm.barrier()?;
    // Every rank must start from rank 0's step (a folder not shared between the ranks'
    // machines would not be).
    if parallel {
        let mine = match &start {
            Start::Resume(step, _) => *step,
            Start::Fresh => u64::MAX,
        };
        let mut buf = mine.to_le_bytes();
        comm.broadcast(&mut buf, 0)?;
        if u64::from_le_bytes(buf) != mine {
            return Err(Error::Invalid(format!(
                "rank {} sees another checkpoint in {} than rank 0: the ranks must share the output folder",
                comm.rank(),
                out.display()
            )));
        }
    }
    match start {
        Start::Resume(step, dir) => {
            resume_from(&dir, task, &mut opt, &mut state, comm.as_ref())?;
            state.total_steps = total_steps;
            resumed_from = Some(step);
            crate::note!("resuming from {} (step {step})", dir.display());
        }
        Start::Fresh if args.resume => {
            return Err(Error::Invalid(format!(
                "--resume: no valid checkpoint in {}",
                out.display()
            )));
        }
        Start::Fresh => {}
    }
    if main {
        std::fs::create_dir_all(&out).map_err(|e| Error::write(&out, e))?;
        write_json(&out.join(TRAINING_ARGS_FILE), resolved_config)?;
    }

    // metrics.jsonl keeps the steps up to the checkpoint resumed from, so that each
    // step appears once.
    let mut metrics = match main {
        true => Some(MetricsWriter::create(&out, resumed_from)?),
        false => None,
    };
    let mut acc = GradAccumulator::new(task.params())?;
    let bar = match main {
        true => crate::progress::bar(total_steps, label),
        false => indicatif::ProgressBar::hidden(),
    };
    bar.set_position(state.global_step);
    let (mut window_loss, mut window_steps, mut window_tokens) = (0.0, 0usize, 0usize);
    let mut window_start = Instant::now();
    let mut last_loss = f64::NAN;
    let mut eval = BTreeMap::new();
    // The last periodic checkpoint, while its fsyncs and rename finish.
    let mut finishing: Option<checkpoint::Finishing> = None;

    let stop_at = args.stop_after_steps.map_or(total_steps, |n| {
        (state.global_step + n as u64).min(total_steps)
    });
    while state.global_step < stop_at {
        let step = state.global_step;
        let step_lr =
            args.lr() * lr_factor(args.schedule(), step as usize, warmup, total_steps as usize);
        let micro: Vec<(usize, usize)> = (0..accum)
            .map(|i| {
                let m = step as usize * accum + i;
                (m / nb, m % nb)
            })
            .collect();
        for &(e, i) in &micro {
            task.prepare_batch(e, i)?;
        }
        let step_start = Instant::now();
        let weights: Vec<f64> = micro
            .iter()
            .map(|&(e, i)| task.batch_weight(e, i))
            .collect::<Result<_>>()?;
        // The weight of the whole step over all ranks: each rank's loss is its share
        // of the global mean, so that the summed gradients are the global batch's.
        let mut total_weight = [weights.iter().sum::<f64>()];
        comm.all_reduce_sum_f64(&mut total_weight)?;
        let total_weight = total_weight[0];
        acc.zero()?;
        let mut loss = 0.0;
        let mut tokens = 0;
        if total_weight > 0.0 {
            // The last micro-batch also takes the norm's squares (in a data-parallel
            // run the sum over ranks comes first, and the norm is taken after it).
            let last = micro.len().checked_sub(1).filter(|_| !parallel);
            for (k, (&(e, i), &w)) in micro.iter().zip(&weights).enumerate() {
                if parallel && w == 0.0 {
                    continue; // this rank's shard of the batch is empty
                }
                let parts = task.batch_loss(e, i)?;
                let scaled = (parts.sum / total_weight)?;
                loss += scaled
                    .to_dtype(candle_core::DType::F64)?
                    .to_scalar::<f64>()?;
                tokens += parts.tokens;
                let grads = scaled.backward()?;
                if Some(k) == last {
                    acc.add_final(task.params(), &grads)?;
                } else {
                    acc.add(task.params(), &grads)?;
                }
            }
        }
        if parallel {
            acc.all_reduce(comm.as_ref())?;
            let mut stats = [loss, tokens as f64];
            comm.all_reduce_sum_f64(&mut stats)?;
            (loss, tokens) = (stats[0], stats[1] as usize);
        }
        let grad_norm = acc.clip(args.max_grad_norm)?;
        state.global_step += 1;
        state.tokens_seen += tokens as u64;
        window_tokens += tokens;
        if !loss.is_finite() || !grad_norm.is_finite() {
            state.skipped_nonfinite_steps += 1;
            state.consecutive_nonfinite += 1;
            bar.println(format!(
                "step {}: non-finite loss ({loss}) or gradient norm ({grad_norm}); update skipped",
                state.global_step
            ));
            if state.consecutive_nonfinite >= args.max_nonfinite_steps as u64 {
                // "Intact" holds only once the last save has finished (and did).
                checkpoint::Finishing::wait_for(&mut finishing)?;
                return Err(Error::Invalid(format!(
                    "aborting: {} non-finite steps in a row (last at step {}); lower --learning_rate or check the data. The last checkpoint is intact.",
                    state.consecutive_nonfinite, state.global_step
                )));
            }
        } else {
            state.consecutive_nonfinite = 0;
            if total_weight > 0.0 {
                opt.step(task.params(), &acc, step_lr)?;
                task.after_update()?;
            }
            last_loss = loss;
            window_loss += loss;
            window_steps += 1;
        }
        task.record_step_seconds(step_start.elapsed().as_secs_f64());
        bar.set_position(state.global_step);
        bar.set_message(format!("{label} loss {loss:.4} lr {step_lr:.2e}"));

        let s = state.global_step;
        let task_metrics = task.take_metrics();
        if let (false, Some(metrics)) = (task_metrics.is_empty(), metrics.as_mut()) {
            metrics.log(s, &task_metrics)?;
        }
        let epoch = (s as usize * accum) as f64 / nb as f64;
        if args.logging_steps > 0
            && (s.is_multiple_of(args.logging_steps as u64) || s == total_steps)
            && window_steps > 0
        {
            let secs = window_start.elapsed().as_secs_f64().max(1e-9);
            let mut m = BTreeMap::new();
            m.insert("train/loss".to_string(), window_loss / window_steps as f64);
            m.insert("train/learning_rate".to_string(), step_lr);
            m.insert("train/grad_norm".to_string(), grad_norm);
            m.insert("train/epoch".to_string(), epoch);
            m.insert(
                "train/tokens_per_second".to_string(),
                window_tokens as f64 / secs,
            );
            m.insert(
                "train/skipped_nonfinite_steps".to_string(),
                state.skipped_nonfinite_steps as f64,
            );
            if let Some(metrics) = metrics.as_mut() {
                metrics.log(s, &m)?;
            }
            bar.set_message(format!(
                "{label} loss {:.4} lr {step_lr:.2e} {:.0} tok/s",
                window_loss / window_steps as f64,
                window_tokens as f64 / secs
            ));
            (window_loss, window_steps, window_tokens) = (0.0, 0, 0);
            window_start = Instant::now();
        }
        let epoch_end = (s as usize * accum) / nb > ((s as usize - 1) * accum) / nb;
        let eval_now = match args.eval_steps {
            Some(n) if n > 0 => s.is_multiple_of(n as u64),
            _ => epoch_end,
        };
        if main && (eval_now || s == total_steps) {
            eval = task.evaluate()?;
            if !eval.is_empty() {
                let m: BTreeMap<String, f64> = eval
                    .iter()
                    .map(|(k, v)| (format!("eval/{k}"), *v))
                    .collect();
                if let Some(metrics) = metrics.as_mut() {
                    metrics.log(s, &m)?;
                }
                let text: Vec<String> = eval.iter().map(|(k, v)| format!("{k} {v:.4}")).collect();
                bar.println(format!("step {s}: eval {}", text.join(", ")));
            }
        }
        if args.save_steps > 0 && s.is_multiple_of(args.save_steps as u64) && s < stop_at {
            let saved = Saved {
                task: &*task,
                opt: &opt,
                state: &state,
            };
            // The previous checkpoint is finished first (saves stay in order).
            checkpoint::Finishing::wait_for(&mut finishing)?;
            finishing = saved.write(comm.as_ref(), &out, args, resolved_config, true)?;
        }
    }
    bar.finish_and_clear();
    checkpoint::Finishing::wait_for(&mut finishing)?;
    // A final checkpoint, so that an interrupted or finished run resumes from here.
    let saved = Saved {
        task: &*task,
        opt: &opt,
        state: &state,
    };
    saved.write(comm.as_ref(), &out, args, resolved_config, false)?;
    if state.global_step < total_steps {
        crate::note!(
            "stopped at step {} of {total_steps} (--stop_after_steps); rerun the same command to continue",
            state.global_step
        );
        return Ok(TrainSummary {
            state,
            last_loss,
            eval,
            resumed_from,
            seconds: call_start.elapsed().as_secs_f64(),
        });
    }
    if main {
        task.save_model(&out)?;
        write_json(
            &out.join(TRAINER_STATE_FILE),
            &serde_json::to_value(&state).expect("state serializes"),
        )?;
    }
    comm.barrier()?;
    Ok(TrainSummary {
        state,
        last_loss,
        eval,
        resumed_from,
        seconds: call_start.elapsed().as_secs_f64(),
    })
}

/// What a checkpoint holds, written by rank 0 while the other ranks wait.
struct Saved<'a> {
    task: &'a dyn TrainTask,
    opt: &'a AdamW,
    state: &'a TrainerState,
}

impl Saved<'_> {
    /// With `background`, rank 0's save is returned while it is still being finished
    /// on its own thread (`checkpoint::start_save`); otherwise it is on disk before
    /// the ranks meet at the barrier.
    fn write(
        &self,
        comm: &dyn crate::distributed::Collective,
        out: &Path,
        args: &TrainingArgs,
        resolved_config: &Value,
        background: bool,
    ) -> Result<Option<checkpoint::Finishing>> {
        // Each rank's own task state (its rollouts; GRPO's and RLOO's sampling stream) goes into the
        // checkpoint: gathered on rank 0 in rank order.
        let mut state = self.state.clone();
        state.task = self.task.state();
        if comm.world_size() > 1 {
            let ranks = gather_json(comm, &state.task)?;
            state.task = serde_json::json!({ "ranks": ranks });
            state.world_size = comm.world_size() as u64;
        }
        let mut finishing = if comm.is_main() {
            Some(save_checkpoint(
                self.task,
                self.opt,
                &state,
                out,
                args.save_total_limit,
                resolved_config,
            )?)
        } else {
            None
        };
        if !background {
            checkpoint::Finishing::wait_for(&mut finishing)?;
        }
        comm.barrier()?;
        Ok(finishing)
    }
}

/// Every rank's `value`, in rank order, on rank 0 (empty on the others).
fn gather_json(comm: &dyn crate::distributed::Collective, value: &Value) -> Result<Vec<Value>> {
    let mut out = vec![];
    for r in 0..comm.world_size() {
        let bytes = if comm.rank() == r {
            serde_json::to_vec(value).expect("state serializes")
        } else {
            vec![]
        };
        let mut len = [bytes.len() as f64];
        comm.all_reduce_sum_f64(&mut len)?;
        let mut buf = if comm.rank() == r {
            bytes
        } else {
            vec![0u8; len[0] as usize]
        };
        comm.broadcast(&mut buf, r)?;
        if comm.is_main() {
            out.push(serde_json::from_slice(&buf).map_err(|e| {
                Error::Invalid(format!(
                    "rank {r}'s training state did not arrive whole: {e}"
                ))
            })?);
        }
    }
    Ok(out)
}

/// A non-finite state is never written.
fn ensure_finite(params: &Params) -> Result<()> {
    for ((spec, _), data) in params.vars().into_iter().zip(params.flat()?) {
        if !data.iter().all(|x| x.is_finite()) {
            return Err(Error::Invalid(format!(
                "parameter {} holds non-finite values; not saving it",
                spec.name
            )));
        }
    }
    Ok(())
}

fn save_checkpoint(
    task: &dyn TrainTask,
    opt: &AdamW,
    state: &TrainerState,
    out: &Path,
    limit: Option<usize>,
    resolved_config: &Value,
) -> Result<checkpoint::Finishing> {
    ensure_finite(task.params())?;
    checkpoint::start_save(out, state.global_step, limit, |dir| {
        task.save_model(dir)?;
        save_safetensors(
            &opt.state_tensors(task.params())?,
            &dir.join(OPTIMIZER_FILE),
        )?;
        write_json(
            &dir.join(TRAINER_STATE_FILE),
            &serde_json::to_value(state).expect("state serializes"),
        )?;
        write_json(&dir.join(TRAINING_ARGS_FILE), resolved_config)
    })
}

/// Loads weights, optimizer and trainer state from a validated checkpoint.
fn resume_from(
    dir: &Path,
    task: &mut dyn TrainTask,
    opt: &mut AdamW,
    state: &mut TrainerState,
    comm: &dyn crate::distributed::Collective,
) -> Result<()> {
    task.load_model(dir)?;
    let opt_path = dir.join(OPTIMIZER_FILE);
    let bytes = std::fs::read(&opt_path).map_err(|e| Error::read(&opt_path, e))?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, &candle_core::Device::Cpu)?;
    opt.load_state(task.params(), &tensors)?;
    *state = read_json(&dir.join(TRAINER_STATE_FILE))?;
    let written_by = state.world_size.max(1) as usize;
    if written_by != comm.world_size() {
        return Err(Error::Invalid(format!(
            "{}: written by a run of {written_by} rank(s); resume it with the same number (this run has {})",
            dir.display(),
            comm.world_size()
        )));
    }
    if written_by > 1 {
        let mine = state.task["ranks"]
            .get(comm.rank())
            .cloned()
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "{}: the checkpoint holds no state for rank {}",
                    dir.display(),
                    comm.rank()
                ))
            })?;
        state.task = mine;
    }
    task.load_state(&state.task)?;
    Ok(())
}
