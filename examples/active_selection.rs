//! Active selection, measured: how many labels does the reward model need to reach a
//! held-out pairwise accuracy when the queue is random, and when it puts first the
//! prompts whose K samples the current RM separates least (`label serve --select
//! uncertainty`)?
//!
//! The demo's 3H world: a nano GPT pretrained on its corpus and fine-tuned on its
//! demonstrations (as `rlhf demo --preset nano` does, smaller); a pool of training
//! prompts with K = 4 SFT samples each; held-out prompts (`eval_tasks`: people,
//! numbers and requests no training prompt uses) with K samples ranked by the gold
//! judge without noise. A simulated labeler, the gold judge with labeler noise
//! (`judge::rank`, σ = 0.15), talks to the real `rlhf label serve` over HTTP: it asks
//! /api/next and posts rankings, `ROUND` per round. After each round the labels are
//! exported (`label export`), a reward model is trained from the SFT model on all of
//! them (`rm train`), and evaluated on the held-out rankings (`rm eval`); the next
//! round's server orders the queue with that RM (uncertainty) or by a seeded shuffle
//! (random). Round 1 is random for both (there is no RM yet).
//!
//!     cargo build --release && cargo run --release --example active_selection -- [OUT_DIR] [TARGET_ACCURACY]
//!
//! Prints one JSON line per round and a summary; writes OUT_DIR/results.json.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rlhf::demo::eval::{chat, chat_ids};
use rlhf::demo::judge;
use rlhf::demo::world::{Environment, Task, World};
use rlhf::generate::{generate_n, SamplingParams};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

mod common;

const SEEDS: [u64; 3] = [0, 1, 2];
const POOL: usize = 160;
const K: usize = 4;
const ROUND: usize = 16;
const ROUNDS: usize = 8;
const NOISE: f64 = 0.15;
const MAX_NEW_TOKENS: usize = 24;

/// The `rlhf` binary built beside this example (target/release/rlhf), or $RLHF_BIN.
fn rlhf() -> Command {
    let bin = std::env::var_os("RLHF_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let exe = std::env::current_exe().unwrap();
            exe.parent().and_then(Path::parent).unwrap().join("rlhf")
        });
    Command::new(bin)
}

