//! GRPO and RLOO, the critic-free methods: the reward rises on a learnable toy reward,
//! advantages follow each method's rule on the real samples, a run resumes bit for
//! bit, a user's reward command plugs in, and its failures are clear errors.

mod common;

use serde_json::{json, Value};
use std::path::{Path, PathBuf};

use rlhf::grpo::{GrpoArgs, ScaleRewards};
use rlhf::policy_gradient::GroupArgs;
use rlhf::rloo::RlooArgs;
use rlhf::rollout::Scorer;

fn prompts(dir: &Path) -> PathBuf {
    let p = dir.join("prompts.jsonl");
    let rows: Vec<String> = (0..8)
        .map(|i| json!({"prompt": format!("The cat {i} sat on")}).to_string())
        .collect();
    std::fs::write(&p, rows.join("\n")).unwrap();
    p
}

fn group_args(data: &Path, out: &Path) -> GroupArgs {
    use clap::Parser;
    #[derive(Parser)]
    struct P {
        #[command(flatten)]
        a: GroupArgs,
    }
    let mut a = P::parse_from(["x", "--output_dir", out.to_str().unwrap()]).a;
    a.model_name_or_path = Some(common::fixture("qwen2"));
    a.dataset = Some(data.to_path_buf());
    a.rollout_batch_size = 4;
    a.num_generations = 4;
    a.mini_batch_size = 8;
    a.num_iterations = 2;
    a.max_completion_length = 12;
    a.max_iterations = Some(12);
    a.train.learning_rate = Some(3e-3);
    a.train.lr_scheduler_type = Some(rlhf::train::schedule::LrSchedulerType::Constant);
    a.train.logging_steps = 4;
    a.train.save_steps = 0;
    a.train.seed = 5;
    a
}

fn grpo_args(data: &Path, out: &Path) -> GrpoArgs {
    GrpoArgs {
        beta: 0.04,
        scale_rewards: ScaleRewards::Group,
        group: group_args(data, out),
    }
}

fn rloo_args(data: &Path, out: &Path) -> RlooArgs {
    RlooArgs {
        beta: 0.05,
        group: group_args(data, out),
    }
}

/// 4 × the fraction of response tokens with an id below 100: a reward the random
/// fixture policy (near-uniform over 400 ids) can learn to raise.
fn count_reward() -> Scorer {
    Scorer::Function(Box::new(|_p: &[u32], r: &[u32]| {
        r.iter().filter(|&&t| t < 100).count() as f64 / r.len().max(1) as f64 * 4.0
    }))
}

fn iteration_metrics(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v.get("reward").is_some())
        .collect()
}

fn rises(out: &Path) {
    let m = iteration_metrics(out);
    assert_eq!(m.len(), 12, "one metrics row per iteration");
    let mean = |rows: &[Value]| {
        rows.iter()
            .map(|v| v["reward"].as_f64().unwrap())
            .sum::<f64>()
            / rows.len() as f64
    };
    let (first, last) = (mean(&m[..3]), mean(&m[9..]));
    assert!(last > first + 0.3, "reward did not rise: {first} → {last}");
    for v in &m {
        for key in [
            "reward_std",
            "frac_reward_zero_std",
            "kl",
            "entropy",
            "loss",
            "clip_ratio/region_mean",
            "completions/mean_length",
            "completions/clipped_ratio",
        ] {
            assert!(
                v[key].as_f64().is_some_and(f64::is_finite),
                "missing {key}: {v}"
            );
        }
    }
}

#[test]
fn grpo_raises_the_reward_with_group_relative_advantages() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prompts(tmp.path());
    let out = tmp.path().join("grpo");
    let (_, task) = rlhf::grpo::run(&grpo_args(&data, &out), Some(count_reward())).unwrap();
    rises(&out);
    // The last iteration's advantages are the group-normalised scores of its samples.
    let s = task.samples();
    assert_eq!(s.len(), 16);
    let scores: Vec<f64> = s.iter().map(|x| x.score).collect();
    let want = rlhf::grpo::advantages(&scores, 4, ScaleRewards::Group);
    for (x, w) in s.iter().zip(want) {
        assert_eq!(x.advantage, w);
        assert_eq!(x.logprobs.len(), x.response.len());
        assert_eq!(x.ref_logprobs.len(), x.response.len());
    }
    // Groups share their prompt.
    for g in s.chunks(4) {
        assert!(g.iter().all(|x| x.prompt == g[0].prompt));
    }
}

