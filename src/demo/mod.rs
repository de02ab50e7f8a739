//! `rlhf demo`: the whole InstructGPT pipeline on the built-in 3H task, with nothing
//! downloaded: make the data → pretrain the tokenizer and GPT → SFT → sample K
//! responses per RM prompt from the SFT model → the gold judge ranks them → reward
//! model → PPO-ptx, and beside it the methods users compare it with, each from the
//! same SFT model: DPO on the same rankings, GRPO and RLOO against the same reward
//! model (`--methods`) → evaluate every policy on the same held-out prompts.
//!
//! Every stage writes its HF folder and metrics under the output folder and resumes:
//! a finished stage is skipped, an interrupted one continues from its checkpoint.

pub mod environment;
pub mod eval;
pub mod format;
pub mod judge;
pub mod plot;
pub mod report;
pub mod summary;
pub mod world;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::error::{Error, Result};
use crate::generate::{generate, SamplingParams};
use crate::io::write_atomic;
use crate::model::hf::load_pretrained;
use crate::pipeline::stage;
use environment::{Environment, Task};
use eval::chat;
use format::FormatWorld;
use report::{Report, StageMemory, Thresholds};
use world::World;

#[derive(Debug, Clone, clap::Args)]
#[command(rename_all = "snake_case")]
pub struct DemoArgs {
    #[arg(long, default_value = "runs/demo")]
    pub output_dir: PathBuf,
    /// A smaller run: half the documents, fewer steps, prompts and responses (about half
    /// to 60 % of the full run's time)
    #[arg(long)]
    pub quick: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Run several seeds, each into OUTPUT_DIR/seed-S (finished stages are reused),
    /// and write OUTPUT_DIR/summary.html and summary.json: every method's figures as
    /// the seeds' mean and range. Replaces `--seed`.
    #[arg(long, value_delimiter = ',', num_args = 1.., conflicts_with = "seed")]
    pub seeds: Vec<u64>,
    /// Model size (gpt2 presets); `nano` makes a test-sized run.
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    /// Which built-in task: `3h` (helpful arithmetic, honest answers about a world of
    /// facts, harmless refusals) or `format` (list N items, capitals, one-word
    /// answers, polite greetings), the second task that checks the recipe carries over.
    #[arg(long, value_enum, default_value_t = DemoTask::ThreeH)]
    pub task: DemoTask,
    /// The methods trained from the SFT model and compared (SFT is always evaluated).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "ppo,dpo,grpo,rloo"
    )]
    pub methods: Vec<Method>,
    /// Train the reward model and every method as LoRA adapters on the SFT model
    /// (r 16, α 32, all-linear; PPO, GRPO and RLOO with --share_base, so the reward
    /// model and PPO's critic sit on the policy's base) at 10× each stage's learning
    /// rate, as TRL advises for LoRA. Pretraining and SFT stay full fine-tuning.
    #[arg(long)]
    pub use_peft: bool,
}

/// The methods the demo compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Method {
    Ppo,
    Dpo,
    Grpo,
    Rloo,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::Ppo => "ppo",
            Method::Dpo => "dpo",
            Method::Grpo => "grpo",
            Method::Rloo => "rloo",
        }
    }
}

/// Runs a training stage, recording its wall time and peak resident memory: the
/// process's high-water mark from the stage's start, after the memory earlier stages
/// freed was handed back to the kernel as far as the allocator lets go of it. What it
/// still held at the start is recorded beside the peak: the stage's own footprint is
/// between `peak − start` and `peak`.
fn measured(
    dir: &Path,
    name: &str,
    elapsed: &mut BTreeMap<String, f64>,
    peak: &mut BTreeMap<String, StageMemory>,
    run: impl FnOnce() -> Result<()>,
) -> Result<()> {
    crate::release_freed_memory();
    let reset = crate::memory::reset_peak();
    let start = crate::memory::peak_mib();
    let ran = std::cell::Cell::new(false);
    let s = stage(dir, name, || {
        ran.set(true);
        run()
    })?;
    elapsed.insert(name.to_string(), s);
    let file = dir.join(".stage-peak-mib");
    if let (true, true, Some(start), Some(mib)) =
        (reset, ran.get(), start, crate::memory::peak_mib())
    {
        let m = StageMemory {
            peak_mib: mib,
            start_mib: start,
        };
        write_atomic(
            &file,
            format!("{} {}\n", m.peak_mib, m.start_mib).as_bytes(),
        )?;
        peak.insert(name.to_string(), m);
    } else if let Ok(text) = std::fs::read_to_string(&file) {
        let v: Vec<f64> = text
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        if let [peak_mib, start_mib] = v[..] {
            peak.insert(
                name.to_string(),
                StageMemory {
                    peak_mib,
                    start_mib,
                },
            );
        }
    }
    Ok(())
}