fn run(args: &[&str]) -> String {
    let o = rlhf().args(args).output().expect("run rlhf");
    if !o.status.success() {
        panic!(
            "rlhf {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    String::from_utf8(o.stdout).unwrap()
}

fn write_jsonl(path: &Path, rows: &[Value]) {
    std::fs::write(
        path,
        rows.iter()
            .map(|r| r.to_string() + "\n")
            .collect::<String>(),
    )
    .unwrap();
}

fn flags(pairs: &[(&str, String)]) -> Vec<String> {
    pairs
        .iter()
        .flat_map(|(k, v)| [format!("--{k}"), v.clone()])
        .collect()
}

/// Pretrain and SFT a nano GPT on the world (skipped when already there).
fn base_models(out: &Path, world: &World) -> PathBuf {
    let data = out.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let (pt, sft) = (out.join("pretrain"), out.join("sft"));
    if !pt.join("model.safetensors").exists() {
        std::fs::write(data.join("corpus.txt"), world.corpus(1000, 1).join("\n\n")).unwrap();
        let a: rlhf::pretrain::PretrainArgs = rlhf::train::args::parse_args(&flags(&[
            ("dataset", data.join("corpus.txt").display().to_string()),
            ("output_dir", pt.display().to_string()),
            ("arch", "gpt2".into()),
            ("preset", "nano".into()),
            ("vocab_size", "1024".into()),
            ("block_size", "64".into()),
            ("max_steps", "300".into()),
            ("per_device_train_batch_size", "16".into()),
            ("learning_rate", "1e-3".into()),
            ("lr_scheduler_type", "cosine".into()),
            ("warmup_steps", "20".into()),
            ("save_steps", "1000".into()),
            ("logging_steps", "50".into()),
        ]))
        .unwrap();
        rlhf::pretrain::run(&a).unwrap();
    }
    if !sft.join("model.safetensors").exists() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let rows: Vec<Value> = world
            .tasks(400, 3)
            .iter()
            .map(|t| json!({"messages": [{"role": "user", "content": t.prompt},
                                         {"role": "assistant", "content": world.demonstration(t, 0.55, &mut rng)}]}))
            .collect();
        write_jsonl(&data.join("sft.jsonl"), &rows);
        let a: rlhf::sft::SftArgs = rlhf::train::args::parse_args(&flags(&[
            ("model_name_or_path", pt.display().to_string()),
            ("dataset", data.join("sft.jsonl").display().to_string()),
            ("output_dir", sft.display().to_string()),
            ("max_steps", "200".into()),
            ("per_device_train_batch_size", "16".into()),
            ("learning_rate", "3e-4".into()),
            ("lr_scheduler_type", "cosine".into()),
            ("warmup_steps", "20".into()),
            ("max_length", "128".into()),
            ("on_overflow", "skip".into()),
            ("save_steps", "1000".into()),
            ("logging_steps", "50".into()),
        ]))
        .unwrap();
        rlhf::sft::run(&a).unwrap();
    }
    sft
}

/// K samples per task from the SFT model.
fn samples(sft: &Path, tasks: &[Task], seed: u64) -> Vec<Vec<String>> {
    let pre = rlhf::model::hf::load_pretrained(sft, &candle_core::Device::Cpu).unwrap();
    let params = SamplingParams {
        max_new_tokens: MAX_NEW_TOKENS,
        eos_token_ids: pre.eos_token_ids.clone(),
        ..Default::default()
    };
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = vec![];
    for chunk in tasks.chunks(16) {
        let ids: Vec<Vec<u32>> = chunk
            .iter()
            .map(|t| chat_ids(&pre, &t.prompt).unwrap())
            .collect();
        for group in generate_n(&pre.model, &pre.tokenizer, &ids, K, &params, &mut rng).unwrap() {
            out.push(
                group
                    .into_iter()
                    .map(|c| c.text.trim().to_string())
                    .collect(),
            );
        }
    }
    out
}

/// `rlhf label serve` on a free port; returns the process and its address.
fn serve(db: &Path, select: &[&str]) -> (Child, String) {
    let mut child = rlhf()
        .args([
            "label",
            "serve",
            "--db",
            db.to_str().unwrap(),
            "--port",
            "0",
        ])
        .args(select)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let url = loop {
        let line = lines
            .next()
            .expect("server exited before listening")
            .unwrap();
        if let Some(i) = line.find("http://") {
            break line[i..].trim().to_string();
        }
    };
    (child, url)
}

/// The simulated labeler: `n` items from /api/next, ranked by the noisy gold judge.
fn label_round(
    url: &str,
    token: &str,
    tasks: &HashMap<String, Task>,
    n: usize,
    rng: &mut ChaCha8Rng,
    seq: &mut usize,
) -> usize {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let auth = format!("Bearer {token}");
    let mut done = 0;
    while done < n {
        let next: Value = agent
            .get(&format!("{url}/api/next"))
            .header("authorization", &auth)
            .call()
            .unwrap()
            .body_mut()
            .read_json()
            .unwrap();
        let item = &next["item"];
        if item.is_null() {
            break;
        }
        let task = &tasks[item["prompt_text"].as_str().unwrap()];
        let shown = item["responses"].as_array().unwrap();
        let mut texts = vec![String::new(); K];
        for r in shown {
            texts[r["index"].as_u64().unwrap() as usize] = r["text"].as_str().unwrap().to_string();
        }
        let ranking = judge::rank(task, &texts, NOISE, rng);
        *seq += 1;
        let mut body =
            json!({"client_id": format!("sim-label-{seq}"), "item_id": item["id"], "seconds": 1.0});
        if ranking.iter().all(|&r| r == ranking[0]) {
            body["skip"] = json!("all responses equally good");
        } else {
            body["ranking"] = json!(ranking);
            done += 1;
        }
        let r = agent
            .post(&format!("{url}/api/labels"))
            .header("authorization", &auth)
            .send_json(&body)
            .unwrap();
        assert_eq!(r.status(), 200, "{body}");
    }
    done
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let out = PathBuf::from(
        args.get(1)
            .cloned()
            .unwrap_or_else(|| "runs/active_selection".into()),
    );
    let target: f64 = args.get(2).map_or(0.65, |t| t.parse().unwrap());
    let started = Instant::now();
    let world = World::new(0);
    let sft = base_models(&out, &world);
    // Held-out rankings: prompts no training stage or pool uses, judged without noise.
    let held = world.eval_tasks();
    let mut rng = ChaCha8Rng::seed_from_u64(99);
    let held_rows: Vec<Value> = held
        .iter()
        .zip(samples(&sft, &held, 98))
        .filter_map(|(t, rs)| {
            let ranking = judge::rank(t, &rs, 0.0, &mut rng);
            (!ranking.iter().all(|&r| r == ranking[0]))
                .then(|| json!({"prompt": chat(&t.prompt), "responses": rs, "ranking": ranking}))
        })
        .collect();
    let held_path = out.join("data/held_out_rankings.jsonl");
    write_jsonl(&held_path, &held_rows);
    let held_prompts: std::collections::HashSet<&str> =
        held.iter().map(|t| t.prompt.as_str()).collect();

    let mut results = vec![];
    for seed in SEEDS {
        let pool = world.tasks(POOL, 1000 + seed);
        assert!(
            pool.iter()
                .all(|t| !held_prompts.contains(t.prompt.as_str())),
            "a pool prompt is held out"
        );
        let by_prompt: HashMap<String, Task> =
            pool.iter().map(|t| (t.prompt.clone(), t.clone())).collect();
        let pool_rows: Vec<Value> = pool
            .iter()
            .zip(samples(&sft, &pool, 2000 + seed))
            .map(|(t, rs)| json!({"prompt": chat(&t.prompt), "responses": rs}))
            .collect();
        let dir = out.join(format!("seed{seed}"));
        std::fs::create_dir_all(&dir).unwrap();
        let pool_path = dir.join("pool.jsonl");
        write_jsonl(&pool_path, &pool_rows);
        for strategy in ["random", "uncertainty"] {
            let sdir = dir.join(strategy);
            let _ = std::fs::remove_dir_all(&sdir);
            std::fs::create_dir_all(&sdir).unwrap();
            let db = sdir.join("labels.sqlite");
            run(&[
                "label",
                "new",
                "--db",
                db.to_str().unwrap(),
                "--kind",
                "rank",
                "--k",
                &K.to_string(),
                "--prompts",
                pool_path.to_str().unwrap(),
            ]);
            let link = run(&[
                "label",
                "add-labeler",
                "--db",
                db.to_str().unwrap(),
                "judge",
            ]);
            let token = link.trim().split("?token=").nth(1).unwrap().to_string();
            let mut rng = ChaCha8Rng::seed_from_u64(3000 + seed);
            let (mut labels, mut seq, mut curve, mut reached) = (0, 0, vec![], None);
            for round in 0..ROUNDS {
                let rm_prev = sdir.join(format!("rm{}", round.wrapping_sub(1)));
                let seed_s = seed.to_string();
                let select: Vec<&str> = if strategy == "uncertainty" && round > 0 {
                    vec![
                        "--select",
                        "uncertainty",
                        "--reward_model",
                        rm_prev.to_str().unwrap(),
                    ]
                } else {
                    vec!["--select", "random", "--seed", &seed_s]
                };
                let (mut server, url) = serve(&db, &select);
                labels += label_round(&url, &token, &by_prompt, ROUND, &mut rng, &mut seq);
                server.kill().unwrap();
                server.wait().unwrap();
                let export = sdir.join("rankings.jsonl");
                run(&[
                    "label",
                    "export",
                    "--db",
                    db.to_str().unwrap(),
                    "--format",
                    "rankings",
                    "--output",
                    export.to_str().unwrap(),
                ]);
                let rm = sdir.join(format!("rm{round}"));
                run(&[
                    "rm",
                    "train",
                    "--model",
                    sft.to_str().unwrap(),
                    "--data",
                    export.to_str().unwrap(),
                    "--output_dir",
                    rm.to_str().unwrap(),
                    "--num_train_epochs",
                    "3",
                    "--learning_rate",
                    "5e-4",
                    "--prompts_per_batch",
                    "8",
                    "--max_length",
                    "128",
                    "--save_steps",
                    "100000",
                    "--logging_steps",
                    "100",
                    "--seed",
                    &seed_s,
                ]);
                let eval: Value = serde_json::from_str(&run(&[
                    "rm",
                    "eval",
                    "--model",
                    rm.to_str().unwrap(),
                    "--data",
                    held_path.to_str().unwrap(),
                    "--max_length",
                    "128",
                ]))
                .unwrap();
                let acc = eval["accuracy"].as_f64().unwrap();
                println!(
                    "{}",
                    json!({"seed": seed, "strategy": strategy, "round": round + 1, "labels": labels,
                                      "held_out_accuracy": acc, "elapsed_s": started.elapsed().as_secs_f64()})
                );
                curve.push((labels, acc));
                if acc >= target && reached.is_none() {
                    reached = Some(labels);
                }
                if round > 0 {
                    let _ = std::fs::remove_dir_all(&rm_prev);
                }
            }
            results.push(json!({"seed": seed, "strategy": strategy, "curve": curve, "labels_to_target": reached}));
        }
    }
    let summary: Vec<Value> = ["random", "uncertainty"]
        .iter()
        .map(|s| {
            let runs: Vec<&Value> = results.iter().filter(|r| r["strategy"] == *s).collect();
            let needed: Vec<Option<u64>> = runs.iter().map(|r| r["labels_to_target"].as_u64()).collect();
            let reached: Vec<u64> = needed.iter().flatten().copied().collect();
            let final_acc: Vec<f64> = runs.iter().map(|r| r["curve"].as_array().unwrap().last().unwrap()[1].as_f64().unwrap()).collect();
            json!({"strategy": s, "labels_to_target": needed,
                   "mean_if_all_reached": (reached.len() == needed.len()).then(|| reached.iter().sum::<u64>() as f64 / reached.len() as f64),
                   "worst": if reached.len() == needed.len() { json!(reached.iter().max()) } else { json!("not reached") },
                   "final_accuracy_mean": final_acc.iter().sum::<f64>() / final_acc.len() as f64,
                   "final_accuracy_worst": final_acc.iter().copied().fold(f64::INFINITY, f64::min)})
        })
        .collect();
    let report = json!({"target_accuracy": target, "pool": POOL, "k": K, "labels_per_round": ROUND,
                        "rounds": ROUNDS, "noise": NOISE, "held_out_rankings": held_rows.len(),
                        "cpu": common::cpu_info(), "elapsed_s": started.elapsed().as_secs_f64(),
                        "summary": summary, "runs": results});
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&report).unwrap(),
    )
    .unwrap();
    println!("{}", serde_json::to_string_pretty(&json!({"summary": report["summary"], "cpu": report["cpu"], "elapsed_s": report["elapsed_s"]})).unwrap());
}
