//! Bad input gives a clear error naming the file, tensor or value, and the binary
//! exits with code 2 (never a panic).

mod common;

use candle_core::Device;
use serde_json::Value;
use std::path::Path;

use common::{copy_fixture, fixture, rlhf_bin};
use rlhf::model::hf::{load_causal_lm, load_pretrained};

fn edit_json(path: &Path, f: impl FnOnce(&mut Value)) {
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, serde_json::to_string(&v).unwrap()).unwrap();
}

fn load_err(dir: &Path) -> String {
    load_pretrained(dir, &Device::Cpu).unwrap_err().to_string()
}

#[test]
fn missing_model_folder_and_missing_config() {
    let err = load_err(Path::new("/nonexistent/model"));
    assert!(
        err.contains("/nonexistent/model") && err.contains("not found"),
        "{err}"
    );
    let dir = copy_fixture("gpt2");
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("config.json"), "{err}");
}

#[test]
fn malformed_config_names_file_and_line() {
    let dir = copy_fixture("gpt2");
    std::fs::write(
        dir.path().join("config.json"),
        "{\n  \"model_type\": \"gpt2\",\n  oops\n}",
    )
    .unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("config.json:3"), "{err}");
}

#[test]
fn unknown_model_type() {
    let dir = copy_fixture("gpt2");
    edit_json(&dir.path().join("config.json"), |v| {
        v["model_type"] = "mamba".into()
    });
    let err = load_err(dir.path());
    assert!(
        err.contains("model_type \"mamba\" is not supported"),
        "{err}"
    );
}

#[test]
fn missing_tensor_is_named() {
    let dir = copy_fixture("gpt2");
    // Declare one more layer than the file holds.
    edit_json(&dir.path().join("config.json"), |v| v["n_layer"] = 3.into());
    let err = load_causal_lm(dir.path(), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("transformer.h.2.ln_1.weight") && err.contains("missing"),
        "{err}"
    );
}

#[test]
fn wrong_shape_names_tensor_and_both_shapes() {
    let dir = copy_fixture("llama");
    edit_json(&dir.path().join("config.json"), |v| {
        v["intermediate_size"] = 48.into()
    });
    let err = load_causal_lm(dir.path(), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.layers.0.mlp.gate_proj.weight")
            && err.contains("[64, 32]")
            && err.contains("[48, 32]"),
        "{err}"
    );
}

#[test]
fn missing_shard_is_named() {
    let dir = copy_fixture("llama");
    std::fs::remove_file(dir.path().join("model-00002-of-00004.safetensors")).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("model-00002-of-00004.safetensors"), "{err}");
}

#[test]
fn corrupt_safetensors_is_reported() {
    let dir = copy_fixture("gpt2");
    std::fs::write(
        dir.path().join("model.safetensors"),
        b"not a safetensors file",
    )
    .unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("model.safetensors") && err.contains("not a valid safetensors"),
        "{err}"
    );
}

#[test]
fn tokenizer_larger_than_embedding() {
    let dir = copy_fixture("gpt2");
    // Shrink the declared vocabulary and the embedding with it: the tokenizer (400
    // tokens) no longer fits.
    let st = dir.path().join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&st, &Device::Cpu).unwrap();
    let wte = tensors["transformer.wte.weight"].narrow(0, 0, 300).unwrap();
    tensors.insert("transformer.wte.weight".into(), wte);
    candle_core::safetensors::save(&tensors, &st).unwrap();
    edit_json(&dir.path().join("config.json"), |v| {
        v["vocab_size"] = 300.into()
    });
    let err = load_err(dir.path());
    assert!(
        err.contains("tokenizer has 400 tokens") && err.contains("only 300 rows"),
        "{err}"
    );
}

