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

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Six prompt/completion rows for `rlhf sft`.
fn sft_rows(dir: &Path) -> std::path::PathBuf {
    let data = dir.join("sft.jsonl");
    let rows: Vec<String> = (0..6)
        .map(|i| format!("{{\"prompt\": \"q{i}\", \"completion\": \" a{i}\"}}"))
        .collect();
    std::fs::write(&data, rows.join("\n")).unwrap();
    data
}

fn sft_into(model: &Path, data: &Path, out: &Path, extra: &[&str]) -> (Option<i32>, String) {
    let mut args = vec![
        "sft",
        "--model",
        s(model),
        "--data",
        s(data),
        "--output_dir",
        s(out),
    ];
    args.extend(extra);
    if !extra.contains(&"--max_steps") {
        args.extend(["--max_steps", "1"]);
    }
    rlhf(&args)
}

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

// Issue 17: `sft --output_dir` on a folder holding a model overwrote it (no checkpoint
// to resume from, so the run started and replaced the weights); with
// --overwrite_output_dir, old shards stayed beside the new model.
#[test]
fn an_output_folder_holding_a_model_is_refused_unless_overwritten() {
    let tmp = tempfile::tempdir().unwrap();
    let data = sft_rows(tmp.path());
    let held = copy_fixture("llama");
    let before = listing(held.path());
    let (code, err) = sft_into(&fixture("gpt2"), &data, held.path(), &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("holds a model") && err.contains("--overwrite_output_dir"),
        "{err}"
    );
    assert_eq!(listing(held.path()), before, "nothing was touched");

    let (code, err) = sft_into(
        &fixture("gpt2"),
        &data,
        held.path(),
        &["--overwrite_output_dir"],
    );
    assert_eq!(code, Some(0), "{err}");
    let after = listing(held.path());
    assert!(
        !after.iter().any(|f| f.starts_with("model-0000")),
        "the old model's shards are gone: {after:?}"
    );
    assert!(!after.contains(&"chat_template.jinja".to_string()));
    load_pretrained(held.path(), &Device::Cpu).unwrap();

    // A rerun of the finished run resumes (as before), it is not refused.
    let (code, err) = sft_into(&fixture("gpt2"), &data, held.path(), &[]);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("resuming from"), "{err}");
}

// Issue 17: `--output_dir` equal to `--model` overwrote the input model while reading it.
#[test]
fn an_output_folder_that_is_an_input_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = sft_rows(tmp.path());
    let model = copy_fixture("gpt2");
    let same = model
        .path()
        .join("..")
        .join(model.path().file_name().unwrap());
    for extra in [&[][..], &["--overwrite_output_dir"][..]] {
        let (code, err) = sft_into(model.path(), &data, &same, extra);
        assert_eq!(code, Some(2), "{err}");
        assert!(err.contains("is the --model folder"), "{err}");
    }
    let rm = common::reward_model_folder(tmp.path());
    let prompts = tmp.path().join("p.jsonl");
    std::fs::write(&prompts, "{\"prompt\": \"The cat\"}\n").unwrap();
    let (code, err) = rlhf(&[
        "ppo",
        "--model",
        s(&fixture("qwen2")),
        "--reward_model",
        s(&rm),
        "--data",
        s(&prompts),
        "--output_dir",
        s(&rm),
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("is the --reward_model folder"), "{err}");
}

