//! The shared training loop, pretraining and SFT on tiny models: parameters change
//! and the loss falls; resume is bit-exact (also after a torn checkpoint);
//! accumulation equals a bigger batch; metrics files are readable.

mod common;

use candle_core::Device;
use serde_json::{json, Value};
use std::path::Path;

use rlhf::model::hf::load_pretrained;
use rlhf::pretrain::{self, PretrainArgs};
use rlhf::sft::{self, SftArgs};
use rlhf::train::args::TrainingArgs;
use rlhf::train::schedule::LrSchedulerType;

pub fn train_args(out: &Path) -> TrainingArgs {
    TrainingArgs {
        output_dir: Some(out.to_path_buf()),
        learning_rate: Some(3e-3),
        num_train_epochs: Some(1.0),
        max_steps: 12,
        per_device_train_batch_size: 4,
        per_device_eval_batch_size: 8,
        gradient_accumulation_steps: 1,
        max_grad_norm: 1.0,
        warmup_steps: 2,
        warmup_ratio: 0.0,
        lr_scheduler_type: Some(LrSchedulerType::Cosine),
        weight_decay: 0.01,
        adam_beta1: 0.9,
        adam_beta2: 0.95,
        adam_epsilon: 1e-8,
        seed: 7,
        save_steps: 4,
        save_total_limit: None,
        logging_steps: 2,
        eval_steps: None,
        resume: false,
        overwrite_output_dir: false,
        stop_after_steps: None,
        max_nonfinite_steps: 10,
    }
}

fn corpus(dir: &Path) -> std::path::PathBuf {
    let names = ["Alice", "Bob", "Carol", "Dan"];
    let things = ["apples", "books", "cats", "cups"];
    let mut docs = vec![];
    for i in 0..120usize {
        let (a, b, t) = (names[i % 4], names[(i / 4) % 4], things[(i / 3) % 4]);
        let (x, y) = (i % 7 + 1, (i * 3) % 5 + 1);
        docs.push(format!(
            "{a} has {x} {t}. {b} has {y} {t}. Together they have {} {t}.",
            x + y
        ));
    }
    let p = dir.join("corpus.txt");
    std::fs::write(&p, docs.join("\n\n")).unwrap();
    p
}

pub fn pretrain_args(data: &Path, out: &Path) -> PretrainArgs {
    PretrainArgs {
        dataset: Some(data.to_path_buf()),
        eval_dataset: None,
        eval_split: 0.1,
        model_name_or_path: None,
        arch: rlhf::model::Arch::Gpt2,
        preset: "nano".into(),
        tokenizer: None,
        vocab_size: 300,
        block_size: Some(32),
        config: None,
        train: train_args(out),
    }
}

/// Two weight lists hold the same parameters in the same order (so that zipping
/// them compares each with itself, and none is left out).
fn assert_same_names(a: &[(String, Vec<u32>)], b: &[(String, Vec<u32>)]) {
    let names =
        |w: &[(String, Vec<u32>)]| -> Vec<String> { w.iter().map(|(n, _)| n.clone()).collect() };
    assert_eq!(names(a), names(b));
    assert!(!a.is_empty(), "no parameters read");
}

fn metrics(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn train_losses(dir: &Path) -> Vec<f64> {
    metrics(dir)
        .iter()
        .filter_map(|m| m["train/loss"].as_f64())
        .collect()
}

#[test]
fn pretrain_changes_every_parameter_and_lowers_the_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    let out = tmp.path().join("pt");
    // The starting point: the same config at step 0.
    let mut a0 = pretrain_args(&data, &tmp.path().join("pt0"));
    a0.train.max_steps = 1;
    a0.train.learning_rate = Some(1e-12);
    pretrain::run(&a0).unwrap();
    let before = common::lm_weight_bits(&tmp.path().join("pt0"));
    let mut args = pretrain_args(&data, &out);
    args.train.max_steps = 30;
    let summary = pretrain::run(&args).unwrap();
    let after = common::lm_weight_bits(&out);
    assert_same_names(&before, &after);
    for ((name, b), (_, a)) in before.iter().zip(&after) {
        assert_ne!(a, b, "{name} did not change");
    }
    let losses = train_losses(&out);
    assert!(
        losses.last().unwrap() < &(losses[0] - 0.5),
        "loss did not fall: {losses:?}"
    );
    assert!(summary.eval.contains_key("perplexity"));
    // The folder is a complete HF model that generates.
    let pre = load_pretrained(&out, &Device::Cpu).unwrap();
    assert!(pre.tokenizer.chat_template().is_some());
}

