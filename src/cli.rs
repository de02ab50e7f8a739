//! The `rlhf` command line. Raw arguments become validated settings before any
//! model is loaded; every failure is an error with context (exit code 2 in `main`).

use anyhow::{bail, Context, Result};
use clap::{ArgMatches, Args, CommandFactory, Parser, Subcommand};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use std::fmt::Display;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::data::chat_template::{check_role, ChatTemplate, CHATML_TEMPLATE};
use crate::data::prompts::{read_prompts, Prompt};
use crate::data::tokenizer::Tokenizer;
use crate::error::{read_json, Error};
use crate::generate::{generate, generate_n, SamplingParams};
use crate::io::AtomicFile;
use crate::model::hf::{load_pretrained, save_pretrained, Pretrained};
use crate::model::{presets, Arch};
use crate::ppo::PpoArgs;
use crate::pretrain::PretrainArgs;
use crate::rm::RmTrainArgs;
use crate::settings::{as_flag, at_least, finite_f32, Settings};
use crate::sft::SftArgs;
use crate::train::args::{negative_numbers, resolve};
use crate::train::output_dir::{check_model_dir, check_not_input, claim_for_model};
use crate::train::trainer::TrainSummary;

/// The `rlhf` command line as clap parses it: every option may take a negative
/// number (`--max_steps -1`, not only `--max_steps=-1`); which settings may be negative
/// is for their ranges to say (`crate::settings`), with an error naming the flag.
pub fn command() -> clap::Command {
    negative_numbers(Cli::command())
}

/// Whether a failure is a write to a closed pipe (`rlhf generate ... | head -1`):
/// `main` then exits quietly with code 0, as ripgrep and other Unix tools do.
pub fn is_broken_pipe(err: &anyhow::Error) -> bool {
    let broken = |e: &std::io::Error| e.kind() == std::io::ErrorKind::BrokenPipe;
    err.chain().any(|c| match c.downcast_ref::<Error>() {
        Some(Error::Write { cause, .. }) => broken(cause),
        _ => c.downcast_ref::<std::io::Error>().is_some_and(broken),
    })
}

#[derive(Debug, Parser)]
#[command(
    name = "rlhf",
    version,
    about = "InstructGPT-style RLHF: SFT, reward model from K-way rankings, PPO-ptx; on HF model folders"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Where the models run: cpu, or cuda[:N] in a binary built with `--features cuda`.
    #[arg(
        long,
        global = true,
        default_value = "cpu",
        value_name = "cpu|cuda[:N]"
    )]
    pub device: crate::device::DeviceSpec,
    /// bf16 autocast: matrix products in bf16, f32 master weights; on a GPU, or for
    /// training on a CPU with AMX-BF16 tiles (Intel Xeon, 4th generation on).
    #[arg(long, global = true)]
    pub bf16: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The whole pipeline on the built-in 3H task, with a report (README's first command).
    Demo(crate::demo::DemoArgs),
    /// SFT → reward model → PPO-ptx on your own model and data, from one config file.
    Pipeline(crate::pipeline::PipelineArgs),
    /// Sample completions from a model folder.
    Generate(GenerateArgs),
    /// Print a conversation rendered with a model's chat template.
    Template(TemplateArgs),
    /// Write a randomly initialised model folder.
    Init(InitArgs),
    /// Pretrain a causal LM (and its tokenizer) on text.
    Pretrain(PretrainArgs),
    /// Supervised fine-tuning on demonstrations (InstructGPT step 1).
    Sft(SftArgs),
    /// The reward model from K-way rankings (InstructGPT step 2).
    #[command(subcommand)]
    Rm(RmCommand),
    /// PPO against the reward model with a KL penalty and PPO-ptx (InstructGPT step 3).
    Ppo(PpoArgs),
    /// DPO: the policy trained on comparisons directly, against the frozen SFT model.
    Dpo(crate::dpo::DpoArgs),
    /// GRPO: G samples per prompt, advantages relative to the group; no critic.
    Grpo(crate::grpo::GrpoArgs),
    /// RLOO: k samples per prompt, a leave-one-out baseline; no critic.
    Rloo(crate::rloo::RlooArgs),
    /// The labeling app: demonstrations, rankings of K outputs, blind model comparisons.
    #[command(subcommand)]
    Label(crate::label::LabelCommand),
    /// An OpenAI-compatible server with continuous batching, and a chat page at `/`.
    Serve(crate::serve::ServeArgs),
    /// Chat with a model in the terminal.
    Chat(crate::serve::chat_cli::ChatArgs),
    /// Merge a LoRA adapter into its base model: a plain HF folder (PEFT's
    /// merge_and_unload), which transformers and every command load as a model.
    Merge(MergeArgs),
}