// Issue 17: `rlhf init` wrote over an existing model folder.
#[test]
fn init_refuses_an_existing_model_unless_overwritten() {
    let held = copy_fixture("llama");
    let tok = common::fixtures().join("tokenizer.json");
    let init = |extra: &[&str]| {
        let mut args = vec![
            "init",
            "--arch",
            "gpt2",
            "--preset",
            "nano",
            "--tokenizer",
            s(&tok),
            "--output_dir",
            s(held.path()),
        ];
        args.extend(extra);
        rlhf(&args)
    };
    let (code, err) = init(&[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("holds a model or a run"), "{err}");
    let (code, err) = init(&["--overwrite_output_dir"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(!held.path().join("model.safetensors.index.json").exists());
    let pre = load_pretrained(held.path(), &Device::Cpu).unwrap();
    assert_eq!(pre.model.config.arch.model_type(), "gpt2");
}

// Issue 17: a checkpoint torn by a full disk left `.tmp-checkpoint-N/` behind for good.
#[test]
fn leftover_temporary_folders_are_removed_on_the_next_start() {
    let tmp = tempfile::tempdir().unwrap();
    let data = sft_rows(tmp.path());
    let out = tmp.path().join("out");
    let (code, err) = sft_into(
        &fixture("gpt2"),
        &data,
        &out,
        &["--max_steps", "2", "--stop_after_steps", "1"],
    );
    assert_eq!(code, Some(0), "{err}");
    std::fs::create_dir_all(out.join(".tmp-checkpoint-7")).unwrap();
    std::fs::write(out.join(".tmp-checkpoint-7/model.safetensors"), "torn").unwrap();
    std::fs::write(out.join(".tmp-config.json"), "{").unwrap();
    let (code, err) = sft_into(&fixture("gpt2"), &data, &out, &["--max_steps", "2"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains(".tmp-checkpoint-7, left by an interrupted run"),
        "{err}"
    );
    assert!(
        !listing(&out).iter().any(|f| f.starts_with(".tmp-")),
        "{:?}",
        listing(&out)
    );
}

// Issue 17: `generate --model RM_DIR` sampled from a reward model's backbone with an
// LM head it does not have (or failed on a missing lm_head.weight); `rm score` on an
// SFT folder said only "no score.weight".
#[test]
fn a_model_of_the_wrong_kind_says_what_was_expected() {
    let tmp = tempfile::tempdir().unwrap();
    let rm = common::reward_model_folder(tmp.path());
    let (code, err) = rlhf(&["generate", "--model", s(&rm), "--prompt", "x"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("this is a reward model (score.weight")
            && err.contains("expected a causal LM (Qwen2ForCausalLM"),
        "{err}"
    );
    let rows = tmp.path().join("r.jsonl");
    std::fs::write(&rows, "{\"prompt\": \"a\", \"response\": \"b\"}\n").unwrap();
    let (code, err) = rlhf(&[
        "rm",
        "score",
        "--model",
        s(&fixture("qwen2")),
        "--data",
        s(&rows),
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("causal LM without a score head") && err.contains("expected a reward model"),
        "{err}"
    );
}

// Issue 17: an eos id outside the vocabulary was accepted (generation could never stop
// at it), and NaN weights loaded silently.
#[test]
fn eos_outside_the_vocabulary_is_refused_and_nan_weights_are_noted() {
    let dir = copy_fixture("qwen2");
    edit_json(&dir.path().join("generation_config.json"), |v| {
        v["eos_token_id"] = serde_json::json!([0, 5000])
    });
    let err = load_err(dir.path());
    assert!(
        err.contains("generation_config.json") && err.contains("eos_token_id 5000"),
        "{err}"
    );
    let dir = copy_fixture("qwen2");
    edit_json(&dir.path().join("config.json"), |v| {
        v["eos_token_id"] = (-1).into()
    });
    let err = load_err(dir.path());
    assert!(err.contains("config.json: eos_token_id -1"), "{err}");

    let dir = copy_fixture("gpt2");
    let st = dir.path().join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&st, &Device::Cpu).unwrap();
    let w = &tensors["transformer.ln_f.weight"];
    let nan = candle_core::Tensor::full(f32::NAN, w.dims(), &Device::Cpu).unwrap();
    tensors.insert("transformer.ln_f.weight".into(), nan);
    candle_core::safetensors::save(&tensors, &st).unwrap();
    let out = rlhf_bin()
        .args(["generate", "--model"])
        .arg(dir.path())
        .args(["--prompt", "x", "--max_new_tokens", "1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("warning:")
            && err.contains("\"transformer.ln_f.weight\" holds 32 non-finite values"),
        "{err}"
    );
}

// Issue 17: rows with chosen == rejected were trained on (a constant loss of log 2
// that diluted the others); a response repeated in a ranking contradicted itself.
#[test]
fn comparisons_between_identical_responses_are_dropped_and_counted() {
    use rlhf::data::rankings::{load_rankings, PairTokenizing};
    let rm = rlhf::model::scalar::load_scalar(&fixture("qwen2"), &Device::Cpu, 0).unwrap();
    let cfg = PairTokenizing {
        rule: rm.reward_input().unwrap(),
        max_length: 64,
    };
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("r.jsonl");
    std::fs::write(
        &p,
        [
            r#"{"prompt": "p", "chosen": "same", "rejected": "same"}"#,
            r#"{"prompt": "p", "chosen": "a", "rejected": "b"}"#,
            r#"{"prompt": "p", "responses": ["x", "y", "x"], "ranking": [0, 1, 2]}"#,
            r#"{"prompt": "p", "chosen": "", "rejected": "b"}"#,
        ]
        .join("\n"),
    )
    .unwrap();
    let (set, skipped) = load_rankings(&p, &cfg, false).unwrap();
    assert_eq!(skipped, 0);
    assert_eq!(set.len(), 3, "the chosen == rejected row is dropped");
    assert_eq!(set[1].pairs, [(0, 1), (1, 2)], "x vs x is dropped");
    assert_eq!(set[2].pairs, [(0, 1)], "an empty response is ranked");
}

// Issue 17: PPO divided every score by a stored reward std of 1e-6 (a reward model
// trained on degenerate pairs), turning tiny differences into rewards of millions.
#[test]
fn ppo_refuses_a_reward_model_whose_normalisation_would_blow_scores_up() {
    let tmp = tempfile::tempdir().unwrap();
    let rm = common::reward_model_folder(tmp.path());
    edit_json(
        &rm.join("config.json"),
        |v| v["rlhf"] = serde_json::json!({"reward_normalization": {"mean": 0.5, "std": 1e-6}}),
    );
    let prompts = tmp.path().join("p.jsonl");
    std::fs::write(&prompts, "{\"prompt\": \"The cat\"}\n").unwrap();
    let out = tmp.path().join("out");
    let (code, err) = rlhf(&[
        "ppo",
        "--model",
        s(&fixture("qwen2")),
        "--reward_model",
        s(&rm),
        "--data",
        s(&prompts),
        "--output_dir",
        s(&out),
        "--max_new_tokens",
        "4",
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("config.json: rlhf.reward_normalization")
            && err.contains("below 1e-3")
            && err.contains("multiplied by 1000000"),
        "{err}"
    );
    assert!(!out.exists());
}

// Issue 17: a reward model that gives every response the same reward (here: a zero
// head that barely moves) finished "successfully" and PPO then divided by its std.
#[test]
fn rm_train_with_degenerate_rewards_exits_2_and_explains() {
    let tmp = tempfile::tempdir().unwrap();
    let rm = common::reward_model_folder(tmp.path());
    let st = rm.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&st, &Device::Cpu).unwrap();
    let zero = tensors["score.weight"].zeros_like().unwrap();
    tensors.insert("score.weight".into(), zero);
    candle_core::safetensors::save(&tensors, &st).unwrap();
    let data = tmp.path().join("r.jsonl");
    std::fs::write(
        &data,
        "{\"prompt\": \"p\", \"chosen\": \"a\", \"rejected\": \"b\"}\n{\"prompt\": \"q\", \"chosen\": \"c\", \"rejected\": \"d\"}\n",
    )
    .unwrap();
    let out = tmp.path().join("out");
    let (code, err) = rlhf(&[
        "rm",
        "train",
        "--model",
        s(&rm),
        "--data",
        s(&data),
        "--output_dir",
        s(&out),
        "--max_steps",
        "1",
        "--learning_rate",
        "1e-30",
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("standard deviation of the training rewards")
            && err.contains("identical or near-identical chosen and rejected"),
        "{err}"
    );
    assert!(
        out.join("model.safetensors").exists(),
        "saved for inspection"
    );
}

fn generate_prompts(model: &Path, prompts: &Path, extra: &[&str]) -> (Option<i32>, String) {
    let mut args = vec![
        "generate",
        "--model",
        s(model),
        "--prompts",
        s(prompts),
        "--max_new_tokens",
        "2",
    ];
    args.extend(extra);
    rlhf(&args)
}

// Issue 17: an unknown role went to the template (dropped or rendered as a turn of its
// own); a prompt ending with the assistant's turn was sampled from; a template error
// said only what jinja said.
#[test]
fn conversations_name_unknown_roles_bad_endings_and_template_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("p.jsonl");
    let model = fixture("qwen2");
    std::fs::write(
        &p,
        "{\"prompt\": \"ok\"}\n{\"messages\": [{\"role\": \"admin\", \"content\": \"x\"}]}\n",
    )
    .unwrap();
    let (code, err) = generate_prompts(&model, &p, &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(
            "p.jsonl:2: field \"messages\": message 0 has role \"admin\"; expected one of system"
        ),
        "{err}"
    );
    std::fs::write(
        &p,
        "{\"prompt\": [{\"role\": \"user\", \"content\": \"x\"}, {\"role\": \"assistant\", \"content\": \"y\"}]}\n",
    )
    .unwrap();
    let (code, err) = generate_prompts(&model, &p, &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(
            "p.jsonl:1: field \"prompt\": the conversation ends with a \"assistant\" message"
        ),
        "{err}"
    );

    let dir = copy_fixture("qwen2");
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        "{% for m in messages %}{% if m.content == 'boom' %}{{ raise_exception('no booms') }}{% endif %}{{ m.content }}{% endfor %}",
    )
    .unwrap();
    std::fs::write(
        &p,
        "{\"prompt\": [{\"role\": \"user\", \"content\": \"fine\"}]}\n\n{\"prompt\": [{\"role\": \"user\", \"content\": \"boom\"}]}\n",
    )
    .unwrap();
    let (code, err) = generate_prompts(dir.path(), &p, &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("p.jsonl:3: chat template: ")
            && err.contains("chat_template.jinja: line 1: no booms"),
        "{err}"
    );
}

// Issue 17 asked whether an empty prompt's line counts from the batch: it counts from
// the start of the file (blank lines included), whatever the batch size.
#[test]
fn an_empty_prompt_is_named_by_its_line_in_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("p.jsonl");
    let mut lines: Vec<String> = (0..5)
        .map(|i| format!("{{\"prompt\": \"p{i}\"}}"))
        .collect();
    lines.push(String::new());
    lines.push("{\"prompt\": \"\"}".into());
    std::fs::write(&p, lines.join("\n")).unwrap();
    let (code, err) = generate_prompts(&fixture("gpt2"), &p, &["--batch_size", "2"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("p.jsonl:7: the prompt is empty"), "{err}");
}

// Issue 17: `generate --output OUT` truncated OUT when it started, so a run that failed
// left a half-written or empty file in place of the previous results.
#[test]
fn a_failed_generate_leaves_its_previous_output_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.jsonl");
    std::fs::write(&out, "previous\n").unwrap();
    let p = tmp.path().join("p.jsonl");
    std::fs::write(
        &p,
        "{\"prompt\": \"a\"}\n{\"prompt\": \"b\"}\n{\"prompt\": 3}\n",
    )
    .unwrap();
    let (code, err) = generate_prompts(&fixture("gpt2"), &p, &["--output", s(&out)]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("p.jsonl:3"), "{err}");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "previous\n");
    // A leftover temporary file of a killed run is replaced; success puts the file in
    // place and leaves no temporary file.
    std::fs::write(tmp.path().join(".tmp-out.jsonl"), "half a row").unwrap();
    std::fs::write(&p, "{\"prompt\": \"a\"}\n{\"prompt\": \"b\"}\n").unwrap();
    let (code, err) = generate_prompts(&fixture("gpt2"), &p, &["--output", s(&out)]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(std::fs::read_to_string(&out).unwrap().lines().count(), 2);
    assert_eq!(listing(tmp.path()), ["out.jsonl", "p.jsonl"]);
}

/// `--device`, `--bf16` and a launcher's rank variables, refused with exit code 2 and
/// a message that says what to do, where this build or CPU cannot honour them
/// (`--bf16 --device cpu` is accepted where the CPU has AMX-BF16 tiles).
#[test]
fn devices_and_launchers_this_build_cannot_serve_exit_2() {
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut cmd = rlhf_bin();
        cmd.args(args)
            .arg(fixture("gpt2"))
            .args(["--prompt", "hi", "--max_new_tokens", "1"]);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, err) = run(&["generate", "--device", "tpu", "--model"], &[]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("--device") && err.contains("cpu, cuda or cuda:N"),
        "{err}"
    );
    let (code, err) = run(&["generate", "--device", "cpu", "--bf16", "--model"], &[]);
    if rlhf::ops::amx::available() {
        // A CPU with AMX-BF16 tiles runs autocast (tests/bf16.rs checks its numbers).
        assert_eq!(code, Some(0), "{err}");
    } else {
        assert_eq!(code, Some(2));
        assert!(
            err.contains("--bf16") && err.contains("GPU") && err.contains("AMX-BF16"),
            "{err}"
        );
    }
    if !cfg!(feature = "cuda") {
        let (code, err) = run(&["generate", "--device", "cuda", "--model"], &[]);
        assert_eq!(code, Some(2));
        assert!(
            err.contains("built without CUDA") && err.contains("--features cuda"),
            "{err}"
        );
    }
    if !cfg!(feature = "mpi") {
        let (code, err) = run(
            &["generate", "--model"],
            &[("RANK", "0"), ("WORLD_SIZE", "2")],
        );
        assert_eq!(code, Some(2));
        assert!(
            err.contains("rank 0 of 2") && err.contains("--features mpi"),
            "{err}"
        );
    }
    // A world of one needs no engine.
    let (code, err) = run(
        &["generate", "--model"],
        &[("RANK", "0"), ("WORLD_SIZE", "1")],
    );
    assert_eq!(code, Some(0), "{err}");
}
