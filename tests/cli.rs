//! The `rlhf` commands end to end on the shipped fixtures.

mod common;

use serde_json::Value;

use common::{fixture, rlhf_bin};

#[test]
fn generate_prints_only_the_completion_and_is_seeded() {
    let run = |seed: &str| {
        let out = rlhf_bin()
            .args(["generate", "--model"])
            .arg(fixture("qwen2"))
            .args([
                "--prompt",
                "The cat",
                "--max_new_tokens",
                "6",
                "--seed",
                seed,
                "--top_k",
                "50",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let a = run("1");
    assert_eq!(a, run("1"));
    assert!(!a.contains("The cat"), "the prompt is not echoed: {a:?}");
}

#[test]
fn generate_prompts_file_writes_jsonl_with_logprobs() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("p.jsonl");
    std::fs::write(
        &prompts,
        "{\"prompt\": \"The cat sat on\", \"id\": 1}\n\n{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n{\"prompt\": [{\"role\": \"user\", \"content\": \"yo\"}]}\n",
    )
    .unwrap();
    let out_path = dir.path().join("out.jsonl");
    let out = rlhf_bin()
        .args(["generate", "--model"])
        .arg(fixture("qwen2"))
        .arg("--prompts")
        .arg(&prompts)
        .arg("--output")
        .arg(&out_path)
        .args([
            "--temperature",
            "0",
            "--max_new_tokens",
            "5",
            "--batch_size",
            "2",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&out_path).unwrap();
    let rows: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0]["id"], 1, "input fields are kept");
    for r in &rows {
        let n = r["token_ids"].as_array().unwrap().len();
        assert!((1..=5).contains(&n));
        assert_eq!(r["logprobs"].as_array().unwrap().len(), n);
        assert!(["eos", "length", "stop"].contains(&r["finish_reason"].as_str().unwrap()));
        assert!(r["completion"].is_string());
    }
    // Conversational prompts went through the chat template (ChatML markers); the
    // plain one did not.
    let pre = common::load_fixture("qwen2");
    let im_start = pre.tokenizer.token_to_id("<|im_start|>").unwrap();
    let ids =
        |r: &Value| serde_json::from_value::<Vec<u32>>(r["prompt_token_ids"].clone()).unwrap();
    assert!(ids(&rows[1]).contains(&im_start) && ids(&rows[2]).contains(&im_start));
    assert!(!ids(&rows[0]).contains(&im_start));
}

#[test]
fn template_prints_rendered_chat() {
    let dir = tempfile::tempdir().unwrap();
    let msgs = dir.path().join("m.json");
    std::fs::write(
        &msgs,
        r#"{"messages": [{"role": "user", "content": "Hello"}]}"#,
    )
    .unwrap();
    let out = rlhf_bin()
        .args(["template", "--model"])
        .arg(fixture("qwen2"))
        .arg("--messages")
        .arg(&msgs)
        .arg("--add_generation_prompt")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn init_writes_a_loadable_folder_for_each_arch() {
    for arch in ["gpt2", "llama", "qwen2"] {
        let dir = tempfile::tempdir().unwrap();
        let out_dir = dir.path().join("m");
        let out = rlhf_bin()
            .args([
                "init",
                "--arch",
                arch,
                "--preset",
                "nano",
                "--chat_template",
                "chatml",
                "--tokenizer",
            ])
            .arg(common::fixtures().join("tokenizer.json"))
            .arg("--output_dir")
            .arg(&out_dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pre = rlhf::model::hf::load_pretrained(&out_dir, &candle_core::Device::Cpu).unwrap();
        assert_eq!(pre.model.config.vocab_size(), 400);
        assert_eq!(pre.eos_token_ids, vec![0], "<|endoftext|> is the eos");
        assert!(pre.tokenizer.chat_template().is_some());
        let config: Value =
            serde_json::from_str(&std::fs::read_to_string(out_dir.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(config["model_type"], arch);
    }
    let out = rlhf_bin()
        .args([
            "init",
            "--arch",
            "gpt2",
            "--preset",
            "huge",
            "--output_dir",
            "/tmp/x",
            "--tokenizer",
        ])
        .arg(common::fixtures().join("tokenizer.json"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown preset \"huge\""));
}
