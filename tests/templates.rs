//! Chat templates render exactly the text transformers renders (reference strings
//! written by tools/make_fixtures.py with transformers' apply_chat_template).

mod common;

use serde_json::Value;
use std::collections::BTreeMap;

use rlhf::data::chat_template::ChatTemplate;

#[test]
fn templates_render_as_transformers_does() {
    let text = std::fs::read_to_string(common::fixture("templates.json")).unwrap();
    let cases: Vec<Value> = serde_json::from_str(&text).unwrap();
    let mut names = std::collections::BTreeSet::new();
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        names.insert(name);
        let t = ChatTemplate::new(case["template"].as_str().unwrap()).unwrap();
        let special = BTreeMap::from([
            (
                "bos_token".to_string(),
                case["bos_token"].as_str().unwrap().to_string(),
            ),
            (
                "eos_token".to_string(),
                case["eos_token"].as_str().unwrap().to_string(),
            ),
        ]);
        let gen = case["add_generation_prompt"].as_bool().unwrap();
        let got = t.render(&case["messages"], gen, &special);
        match (case["expected"].as_str(), case["error"].as_str()) {
            (Some(expected), _) => assert_eq!(got.unwrap(), expected, "template {name}, gen={gen}"),
            (None, Some(err)) => {
                let msg = got.unwrap_err().to_string();
                assert!(msg.contains(err), "template {name}: {msg:?} lacks {err:?}");
            }
            _ => panic!("case without expectation"),
        }
    }
    for required in ["chatml", "llama3", "zephyr"] {
        assert!(names.contains(required), "missing {required}");
    }
}

#[test]
fn model_folders_read_their_chat_template() {
    // llama: chat_template.jinja; qwen2: also a .jinja file written by transformers 5;
    // gpt2: none at all.
    let msgs = serde_json::json!([{"role": "user", "content": "hi"}]);
    let llama = common::load_fixture("llama").tokenizer;
    let out = llama.apply_chat_template(&msgs, true).unwrap();
    assert_eq!(
        out,
        "<|endoftext|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    );
    let gpt2 = common::load_fixture("gpt2").tokenizer;
    let err = gpt2
        .apply_chat_template(&msgs, true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no chat template"), "{err}");
}