#[derive(Debug, Args)]
#[command(rename_all = "snake_case")]
pub struct MergeArgs {
    /// The base model folder (default: the adapter's base_model_name_or_path).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The adapter folder (adapter_config.json, adapter_model.safetensors), PEFT's or
    /// written by `--use_peft`.
    #[arg(long)]
    pub adapter: PathBuf,
    /// Where the merged model goes.
    #[arg(long)]
    pub output_dir: PathBuf,
    /// Replace a model already in output_dir.
    #[arg(long)]
    pub overwrite_output_dir: bool,
}

#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per process
pub enum RmCommand {
    /// Train a reward model from an SFT model and ranked responses.
    Train(RmTrainArgs),
    /// Loss and pairwise accuracy on a rankings file (one JSON object on stdout).
    Eval(RmDataArgs),
    /// Rewards for {"prompt", "response"} rows (JSONL with "reward" added).
    Score(RmDataArgs),
}

#[derive(Debug, Args)]
#[command(rename_all = "snake_case")]
pub struct RmDataArgs {
    /// A reward-model folder (written by `rlhf rm train`).
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub data: PathBuf,
    /// Where to write the scored JSONL (default: stdout).
    #[arg(long)]
    pub output: Option<PathBuf>,
    #[arg(long, default_value_t = 1024)]
    pub max_length: usize,
    /// Sequences (eval: prompts) per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Encode special-token strings inside prompts and responses (`<|im_end|>`) as
    /// text, not as special tokens (transformers' option; off by default, as there).
    #[arg(long)]
    pub split_special_tokens: bool,
}

#[derive(Debug, Args)]
#[command(rename_all = "snake_case")]
pub struct GenerateArgs {
    /// HF model folder (config.json, model.safetensors, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// One prompt; the completion is printed on stdout.
    #[arg(long, conflicts_with = "prompts", required_unless_present = "prompts")]
    pub prompt: Option<String>,
    /// JSONL of {"prompt": ...} or {"messages": [...]}; writes JSONL with completion,
    /// token ids, logprobs and finish_reason.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Where to write the JSONL of --prompts (default: stdout).
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Treat --prompt as a user message and render it with the chat template.
    #[arg(long)]
    pub chat: bool,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 1.0, value_parser = finite_f32)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0, value_parser = finite_f32)]
    pub top_p: f32,
    /// 0 keeps all tokens.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0, value_parser = finite_f32)]
    pub repetition_penalty: f32,
    /// Stop when this string appears (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Prompts per generation batch with --prompts.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Encode special-token strings inside prompts and message content
    /// (`<|im_end|>`) as text, not as special tokens, so that a prompt cannot close
    /// its turn (transformers' option; off by default, as there).
    #[arg(long)]
    pub split_special_tokens: bool,
    /// Samples per prompt, drawn in the same batch; above 1 every output row gains
    /// `prompt_index` (0-based, the prompt's row) and `sample_index`.
    #[arg(long, default_value_t = 1)]
    pub num_return_sequences: usize,
}

