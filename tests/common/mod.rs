//! Helpers shared by the integration tests: fixture paths and small model folders.
#![allow(dead_code)]

use candle_core::Device;
use std::path::{Path, PathBuf};

use rlhf::model::hf::{load_pretrained, Pretrained};

pub const FAMILIES: [&str; 3] = ["gpt2", "llama", "qwen2"];

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
}

pub fn fixture(name: &str) -> PathBuf {
    fixtures().join(name)
}

/// A fixture's reference.json: transformers' logits, greedy continuations, rewards.
pub fn reference(name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(fixture(name).join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A JSON array of token ids.
pub fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// The largest |a − b| over two outputs of the same shape (an output of another
/// shape, an empty one included, fails).
pub fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len(), "rows");
    assert!(!a.is_empty(), "empty output");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert_eq!(x.len(), y.len(), "row {i} lengths");
    }
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Greedy decoding from `pre` (the fixture `name`, on any device) gives
/// transformers' continuations and their log-probs (1e-4) from reference.json.
pub fn assert_greedy_matches_reference(name: &str, pre: &Pretrained) {
    use rand::SeedableRng;
    use rlhf::generate::{generate, SamplingParams};
    for case in reference(name)["greedy"].as_array().unwrap() {
        let prompt = ids_of(&case["prompt_ids"]);
        let params = SamplingParams {
            max_new_tokens: 20,
            temperature: 0.0,
            eos_token_ids: pre.eos_token_ids.clone(),
            ..Default::default()
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let out = generate(&pre.model, &pre.tokenizer, &[prompt], &params, &mut rng).unwrap();
        assert_eq!(out[0].tokens, ids_of(&case["tokens"]), "{name}");
        let ref_lp: Vec<f32> = serde_json::from_value(case["logprobs"].clone()).unwrap();
        assert_eq!(out[0].logprobs.len(), ref_lp.len(), "{name}: logprobs");
        for (a, b) in out[0].logprobs.iter().zip(&ref_lp) {
            assert!((a - b).abs() <= 1e-4, "{name}: logprob {a} vs {b}");
        }
    }
}

pub fn load_fixture(name: &str) -> Pretrained {
    load_pretrained(&fixture(name), &Device::Cpu).unwrap()
}

/// Copies a fixture folder (without reference.json) into a temp dir for mutation.
pub fn copy_fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

/// The rlhf binary built by cargo for this test run.
pub fn rlhf_bin() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_rlhf"))
}

/// A reward-model folder under `dir`: the qwen2 fixture with a fresh scalar head
/// (what `rlhf rm eval` and `rlhf ppo --reward_model` read), without training one.
pub fn reward_model_folder(dir: &Path) -> PathBuf {
    use rlhf::model::scalar::{load_scalar, save_scalar};
    let rm = dir.join("rm");
    save_scalar(
        &load_scalar(&fixture("qwen2"), &Device::Cpu, 0).unwrap(),
        &rm,
    )
    .unwrap();
    rm
}

/// `rlhf rm score --model MODEL --data DATA`: its output rows (asserting success).
pub fn rm_score(model: &Path, data: &Path) -> Vec<serde_json::Value> {
    let s = rlhf_bin()
        .args(["rm", "score", "--model"])
        .arg(model)
        .arg("--data")
        .arg(data)
        .output()
        .unwrap();
    assert!(s.status.success(), "{}", String::from_utf8_lossy(&s.stderr));
    String::from_utf8(s.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

pub const WORDS: [&str; 6] = ["cat", "dog", "sun", "tree", "cup", "box"];

/// A toy comparisons file: K responses per prompt ranked by how often they say "good" (ties allowed).
pub fn toy_rankings(dir: &Path, n: usize, seed: usize) -> PathBuf {
    let mut lines = vec![];
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed as u64);
    let mut next = || rng.random_range(0..1000usize);
    for i in 0..n {
        let k = 2 + i % 4; // K = 2..5
        let mut responses = vec![];
        let mut goods = vec![];
        for _ in 0..k {
            let g = next() % 4;
            let mut words: Vec<&str> = (0..4).map(|_| WORDS[next() % WORDS.len()]).collect();
            for _ in 0..g {
                let pos = next() % (words.len() + 1);
                words.insert(pos, "good");
            }
            responses.push(words.join(" "));
            goods.push(g);
        }
        if goods.iter().all(|&g| g == goods[0]) {
            goods[0] += 1;
            responses[0] = format!("good {}", responses[0]);
        }
        // rank = number of responses with strictly more "good"
        let ranking: Vec<usize> = goods
            .iter()
            .map(|g| goods.iter().filter(|h| *h > g).count())
            .collect();
        lines.push(serde_json::json!({"prompt": format!("Tell me about the {}.", WORDS[i % 6]), "responses": responses, "ranking": ranking}).to_string());
    }
    let p = dir.join(format!("rank{seed}.jsonl"));
    std::fs::write(&p, lines.join("\n")).unwrap();
    p
}

/// Every parameter of the causal LM in `dir`, by name, as f32 bit patterns (for
/// bit-for-bit comparisons: resume tests, "every parameter changed").
pub fn lm_weight_bits(dir: &Path) -> Vec<(String, Vec<u32>)> {
    let pre = load_pretrained(dir, &Device::Cpu).unwrap();
    pre.model
        .params
        .vars()
        .iter()
        .map(|(s, v)| {
            let bits = v
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            (s.name.clone(), bits.iter().map(|x| x.to_bits()).collect())
        })
        .collect()
}

pub mod browser;
pub mod server;
