//! `rlhf demo --quick` on a test-sized model: the stages chain, the evaluation is on
//! data that no training stage saw (checked on the files the run wrote), the report
//! is internally consistent (every figure recomputed from the per-prompt answers it
//! saves), and a rerun skips the finished stages and reproduces the numbers.
//! (The thresholds are measured on full runs, not here.)

mod common;

use rlhf::demo::judge::{gold_score, win_of};
use rlhf::demo::world::{Environment, World};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every user prompt of a stage's JSONL data (conversational rows).
fn user_prompts(path: &Path) -> Vec<String> {
    let mut out = vec![];
    for line in read(path).lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        let msgs = v.get("messages").or_else(|| v.get("prompt")).unwrap();
        for m in msgs.as_array().unwrap() {
            if m["role"] == "user" {
                out.push(m["content"].as_str().unwrap().to_string());
            }
        }
    }
    out
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

#[test]
fn quick_demo_is_evaluated_on_unseen_data_and_its_report_adds_up() {
    let tmp = tempfile::tempdir().unwrap();
    // The folder `--seeds 3` uses, so that the rerun below can be a summary run.
    let out = tmp.path().join("seed-3");
    let run = |seed_flags: &[&str], dir: &Path| {
        let o = common::rlhf_bin()
            .args(["demo", "--quick", "--preset", "nano"])
            .args(seed_flags)
            .arg("--output_dir")
            .arg(dir)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    run(&["--seed", "3"], &out);
    let report: Value = serde_json::from_str(&read(&out.join("report.json"))).unwrap();
    for stage in [
        "pretrain", "sft", "rm", "ppo", "ppo/ema", "dpo", "grpo", "rloo",
    ] {
        assert!(
            out.join(stage).join("model.safetensors").exists(),
            "{stage}"
        );
    }
    let html = read(&out.join("report.html"));
    assert!(html.contains("<svg") && html.contains("polyline") && html.contains("<rect"));
    assert!(html.contains("Answers on held-out prompts") && !html.contains("\"prompts\":"));
    // Every method is trained, evaluated and timed.
    let policies = ["sft", "ppo", "ppo-ema", "dpo", "grpo", "rloo"];
    let names: Vec<&str> = report["policies"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(names.len(), policies.len(), "{names:?}");
    for stage in ["rm", "ppo", "dpo", "grpo", "rloo"] {
        assert!(
            report["elapsed_s"][stage].as_f64().is_some_and(|s| s > 0.0),
            "{stage}"
        );
        let m = &report["peak_rss_mib"][stage];
        let (peak, start) = (
            m["peak_mib"].as_f64().unwrap(),
            m["start_mib"].as_f64().unwrap(),
        );
        assert!(start > 1.0 && peak > start, "{stage}: {m}");
    }

    // Unseen by construction, checked on what the run wrote: no eval prompt occurs
    // in the SFT, ranking or PPO data, nor in the pretraining corpus (PPO's ptx
    // data); no held-out document occurs in the corpus.
    let data = out.join("data");
    let eval: Vec<String> = user_prompts(&data.join("eval_prompts.jsonl"));
    assert_eq!(eval.len(), 48);
    let mut trained: Vec<String> = vec![];
    for f in ["sft.jsonl", "rankings.jsonl", "prompts.jsonl"] {
        let p = user_prompts(&data.join(f));
        assert!(!p.is_empty(), "{f}");
        trained.extend(p);
    }
    let corpus = read(&data.join("corpus.txt"));
    for e in &eval {
        assert!(
            !trained.contains(e),
            "eval prompt {e:?} is in the training data"
        );
        assert!(
            !corpus.contains(e.as_str()),
            "eval prompt {e:?} is in the corpus"
        );
    }
    let held = read(&data.join("held_out.txt"));
    let docs: Vec<&str> = held.split("\n\n").collect();
    assert_eq!(
        docs.len() as u64,
        report["held_out_documents"].as_u64().unwrap()
    );
    for d in &docs {
        assert!(
            !corpus.contains(d),
            "held-out document {d:?} is in the corpus"
        );
    }

    // The report adds up: each saved answer's score is the judge's, and every
    // aggregate is recomputed from the per-prompt scores.
    let prompts = report["prompts"].as_array().unwrap();
    assert_eq!(prompts.len(), eval.len());
    let tasks = World::new(3).eval_tasks();
    let score = |p: &Value, who: &str| p["answers"][who]["score"].as_f64().unwrap();
    let text = |p: &Value, who: &str| p["answers"][who]["text"].as_str().unwrap().to_string();
    for (p, t) in prompts.iter().zip(&tasks) {
        assert_eq!(p["prompt"], t.prompt.as_str());
        for who in policies {
            assert!(
                close(score(p, who), gold_score(t, &text(p, who))),
                "{who}: {p}"
            );
        }
    }
    for who in policies {
        let r = &report["policies"][who];
        let scores: Vec<f64> = prompts.iter().map(|p| score(p, who)).collect();
        let mean = scores.iter().sum::<f64>() / scores.len() as f64;
        assert!(close(r["gold_score"].as_f64().unwrap(), mean), "{who}");
        let mut per: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for p in prompts {
            per.entry(p["family"].as_str().unwrap().to_string())
                .or_default()
                .push(score(p, who));
        }
        let fams = r["families"].as_object().unwrap();
        assert_eq!(fams.len(), 4, "{who}");
        let mut weighted = 0.0;
        for (fam, s) in &per {
            let m = s.iter().sum::<f64>() / s.len() as f64;
            assert!(close(fams[fam].as_f64().unwrap(), m), "{who} {fam}");
            assert_eq!(
                report["family_counts"][fam].as_u64().unwrap() as usize,
                s.len()
            );
            weighted += m * s.len() as f64;
        }
        assert!(
            close(weighted / prompts.len() as f64, mean),
            "{who}: families → total"
        );
        if who != "sft" {
            let wins: f64 = prompts
                .iter()
                .map(|p| win_of(score(p, who), score(p, "sft")))
                .sum();
            let rate = wins / prompts.len() as f64;
            assert!(close(r["win_rate_vs_sft"].as_f64().unwrap(), rate), "{who}");
            assert!(r["kl_to_sft_eval"].as_f64().is_some_and(f64::is_finite));
        }
        let answers: std::collections::HashSet<String> =
            prompts.iter().map(|p| text(p, who)).collect();
        let ratio = answers.len() as f64 / prompts.len() as f64;
        assert!(
            close(r["distinct_answers"].as_f64().unwrap(), ratio),
            "{who}"
        );
        for shares in ["end_tokens_greedy", "end_tokens_sampled"] {
            let total: f64 = r[shares]
                .as_object()
                .unwrap()
                .values()
                .map(|v| v.as_f64().unwrap())
                .sum();
            assert!(close(total, 1.0), "{who} {shares}: {total}");
        }
        assert!(r["ptx_loss_held_out"].as_f64().is_some_and(f64::is_finite));
    }
    assert!(report["rm_val_accuracy"]
        .as_f64()
        .is_some_and(f64::is_finite));

    // The page: charts with labelled axes, every answer escaped into its table.
    let html = read(&out.join("report.html"));
    // (plotters writes each text on a line of its own)
    assert!(
        html.contains("\nstep\n") && html.contains("\ntrain/loss\n"),
        "curves"
    );
    assert!(html.contains("\nmean gold score\n"), "family bars");

    // Rerun as a one-seed summary: every stage is skipped, the evaluation gives the
    // same numbers, and the summary's figures are the report's.
    let log = run(&["--seeds", "3"], tmp.path());
    assert_eq!(log.matches("already done").count(), 8, "{log}");
    let again: Value = serde_json::from_str(&read(&out.join("report.json"))).unwrap();
    assert_eq!(again["policies"], report["policies"]);
    assert_eq!(again["peak_rss_mib"], report["peak_rss_mib"]);
    assert_eq!(again["prompts"], report["prompts"]);
    let summary: Value = serde_json::from_str(&read(&tmp.path().join("summary.json"))).unwrap();
    assert_eq!(summary["seeds"], serde_json::json!([3]));
    for who in ["sft", "ppo", "dpo", "grpo", "rloo"] {
        for fam in report["family_counts"].as_object().unwrap().keys() {
            let s = &summary["policies"][who]["families"][fam];
            let r = report["policies"][who]["families"][fam].as_f64().unwrap();
            for k in ["mean", "min", "max"] {
                assert!(
                    close(s[k].as_f64().unwrap(), r),
                    "{who} {fam} {k}: {s} vs {r}"
                );
            }
        }
    }
    assert_eq!(
        summary["thresholds_met"]["3"].as_bool(),
        report["thresholds"]["all"].as_bool()
    );
    let page = read(&tmp.path().join("summary.html"));
    assert!(
        page.contains("seed 3 (") && page.contains("\nstep\n"),
        "summary page"
    );
}

/// KL(π‖π) is zero: the sampled log-probs (KV-cache decoding) and the reference's
/// (one padded forward) line up token for token. Misaligned tokens or a wrong sign
/// would give a clearly non-zero value.
#[test]
fn the_eval_kl_of_a_policy_to_itself_is_zero() {
    use rlhf::demo::eval::{complete, sequence_kl};
    let pre = common::load_fixture("qwen2");
    let tasks = World::new(0).eval_tasks();
    let samples = complete(&pre, &tasks[..6], 2, 1.0, 8, 0).unwrap();
    assert_eq!(samples.len(), 12);
    assert!(samples.iter().all(|c| !c.tokens.is_empty()));
    let kl = sequence_kl(&pre, &samples).unwrap();
    assert!(kl.abs() < 1e-3, "KL to itself {kl}");
    // Against another model the estimate is clearly positive on average.
    let other = common::load_fixture("llama");
    assert_eq!(other.tokenizer.vocab_size(), pre.tokenizer.vocab_size());
    let kl_other = sequence_kl(&other, &samples).unwrap();
    assert!(kl_other > 0.1, "KL to another model {kl_other}");
}

/// `rlhf demo --use_peft`: the reward model and the methods are adapters on the SFT
/// model (PPO's critic too, on the shared base), the report says so, and a folder
/// holding a run with other settings is refused rather than silently reused.
#[test]
fn demo_with_lora_trains_adapters_and_a_folder_keeps_one_kind_of_run() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("lora");
    let run = |extra: &[&str]| {
        common::rlhf_bin()
            .args([
                "demo",
                "--quick",
                "--preset",
                "nano",
                "--methods",
                "ppo,dpo",
            ])
            .args(extra)
            .arg("--output_dir")
            .arg(&out)
            .output()
            .unwrap()
    };
    let o = run(&["--use_peft"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for stage in ["rm", "ppo", "ppo/critic", "ppo/ema", "dpo"] {
        let dir = out.join(stage);
        assert!(dir.join("adapter_config.json").is_file(), "{stage}");
        assert!(!dir.join("model.safetensors").exists(), "{stage}");
    }
    for stage in ["pretrain", "sft"] {
        assert!(
            out.join(stage).join("model.safetensors").is_file(),
            "{stage}"
        );
    }
    let cfg: Value = serde_json::from_str(&read(&out.join("rm/adapter_config.json"))).unwrap();
    assert_eq!(cfg["task_type"], "SEQ_CLS");
    let report: Value = serde_json::from_str(&read(&out.join("report.json"))).unwrap();
    assert!(report["settings"]["reward model and methods"]
        .as_str()
        .unwrap()
        .starts_with("LoRA"));
    assert!(report["policies"]["ppo"]["win_rate_vs_sft"]
        .as_f64()
        .unwrap()
        .is_finite());
    // The same folder without --use_peft would reuse the LoRA stages: refused.
    let o = run(&[]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("holds a demo run with other settings") && err.contains("LoRA"),
        "{err}"
    );
}
