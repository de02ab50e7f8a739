//! Pretraining from scratch (or continued): trains a byte-level BPE tokenizer when
//! none is given, packs text into blocks of the context length and trains the causal
//! LM. Its HF folder is what SFT starts from, and its text is PPO-ptx's data.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

use crate::data::chat_template::{ChatTemplate, CHATML_TEMPLATE};
use crate::data::text::read_documents;
use crate::data::tokenizer::Tokenizer;
use crate::error::{Error, Result};
use crate::model::hf::{load_pretrained, Pretrained};
use crate::model::{presets, Arch};
use crate::settings::{at_least, at_least_opt, finite_f64, float, invalid, Range, Settings};
use crate::sft::split_eval;
use crate::train::args::{require, StageDefaults, TrainingArgs};
use crate::train::lm_task::{text_rows, train_lm, Row};
use crate::train::output_dir::check_stage;
use crate::train::schedule::LrSchedulerType;
use crate::train::trainer::TrainSummary;

/// The defaults of this stage where they differ from other stages.
pub const DEFAULTS: StageDefaults = StageDefaults {
    learning_rate: 3e-4,
    num_train_epochs: 3.0,
    lr_scheduler_type: LrSchedulerType::Linear,
};
/// Special tokens of a tokenizer trained here: end of text, ChatML's markers, and a
/// padding token distinct from eos (a sequence-classification head reads its score at
/// the last non-pad token, which must be the eos ending a response).
pub const SPECIAL_TOKENS: [&str; 4] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clap::Args)]
#[command(rename_all = "snake_case")]
pub struct PretrainArgs {
    /// Text: .txt (documents separated by blank lines) or JSONL with a "text" field.
    #[arg(long, visible_alias = "data")]
    pub dataset: Option<PathBuf>,
    #[arg(long)]
    pub eval_dataset: Option<PathBuf>,
    /// Fraction of the blocks held out for evaluation.
    #[arg(long, default_value_t = 0.0, value_parser = finite_f64)]
    pub eval_split: f64,
    /// Continue pretraining this model folder instead of starting from --arch/--preset.
    #[arg(long, visible_alias = "model")]
    pub model_name_or_path: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = Arch::Gpt2)]
    pub arch: Arch,
    /// Model size: gpt2 nano, tiny, gpt2, gpt2-medium; llama/qwen2 nano, tiny, smollm-135m, smollm-360m.
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    /// A tokenizer.json or model folder to use instead of training one.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Vocabulary size of a trained tokenizer.
    #[arg(long, default_value_t = 4096)]
    pub vocab_size: usize,
    /// Tokens per training block (default: the model's context length).
    #[arg(long)]
    pub block_size: Option<usize>,
    /// A TOML or YAML file with any of these settings; flags override it.
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    #[serde(flatten)]
    pub train: TrainingArgs,
}

impl Settings for PretrainArgs {
    fn validate(&self) -> Result<()> {
        self.train.validate()?;
        float("eval_split", self.eval_split, Range::HalfOpen(0.0, 1.0))?;
        // The upper bound is the model's context, checked once the model is built.
        at_least_opt("block_size", self.block_size, 2)?;
        at_least("vocab_size", self.vocab_size, 1)
    }
}

/// Builds the model to pretrain: an existing folder, or a fresh preset with the
/// given (or a newly trained) tokenizer.
fn starting_model(args: &PretrainArgs, docs: &[String]) -> Result<Pretrained> {
    if let Some(dir) = &args.model_name_or_path {
        return load_pretrained(dir, &crate::device::default());
    }
    let tokenizer = match &args.tokenizer {
        Some(p) => Tokenizer::from_path(p)?,
        None => {
            crate::note!(
                "training a {}-token BPE tokenizer on {} documents",
                args.vocab_size,
                docs.len()
            );
            let mut t = Tokenizer::train_bpe(docs, args.vocab_size, &SPECIAL_TOKENS)?;
            t.set_special_token("eos_token", SPECIAL_TOKENS[0]);
            t.set_special_token("bos_token", SPECIAL_TOKENS[0]);
            t.set_special_token("pad_token", SPECIAL_TOKENS[3]);
            t.set_chat_template(Some(ChatTemplate::new(CHATML_TEMPLATE)?));
            t
        }
    };
    let eos = tokenizer.eos_token_id();
    let model =
        presets::init_for_tokenizer(args.arch, &args.preset, &tokenizer, None, args.train.seed)?;
    // Generation stops at the end of text and at the end of a ChatML turn.
    let eos_token_ids = [SPECIAL_TOKENS[0], SPECIAL_TOKENS[2]]
        .iter()
        .filter_map(|t| tokenizer.token_to_id(t))
        .chain(eos)
        .fold(vec![], |mut v, id| {
            if !v.contains(&id) {
                v.push(id);
            }
            v
        });
    Ok(Pretrained {
        model,
        tokenizer,
        eos_token_ids,
    })
}

fn blocks(docs: &[String], pre: &Pretrained, block: usize) -> Result<Vec<Row>> {
    text_rows(docs, &pre.tokenizer, pre.eos()?, block)
}

/// Runs pretraining with settings already merged with any config file.
pub fn run(args: &PretrainArgs) -> Result<TrainSummary> {
    let mut args = args.clone();
    args.train.fill_defaults(DEFAULTS);
    let args = &args;
    args.validate()?;
    let dataset = require(&args.dataset, "--dataset (or --data)")?;
    check_stage(
        &args.train,
        &[
            ("--model", args.model_name_or_path.as_deref()),
            ("--tokenizer", args.tokenizer.as_deref()),
        ],
    )?;
    let docs = read_documents(dataset)?;
    let pre = starting_model(args, &docs)?;
    let context = pre.model.config.context_length();
    let block = args.block_size.unwrap_or(context);
    if block < 2 || block > context {
        return Err(invalid(
            "block_size",
            format!("must be in [2, {context}] (the model's context), got {block}"),
        ));
    }
    let rows = blocks(&docs, &pre, block)?;
    if rows.is_empty() {
        return Err(Error::bad_file(
            dataset,
            None,
            format!("the text is shorter than one block of {block} tokens"),
        ));
    }
    let (train_rows, eval_rows) = match &args.eval_dataset {
        Some(p) => (rows, blocks(&read_documents(p)?, &pre, block)?),
        None => split_eval(rows, args.eval_split, args.train.seed),
    };
    crate::note!(
        "pretraining {} ({:.2}M parameters) on {} blocks of {block} tokens",
        pre.model.config.arch.model_type(),
        pre.model.params.num_parameters() as f64 / 1e6,
        train_rows.len()
    );
    let resolved = serde_json::to_value(args).expect("args serialize");
    train_lm(
        pre,
        None,
        train_rows,
        eval_rows,
        &args.train,
        &resolved,
        "pretrain",
    )
}