impl GenerateArgs {
    /// The sampling settings (eos ids come from the model, once loaded).
    fn sampling(&self) -> SamplingParams {
        SamplingParams {
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
            eos_token_ids: vec![],
            stop_strings: self.stop.clone(),
        }
    }
}

impl Settings for GenerateArgs {
    fn validate(&self) -> crate::Result<()> {
        self.sampling().validate()?;
        at_least("num_return_sequences", self.num_return_sequences, 1)?;
        at_least("batch_size", self.batch_size, 1)
    }
}

impl Settings for RmDataArgs {
    fn validate(&self) -> crate::Result<()> {
        at_least("max_length", self.max_length, 1)?;
        at_least("batch_size", self.batch_size, 1)
    }
}

#[derive(Debug, Args)]
#[command(rename_all = "snake_case")]
pub struct TemplateArgs {
    /// HF model folder (its tokenizer files hold the chat template).
    #[arg(long)]
    pub model: PathBuf,
    /// JSON file: a list of {role, content} messages (or {"messages": [...]}).
    #[arg(long)]
    pub messages: PathBuf,
    #[arg(long)]
    pub add_generation_prompt: bool,
}

#[derive(Debug, Args)]
#[command(rename_all = "snake_case")]
pub struct InitArgs {
    #[arg(long, value_enum)]
    pub arch: Arch,
    /// gpt2: nano, tiny, gpt2, gpt2-medium; llama/qwen2: nano, tiny, smollm-135m, smollm-360m.
    #[arg(long)]
    pub preset: String,
    /// tokenizer.json, or a model folder whose tokenizer files (special tokens, chat
    /// template) are copied.
    #[arg(long)]
    pub tokenizer: PathBuf,
    #[arg(long)]
    pub output_dir: PathBuf,
    /// Replace a model or run already in output_dir (refused otherwise).
    #[arg(long)]
    pub overwrite_output_dir: bool,
    /// A Jinja chat template file, or `chatml`.
    #[arg(long)]
    pub chat_template: Option<String>,
    /// Embedding rows, when larger than the tokenizer (e.g. 50257 for GPT-2's shape).
    #[arg(long)]
    pub vocab_size: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Runs a parsed command line; `matches` tells which flags were given explicitly
/// (they override a `--config` file).
pub fn run(cli: Cli, matches: &ArgMatches) -> Result<()> {
    crate::device::set_default(cli.device, cli.bf16)?;
    // A data-parallel run (mpirun, or RANK/WORLD_SIZE): join it before anything runs.
    let comm = crate::distributed::init(&crate::device::default())?;
    if comm.world_size() > 1 {
        // A panic on any rank ends this process at once, without finalising MPI (which
        // would wait for ranks that wait in a collective): mpirun then ends the others.
        let report = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            report(info);
            std::process::exit(101);
        }));
    }
    let trains = matches!(
        cli.command,
        Command::Pretrain(_)
            | Command::Sft(_)
            | Command::Rm(RmCommand::Train(_))
            | Command::Dpo(_)
            | Command::Ppo(_)
            | Command::Grpo(_)
            | Command::Rloo(_)
    );
    if comm.world_size() > 1 && !trains {
        let name = matches.subcommand_name().unwrap_or("this command");
        bail!(
            "`rlhf {name}` runs in one process; data-parallel launches (mpirun, RANK/WORLD_SIZE) are for the training commands: pretrain, sft, rm train, dpo, ppo, grpo, rloo"
        );
    }
    let result = run_command(cli, matches);
    if let (Err(err), true) = (&result, comm.world_size() > 1) {
        // The other ranks may be waiting in a collective: end the whole run, not only
        // this rank, so that nothing hangs.
        crate::note!(
            "error on rank {} of {}: {err:#}",
            comm.rank(),
            comm.world_size()
        );
        comm.abort(2);
    }
    drop(comm);
    crate::distributed::finish();
    result
}

