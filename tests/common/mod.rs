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

/// ‖a − b‖₂ of two flattened weight sets, summed in f64.
pub fn l2_distance(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum::<f64>()
        .sqrt()
}

/// What `sft_steps` returns: each step's loss, the first step's gradients, and every
/// parameter before and after (flattened, in `params.vars()` order, on the host).
pub struct SftSteps {
    pub losses: Vec<f32>,
    pub first_grads: Vec<f32>,
    pub start: Vec<f32>,
    pub end: Vec<f32>,
}

/// `steps` SFT steps (AdamW, lr 1e-3, clipping at 1) of the GPT-2 fixture on `dev`,
/// over four fixed 24-token rows with the first 8 tokens masked: the same run on two
/// devices or precisions, to compare.
pub fn sft_steps(dev: &Device, steps: usize) -> SftSteps {
    use rlhf::data::sft::SftExample;
    use rlhf::train::lm_task::{LmTask, Row};
    use rlhf::train::optimizer::{AdamW, AdamWConfig, GradAccumulator};
    let host = |t: &candle_core::Tensor| -> Vec<f32> {
        let t = t.to_device(&Device::Cpu).unwrap();
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    let pre = load_pretrained(&fixture("gpt2"), dev).unwrap();
    let rows: Vec<Row> = (0..4u32)
        .map(|r| {
            Row::single(SftExample {
                ids: (0..24).map(|i| (r * 31 + i * 7 + 3) % 300).collect(),
                loss_mask: (0..24).map(|i| u8::from(i >= 8)).collect(),
            })
        })
        .collect();
    let task = LmTask::new(pre, rows, vec![], 4, 4, 0);
    let params = &task.pre.model.params;
    let flat = || -> Vec<f32> {
        params
            .vars()
            .iter()
            .flat_map(|(_, v)| host(v.as_tensor()))
            .collect()
    };
    let start = flat();
    let cfg = AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
    };
    let mut opt = AdamW::new(params, cfg).unwrap();
    let mut acc = GradAccumulator::new(params).unwrap();
    let refs: Vec<&Row> = task.train_rows.iter().collect();
    let (mut losses, mut first_grads) = (vec![], vec![]);
    for step in 0..steps {
        let (sum, n, _) = task.loss_sum(&refs).unwrap();
        let loss = (sum / n as f64).unwrap();
        losses.push(loss.to_scalar::<f32>().unwrap());
        let grads = loss.backward().unwrap();
        if step == 0 {
            for (_, v) in params.vars() {
                first_grads.extend(host(grads.get(v.as_tensor()).unwrap()));
            }
        }
        acc.zero().unwrap();
        acc.add(params, &grads).unwrap();
        acc.clip(1.0).unwrap();
        opt.step(params, &acc, 1e-3).unwrap();
    }
    SftSteps {
        losses,
        first_grads,
        start,
        end: flat(),
    }
}
