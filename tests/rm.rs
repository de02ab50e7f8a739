//! The reward model: learns a toy preference from K-way rankings, forwards each
//! response once, resumes exactly, reports bad rankings, and its folder is what
//! `rm eval` / `rm score` read.

mod common;

use candle_core::Device;
use serde_json::{json, Value};
use std::path::Path;

use rlhf::data::rankings::{ranked_from_row, PairTokenizing};
use rlhf::model::scalar::load_scalar;
use rlhf::rm::{train_rm, RmTask, RmTrainArgs};
use rlhf::train::args::TrainingArgs;

fn train_args(out: &Path) -> TrainingArgs {
    use clap::Parser;
    #[derive(Parser)]
    struct P {
        #[command(flatten)]
        t: TrainingArgs,
    }
    let mut t = P::parse_from(["x", "--output_dir", out.to_str().unwrap()]).t;
    t.learning_rate = Some(3e-3);
    t.num_train_epochs = Some(4.0);
    t.warmup_steps = 5;
    t.logging_steps = 5;
    t.save_steps = 20;
    t.seed = 3;
    t
}

fn rm_args(data: &Path, eval: Option<&Path>, out: &Path) -> RmTrainArgs {
    RmTrainArgs {
        model_name_or_path: Some(common::fixture("qwen2")),
        dataset: Some(data.to_path_buf()),
        eval_dataset: eval.map(Path::to_path_buf),
        eval_split: 0.0,
        prompts_per_batch: 8,
        max_length: 64,
        skip_invalid: false,
        config: None,
        lora: Default::default(),
        train: train_args(out),
    }
}

fn weights(dir: &Path) -> Vec<(String, Vec<u32>)> {
    let rm = load_scalar(dir, &Device::Cpu, 0).unwrap();
    rm.model
        .params
        .vars()
        .iter()
        .map(|(s, v)| {
            (
                s.name.clone(),
                v.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect(),
            )
        })
        .collect()
}

#[test]
fn learns_a_toy_preference_and_every_parameter_changes() {
    let tmp = tempfile::tempdir().unwrap();
    let train = common::toy_rankings(tmp.path(), 160, 1);
    let held_out = common::toy_rankings(tmp.path(), 40, 2);
    let out = tmp.path().join("rm");
    let (summary, norm) = train_rm(&rm_args(&train, Some(&held_out), &out)).unwrap();
    let acc = summary.eval["accuracy"];
    assert!(acc > 0.9, "held-out pairwise accuracy {acc}");
    assert!(norm.std > 0.0);
    // Every backbone and head parameter moved away from the SFT model / fresh head.
    let before = weights(&common::fixture("qwen2"));
    let head_before = load_scalar(&common::fixture("qwen2"), &Device::Cpu, 3).unwrap();
    let after = load_scalar(&out, &Device::Cpu, 0).unwrap();
    assert!(!after.fresh_head);
    assert_eq!(after.normalization, Some(norm));
    let after_w = weights(&out);
    for (name, b) in &before {
        let a = &after_w.iter().find(|(n, _)| n == name).unwrap().1;
        assert_ne!(a, b, "{name} did not change");
    }
    let h0: Vec<f32> = head_before
        .model
        .params
        .get("score.weight")
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let h1: Vec<f32> = after
        .model
        .params
        .get("score.weight")
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_ne!(h0, h1, "the head did not change");

    // `rm eval` agrees with the training-time evaluation.
    let out_eval = common::rlhf_bin()
        .args(["rm", "eval", "--model"])
        .arg(&out)
        .arg("--data")
        .arg(&held_out)
        .args(["--max_length", "64"])
        .output()
        .unwrap();
    assert!(
        out_eval.status.success(),
        "{}",
        String::from_utf8_lossy(&out_eval.stderr)
    );
    let e: Value = serde_json::from_slice(&out_eval.stdout).unwrap();
    assert!((e["accuracy"].as_f64().unwrap() - acc).abs() < 1e-9);
    assert_eq!(e["prompts"], 40);
    assert!(e["pairs"].as_u64().unwrap() >= 40);

    // `rm score`: a response with more "good" gets a higher reward.
    let score_in = tmp.path().join("score.jsonl");
    std::fs::write(
        &score_in,
        format!(
            "{}\n{}\n",
            json!({"prompt": "Tell me about the cat.", "response": "dog good cat good sun good tree"}),
            json!({"prompt": "Tell me about the cat.", "response": "dog cat sun tree"})
        ),
    )
    .unwrap();
    let rows = common::rm_score(&out, &score_in);
    assert!(
        rows[0]["reward"].as_f64().unwrap() > rows[1]["reward"].as_f64().unwrap(),
        "{rows:?}"
    );
    assert!(rows[0]["reward_normalized"].is_number());
}