fn run_command(cli: Cli, matches: &ArgMatches) -> Result<()> {
    let sub = |name: &str| {
        matches
            .subcommand_matches(name)
            .expect("clap parsed this subcommand")
    };
    match cli.command {
        Command::Demo(a) => {
            if a.seeds.is_empty() {
                crate::demo::run(&a)?;
                crate::note!("report: {}", a.output_dir.join("report.html").display());
            } else {
                crate::demo::run_seeds(&a)?;
            }
            Ok(())
        }
        Command::Pipeline(a) => {
            let summary = crate::pipeline::run(&a)?;
            let mut out = Output::open(None)?;
            out.line(serde_json::to_string_pretty(&summary)?)?;
            out.finish()
        }
        Command::Generate(a) => {
            a.validate().map_err(as_flag)?;
            run_generate(a)
        }
        Command::Template(a) => run_template(a),
        Command::Label(c) => crate::label::run(c),
        Command::Init(a) => run_init(a),
        Command::Pretrain(a) => {
            let a = resolve(&a, sub("pretrain"), a.config.as_deref())?;
            let summary = crate::pretrain::run(&a)?;
            report("pretrain", a.train.output_dir()?, &summary);
            Ok(())
        }
        Command::Sft(a) => {
            let a = resolve(&a, sub("sft"), a.config.as_deref())?;
            let summary = crate::sft::run(&a)?;
            report("sft", a.train.output_dir()?, &summary);
            Ok(())
        }
        Command::Rm(RmCommand::Train(a)) => {
            let m = sub("rm")
                .subcommand_matches("train")
                .expect("clap parsed rm train");
            let a = resolve(&a, m, a.config.as_deref())?;
            let (summary, norm) = crate::rm::train_rm(&a)?;
            report("rm", a.train.output_dir()?, &summary);
            crate::note!(
                "reward normalisation: mean {:.4}, std {:.4}",
                norm.mean,
                norm.std
            );
            Ok(())
        }
        Command::Dpo(a) => {
            let a = resolve(&a, sub("dpo"), a.config.as_deref())?;
            let summary = crate::dpo::run(&a)?;
            report("dpo", a.train.output_dir()?, &summary);
            Ok(())
        }
        Command::Grpo(a) => {
            let a = resolve(&a, sub("grpo"), a.group.config.as_deref())?;
            let (summary, _) = crate::grpo::run(&a, None)?;
            report("grpo", a.group.train.output_dir()?, &summary);
            Ok(())
        }
        Command::Rloo(a) => {
            let a = resolve(&a, sub("rloo"), a.group.config.as_deref())?;
            let (summary, _) = crate::rloo::run(&a, None)?;
            report("rloo", a.group.train.output_dir()?, &summary);
            Ok(())
        }
        Command::Ppo(a) => {
            let a = resolve(&a, sub("ppo"), a.config.as_deref())?;
            let (summary, _) = crate::ppo::run(&a, None)?;
            let out = a.train.output_dir()?;
            report("ppo", out, &summary);
            crate::note!("last iteration: {}", crate::ppo::last_metrics(out)?);
            Ok(())
        }
        Command::Serve(a) => {
            a.validate().map_err(as_flag)?;
            crate::serve::run(&a)
        }
        Command::Chat(a) => {
            a.validate().map_err(as_flag)?;
            crate::serve::chat_cli::run(&a)
        }
        Command::Merge(a) => run_merge(a),
        Command::Rm(RmCommand::Eval(a)) => {
            a.validate().map_err(as_flag)?;
            let e = crate::rm::eval_rm(
                &a.model,
                &a.data,
                a.max_length,
                a.batch_size,
                a.split_special_tokens,
            )
            .with_context(|| format!("evaluating {}", a.model.display()))?;
            let mut out = Output::open(None)?;
            out.line(serde_json::to_string(&e)?)?;
            out.finish()
        }
        Command::Rm(RmCommand::Score(a)) => {
            a.validate().map_err(as_flag)?;
            let rows = crate::rm::score_rm(
                &a.model,
                &a.data,
                a.max_length,
                a.batch_size,
                a.split_special_tokens,
            )
            .with_context(|| format!("scoring with {}", a.model.display()))?;
            let mut out = Output::open(a.output.as_deref())?;
            for r in rows {
                out.line(r)?;
            }
            out.finish()
        }
    }
}