/// The built-in tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DemoTask {
    #[value(name = "3h")]
    ThreeH,
    Format,
}

impl DemoTask {
    /// The name `--task` takes.
    fn name(self) -> &'static str {
        match self {
            DemoTask::ThreeH => "3h",
            DemoTask::Format => "format",
        }
    }

    fn world(self, seed: u64) -> Box<dyn Environment> {
        match self {
            DemoTask::ThreeH => Box::new(World::new(seed)),
            DemoTask::Format => Box::new(FormatWorld::new(seed)),
        }
    }
}

/// Sizes of one demo run.
#[derive(Debug, Clone)]
struct Plan {
    corpus_docs: usize,
    pretrain_steps: usize,
    sft_prompts: usize,
    sft_steps: usize,
    rm_prompts: usize,
    k: usize,
    rm_epochs: f64,
    ppo_prompts: usize,
    ppo_iterations: usize,
}

impl Plan {
    /// The sizes as the report lists them.
    fn describe(&self, preset: &str, use_peft: bool) -> BTreeMap<String, String> {
        let training = if use_peft {
            "LoRA (r 16, α 32, all-linear) for the reward model and every method, 10× learning rates, --share_base"
        } else {
            "full fine-tuning"
        };
        [
            ("model preset", preset.to_string()),
            ("reward model and methods", training.to_string()),
            ("corpus documents", self.corpus_docs.to_string()),
            (
                "pretraining steps (batch 16 × 64 tokens)",
                self.pretrain_steps.to_string(),
            ),
            ("SFT prompts", self.sft_prompts.to_string()),
            ("SFT steps (batch 16)", self.sft_steps.to_string()),
            ("reward-model prompts", self.rm_prompts.to_string()),
            ("K responses ranked per prompt", self.k.to_string()),
            ("reward-model epochs", self.rm_epochs.to_string()),
            ("RL prompts", self.ppo_prompts.to_string()),
            (
                "RL iterations (32 responses each)",
                self.ppo_iterations.to_string(),
            ),
            ("max new tokens", MAX_NEW_TOKENS.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    fn new(quick: bool) -> Self {
        if quick {
            Plan {
                corpus_docs: 1000,
                pretrain_steps: 300,
                sft_prompts: 400,
                sft_steps: 200,
                rm_prompts: 280,
                k: 4,
                rm_epochs: 3.0,
                ppo_prompts: 96,
                ppo_iterations: 6,
            }
        } else {
            Plan {
                corpus_docs: 2000,
                pretrain_steps: 400,
                sft_prompts: 800,
                sft_steps: 300,
                rm_prompts: 600,
                k: 6,
                rm_epochs: 3.0,
                ppo_prompts: 320,
                ppo_iterations: 12,
            }
        }
    }
}

/// Parses a stage's settings from flags, as a user would give them.
fn settings<T: clap::Args>(flags: &[String]) -> Result<T> {
    crate::train::args::parse_args(flags).map_err(|e| Error::Invalid(format!("demo settings: {e}")))
}

fn flags(pairs: &[(&str, String)]) -> Vec<String> {
    pairs
        .iter()
        .flat_map(|(k, v)| [format!("--{k}"), v.clone()])
        .collect()
}

fn write_jsonl(path: &Path, rows: &[Value]) -> Result<()> {
    let text: String = rows.iter().map(|r| r.to_string() + "\n").collect();
    write_atomic(path, text.as_bytes())
}

/// Length of every response the demo samples or evaluates.
const MAX_NEW_TOKENS: usize = 24;

/// The demo's data, made before any training from the seed. Every training stage's
/// prompts come from the world's training split; the evaluation asks only the
/// held-out prompts, and the held-out documents are never in the corpus.
pub struct DemoData {
    pub corpus: Vec<String>,
    pub held_out_docs: Vec<String>,
    pub sft_tasks: Vec<Task>,
    pub rm_tasks: Vec<Task>,
    pub ppo_tasks: Vec<Task>,
    pub eval_tasks: Vec<Task>,
}

impl DemoData {
    fn new(world: &dyn Environment, plan: &Plan, seed: u64) -> Self {
        DemoData {
            corpus: world.corpus(plan.corpus_docs, seed.wrapping_add(1)),
            held_out_docs: world.held_out_documents(),
            sft_tasks: world.tasks(plan.sft_prompts, seed.wrapping_add(3)),
            rm_tasks: world.tasks(plan.rm_prompts, seed.wrapping_add(4)),
            ppo_tasks: world.tasks(plan.ppo_prompts, seed.wrapping_add(5)),
            eval_tasks: world.eval_tasks(),
        }
    }
}

/// Runs every seed of `--seeds` (each as `run` would, into its own folder) and
/// writes the summary over them.
pub fn run_seeds(args: &DemoArgs) -> Result<summary::Summary> {
    let mut seeds = args.seeds.clone();
    let mut seen = std::collections::BTreeSet::new();
    seeds.retain(|s| seen.insert(*s));
    let mut reports = vec![];
    let mut runs = vec![];
    for &seed in &seeds {
        let run_dir = PathBuf::from(format!("seed-{seed}"));
        crate::note!(
            "\n=== seed {seed} → {} ===",
            args.output_dir.join(&run_dir).display()
        );
        let one = DemoArgs {
            output_dir: args.output_dir.join(&run_dir),
            seed,
            seeds: vec![],
            ..args.clone()
        };
        reports.push(run(&one)?);
        runs.push(run_dir);
    }
    let s = summary::Summary::new(&reports, runs)?;
    s.write(&args.output_dir, &reports)?;
    s.print();
    crate::note!(
        "summary: {}",
        args.output_dir.join("summary.html").display()
    );
    Ok(s)
}

/// Finished stages are reused, so a folder must not mix runs: the settings that
/// shape the stages (task, seed, size, full or LoRA) are kept in
/// OUTPUT_DIR/demo-settings.json, and a run with other settings is refused.
fn same_settings_as_before(out: &Path, args: &DemoArgs, plan: &Plan) -> Result<()> {
    let mut now = plan.describe(&args.preset, args.use_peft);
    now.insert("task".into(), args.task.name().into());
    now.insert("seed".into(), args.seed.to_string());
    let path = out.join("demo-settings.json");
    if let Ok(text) = std::fs::read_to_string(&path) {
        let before: BTreeMap<String, String> = serde_json::from_str(&text)
            .map_err(|e| Error::bad_file(&path, None, format!("not a settings table: {e}")))?;
        if let Some((k, v)) = now.iter().find(|(k, v)| before.get(*k) != Some(*v)) {
            return Err(Error::Invalid(format!(
                "{} holds a demo run with other settings ({k}: {:?} there, {v:?} now); its finished stages would be reused, so give another --output_dir",
                out.display(),
                before.get(k).map(String::as_str).unwrap_or("unset")
            )));
        }
        return Ok(());
    }
    write_atomic(
        &path,
        serde_json::to_string_pretty(&now)
            .expect("a string table serializes")
            .as_bytes(),
    )
}

/// Runs the whole pipeline; returns the report.
pub fn run(args: &DemoArgs) -> Result<Report> {
    let plan = Plan::new(args.quick);
    let out = args.output_dir.clone();
    let seed = args.seed;
    let data = out.join("data");
    std::fs::create_dir_all(&data).map_err(|e| Error::write(&data, e))?;
    same_settings_as_before(&out, args, &plan)?;
    let world = args.task.world(seed);
    let mut elapsed = BTreeMap::new();

    // Data: the corpus, the prompts of every stage (from the training split), the
    // demonstrations; the eval prompts and held-out documents stay out of all of them.
    let t = Instant::now();
    let d = DemoData::new(world.as_ref(), &plan, seed);
    write_atomic(&data.join("corpus.txt"), d.corpus.join("\n\n").as_bytes())?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_add(7));
    let sft_rows: Vec<Value> = d
        .sft_tasks
        .iter()
        .map(|t| json!({"messages": [{"role": "user", "content": t.prompt}, {"role": "assistant", "content": world.demonstration(t, world.flaw_rate(), &mut rng)}]}))
        .collect();
    write_jsonl(&data.join("sft.jsonl"), &sft_rows)?;
    let ppo_rows: Vec<Value> = d
        .ppo_tasks
        .iter()
        .map(|t| json!({"prompt": chat(&t.prompt)}))
        .collect();
    write_jsonl(&data.join("prompts.jsonl"), &ppo_rows)?;
    let eval_rows: Vec<Value> = d
        .eval_tasks
        .iter()
        .map(|t| json!({"prompt": chat(&t.prompt), "family": t.family.name()}))
        .collect();
    write_jsonl(&data.join("eval_prompts.jsonl"), &eval_rows)?;
    write_atomic(
        &data.join("held_out.txt"),
        d.held_out_docs.join("\n\n").as_bytes(),
    )?;
    elapsed.insert("data".to_string(), t.elapsed().as_secs_f64());

    // Pretraining: tokenizer and GPT from scratch.
    let pt_dir = out.join("pretrain");
    let s = stage(&pt_dir, "pretrain", || {
        let a: crate::pretrain::PretrainArgs = settings(&flags(&[
            ("dataset", data.join("corpus.txt").display().to_string()),
            ("output_dir", pt_dir.display().to_string()),
            ("arch", "gpt2".into()),
            ("preset", args.preset.clone()),
            ("vocab_size", "1024".into()),
            ("block_size", "64".into()),
            ("max_steps", plan.pretrain_steps.to_string()),
            ("per_device_train_batch_size", "16".into()),
            ("learning_rate", "1e-3".into()),
            ("lr_scheduler_type", "cosine".into()),
            ("warmup_steps", "20".into()),
            ("save_steps", "100".into()),
            ("logging_steps", "10".into()),
            ("seed", seed.to_string()),
        ]))?;
        crate::pretrain::run(&a).map(|_| ())
    })?;
    elapsed.insert("pretrain".into(), s);

    // SFT on imperfect demonstrations.
    let sft_dir = out.join("sft");
    let s = stage(&sft_dir, "sft", || {
        let a: crate::sft::SftArgs = settings(&flags(&[
            ("model_name_or_path", pt_dir.display().to_string()),
            ("dataset", data.join("sft.jsonl").display().to_string()),
            ("output_dir", sft_dir.display().to_string()),
            ("max_steps", plan.sft_steps.to_string()),
            ("per_device_train_batch_size", "16".into()),
            ("learning_rate", "3e-4".into()),
            ("lr_scheduler_type", "cosine".into()),
            ("warmup_steps", "20".into()),
            ("max_length", "128".into()),
            ("on_overflow", "skip".into()),
            ("save_steps", "100".into()),
            ("logging_steps", "10".into()),
            ("seed", seed.to_string()),
        ]))?;
        crate::sft::run(&a).map(|_| ())
    })?;
    elapsed.insert("sft".into(), s);

    // Comparison data: K samples per prompt from the SFT model, ranked by the judge.
    let rank_path = data.join("rankings.jsonl");
    let s = stage(&out.join("rankings"), "rankings", || {
        let sft = load_pretrained(&sft_dir, &crate::device::default())?;
        let params = SamplingParams {
            max_new_tokens: MAX_NEW_TOKENS,
            temperature: 1.0,
            eos_token_ids: sft.eos_token_ids.clone(),
            ..Default::default()
        };
        let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_add(8));
        let mut rows = vec![];
        for chunk in d.rm_tasks.chunks(8) {
            let mut ids = vec![];
            for t in chunk {
                let p = eval::chat_ids(&sft, &t.prompt)?;
                ids.extend(std::iter::repeat_n(p, plan.k));
            }
            let samples = generate(&sft.model, &sft.tokenizer, &ids, &params, &mut rng)?;
            for (t, group) in chunk.iter().zip(samples.chunks(plan.k)) {
                let responses: Vec<String> =
                    group.iter().map(|c| c.text.trim().to_string()).collect();
                let ranking = judge::rank(t, &responses, 0.15, &mut rng);
                if ranking.iter().all(|&r| r == ranking[0]) {
                    continue; // all tied: nothing to learn
                }
                rows.push(
                    json!({"prompt": chat(&t.prompt), "responses": responses, "ranking": ranking}),
                );
            }
        }
        write_jsonl(&rank_path, &rows)
    })?;
    elapsed.insert("rankings".into(), s);

    // With --use_peft every stage from here trains an adapter at 10× the rate (the
    // product in f64, as the recorded LoRA runs used it; full runs keep the literal).
    let lr = |full: f64| (if args.use_peft { full * 10.0 } else { full }).to_string();
    let peft = |share_base: bool| -> Vec<String> {
        let mut f = vec![];
        if args.use_peft {
            f.extend(["--use_peft", "--lora_target_modules", "all-linear"].map(String::from));
            if share_base {
                f.push("--share_base".into());
            }
        }
        f
    };

    // Reward model from the SFT model.
    let mut peak = BTreeMap::new();
    let rm_dir = out.join("rm");
    measured(&rm_dir, "rm", &mut elapsed, &mut peak, || {
        let mut f = flags(&[
            ("model_name_or_path", sft_dir.display().to_string()),
            ("dataset", rank_path.display().to_string()),
            ("output_dir", rm_dir.display().to_string()),
            ("eval_split", "0.2".into()),
            ("prompts_per_batch", "8".into()),
            ("num_train_epochs", plan.rm_epochs.to_string()),
            ("learning_rate", lr(5e-4)),
            ("max_length", "128".into()),
            ("save_steps", "50".into()),
            ("logging_steps", "5".into()),
            ("seed", seed.to_string()),
        ]);
        f.extend(peft(false));
        let a: crate::rm::RmTrainArgs = settings(&f)?;
        crate::rm::train_rm(&a).map(|_| ())
    })?;

    let mut methods = args.methods.clone();
    methods.sort();
    methods.dedup();
    let prompts_path = data.join("prompts.jsonl").display().to_string();
    for &method in &methods {
        let dir = out.join(method.name());
        let common = |extra: &[(&str, String)]| -> Vec<String> {
            let mut pairs = vec![
                ("model_name_or_path", sft_dir.display().to_string()),
                ("output_dir", dir.display().to_string()),
                ("seed", seed.to_string()),
            ];
            pairs.extend(extra.iter().cloned());
            let mut f = flags(&pairs);
            // DPO has no reward model to share a base with.
            f.extend(peft(method != Method::Dpo));
            f
        };
        // The online methods sample as many responses per iteration as PPO (32), take
        // as many updates per iteration (4 passes × 4 minibatches of 8 = 16) and run
        // as many iterations against the same reward model. Their KL terms differ by
        // method: PPO's β·k1 per token in the reward, GRPO's β·k3 in the loss, RLOO's
        // β·Σ k1 folded into the sequence's reward.
        let online = [
            ("reward_model", rm_dir.display().to_string()),
            ("dataset", prompts_path.clone()),
            ("num_generations", "4".to_string()),
            ("rollout_batch_size", "8".to_string()),
            ("mini_batch_size", "8".to_string()),
            ("num_iterations", "4".to_string()),
            ("max_iterations", plan.ppo_iterations.to_string()),
            ("max_completion_length", MAX_NEW_TOKENS.to_string()),
            ("learning_rate", lr(3e-5)),
            ("lr_scheduler_type", "constant".to_string()),
            ("save_steps", "16".to_string()),
            ("logging_steps", "8".to_string()),
        ];
        measured(
            &dir,
            method.name(),
            &mut elapsed,
            &mut peak,
            || match method {
                Method::Ppo => {
                    let mut f = common(&[
                        ("reward_model", rm_dir.display().to_string()),
                        ("dataset", prompts_path.clone()),
                        ("ptx_data", data.join("corpus.txt").display().to_string()),
                        ("ptx_coef", "0.2".into()),
                        ("rollout_batch_size", "32".into()),
                        ("mini_batch_size", "8".into()),
                        ("ppo_epochs", "4".into()),
                        ("num_iterations", plan.ppo_iterations.to_string()),
                        ("max_new_tokens", MAX_NEW_TOKENS.to_string()),
                        ("learning_rate", lr(3e-5)),
                        ("kl_coef", "0.3".into()),
                        ("ema", "0.9".into()),
                        ("save_steps", "16".into()),
                        ("logging_steps", "8".into()),
                    ]);
                    f.extend(["--missing_eos_penalty".to_string(), "1.0".to_string()]);
                    let a: crate::ppo::PpoArgs = settings(&f)?;
                    crate::ppo::run(&a, None).map(|_| ())
                }
                Method::Dpo => {
                    let a: crate::dpo::DpoArgs = settings(&common(&[
                        ("dataset", rank_path.display().to_string()),
                        ("beta", "0.1".into()),
                        ("eval_split", "0.1".into()),
                        ("prompts_per_batch", "8".into()),
                        ("num_train_epochs", "2".into()),
                        ("learning_rate", lr(5e-5)),
                        ("max_length", "128".into()),
                        ("save_steps", "50".into()),
                        ("logging_steps", "5".into()),
                    ]))?;
                    crate::dpo::run(&a).map(|_| ())
                }
                Method::Grpo => {
                    let mut pairs = online.to_vec();
                    pairs.push(("beta", "0.04".into()));
                    let a: crate::grpo::GrpoArgs = settings(&common(&pairs))?;
                    crate::grpo::run(&a, None).map(|_| ())
                }
                Method::Rloo => {
                    let mut pairs = online.to_vec();
                    pairs.push(("beta", "0.1".into()));
                    let a: crate::rloo::RlooArgs = settings(&common(&pairs))?;
                    crate::rloo::run(&a, None).map(|_| ())
                }
            },
        )?;
    }

    // Evaluation on the held-out prompts and documents, every policy the same way.
    let t = Instant::now();
    let sft = load_pretrained(&sft_dir, &crate::device::default())?;
    let (tasks, docs) = (&d.eval_tasks, &d.held_out_docs);
    let eval_seed = seed.wrapping_add(9);
    let (e_sft, t_sft, s_sft) =
        eval::evaluate_policy(&sft, None, tasks, docs, MAX_NEW_TOKENS, eval_seed)?;
    let mut folders: Vec<(String, PathBuf)> = vec![];
    for &m in &methods {
        folders.push((m.name().to_string(), out.join(m.name())));
        if m == Method::Ppo {
            folders.push(("ppo-ema".into(), out.join("ppo").join("ema")));
        }
    }
    let mut policies = BTreeMap::new();
    let mut answers: Vec<BTreeMap<String, eval::Answer>> = t_sft
        .into_iter()
        .zip(&s_sft)
        .map(|(text, &score)| BTreeMap::from([("sft".to_string(), eval::Answer { text, score })]))
        .collect();
    for (name, dir) in &folders {
        let policy = load_pretrained(dir, &crate::device::default())?;
        let (e, texts, scores) = eval::evaluate_policy(
            &policy,
            Some((&sft, s_sft.as_slice())),
            tasks,
            docs,
            MAX_NEW_TOKENS,
            eval_seed,
        )?;
        for ((a, text), score) in answers.iter_mut().zip(texts).zip(scores) {
            a.insert(name.clone(), eval::Answer { text, score });
        }
        policies.insert(name.clone(), e);
    }
    let rm_accuracy = report::curve(&rm_dir, "eval/accuracy")
        .last()
        .map_or(f64::NAN, |p| p.1);
    let ppo_dir = out.join("ppo");
    let ppo_kl_train = report::curve(&ppo_dir, "objective/kl").last().map(|p| p.1);
    elapsed.insert("eval".into(), t.elapsed().as_secs_f64());
    let total: f64 = elapsed.values().sum();
    elapsed.insert("total".into(), total);

    let prompts: Vec<eval::PromptResult> = tasks
        .iter()
        .zip(answers)
        .map(|(t, answers)| eval::PromptResult {
            family: t.family,
            prompt: t.prompt.clone(),
            answers,
        })
        .collect();
    let thresholds = policies
        .get("ppo")
        .map(|ppo| Thresholds::check(&e_sft, ppo, rm_accuracy));
    policies.insert("sft".into(), e_sft);
    let report = Report {
        seed,
        task: args.task.name().to_string(),
        quick: args.quick,
        cpu: crate::cpu::describe(),
        methods: methods.iter().map(|m| m.name().to_string()).collect(),
        policies,
        rm_val_accuracy: rm_accuracy,
        ppo_kl_last_training_iteration: ppo_kl_train,
        eval_prompts: tasks.len(),
        family_counts: eval::family_counts(world.families(), tasks),
        held_out_documents: docs.len(),
        thresholds,
        elapsed_s: elapsed,
        peak_rss_mib: peak,
        prompts,
        settings: plan.describe(&args.preset, args.use_peft),
    };
    report.write(&out)?;
    report::write_html(&out, &report)?;
    report.print_table();
    Ok(report)
}