#[test]
fn cli_prompt_longer_than_context_exits_2() {
    let long = "the cat sat on the mat ".repeat(40);
    let out = rlhf_bin()
        .args(["generate", "--model"])
        .arg(fixture("gpt2"))
        .args(["--prompt", &long, "--max_new_tokens", "8"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("max_new_tokens is 8") && err.contains("context is 64 tokens"),
        "{err}"
    );
}

#[test]
fn cli_bad_prompts_file_names_line_and_field() {
    // An over-long prompt in a file is reported with its line.
    let dir0 = tempfile::tempdir().unwrap();
    let long_path = dir0.path().join("long.jsonl");
    let long = "the cat sat on the mat ".repeat(40);
    std::fs::write(
        &long_path,
        format!("{{\"prompt\": \"hi\"}}\n{{\"prompt\": \"{long}\"}}\n"),
    )
    .unwrap();
    let out = rlhf_bin()
        .args(["generate", "--model"])
        .arg(fixture("gpt2"))
        .arg("--prompts")
        .arg(&long_path)
        .args(["--max_new_tokens", "8"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("long.jsonl:2") && err.contains("context is 64 tokens"),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.jsonl");
    std::fs::write(&path, "{\"prompt\": \"ok\"}\n{\"text\": \"no prompt\"}\n").unwrap();
    let out = rlhf_bin()
        .args(["generate", "--model"])
        .arg(fixture("gpt2"))
        .arg("--prompts")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("p.jsonl:2") && err.contains("\"prompt\""),
        "{err}"
    );

    std::fs::write(
        &path,
        "{\"prompt\": \"ok\"}\n{\"prompt\": \"unterminated}\n",
    )
    .unwrap();
    let out = rlhf_bin()
        .args(["generate", "--model"])
        .arg(fixture("gpt2"))
        .arg("--prompts")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("p.jsonl:2") && err.contains("malformed JSON"),
        "{err}"
    );
}

#[test]
fn cli_template_error_and_missing_model_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let msgs = dir.path().join("m.json");
    std::fs::write(&msgs, r#"[{"role": "user", "content": "hi"}]"#).unwrap();
    let out = rlhf_bin()
        .args(["template", "--model"])
        .arg(fixture("gpt2"))
        .arg("--messages")
        .arg(&msgs)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no chat template"));

    let out = rlhf_bin()
        .args(["generate", "--model", "/no/such/dir", "--prompt", "x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("loading model from /no/such/dir"), "{err}");
}

/// Runs `rlhf ARGS`; returns the exit code and stderr.
fn rlhf(args: &[&str]) -> (Option<i32>, String) {
    let out = rlhf_bin().args(args).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

// Issue 16: `--max_grad_norm inf` panicked in the settings' JSON round trip ("args
// round-trip: invalid type: null", exit 101), and `--learning_rate nan` (an optional
// setting) silently became the default.
#[test]
fn non_finite_float_flags_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let out = out.to_str().unwrap();
    let flags = [
        ("sft", "max_grad_norm"),
        ("sft", "weight_decay"),
        ("sft", "warmup_ratio"),
        ("sft", "adam_beta1"),
        ("sft", "adam_epsilon"),
        ("sft", "eval_split"),
        ("sft", "learning_rate"),
        ("sft", "num_train_epochs"),
        ("ppo", "gamma"),
        ("ppo", "temperature"),
        ("ppo", "kl_coef"),
        ("ppo", "cliprange"),
        ("ppo", "adaptive_kl_target"),
    ];
    for (cmd, flag) in flags {
        for value in ["inf", "nan", "=-inf"] {
            let (arg, value) = match value.strip_prefix('=') {
                Some(v) => (format!("--{flag}={v}"), None),
                None => (format!("--{flag}"), Some(value)),
            };
            let mut args = vec![cmd, "--output_dir", out, &arg];
            args.extend(value);
            let (code, err) = rlhf(&args);
            assert_eq!(code, Some(2), "{args:?}: {err}");
            assert!(
                err.contains(&format!("--{flag}")) && err.contains("finite"),
                "{args:?}: {err}"
            );
        }
    }
    assert!(!tmp.path().join("out").exists());
}

// Issue 16: inf/nan in a config file became JSON null: "invalid type: null, expected
// f64", without the key.
#[test]
fn non_finite_floats_in_config_files_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    for (name, body, want) in [
        (
            "c.toml",
            "max_grad_norm = inf\n",
            "c.toml: max_grad_norm must be a finite number, got inf",
        ),
        (
            "c.yaml",
            "adam_beta1: .nan\n",
            "c.yaml: adam_beta1 must be a finite number, got NaN",
        ),
    ] {
        let cfg = tmp.path().join(name);
        std::fs::write(&cfg, body).unwrap();
        let (code, err) = rlhf(&[
            "sft",
            "--output_dir",
            out.to_str().unwrap(),
            "--config",
            cfg.to_str().unwrap(),
        ]);
        assert_eq!(code, Some(2), "{err}");
        assert!(err.contains(want), "{err}");
    }
}

// Issue 16: out-of-range values were accepted (negative weight_decay, max_grad_norm,
// kl_coef, cliprange; --ema 2; --gamma 5; --ptx_batch_size 0; --num_iterations 0
// printed "0 iterations" and ran 1), and `--flag -1` was refused by the parser
// ("unexpected argument '-1'") while `--flag=-1` went through.
#[test]
fn out_of_range_settings_name_the_flag_and_the_range() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let out = out.to_str().unwrap();
    let cases: [(&[&str], &str); 13] = [
        (
            &["sft", "--weight_decay", "-1"],
            "--weight_decay must be ≥ 0, got -1",
        ),
        (
            &["sft", "--max_grad_norm", "-0.5"],
            "--max_grad_norm must be ≥ 0, got -0.5",
        ),
        (
            &["sft", "--per_device_eval_batch_size", "0"],
            "--per_device_eval_batch_size must be ≥ 1, got 0",
        ),
        (
            &["sft", "--adam_beta2", "1"],
            "--adam_beta2 must be in [0, 1), got 1",
        ),
        (&["ppo", "--kl_coef", "-1"], "--kl_coef must be ≥ 0, got -1"),
        (
            &["ppo", "--cliprange=-0.2"],
            "--cliprange must be ≥ 0, got -0.2",
        ),
        (&["ppo", "--ema", "2"], "--ema must be in [0, 1), got 2"),
        (&["ppo", "--gamma", "5"], "--gamma must be in [0, 1], got 5"),
        (
            &["ppo", "--ptx_batch_size", "0"],
            "--ptx_batch_size must be ≥ 1, got 0",
        ),
        (
            &["ppo", "--num_iterations", "0"],
            "--num_iterations must be ≥ 1, got 0",
        ),
        (
            &["ppo", "--max_new_tokens", "0"],
            "--max_new_tokens must be ≥ 1, got 0",
        ),
        (
            &["rm", "train", "--eval_split", "1.5"],
            "--eval_split must be in [0, 1), got 1.5",
        ),
        (
            &["pretrain", "--block_size", "1"],
            "--block_size must be ≥ 2, got 1",
        ),
    ];
    for (args, want) in cases {
        let mut argv = args.to_vec();
        argv.extend(["--output_dir", out]);
        let (code, err) = rlhf(&argv);
        assert_eq!(code, Some(2), "{argv:?}: {err}");
        assert!(err.contains(want), "{argv:?}: {err}");
    }
    // Commands without an output folder check their flags before loading the model.
    for (args, want) in [
        (
            vec![
                "generate", "--model", "/no/such", "--prompt", "x", "--top_p", "0",
            ],
            "--top_p must be in (0, 1], got 0",
        ),
        (
            vec![
                "rm",
                "eval",
                "--model",
                "/no/such",
                "--data",
                "x",
                "--batch_size",
                "0",
            ],
            "--batch_size must be ≥ 1, got 0",
        ),
    ] {
        let (code, err) = rlhf(&args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
    // A value out of range in a config file names the file and the key; the same key
    // given as a flag wins over the file and is named as the flag.
    let cfg = tmp.path().join("c.toml");
    std::fs::write(&cfg, "weight_decay = -2\n").unwrap();
    let with_config = |extra: &[&str]| {
        let mut argv = vec![
            "sft",
            "--output_dir",
            out,
            "--config",
            cfg.to_str().unwrap(),
        ];
        argv.extend(extra);
        rlhf(&argv)
    };
    let (code, err) = with_config(&[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("c.toml: weight_decay must be ≥ 0, got -2"),
        "{err}"
    );
    let (_, err) = with_config(&["--weight_decay", "-3"]);
    assert!(err.contains("--weight_decay must be ≥ 0, got -3"), "{err}");
    assert!(!tmp.path().join("out").exists(), "nothing was written");
}

// Issue 16: `--per_device_eval_batch_size 0` with eval data panicked in lm_task.rs
// ("chunk size must be non-zero") after training, and no final model was written.
#[test]
fn zero_eval_batch_size_fails_before_training() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("sft.jsonl");
    let rows: Vec<String> = (0..4)
        .map(|i| format!("{{\"prompt\": \"The cat {i}\", \"completion\": \" sat.\"}}"))
        .collect();
    std::fs::write(&data, rows.join("\n")).unwrap();
    let out = tmp.path().join("out");
    let model = fixture("gpt2");
    let (code, err) = rlhf(&[
        "sft",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--output_dir",
        out.to_str().unwrap(),
        "--eval_split",
        "0.5",
        "--max_steps",
        "1",
        "--per_device_eval_batch_size",
        "0",
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--per_device_eval_batch_size must be ≥ 1"),
        "{err}"
    );
    assert!(!out.exists(), "no training happened");
}

// Issue 16: a YAML type error said "invalid type: string "fast", expected f64" without
// the key's name.
#[test]
fn config_type_errors_name_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("c.yaml");
    std::fs::write(&cfg, "max_steps: 3\nlearning_rate: fast\n").unwrap();
    let out = tmp.path().join("out");
    let (code, err) = rlhf(&[
        "sft",
        "--output_dir",
        out.to_str().unwrap(),
        "--config",
        cfg.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("c.yaml: learning_rate: invalid type: string \"fast\", expected f64"),
        "{err}"
    );
}

// Issue 16: `ppo` created its output folder, then failed on an empty prompt with "prompt
// 0 is empty (0 tokens)": no file, no line, and a folder left behind.
#[test]
fn ppo_names_an_empty_prompt_before_creating_its_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let rm = common::reward_model_folder(tmp.path());
    let data = tmp.path().join("prompts.jsonl");
    std::fs::write(&data, "{\"prompt\": \"The cat\"}\n{\"prompt\": \"\"}\n").unwrap();
    let out = tmp.path().join("out");
    let model = fixture("qwen2");
    let (code, err) = rlhf(&[
        "ppo",
        "--model",
        model.to_str().unwrap(),
        "--reward_model",
        rm.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--output_dir",
        out.to_str().unwrap(),
        "--max_new_tokens",
        "4",
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("prompts.jsonl:2: the prompt is empty"),
        "{err}"
    );
    assert!(!out.exists(), "the output folder was created");
}