fn report(stage: &str, out: &Path, s: &TrainSummary) {
    let eval: Vec<String> = s
        .eval
        .iter()
        .map(|(k, v)| format!("eval {k} {v:.4}"))
        .collect();
    crate::note!(
        "{stage}: {} steps{} in {:.2} s, last loss {:.4}{}{}; model written to {}",
        s.state.global_step,
        s.resumed_from
            .map(|r| format!(" (resumed at {r})"))
            .unwrap_or_default(),
        s.seconds,
        s.last_loss,
        if eval.is_empty() {
            String::new()
        } else {
            format!(", {}", eval.join(", "))
        },
        if s.state.skipped_nonfinite_steps > 0 {
            format!(
                ", {} non-finite steps skipped",
                s.state.skipped_nonfinite_steps
            )
        } else {
            String::new()
        },
        out.display()
    );
}

fn load(dir: &Path) -> Result<Pretrained> {
    load_pretrained(dir, &crate::device::default())
        .with_context(|| format!("loading model from {}", dir.display()))
}

/// `rlhf generate`, with settings already validated.
fn run_generate(a: GenerateArgs) -> Result<()> {
    let params = a.sampling();
    // Read the prompts before loading the model, so bad input fails fast.
    // (source line, original object, prompt)
    let entries: Vec<(usize, Value, Prompt)> = match (&a.prompt, &a.prompts) {
        (Some(text), _) => {
            let p = if a.chat {
                Prompt::Messages(json!([{"role": "user", "content": text}]))
            } else {
                Prompt::Text(text.clone())
            };
            vec![(0, Value::Null, p)]
        }
        (None, Some(path)) => read_prompts(path)?,
        (None, None) => bail!("give --prompt TEXT or --prompts FILE.jsonl"),
    };
    let pre = load(&a.model)?;
    let params = SamplingParams {
        eos_token_ids: pre.eos_token_ids.clone(),
        ..params
    };
    let mut rng = ChaCha8Rng::seed_from_u64(a.seed);
    let context = pre.model.config.context_length();
    let mut ids: Vec<Vec<u32>> = Vec::with_capacity(entries.len());
    for (line, _, p) in &entries {
        // `line` is the prompt's line in the file (from its start, blank lines
        // counted), whatever batch it falls in.
        let at = match &a.prompts {
            Some(path) => format!("{}:{line}: ", path.display()),
            None => String::new(),
        };
        let t = p
            .tokenize(&pre.tokenizer, a.split_special_tokens)
            .with_context(|| match &a.prompts {
                Some(path) => format!("{}:{line}", path.display()),
                None => "--prompt".into(),
            })?;
        if t.is_empty() {
            bail!("{at}the prompt is empty (0 tokens)");
        }
        if t.len() + params.max_new_tokens > context {
            bail!(
                "{at}prompt has {} tokens and max_new_tokens is {}, but the model's context is {context} tokens",
                t.len(),
                params.max_new_tokens
            );
        }
        ids.push(t);
    }

    if a.prompt.is_some() && a.num_return_sequences == 1 {
        // As `rlhf serve` runs its forwards, so that both give the same tokens.
        let out = crate::ops::with_row_independent_products(|| {
            generate(&pre.model, &pre.tokenizer, &ids, &params, &mut rng)
        })?;
        let mut stdout = Output::open(None)?;
        stdout.line(&out[0].text)?;
        return stdout.finish();
    }
    let mut sink = Output::open(a.output.as_deref())?;
    let bar = crate::progress::bar(entries.len() as u64, "generating");
    let n = a.num_return_sequences;
    let chunks = entries.chunks(a.batch_size).zip(ids.chunks(a.batch_size));
    for (chunk, (chunk_entries, chunk_ids)) in chunks.enumerate() {
        let outs = crate::ops::with_row_independent_products(|| {
            generate_n(&pre.model, &pre.tokenizer, chunk_ids, n, &params, &mut rng)
        })?;
        for (i, ((_, orig, _), samples)) in chunk_entries.iter().zip(outs).enumerate() {
            for (s, c) in samples.into_iter().enumerate() {
                let mut row = match orig {
                    Value::Object(o) => o.clone(),
                    _ => Default::default(),
                };
                if n > 1 {
                    row.insert("prompt_index".into(), json!(chunk * a.batch_size + i));
                    row.insert("sample_index".into(), json!(s));
                }
                row.insert("completion".into(), c.text.into());
                row.insert("prompt_token_ids".into(), json!(c.prompt_tokens));
                row.insert("token_ids".into(), json!(c.tokens));
                row.insert("logprobs".into(), json!(c.logprobs));
                row.insert("finish_reason".into(), json!(c.finish_reason));
                sink.line(Value::Object(row))?;
            }
        }
        bar.inc(chunk_entries.len() as u64);
    }
    bar.finish_and_clear();
    sink.finish()
}

