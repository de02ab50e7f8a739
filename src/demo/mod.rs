//! `rlhf demo`: the whole InstructGPT pipeline on the built-in 3H task, with nothing
//! downloaded: make the data → pretrain the tokenizer and GPT → SFT → sample K
//! responses per RM prompt from the SFT model → the gold judge ranks them → reward
//! model → PPO-ptx → evaluate SFT, PPO and the EMA policy on held-out prompts.
//!
//! Every stage writes its HF folder and metrics under the output folder and resumes:
//! a finished stage is skipped, an interrupted one continues from its checkpoint.

pub mod judge;
pub mod report;
pub mod world;

use candle_core::Device;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::error::{Error, Result};
use crate::generate::{generate, SamplingParams};
use crate::model::hf::{load_pretrained, write_atomic, write_json, Pretrained};
use crate::pipeline::stage;
use crate::train::lm_task::{lm_loss_sum, text_rows, Row};
use world::{Family, Task, World};

#[derive(Debug, Clone, clap::Args)]
#[command(rename_all = "snake_case")]
pub struct DemoArgs {
    #[arg(long, default_value = "runs/demo")]
    pub output_dir: PathBuf,
    /// A smaller run (about a third of the work).
    #[arg(long)]
    pub quick: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Model size (gpt2 presets); `nano` makes a test-sized run.
    #[arg(long, default_value = "tiny")]
    pub preset: String,
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
    eval_prompts: usize,
}