#[test]
fn resume_after_stop_is_bit_identical_even_past_a_torn_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    let full = tmp.path().join("full");
    pretrain::run(&pretrain_args(&data, &full)).unwrap();

    // Stop at step 9 (checkpoints at 4, 8 and 9), tear 9, resume: falls back to 8.
    let parts = tmp.path().join("parts");
    let mut a = pretrain_args(&data, &parts);
    a.train.stop_after_steps = Some(9);
    pretrain::run(&a).unwrap();
    assert!(parts.join("checkpoint-9").exists());
    std::fs::write(parts.join("checkpoint-9/model.safetensors"), b"torn write").unwrap();
    a.train.stop_after_steps = None;
    let summary = pretrain::run(&a).unwrap();
    assert_eq!(summary.resumed_from, Some(8));
    assert_eq!(
        common::lm_weight_bits(&full),
        common::lm_weight_bits(&parts),
        "resumed weights differ from the uninterrupted run"
    );
}

#[test]
fn same_seed_same_weights_and_save_total_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let mut args = pretrain_args(&data, &a);
    args.train.save_total_limit = Some(1);
    pretrain::run(&args).unwrap();
    pretrain::run(&pretrain_args(&data, &b)).unwrap();
    assert_eq!(common::lm_weight_bits(&a), common::lm_weight_bits(&b));
    let ckpts: Vec<String> = std::fs::read_dir(&a)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    assert_eq!(ckpts, ["checkpoint-12"]);
}

fn sft_data(dir: &Path) -> std::path::PathBuf {
    let mut lines = vec![];
    for i in 0..40usize {
        let (x, y) = (i % 5 + 1, i % 3 + 2);
        let row = match i % 3 {
            0 => {
                json!({"prompt": format!("What is {x} plus {y}?"), "completion": format!(" {} .", x + y)})
            }
            1 => json!({"messages": [
                {"role": "user", "content": format!("Add {x} and {y}.")},
                {"role": "assistant", "content": format!("{}", x + y)}]}),
            _ => json!({"prompt": [{"role": "user", "content": format!("{x} + {y}?")}],
                        "completion": [{"role": "assistant", "content": format!("{}", x + y)}]}),
        };
        lines.push(row.to_string());
    }
    let p = dir.join("sft.jsonl");
    std::fs::write(&p, lines.join("\n")).unwrap();
    p
}

pub fn sft_args(model: &Path, data: &Path, out: &Path) -> SftArgs {
    SftArgs {
        model_name_or_path: Some(model.to_path_buf()),
        dataset: Some(data.to_path_buf()),
        eval_dataset: None,
        eval_split: 0.2,
        max_length: 64,
        packing: false,
        on_overflow: rlhf::data::sft::Overflow::Error,
        skip_invalid: false,
        split_special_tokens: false,
        config: None,
        lora: Default::default(),
        train: train_args(out),
    }
}

#[test]
fn sft_changes_every_parameter_and_lowers_the_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let data = sft_data(tmp.path());
    let model = common::fixture("qwen2");
    for packing in [false, true] {
        let out = tmp.path().join(format!("sft-{packing}"));
        let mut args = sft_args(&model, &data, &out);
        args.packing = packing;
        args.train.max_steps = 25;
        sft::run(&args).unwrap();
        let before = common::lm_weight_bits(&model);
        let after = common::lm_weight_bits(&out);
        assert_same_names(&before, &after);
        for ((name, b), (_, a)) in before.iter().zip(&after) {
            assert_ne!(a, b, "{name} did not change (packing {packing})");
        }
        let losses = train_losses(&out);
        assert!(
            losses.last().unwrap() < &(losses[0] * 0.7),
            "packing {packing}: {losses:?}"
        );
    }
}

