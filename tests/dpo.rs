//! DPO: learns a toy preference from K-way rankings (held-out reward accuracy up,
//! loss down from ln 2, every parameter moved), resumes bit for bit, reads chat
//! responses as the assistant turn, and checks its settings.

mod common;

use std::path::Path;

use rlhf::data::rankings::PairTokenizing;
use rlhf::data::reward_input::RewardInput;
use rlhf::dpo::{preference_from_row, run, DpoArgs};
use rlhf::losses::DpoLossType;
use rlhf::model::hf::load_pretrained;
use rlhf::train::args::TrainingArgs;

fn train_args(out: &Path) -> TrainingArgs {
    use clap::Parser;
    #[derive(Parser)]
    struct P {
        #[command(flatten)]
        t: TrainingArgs,
    }
    let mut t = P::parse_from(["x", "--output_dir", out.to_str().unwrap()]).t;
    t.learning_rate = Some(2e-3);
    t.num_train_epochs = Some(3.0);
    t.warmup_steps = 3;
    t.logging_steps = 5;
    t.save_steps = 20;
    t.seed = 5;
    t
}

fn dpo_args(data: &Path, eval: Option<&Path>, out: &Path) -> DpoArgs {
    DpoArgs {
        model_name_or_path: Some(common::fixture("qwen2")),
        dataset: Some(data.to_path_buf()),
        eval_dataset: eval.map(Path::to_path_buf),
        eval_split: 0.0,
        beta: 0.1,
        loss_type: DpoLossType::Sigmoid,
        prompts_per_batch: 8,
        max_length: 64,
        skip_invalid: false,
        config: None,
        lora: Default::default(),
        train: train_args(out),
    }
}

#[test]
fn learns_a_toy_preference_and_every_parameter_changes() {
    let tmp = tempfile::tempdir().unwrap();
    let train = common::toy_rankings(tmp.path(), 120, 1);
    let held_out = common::toy_rankings(tmp.path(), 40, 2);
    let out = tmp.path().join("dpo");
    for loss_type in [DpoLossType::Sigmoid, DpoLossType::Ipo] {
        let mut args = dpo_args(&train, Some(&held_out), &out);
        args.loss_type = loss_type;
        args.train.overwrite_output_dir = true;
        let s = run(&args).unwrap();
        let (acc, loss) = (s.eval["rewards/accuracies"], s.eval["loss"]);
        assert!(acc > 0.8, "{loss_type:?}: held-out reward accuracy {acc}");
        assert!(
            s.eval["rewards/margins"] > 0.0,
            "{loss_type:?}: {:?}",
            s.eval
        );
        // At the start the policy is the reference: h = 0, so the sigmoid loss is
        // ln 2 and the IPO loss (1/(2β))² = 25.
        let start = match loss_type {
            DpoLossType::Sigmoid => std::f64::consts::LN_2,
            DpoLossType::Ipo => 25.0,
        };
        assert!(
            loss < 0.8 * start,
            "{loss_type:?}: held-out loss {loss} vs {start} at the start"
        );
    }
    // Every parameter moved away from the SFT model.
    let (before, after) = (
        common::lm_weight_bits(&common::fixture("qwen2")),
        common::lm_weight_bits(&out),
    );
    for ((name, a), (_, b)) in before.iter().zip(&after) {
        assert_ne!(a, b, "{name} did not change");
    }
    // TRL's metric names are logged.
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    for name in [
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
    ] {
        assert!(
            metrics.contains(&format!("\"train/{name}\""))
                || metrics.contains(&format!("\"{name}\"")),
            "{name} not logged"
        );
    }
}

#[test]
fn resume_is_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::toy_rankings(tmp.path(), 40, 3);
    let full = tmp.path().join("full");
    run(&dpo_args(&data, None, &full)).unwrap();
    let parts = tmp.path().join("parts");
    let mut b = dpo_args(&data, None, &parts);
    b.train.stop_after_steps = Some(7);
    run(&b).unwrap();
    b.train.stop_after_steps = None;
    let s = run(&b).unwrap();
    assert_eq!(s.resumed_from, Some(7));
    assert_eq!(
        common::lm_weight_bits(&full),
        common::lm_weight_bits(&parts)
    );
}

#[test]
fn chat_responses_are_the_assistant_turn() {
    let p = load_pretrained(&common::fixture("qwen2"), &candle_core::Device::Cpu).unwrap();
    let cfg = PairTokenizing {
        rule: RewardInput {
            tokenizer: &p.tokenizer,
            eos: p.eos().unwrap(),
            eos_ids: &p.eos_token_ids,
            split_special_tokens: false,
        },
        max_length: 128,
    };
    let row = serde_json::json!({
        "prompt": [{"role": "user", "content": "hi"}],
        "chosen": "hello there", "rejected": "go away"
    });
    let (pref, dropped) = preference_from_row(&row, &cfg).unwrap();
    assert_eq!(dropped, 0);
    assert_eq!(pref.pairs, vec![(0, 1)]);
    let response = p
        .tokenizer
        .decode(&pref.inputs[0][pref.prompt_len..], false)
        .unwrap();
    assert_eq!(response, "hello there<|im_end|>\n");
    let prompt = p
        .tokenizer
        .decode(&pref.inputs[1][..pref.prompt_len], false)
        .unwrap();
    assert!(prompt.ends_with("<|im_start|>assistant\n"), "{prompt:?}");
}

#[test]
fn the_command_checks_its_settings_and_data() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::toy_rankings(tmp.path(), 4, 4);
    let out = tmp.path().join("o");
    let run_cli = |extra: &[&str]| {
        common::rlhf_bin()
            .args(["dpo", "--model"])
            .arg(common::fixture("qwen2"))
            .arg("--data")
            .arg(&data)
            .arg("--output_dir")
            .arg(&out)
            .args(extra)
            .output()
            .unwrap()
    };
    let o = run_cli(&["--beta", "-1"]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("beta") && err.contains("> 0"), "{err}");
    let o = run_cli(&["--loss_type", "hinge"]);
    assert_eq!(o.status.code(), Some(2));
    // Ties only: nothing to learn, named by file and line.
    let tied = tmp.path().join("tied.jsonl");
    std::fs::write(
        &tied,
        r#"{"prompt": "a", "responses": ["x", "y"], "ranking": [0, 0]}"#,
    )
    .unwrap();
    let o = common::rlhf_bin()
        .args(["dpo", "--model"])
        .arg(common::fixture("qwen2"))
        .arg("--data")
        .arg(&tied)
        .arg("--output_dir")
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("tied.jsonl:1") && err.contains("tied"),
        "{err}"
    );
    // A short run from the command line writes a model folder.
    let o = run_cli(&[
        "--max_steps",
        "2",
        "--learning_rate",
        "1e-3",
        "--loss_type",
        "ipo",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.join("model.safetensors").is_file());
}