#[test]
fn rloo_raises_the_reward_with_a_leave_one_out_baseline() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prompts(tmp.path());
    let out = tmp.path().join("rloo");
    let (_, task) = rlhf::rloo::run(&rloo_args(&data, &out), Some(count_reward())).unwrap();
    rises(&out);
    let s = task.samples();
    let scores: Vec<f64> = s.iter().map(|x| x.score).collect();
    let kl: Vec<f64> = s
        .iter()
        .map(|x| {
            x.logprobs
                .iter()
                .zip(&x.ref_logprobs)
                .map(|(a, b)| (a - b) as f64)
                .sum()
        })
        .collect();
    let want = rlhf::rloo::advantages(&scores, &kl, 4, 0.05);
    for (x, w) in s.iter().zip(want) {
        assert_eq!(x.advantage, w);
    }
}

#[test]
fn both_resume_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prompts(tmp.path());
    for method in ["grpo", "rloo"] {
        let run = |out: &Path, stop: Option<usize>| {
            let mut g = group_args(&data, out);
            g.max_iterations = Some(3);
            g.train.save_steps = 1;
            g.train.stop_after_steps = stop;
            match method {
                "grpo" => drop(
                    rlhf::grpo::run(
                        &GrpoArgs {
                            group: g,
                            ..grpo_args(&data, out)
                        },
                        Some(count_reward()),
                    )
                    .unwrap(),
                ),
                _ => drop(
                    rlhf::rloo::run(
                        &RlooArgs {
                            group: g,
                            ..rloo_args(&data, out)
                        },
                        Some(count_reward()),
                    )
                    .unwrap(),
                ),
            }
        };
        let full = tmp.path().join(format!("{method}-full"));
        run(&full, None);
        let parts = tmp.path().join(format!("{method}-parts"));
        // Stop mid-iteration (3 updates of 4), then resume.
        run(&parts, Some(3));
        run(&parts, None);
        assert_eq!(
            common::lm_weight_bits(&full),
            common::lm_weight_bits(&parts),
            "{method}"
        );
        assert_eq!(
            common::lm_weight_bits(&full).len(),
            common::lm_weight_bits(&common::fixture("qwen2")).len()
        );
        assert_ne!(
            common::lm_weight_bits(&full),
            common::lm_weight_bits(&common::fixture("qwen2")),
            "{method}: no update"
        );
    }
}

#[test]
fn a_reward_command_plugs_in_and_its_failures_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prompts(tmp.path());
    let out = tmp.path().join("cmd");
    let base = |cmd: &str| {
        let mut c = common::rlhf_bin();
        c.args(["grpo", "--model"])
            .arg(common::fixture("qwen2"))
            .arg("--data")
            .arg(&data)
            .arg("--output_dir")
            .arg(&out)
            .args([
                "--max_iterations",
                "1",
                "--rollout_batch_size",
                "2",
                "--num_generations",
                "2",
                "--mini_batch_size",
                "2",
                "--max_completion_length",
                "4",
                "--overwrite_output_dir",
            ])
            .arg("--reward_cmd")
            .arg(cmd);
        c.output().unwrap()
    };
    // Each line's length in characters as its reward: any program works.
    let ok = base("while IFS= read -r line; do echo ${#line}; done");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let m = iteration_metrics(&out);
    assert_eq!(m.len(), 1);
    assert!(m[0]["reward"].as_f64().unwrap() > 20.0, "{}", m[0]);
    let bad = base("cat >/dev/null; echo 1");
    assert_eq!(bad.status.code(), Some(2));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("printed 1 reward lines for 4 completions"),
        "{err}"
    );
    let bad = base("echo oops >&2; exit 7");
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("exit status: 7") && err.contains("oops"),
        "{err}"
    );
    // Neither a reward model nor a command: said before any work.
    let none = common::rlhf_bin()
        .args(["rloo", "--model"])
        .arg(common::fixture("qwen2"))
        .arg("--data")
        .arg(&data)
        .arg("--output_dir")
        .arg(tmp.path().join("none"))
        .output()
        .unwrap();
    assert_eq!(none.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&none.stderr).contains("--reward_model DIR or --reward_cmd CMD")
    );
    // Settings are checked by name.
    let g1 = base_settings(&data, tmp.path(), &["--num_generations", "1"]);
    assert!(g1.contains("num_generations") && g1.contains("≥ 2"), "{g1}");
    let mb = base_settings(
        &data,
        tmp.path(),
        &[
            "--num_generations",
            "3",
            "--rollout_batch_size",
            "2",
            "--mini_batch_size",
            "4",
        ],
    );
    assert!(
        mb.contains("mini_batch_size") && mb.contains("does not divide"),
        "{mb}"
    );
}

fn base_settings(data: &Path, dir: &Path, extra: &[&str]) -> String {
    let o = common::rlhf_bin()
        .args(["grpo", "--model"])
        .arg(common::fixture("qwen2"))
        .arg("--data")
        .arg(data)
        .arg("--output_dir")
        .arg(dir.join("s"))
        .args(["--reward_cmd", "cat"])
        .args(extra)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    String::from_utf8_lossy(&o.stderr).into_owned()
}