fn run_template(a: TemplateArgs) -> Result<()> {
    let messages: Value = read_json(&a.messages)?;
    let messages = match messages {
        Value::Object(mut o) if o.contains_key("messages") => {
            o.remove("messages").unwrap_or_default()
        }
        v => v,
    };
    let Some(list) = messages.as_array() else {
        bail!(
            "{}: expected a list of {{role, content}} messages or {{\"messages\": [...]}}",
            a.messages.display()
        );
    };
    for (i, m) in list.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str).unwrap_or_default();
        check_role(role, i).map_err(|e| Error::bad_file(&a.messages, None, e))?;
    }
    let tokenizer = Tokenizer::from_dir(&a.model)
        .with_context(|| format!("loading tokenizer from {}", a.model.display()))?;
    let text = tokenizer.apply_chat_template(&messages, a.add_generation_prompt)?;
    let mut out = Output::open(None)?;
    out.text(text)?;
    out.finish()
}

/// `rlhf merge`: the base with the adapter's (α/r)·B·A added to each weight, written as
/// a plain HF folder (a causal LM, or for a SEQ_CLS adapter a reward model with its
/// score head and reward statistics).
fn run_merge(a: MergeArgs) -> Result<()> {
    use crate::model::lora::AdapterFile;
    use crate::model::scalar::{apply_adapter, load_scalar, save_scalar};
    check_not_input(
        &a.output_dir,
        &[
            ("--model", a.model.as_deref()),
            ("--adapter", Some(&a.adapter)),
        ],
    )?;
    check_model_dir(&a.output_dir, a.overwrite_output_dir)?;
    crate::model::hf::ensure_model_dir(&a.adapter)?;
    let adapter = AdapterFile::read(&a.adapter)
        .with_context(|| format!("reading the adapter {}", a.adapter.display()))?;
    let base = adapter.base(a.model.as_deref())?;
    let tok_dir = if a.adapter.join("tokenizer.json").is_file() {
        a.adapter.clone()
    } else {
        crate::model::hf::tokenizer_dir(&base)?
    };
    let dev = crate::device::default();
    if adapter.is_seq_cls() {
        let mut p = load_scalar(&base, &dev, 0)
            .with_context(|| format!("loading the base model {}", base.display()))?;
        apply_adapter(&mut p, &adapter)?;
        (p.tokenizer, p.eos_token_ids) =
            crate::model::hf::read_tokenizer_for(&tok_dir, &p.model.config)?;
        claim_for_model(&a.output_dir, a.overwrite_output_dir)?;
        save_scalar(&p, &a.output_dir)?;
    } else {
        let mut p = load_pretrained(&base, &dev)
            .with_context(|| format!("loading the base model {}", base.display()))?;
        adapter.merge_into(&p.model.params, &p.model.config)?;
        (p.tokenizer, p.eos_token_ids) =
            crate::model::hf::read_tokenizer_for(&tok_dir, &p.model.config)?;
        claim_for_model(&a.output_dir, a.overwrite_output_dir)?;
        save_pretrained(&p, &a.output_dir)?;
    }
    crate::note!(
        "merged {} into {}: wrote {}",
        a.adapter.display(),
        base.display(),
        a.output_dir.display()
    );
    Ok(())
}