#[test]
fn each_response_is_forwarded_once() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::toy_rankings(tmp.path(), 12, 5);
    let rm = load_scalar(&common::fixture("qwen2"), &Device::Cpu, 0).unwrap();
    let cfg = PairTokenizing {
        rule: rm.reward_input().unwrap(),
        max_length: 64,
    };
    let (set, _) = rlhf::data::rankings::load_rankings(&data, &cfg, false).unwrap();
    let total_k: usize = set.iter().map(|r| r.inputs.len()).sum();
    let comparisons: usize = set.iter().map(|r| r.pairs.len()).sum();
    assert!(
        2 * comparisons > total_k,
        "forwarding each comparison's two responses ({}) would be more than K per prompt ({total_k})",
        2 * comparisons
    );
    let task = RmTask::new(rm, vec![], vec![], 4, 0);
    // Counted inside the scalar model's forward: the sequences that actually ran.
    let before = task.rm.model.sequences_forwarded.get();
    task.evaluate_set(&set).unwrap();
    let forwarded = task.rm.model.sequences_forwarded.get() - before;
    assert_eq!(forwarded, total_k, "K forwards per prompt");
}

/// The issue-16 bug: with a conversational prompt, a response given as text (what
/// `generate --prompts` writes) was followed by the tokenizer's eos
/// (`<|endoftext|>`), while the SFT policy closes its turns with `<|im_end|>`; the
/// reward model learned to pay for the end token. It is read where transformers reads
/// `apply_chat_template(prompt + [assistant])`: at the end of the templated turn.
#[test]
fn chat_responses_are_read_at_the_end_of_the_templated_turn() {
    let rm = load_scalar(&common::fixture("qwen2"), &Device::Cpu, 0).unwrap();
    let cfg = PairTokenizing {
        rule: rm.reward_input().unwrap(),
        max_length: 64,
    };
    let prompt = json!([{"role": "user", "content": "hi"}]);
    let r = ranked_from_row(
        &json!({"prompt": prompt, "responses": ["hello", "go away"], "ranking": [0, 1]}),
        &cfg,
    )
    .unwrap();
    for (i, text) in ["hello", "go away"].iter().enumerate() {
        let mut conv = prompt.as_array().unwrap().clone();
        conv.push(json!({"role": "assistant", "content": text}));
        let rendered = rm
            .tokenizer
            .apply_chat_template(&Value::Array(conv), false)
            .unwrap();
        assert!(rendered.ends_with(&format!("{text}<|im_end|>\n")));
        let expected = rm.tokenizer.encode(&rendered, false).unwrap();
        assert_eq!(r.inputs[i], expected, "response {i}");
    }
}

#[test]
fn resume_is_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::toy_rankings(tmp.path(), 48, 3);
    let full = tmp.path().join("full");
    let mut a = rm_args(&data, None, &full);
    a.train.num_train_epochs = Some(2.0);
    train_rm(&a).unwrap();
    let parts = tmp.path().join("parts");
    let mut b = rm_args(&data, None, &parts);
    b.train.num_train_epochs = Some(2.0);
    b.train.stop_after_steps = Some(7);
    train_rm(&b).unwrap();
    b.train.stop_after_steps = None;
    let (s, _) = train_rm(&b).unwrap();
    assert_eq!(s.resumed_from, Some(7));
    assert_eq!(weights(&full), weights(&parts));
}