impl Plan {
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
                eval_prompts: 48,
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
                eval_prompts: 120,
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

fn chat(prompt: &str) -> Value {
    json!([{"role": "user", "content": prompt}])
}

/// Greedy responses of a policy to chat prompts.
fn respond(pre: &Pretrained, tasks: &[Task], max_new_tokens: usize) -> Result<Vec<String>> {
    let params = SamplingParams {
        max_new_tokens,
        temperature: 0.0,
        eos_token_ids: pre.eos_token_ids.clone(),
        ..Default::default()
    };
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut out = vec![];
    for chunk in tasks.chunks(16) {
        let ids: Vec<Vec<u32>> = chunk
            .iter()
            .map(|t| {
                let text = pre.tokenizer.apply_chat_template(&chat(&t.prompt), true)?;
                pre.tokenizer.encode(&text, false)
            })
            .collect::<Result<_>>()?;
        out.extend(
            generate(&pre.model, &pre.tokenizer, &ids, &params, &mut rng)?
                .into_iter()
                .map(|c| c.text.trim().to_string()),
        );
    }
    Ok(out)
}

/// Mean next-token loss of a policy on held-out pretraining text.
fn ptx_loss(pre: &Pretrained, docs: &[String]) -> Result<f64> {
    let rows = text_rows(docs, &pre.tokenizer, pre.eos()?, 64)?;
    let (mut total, mut count) = (0.0, 0usize);
    for chunk in rows.chunks(16) {
        let refs: Vec<&Row> = chunk.iter().collect();
        let (sum, n, _) = lm_loss_sum(&pre.model, pre.tokenizer.pad_token_id(), &refs)?;
        total += sum.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        count += n;
    }
    Ok(total / count.max(1) as f64)
}

/// Gold-judge summary of responses: mean score overall and per family.
fn judge_all(tasks: &[Task], responses: &[String]) -> (f64, BTreeMap<String, f64>) {
    let mut per: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    let mut total = 0.0;
    for (t, r) in tasks.iter().zip(responses) {
        let s = judge::gold_score(t, r);
        total += s;
        let e = per.entry(t.family.name().to_string()).or_default();
        e.0 += s;
        e.1 += 1;
    }
    let fam = per
        .into_iter()
        .map(|(k, (s, n))| (k, s / n as f64))
        .collect();
    (total / tasks.len().max(1) as f64, fam)
}

/// Runs the whole pipeline; returns the report.
pub fn run(args: &DemoArgs) -> Result<Value> {
    let plan = Plan::new(args.quick);
    let out = args.output_dir.clone();
    let seed = args.seed;
    let data = out.join("data");
    std::fs::create_dir_all(&data).map_err(|e| Error::write(&data, e))?;
    let world = World::new(seed);
    let mut elapsed = BTreeMap::new();

    // Data: the corpus (with held-out documents for the ptx loss), the prompts of
    // every stage (disjoint seeds), and the demonstrations.
    let t = Instant::now();
    let corpus = world.corpus(plan.corpus_docs, seed + 1);
    let held_out_docs = world.corpus(120, seed + 2);
    write_atomic(&data.join("corpus.txt"), corpus.join("\n\n").as_bytes())?;
    let sft_tasks = world.tasks(plan.sft_prompts, seed + 3);
    let rm_tasks = world.tasks(plan.rm_prompts, seed + 4);
    let ppo_tasks = world.tasks(plan.ppo_prompts, seed + 5);
    let eval_tasks = world.tasks(plan.eval_prompts, seed + 6);
    let mut rng = ChaCha8Rng::seed_from_u64(seed + 7);
    let sft_rows: Vec<Value> = sft_tasks
        .iter()
        .map(|t| json!({"messages": [{"role": "user", "content": t.prompt}, {"role": "assistant", "content": world.demonstration(t, 0.55, &mut rng)}]}))
        .collect();
    write_jsonl(&data.join("sft.jsonl"), &sft_rows)?;
    let ppo_rows: Vec<Value> = ppo_tasks
        .iter()
        .map(|t| json!({"prompt": chat(&t.prompt)}))
        .collect();
    write_jsonl(&data.join("prompts.jsonl"), &ppo_rows)?;
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
        let sft = load_pretrained(&sft_dir, &Device::Cpu)?;
        let params = SamplingParams {
            max_new_tokens: 24,
            temperature: 1.0,
            eos_token_ids: sft.eos_token_ids.clone(),
            ..Default::default()
        };
        let mut rng = ChaCha8Rng::seed_from_u64(seed + 8);
        let mut rows = vec![];
        for chunk in rm_tasks.chunks(8) {
            let mut ids = vec![];
            for t in chunk {
                let text = sft.tokenizer.apply_chat_template(&chat(&t.prompt), true)?;
                let p = sft.tokenizer.encode(&text, false)?;
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

    // Reward model from the SFT model.
    let rm_dir = out.join("rm");
    let s = stage(&rm_dir, "reward model", || {
        let a: crate::rm::RmTrainArgs = settings(&flags(&[
            ("model_name_or_path", sft_dir.display().to_string()),
            ("dataset", rank_path.display().to_string()),
            ("output_dir", rm_dir.display().to_string()),
            ("eval_split", "0.2".into()),
            ("prompts_per_batch", "8".into()),
            ("num_train_epochs", plan.rm_epochs.to_string()),
            ("learning_rate", "5e-4".into()),
            ("max_length", "128".into()),
            ("save_steps", "50".into()),
            ("logging_steps", "5".into()),
            ("seed", seed.to_string()),
        ]))?;
        crate::rm::train_rm(&a).map(|_| ())
    })?;
    elapsed.insert("rm".into(), s);

    // PPO-ptx against the reward model.
    let ppo_dir = out.join("ppo");
    let s = stage(&ppo_dir, "ppo", || {
        let mut f = flags(&[
            ("model_name_or_path", sft_dir.display().to_string()),
            ("reward_model", rm_dir.display().to_string()),
            ("dataset", data.join("prompts.jsonl").display().to_string()),
            ("ptx_data", data.join("corpus.txt").display().to_string()),
            ("output_dir", ppo_dir.display().to_string()),
            ("ptx_coef", "0.2".into()),
            ("rollout_batch_size", "32".into()),
            ("mini_batch_size", "8".into()),
            ("ppo_epochs", "4".into()),
            ("num_iterations", plan.ppo_iterations.to_string()),
            ("max_new_tokens", "24".into()),
            ("learning_rate", "3e-5".into()),
            ("kl_coef", "0.3".into()),
            ("ema", "0.9".into()),
            ("save_steps", "16".into()),
            ("logging_steps", "8".into()),
            ("seed", seed.to_string()),
        ]);
        f.extend(["--missing_eos_penalty".to_string(), "1.0".to_string()]);
        let a: crate::ppo::PpoArgs = settings(&f)?;
        crate::ppo::run(&a, None).map(|_| ())
    })?;
    elapsed.insert("ppo".into(), s);

    // Evaluation on held-out prompts.
    let t = Instant::now();
    let sft = load_pretrained(&sft_dir, &Device::Cpu)?;
    let ppo = load_pretrained(&ppo_dir, &Device::Cpu)?;
    let ema = load_pretrained(&ppo_dir.join("ema"), &Device::Cpu)?;
    let (r_sft, r_ppo, r_ema) = (
        respond(&sft, &eval_tasks, 24)?,
        respond(&ppo, &eval_tasks, 24)?,
        respond(&ema, &eval_tasks, 24)?,
    );
    let (g_sft, f_sft) = judge_all(&eval_tasks, &r_sft);
    let (g_ppo, f_ppo) = judge_all(&eval_tasks, &r_ppo);
    let (g_ema, f_ema) = judge_all(&eval_tasks, &r_ema);
    let win_rate = judge::win_rate(&eval_tasks, &r_ppo, &r_sft);
    let ema_win = judge::win_rate(&eval_tasks, &r_ema, &r_sft);
    let (ptx_sft, ptx_ppo) = (
        ptx_loss(&sft, &held_out_docs)?,
        ptx_loss(&ppo, &held_out_docs)?,
    );
    let rm_acc = report::curve(&rm_dir, "eval/accuracy")
        .last()
        .map_or(f64::NAN, |p| p.1);
    let ppo_kl = report::curve(&ppo_dir, "objective/kl")
        .last()
        .map_or(f64::NAN, |p| p.1);
    elapsed.insert("eval".into(), t.elapsed().as_secs_f64());
    let total: f64 = elapsed.values().sum();
    elapsed.insert("total".into(), total);

    let samples: Vec<Value> = eval_tasks
        .iter()
        .zip(r_sft.iter().zip(&r_ppo))
        .take(12)
        .map(|(t, (a, b))| json!({"family": t.family.name(), "prompt": t.prompt, "sft": a, "ppo": b}))
        .collect();
    let report = json!({
        "sft": {"gold_score": g_sft, "ptx_loss": ptx_sft, "families": f_sft},
        "ppo": {"gold_score": g_ppo, "win_rate_vs_sft": win_rate, "kl": ppo_kl, "ptx_loss": ptx_ppo, "families": f_ppo},
        "ema": {"gold_score": g_ema, "win_rate_vs_sft": ema_win, "families": f_ema},
        "rm": {"val_accuracy": rm_acc},
        "eval_prompts": eval_tasks.len(),
        "elapsed_s": elapsed,
        "quick": args.quick,
        "seed": seed,
        "samples": samples,
    });
    write_json(&out.join("report.json"), &report)?;
    let plots: Vec<(String, Vec<(f64, f64)>)> = [
        ("pretrain train/loss", &pt_dir, "train/loss"),
        ("sft train/loss", &sft_dir, "train/loss"),
        ("rm eval/accuracy", &rm_dir, "eval/accuracy"),
        ("ppo objective/scores", &ppo_dir, "objective/scores"),
        ("ppo objective/kl", &ppo_dir, "objective/kl"),
        ("ppo loss/ptx", &ppo_dir, "loss/ptx"),
    ]
    .iter()
    .map(|(title, dir, m)| (title.to_string(), report::curve(dir, m)))
    .collect();
    let side: Vec<(String, String, String)> = eval_tasks
        .iter()
        .zip(r_sft.iter().zip(&r_ppo))
        .take(12)
        .map(|(t, (a, b))| (t.prompt.clone(), a.clone(), b.clone()))
        .collect();
    report::write_html(&out, &report, &plots, &side)?;
    print_table(&report, &Family::ALL);
    Ok(report)
}

fn print_table(r: &Value, families: &[Family]) {
    let f = |v: &Value| v.as_f64().map_or("-".to_string(), |x| format!("{x:.3}"));
    eprintln!("\n{:<22}{:>10}{:>10}{:>10}", "", "SFT", "PPO", "PPO-EMA");
    eprintln!(
        "{:<22}{:>10}{:>10}{:>10}",
        "gold score",
        f(&r["sft"]["gold_score"]),
        f(&r["ppo"]["gold_score"]),
        f(&r["ema"]["gold_score"])
    );
    for fam in families {
        let n = fam.name();
        eprintln!(
            "{:<22}{:>10}{:>10}{:>10}",
            format!("  {n}"),
            f(&r["sft"]["families"][n]),
            f(&r["ppo"]["families"][n]),
            f(&r["ema"]["families"][n])
        );
    }
    eprintln!(
        "{:<22}{:>10}{:>10}{:>10}",
        "win rate vs SFT",
        "",
        f(&r["ppo"]["win_rate_vs_sft"]),
        f(&r["ema"]["win_rate_vs_sft"])
    );
    eprintln!(
        "{:<22}{:>10}{:>10}",
        "ptx loss (held out)",
        f(&r["sft"]["ptx_loss"]),
        f(&r["ppo"]["ptx_loss"])
    );
    eprintln!("{:<22}{:>10}", "KL to SFT", f(&r["ppo"]["kl"]));
    eprintln!(
        "{:<22}{:>10}",
        "RM val accuracy",
        f(&r["rm"]["val_accuracy"])
    );
    eprintln!("{:<22}{:>10}", "elapsed s", f(&r["elapsed_s"]["total"]));
}
