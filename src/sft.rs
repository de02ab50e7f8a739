//! Supervised fine-tuning (InstructGPT step 1): the causal-LM loss on demonstration
//! completions only, prompts masked, through the shared training loop.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

use crate::data::sft::{load_sft, LoadReport, Overflow, SftExample, SftTokenizing};
use crate::error::{Error, Result};
use crate::model::hf::load_pretrained;
use crate::model::lora::LoraArgs;
use crate::settings::{at_least, finite_f64, float, Range, Settings};
use crate::train::args::{require, StageDefaults, TrainingArgs};
use crate::train::lm_task::{pack, train_lm, Row};
use crate::train::output_dir::check_stage;
use crate::train::schedule::LrSchedulerType;
use crate::train::trainer::TrainSummary;

/// The defaults of this stage where they differ from other stages.
pub const DEFAULTS: StageDefaults = StageDefaults {
    learning_rate: 2e-5,
    num_train_epochs: 3.0,
    lr_scheduler_type: LrSchedulerType::Linear,
};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clap::Args)]
#[command(rename_all = "snake_case")]
pub struct SftArgs {
    /// The model folder to fine-tune.
    #[arg(long, visible_alias = "model")]
    pub model_name_or_path: Option<PathBuf>,
    /// JSONL in TRL's formats: prompt/completion, messages, or text.
    #[arg(long, visible_alias = "data")]
    pub dataset: Option<PathBuf>,
    /// A separate JSONL for evaluation (else --eval_split of the dataset).
    #[arg(long)]
    pub eval_dataset: Option<PathBuf>,
    /// Fraction of the dataset held out for evaluation (eval loss and perplexity).
    #[arg(long, default_value_t = 0.0, value_parser = finite_f64)]
    pub eval_split: f64,
    /// Longest example in tokens (capped at the model's context).
    #[arg(long, default_value_t = 1024)]
    pub max_length: usize,
    /// Pack several examples into each row (attention never crosses examples).
    #[arg(long)]
    pub packing: bool,
    /// What to do with an example longer than max_length.
    #[arg(long, value_enum, default_value_t = Overflow::Error)]
    pub on_overflow: Overflow,
    /// Skip malformed rows (and report how many) instead of stopping.
    #[arg(long)]
    pub skip_invalid: bool,
    /// Encode special-token strings inside the data's text and message content
    /// (`<|im_end|>`) as text, not as special tokens (transformers' option; off by
    /// default, as there).
    #[arg(long)]
    #[serde(default)]
    pub split_special_tokens: bool,
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

impl Settings for SftArgs {
    fn validate(&self) -> Result<()> {
        self.train.validate()?;
        self.lora.validate()?;
        float("eval_split", self.eval_split, Range::HalfOpen(0.0, 1.0))?;
        at_least("max_length", self.max_length, 1)
    }
}

/// Splits off the last `fraction` of a seeded shuffle for evaluation.
pub fn split_eval<T>(mut items: Vec<T>, fraction: f64, seed: u64) -> (Vec<T>, Vec<T>) {
    if fraction <= 0.0 || items.len() < 2 {
        return (items, vec![]);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    items.shuffle(&mut rng);
    let n_eval = ((items.len() as f64 * fraction).round() as usize).clamp(1, items.len() - 1);
    let eval = items.split_off(items.len() - n_eval);
    (items, eval)
}

fn report_skips(what: &str, r: &LoadReport) {
    if r.skipped_invalid + r.skipped_overlong + r.truncated > 0 {
        crate::note!(
            "{what}: {} rows, {} invalid skipped, {} over max_length skipped, {} truncated",
            r.rows,
            r.skipped_invalid,
            r.skipped_overlong,
            r.truncated
        );
    }
}

/// Runs SFT with settings already merged with any config file.
pub fn run(args: &SftArgs) -> Result<TrainSummary> {
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
    let mut pre = load_pretrained(model_dir, &crate::device::default())?;
    let adapter = args
        .lora
        .attach(&mut pre.model, model_dir, args.train.seed)?;
    let max_length = args.max_length.min(pre.model.config.context_length());
    let eos = pre
        .eos()
        .map_err(|e| Error::Invalid(format!("{}: {e}", model_dir.display())))?;
    let cfg = SftTokenizing {
        tokenizer: &pre.tokenizer,
        eos,
        eos_ids: &pre.eos_token_ids,
        max_length,
        overflow: args.on_overflow,
        split_special_tokens: args.split_special_tokens,
    };
    let (examples, report) = load_sft(dataset, &cfg, args.skip_invalid)?;
    report_skips(&dataset.display().to_string(), &report);
    let (train_ex, eval_ex): (Vec<SftExample>, Vec<SftExample>) = match &args.eval_dataset {
        Some(path) => {
            let (e, r) = load_sft(path, &cfg, args.skip_invalid)?;
            report_skips(&path.display().to_string(), &r);
            (examples, e)
        }
        None => split_eval(examples, args.eval_split, args.train.seed),
    };
    let to_rows = |ex: Vec<SftExample>| -> Vec<Row> {
        if args.packing {
            pack(ex, max_length)
        } else {
            ex.into_iter().map(Row::single).collect()
        }
    };
    let (train_rows, eval_rows) = (to_rows(train_ex), to_rows(eval_ex));
    let resolved = serde_json::to_value(args).expect("args serialize");
    train_lm(
        pre,
        adapter,
        train_rows,
        eval_rows,
        &args.train,
        &resolved,
        "sft",
    )
}
