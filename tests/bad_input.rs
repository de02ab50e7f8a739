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