#[test]
fn gradient_accumulation_equals_a_bigger_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let data = sft_data(tmp.path());
    let model = common::fixture("qwen2");
    let run = |name: &str, batch: usize, accum: usize| {
        let out = tmp.path().join(name);
        let mut args = sft_args(&model, &data, &out);
        args.eval_split = 0.0;
        args.train.per_device_train_batch_size = batch;
        args.train.gradient_accumulation_steps = accum;
        args.train.max_steps = 3;
        args.train.save_steps = 0;
        args.train.learning_rate = Some(1e-3);
        sft::run(&args).unwrap();
        load_pretrained(&out, &Device::Cpu).unwrap()
    };
    let big = run("big", 8, 1);
    let acc = run("acc", 2, 4);
    let (vb, va) = (big.model.params.vars(), acc.model.params.vars());
    assert_eq!(vb.len(), va.len());
    for ((spec, a), (_, b)) in vb.iter().zip(va) {
        let d: f32 = (a.as_tensor() - b.as_tensor())
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(d < 1e-5, "{}: {d}", spec.name);
    }
}

/// Reads every TFRecord of an event file, checking both CRCs of each.
fn read_tfrecords(path: &Path) -> Vec<Vec<u8>> {
    let bytes = std::fs::read(path).unwrap();
    let mask = |c: u32| c.rotate_right(15).wrapping_add(0xa282_ead8);
    let mut out = vec![];
    let mut i = 0;
    while i < bytes.len() {
        let len_bytes = &bytes[i..i + 8];
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
        let len_crc = u32::from_le_bytes(bytes[i + 8..i + 12].try_into().unwrap());
        assert_eq!(len_crc, mask(crc32c::crc32c(len_bytes)), "length CRC");
        let data = &bytes[i + 12..i + 12 + len];
        let data_crc = u32::from_le_bytes(bytes[i + 12 + len..i + 16 + len].try_into().unwrap());
        assert_eq!(data_crc, mask(crc32c::crc32c(data)), "data CRC");
        out.push(data.to_vec());
        i += 16 + len;
    }
    out
}

#[test]
fn tensorboard_events_are_valid_records_with_trl_names() {
    let tmp = tempfile::tempdir().unwrap();
    let data = corpus(tmp.path());
    let out = tmp.path().join("tb");
    pretrain::run(&pretrain_args(&data, &out)).unwrap();
    let runs: Vec<_> = std::fs::read_dir(out.join("runs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(runs.len(), 1);
    let records = read_tfrecords(&runs[0]);
    assert!(records[0].windows(13).any(|w| w == b"brain.Event:2"));
    let tags = [
        "train/loss",
        "train/learning_rate",
        "train/grad_norm",
        "eval/loss",
    ];
    for tag in tags {
        assert!(
            records
                .iter()
                .any(|r| r.windows(tag.len()).any(|w| w == tag.as_bytes())),
            "no {tag}"
        );
    }
    // One scalar event per logging step (every 2 of 12) plus eval, and the header.
    assert!(records.len() >= 8, "{} records", records.len());
}

#[test]
fn pretrain_bad_input_names_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    let cases: Vec<(&str, &[u8], &str)> = vec![
        (
            "a.jsonl",
            b"{\"text\": \"ok\"}\n{\"txt\": \"x\"}\n",
            "a.jsonl:2: field \"text\" is missing",
        ),
        (
            "b.jsonl",
            b"{\"text\": 3}\n",
            "b.jsonl:1: field \"text\" must be a string",
        ),
        ("c.txt", b"\n\n  \n", "c.txt: no text in this file"),
        ("d.txt", b"tiny", "shorter than one block"),
        ("e.txt", b"ok \xfe\xff", "e.txt:1: invalid UTF-8"),
    ];
    for (name, body, want) in cases {
        let p = tmp.path().join(name);
        std::fs::write(&p, body).unwrap();
        let err = pretrain::run(&pretrain_args(&p, &out))
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "{name}: {err}");
    }
    let data = corpus(tmp.path());
    let mut a = pretrain_args(&data, &out);
    a.block_size = Some(1000);
    let err = pretrain::run(&a).unwrap_err().to_string();
    assert!(err.contains("block_size must be in [2, 128]"), "{err}");
    a.block_size = Some(32);
    a.preset = "giant".into();
    assert!(pretrain::run(&a)
        .unwrap_err()
        .to_string()
        .contains("unknown preset \"giant\""));
}