fn run_init(a: InitArgs) -> Result<()> {
    let arch = a.arch;
    check_not_input(&a.output_dir, &[("--tokenizer", Some(&a.tokenizer))])?;
    check_model_dir(&a.output_dir, a.overwrite_output_dir)?;
    let mut tokenizer = Tokenizer::from_path(&a.tokenizer)?;
    if let Some(t) = &a.chat_template {
        let src = if t == "chatml" {
            CHATML_TEMPLATE.to_string()
        } else {
            crate::error::read_to_string(Path::new(t))?
        };
        tokenizer.set_chat_template(Some(ChatTemplate::new(&src)?));
    }
    let eos = tokenizer.eos_token_id();
    let model = presets::init_for_tokenizer(arch, &a.preset, &tokenizer, a.vocab_size, a.seed)?;
    let n = model.params.num_parameters();
    let pre = Pretrained {
        model,
        tokenizer,
        eos_token_ids: eos.into_iter().collect(),
    };
    claim_for_model(&a.output_dir, a.overwrite_output_dir)?;
    save_pretrained(&pre, &a.output_dir)
        .with_context(|| format!("writing {}", a.output_dir.display()))?;
    crate::note!(
        "wrote {} ({} {}, {:.2}M parameters)",
        a.output_dir.display(),
        arch.model_type(),
        a.preset,
        n as f64 / 1e6
    );
    Ok(())
}

/// Where a command's results go: a buffered file, or stdout when no path is given. A
/// failed write is an error naming the file (or `<stdout>`); a closed pipe on stdout
/// is one too, which `main` turns into a quiet exit (see [`is_broken_pipe`]).
///
/// A file is written whole or not at all ([`AtomicFile`]): rows go to a temporary
/// file beside it, renamed over the path by [`Output::finish`]; a run that fails
/// midway leaves an existing file untouched.
struct Output {
    name: PathBuf,
    sink: Sink,
}

enum Sink {
    File(AtomicFile),
    Stdout(std::io::StdoutLock<'static>),
}

impl Sink {
    fn writer(&mut self) -> &mut dyn Write {
        match self {
            Sink::File(f) => f,
            Sink::Stdout(s) => s,
        }
    }
}

impl Output {
    fn open(path: Option<&Path>) -> Result<Self> {
        Ok(match path {
            Some(p) => Output {
                name: p.to_path_buf(),
                sink: Sink::File(AtomicFile::create(p)?),
            },
            None => Output {
                name: PathBuf::from("<stdout>"),
                sink: Sink::Stdout(std::io::stdout().lock()),
            },
        })
    }

    fn text(&mut self, text: impl Display) -> Result<()> {
        write!(self.sink.writer(), "{text}").map_err(|e| Error::write(&self.name, e))?;
        Ok(())
    }

    fn line(&mut self, text: impl Display) -> Result<()> {
        writeln!(self.sink.writer(), "{text}").map_err(|e| Error::write(&self.name, e))?;
        Ok(())
    }

    /// Flushes (and puts a file in place); a write that fails only here (a full
    /// disk) is still reported.
    fn finish(self) -> Result<()> {
        match self.sink {
            Sink::File(f) => f.commit()?,
            Sink::Stdout(mut s) => s.flush().map_err(|e| Error::write(&self.name, e))?,
        }
        Ok(())
    }
}