#[test]
fn bad_rankings_are_reported() {
    let rm = load_scalar(&common::fixture("qwen2"), &Device::Cpu, 0).unwrap();
    let cfg = PairTokenizing {
        rule: rm.reward_input().unwrap(),
        max_length: 48,
    };
    let cases = [
        (
            json!({"prompt": "p", "responses": ["a"], "ranking": [0]}),
            "a ranking needs at least 2",
        ),
        (
            json!({"prompt": "p", "responses": ["a", "b", "c"], "ranking": [0, 1]}),
            "has 2 ranks for 3 responses",
        ),
        (
            json!({"prompt": "p", "responses": ["a", "b"], "ranking": [0, 5]}),
            "rank 5 is out of range 0..=1",
        ),
        (
            json!({"prompt": "p", "responses": ["a", "b", "c"], "ranking": [1, 1, 1]}),
            "all responses are tied",
        ),
        (
            json!({"prompt": "p", "responses": ["a", "cat ".repeat(60)], "ranking": [0, 1]}),
            "more than --max_length 48",
        ),
        (
            json!({"prompt": "p", "chosen": "a"}),
            "field \"rejected\" is missing",
        ),
        (
            json!({"responses": ["a", "b"], "ranking": [0, 1]}),
            "field \"prompt\" is missing",
        ),
    ];
    for (row, want) in cases {
        let err = ranked_from_row(&row, &cfg).unwrap_err();
        assert!(err.contains(want), "{row}: {err}");
    }
    // An empty response (a policy that stopped at once) is a response like any other:
    // the reward model scores the end token right after the prompt, and learns from
    // the labelers that it is bad (otherwise PPO finds that it is never penalised).
    let r = ranked_from_row(
        &json!({"prompt": "p", "responses": ["a", ""], "ranking": [0, 1]}),
        &cfg,
    )
    .unwrap();
    let p = rm.tokenizer.encode("p", true).unwrap();
    assert_eq!(r.inputs[1], [p, vec![cfg.rule.eos]].concat(), "{r:?}");
    // A tie among four: 6 pairs minus the tied one.
    let r = ranked_from_row(
        &json!({"prompt": "p", "responses": ["a", "b", "c", "d"], "ranking": [1, 2, 0, 1]}),
        &cfg,
    )
    .unwrap();
    assert_eq!(r.pairs.len(), 5);
    // TRL pairs, conversational: chosen ranks first.
    let r = ranked_from_row(
        &json!({"prompt": [{"role": "user", "content": "hi"}],
                "chosen": [{"role": "assistant", "content": "hello"}],
                "rejected": [{"role": "assistant", "content": "go away"}]}),
        &cfg,
    )
    .unwrap();
    assert_eq!(r.pairs, [(0, 1)]);
    // Read at the end of the templated assistant turn, as transformers renders it.
    let text = rm.tokenizer.decode(&r.inputs[0], false).unwrap();
    assert!(
        text.ends_with("<|im_start|>assistant\nhello<|im_end|>\n"),
        "{text:?}"
    );

    // In a file: the line is named; --skip_invalid counts instead.
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("r.jsonl");
    std::fs::write(
        &p,
        format!(
            "{}\n{}\n",
            json!({"prompt": "p", "chosen": "a", "rejected": "b"}),
            json!({"prompt": "p", "responses": ["a"], "ranking": [0]})
        ),
    )
    .unwrap();
    let err = rlhf::data::rankings::load_rankings(&p, &cfg, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("r.jsonl:2:"), "{err}");
    let (ok, skipped) = rlhf::data::rankings::load_rankings(&p, &cfg, true).unwrap();
    assert_eq!((ok.len(), skipped), (1, 1));
}
