//! LoRA adapters in PEFT's format: adapters made by peft itself load with peft's
//! logits (golden values in tests/fixtures/peft-*, from tools/make_fixtures.py); the
//! frozen base gets no gradient; `--use_peft` training writes only the adapter and
//! resumes bit for bit (sft, rm train, dpo, ppo, grpo); `rlhf merge` writes the
//! same model; adapter folders work wherever a model folder does; and, where
//! python3 has torch + transformers + peft, peft loads what we write
//! (`make_fixtures.py --check-peft`).

mod common;

use candle_core::{Device, Tensor};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;

use rlhf::model::hf::{load_causal_lm, load_pretrained};
use rlhf::model::lora::{attach_to_causal_lm, LoraArgs};
use rlhf::model::scalar::load_scalar;
use rlhf::model::{AttentionMask, CausalLm};
use rlhf::train::lm_task::{lm_loss_sum, Row};

fn reference(name: &str) -> Value {
    let text = std::fs::read_to_string(common::fixture(name).join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn logits(model: &CausalLm, ids: &[u32]) -> Vec<Vec<f32>> {
    let dev = Device::Cpu;
    let t = Tensor::from_vec(ids.to_vec(), (1, ids.len()), &dev).unwrap();
    let mask = AttentionMask::full(&[vec![1u8; ids.len()]], &dev).unwrap();
    model
        .forward(&t, &mask, None)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap()
}

/// Max |ours − peft's| over every logit of the reference inputs.
fn worst_diff(model: &CausalLm, reference: &Value) -> f32 {
    let mut worst = 0f32;
    for case in reference["outputs"].as_array().unwrap() {
        let ids: Vec<u32> = serde_json::from_value(case["input_ids"].clone()).unwrap();
        let want: Vec<Vec<f32>> = serde_json::from_value(case["logits"].clone()).unwrap();
        for (a, b) in logits(model, &ids).iter().zip(&want) {
            for (x, y) in a.iter().zip(b) {
                worst = worst.max((x - y).abs());
            }
        }
    }
    worst
}

fn lora_args(r: usize, alpha: f64, targets: &[&str]) -> LoraArgs {
    LoraArgs {
        use_peft: true,
        lora_r: r,
        lora_alpha: alpha,
        lora_dropout: 0.0,
        lora_target_modules: Some(targets.iter().map(|s| s.to_string()).collect()),
    }
}

#[test]
fn adapters_made_by_peft_give_peft_logits_merged_and_attached() {
    for (name, base, targets) in [
        ("peft-gpt2", "gpt2", vec!["all-linear"]),
        ("peft-llama", "llama", vec!["q_proj", "v_proj", "down_proj"]),
    ] {
        let r = reference(name);
        let dir = common::fixture(name);
        // Loaded as a model folder: the base with the adapter merged into it.
        let merged = load_causal_lm(&dir, &Device::Cpu).unwrap();
        let d = worst_diff(&merged, &r);
        assert!(d < 1e-4, "{name} merged: max abs diff {d}");
        // Attached as a trainable adapter (the LoRA branches, not merged), with the
        // saved A and B read back in.
        let mut model = load_causal_lm(&common::fixture(base), &Device::Cpu).unwrap();
        let adapter =
            attach_to_causal_lm(&mut model, &lora_args(4, 8.0, &targets), &dir, 0).unwrap();
        adapter.load_weights(&dir).unwrap();
        let d = worst_diff(&model, &r);
        assert!(d < 1e-4, "{name} attached: max abs diff {d}");
        // And the base alone is different: the adapter does something.
        let plain = load_causal_lm(&common::fixture(base), &Device::Cpu).unwrap();
        assert!(
            worst_diff(&plain, &r) > 1e-2,
            "{name}: the adapter changes nothing"
        );
    }
}

#[test]
fn a_peft_reward_model_adapter_gives_peft_scores() {
    let r = reference("peft-gpt2-rm");
    let rm = load_scalar(&common::fixture("peft-gpt2-rm"), &Device::Cpu, 0).unwrap();
    assert!(!rm.fresh_head, "the score head comes from modules_to_save");
    for case in r["outputs"].as_array().unwrap() {
        let ids: Vec<u32> = serde_json::from_value(case["input_ids"].clone()).unwrap();
        let want = case["logits"][0][0].as_f64().unwrap() as f32;
        let got = rm
            .model
            .score_last(&[ids], 0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0];
        assert!((got - want).abs() < 1e-4, "score {got} vs peft's {want}");
    }
}

/// One SFT-style loss on the fixture's text, for gradient checks.
fn loss(model: &CausalLm) -> Tensor {
    let row = Row {
        ids: vec![5, 9, 17, 33, 2, 41, 8],
        loss_mask: vec![0, 0, 1, 1, 1, 1, 1],
        segments: vec![1; 7],
    };
    lm_loss_sum(model, 0, &[&row]).unwrap().0
}

#[test]
fn only_the_adapter_gets_gradients() {
    for family in common::FAMILIES {
        let mut model = load_causal_lm(&common::fixture(family), &Device::Cpu).unwrap();
        let adapter = attach_to_causal_lm(
            &mut model,
            &lora_args(4, 8.0, &["all-linear"]),
            &common::fixture(family),
            3,
        )
        .unwrap();
        // B starts at 0; make it non-zero so that A's gradient is too.
        for (spec, var) in adapter.params.vars() {
            if spec.name.ends_with("lora_B.weight") {
                var.set(&(var.as_tensor().ones_like().unwrap() * 0.01).unwrap())
                    .unwrap();
            }
        }
        let grads = loss(&model).backward().unwrap();
        for (spec, var) in adapter.params.vars() {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{family}: no gradient for {}", spec.name));
            let norm = g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(norm > 0.0, "{family}: zero gradient for {}", spec.name);
        }
        for (spec, var) in model.params.vars() {
            assert!(
                grads.get(var.as_tensor()).is_none(),
                "{family}: the frozen base weight {} has a gradient",
                spec.name
            );
        }
        // Only A and B are trained: 2 per adapted layer.
        let layers = rlhf::model::lora::linear_modules(&model.config).len();
        assert_eq!(adapter.params.vars().len(), 2 * layers);
    }
}

#[test]
fn a_fresh_adapter_leaves_the_model_unchanged_and_off_is_the_base() {
    let base = load_causal_lm(&common::fixture("llama"), &Device::Cpu).unwrap();
    let mut model = base.clone();
    let adapter = attach_to_causal_lm(
        &mut model,
        &lora_args(8, 16.0, &["all-linear"]),
        &common::fixture("llama"),
        1,
    )
    .unwrap();
    let ids = [5u32, 9, 17, 33];
    let want = logits(&base, &ids);
    assert_eq!(
        logits(&model, &ids),
        want,
        "B = 0 must leave the logits as they are"
    );
    for (spec, var) in adapter.params.vars() {
        if spec.name.ends_with("lora_B.weight") {
            var.set(&(var.as_tensor().ones_like().unwrap() * 0.05).unwrap())
                .unwrap();
        }
    }
    assert_ne!(logits(&model, &ids), want, "the adapter has no effect");
    let off = rlhf::model::lora::reference_of(&model).unwrap();
    assert_eq!(logits(&off, &ids), want, "adapters off is not the base");
}

fn sft_data(dir: &Path) -> PathBuf {
    let p = dir.join("sft.jsonl");
    let rows: Vec<String> = (0..40)
        .map(|i| json!({"prompt": format!("{} + {}?", i % 8, i % 5), "completion": format!("{}", i % 8 + i % 5)}).to_string())
        .collect();
    std::fs::write(&p, rows.join("\n")).unwrap();
    p
}

fn sft_args(model: &Path, data: &Path, out: &Path) -> rlhf::sft::SftArgs {
    let mut a: rlhf::sft::SftArgs =
        rlhf::train::args::parse_args(&["--output_dir".into(), out.display().to_string()]).unwrap();
    a.model_name_or_path = Some(model.to_path_buf());
    a.dataset = Some(data.to_path_buf());
    a.max_length = 64;
    a.lora.use_peft = true;
    a.lora.lora_target_modules = Some(vec!["all-linear".into()]);
    a.train.learning_rate = Some(1e-2);
    a.train.max_steps = 12;
    a.train.save_steps = 4;
    a.train.per_device_train_batch_size = 4;
    a.train.seed = 3;
    a
}

/// Every tensor of an adapter folder, by key, as f32 bits.
fn adapter_bits(dir: &Path) -> Vec<(String, Vec<u32>)> {
    let t = candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu)
        .unwrap();
    let mut out: Vec<(String, Vec<u32>)> = t
        .iter()
        .map(|(k, v)| {
            let bits = v.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (k.clone(), bits.iter().map(|x| x.to_bits()).collect())
        })
        .collect();
    out.sort();
    out
}

fn train_losses(dir: &Path) -> Vec<f64> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok()?["train/loss"].as_f64())
        .collect()
}

#[test]
fn sft_with_lora_trains_only_the_adapter_and_resumes_bit_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let data = sft_data(tmp.path());
    let model = common::fixture("gpt2");
    let full = tmp.path().join("full");
    rlhf::sft::run(&sft_args(&model, &data, &full)).unwrap();
    assert!(full.join("adapter_config.json").is_file());
    assert!(
        !full.join("model.safetensors").exists(),
        "a LoRA run writes no full model"
    );
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(full.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["r"], 16);
    assert_eq!(cfg["task_type"], "CAUSAL_LM");
    assert_eq!(cfg["fan_in_fan_out"], true);
    assert_eq!(cfg["target_modules"].as_array().unwrap().len(), 8);
    let bits = adapter_bits(&full);
    assert!(bits[0]
        .0
        .starts_with("base_model.model.transformer.h.0.attn.c_attn.lora_"));
    for (k, b) in &bits {
        if k.ends_with("lora_B.weight") {
            assert!(b.iter().any(|&x| x != 0), "{k} never left 0");
        }
    }
    let losses = train_losses(&full);
    assert!(losses.last().unwrap() < &losses[0], "{losses:?}");
    // The adapter folder is a model folder for every command.
    let merged = load_pretrained(&full, &Device::Cpu).unwrap();
    let base = load_pretrained(&model, &Device::Cpu).unwrap();
    assert_ne!(
        logits(&merged.model, &[5, 9, 17]),
        logits(&base.model, &[5, 9, 17])
    );

    // Stopped at 6 (checkpoint at 4, and 6), resumed: the same adapter, dropout included.
    let parts = tmp.path().join("parts");
    let mut a = sft_args(&model, &data, &parts);
    a.train.stop_after_steps = Some(6);
    rlhf::sft::run(&a).unwrap();
    a.train.stop_after_steps = None;
    let s = rlhf::sft::run(&a).unwrap();
    assert_eq!(s.resumed_from, Some(6));
    assert_eq!(adapter_bits(&full), adapter_bits(&parts));
    // Dropout is on (0.05 by default): without it the run differs.
    let nodrop = tmp.path().join("nodrop");
    let mut a = sft_args(&model, &data, &nodrop);
    a.lora.lora_dropout = 0.0;
    rlhf::sft::run(&a).unwrap();
    assert_ne!(adapter_bits(&full), adapter_bits(&nodrop));
}

#[test]
fn dpo_with_lora_starts_at_the_reference_and_resumes_bit_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::toy_rankings(tmp.path(), 40, 3);
    let args = |out: &Path| {
        let mut a: rlhf::dpo::DpoArgs =
            rlhf::train::args::parse_args(&["--output_dir".into(), out.display().to_string()])
                .unwrap();
        a.model_name_or_path = Some(common::fixture("qwen2"));
        a.dataset = Some(data.clone());
        a.max_length = 64;
        a.lora.use_peft = true;
        a.train.learning_rate = Some(2e-2);
        a.train.num_train_epochs = Some(3.0);
        a.train.save_steps = 20;
        a.train.logging_steps = 1;
        a.train.seed = 5;
        a
    };
    let full = tmp.path().join("full");
    rlhf::dpo::run(&args(&full)).unwrap();
    // The policy starts as the reference (B = 0): the first loss is ln 2.
    let first = train_losses(&full)[0];
    assert!(
        (first - std::f64::consts::LN_2).abs() < 1e-4,
        "first loss {first}"
    );
    assert!(train_losses(&full).last().unwrap() < &first);
    let parts = tmp.path().join("parts");
    let mut b = args(&parts);
    b.train.stop_after_steps = Some(7);
    rlhf::dpo::run(&b).unwrap();
    b.train.stop_after_steps = None;
    let s = rlhf::dpo::run(&b).unwrap();
    assert_eq!(s.resumed_from, Some(7));
    assert_eq!(adapter_bits(&full), adapter_bits(&parts));
}

#[test]
fn rm_train_with_lora_saves_the_head_and_resumes_bit_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::toy_rankings(tmp.path(), 40, 4);
    let args = |out: &Path| {
        let mut a: rlhf::rm::RmTrainArgs =
            rlhf::train::args::parse_args(&["--output_dir".into(), out.display().to_string()])
                .unwrap();
        a.model_name_or_path = Some(common::fixture("qwen2"));
        a.dataset = Some(data.clone());
        a.max_length = 64;
        a.lora.use_peft = true;
        a.train.learning_rate = Some(1e-2);
        a.train.max_steps = 10;
        a.train.save_steps = 4;
        a.train.seed = 2;
        a
    };
    let full = tmp.path().join("full");
    rlhf::rm::train_rm(&args(&full)).unwrap();
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(full.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["task_type"], "SEQ_CLS");
    let bits = adapter_bits(&full);
    assert!(bits
        .iter()
        .any(|(k, _)| k == "base_model.model.score.weight"));
    assert!(full.join("reward_normalization.json").is_file());
    // Read back as a reward model: trained head, statistics.
    let rm = load_scalar(&full, &Device::Cpu, 0).unwrap();
    assert!(!rm.fresh_head && rm.normalization.is_some());
    let parts = tmp.path().join("parts");
    let mut b = args(&parts);
    b.train.stop_after_steps = Some(5);
    rlhf::rm::train_rm(&b).unwrap();
    b.train.stop_after_steps = None;
    rlhf::rm::train_rm(&b).unwrap();
    assert_eq!(adapter_bits(&full), adapter_bits(&parts));
}

fn prompts(dir: &Path) -> PathBuf {
    let p = dir.join("prompts.jsonl");
    let rows: Vec<String> = (0..24)
        .map(|i| json!({"prompt": format!("The cat {i} sat on")}).to_string())
        .collect();
    std::fs::write(&p, rows.join("\n")).unwrap();
    p
}

fn count_reward() -> rlhf::ppo::RewardSource {
    rlhf::ppo::RewardSource::Function(Box::new(|_p: &[u32], r: &[u32]| {
        r.iter().filter(|&&t| t < 100).count() as f64 / r.len().max(1) as f64 * 4.0
    }))
}

#[test]
fn ppo_with_lora_uses_the_base_as_reference_and_resumes_bit_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prompts(tmp.path());
    let args = |out: &Path| {
        let mut a: rlhf::ppo::PpoArgs =
            rlhf::train::args::parse_args(&["--output_dir".into(), out.display().to_string()])
                .unwrap();
        a.model_name_or_path = Some(common::fixture("qwen2"));
        a.dataset = Some(data.clone());
        a.rollout_batch_size = 8;
        a.mini_batch_size = 4;
        a.ppo_epochs = 2;
        a.max_new_tokens = 12;
        a.num_iterations = Some(4);
        a.ema = Some(0.9);
        a.lora.use_peft = true;
        a.lora.lora_target_modules = Some(vec!["all-linear".into()]);
        a.train.learning_rate = Some(1e-2);
        a.train.save_steps = 0;
        a.train.logging_steps = 4;
        a.train.seed = 5;
        a
    };
    let full = tmp.path().join("full");
    let (_, task) = rlhf::ppo::run(&args(&full), Some(count_reward())).unwrap();
    // The first iteration samples with B = 0: the policy is its reference, KL 0.
    let metrics: Vec<Value> = std::fs::read_to_string(full.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &Value| v.get("objective/kl").is_some())
        .collect();
    assert_eq!(metrics[0]["objective/kl"].as_f64().unwrap(), 0.0);
    assert!(metrics.last().unwrap()["objective/kl"].as_f64().unwrap() != 0.0);
    // Only adapters are trained; the base weights are those of the SFT folder.
    let (actor, critic) = task.adapters.as_ref().unwrap();
    assert!(actor
        .params
        .vars()
        .iter()
        .all(|(s, _)| s.name.contains(".lora_")));
    assert!(critic
        .params
        .vars()
        .iter()
        .any(|(s, _)| s.name.ends_with("score.weight")));
    let sft = load_pretrained(&common::fixture("qwen2"), &Device::Cpu).unwrap();
    for ((s, a), (_, b)) in task
        .actor
        .model
        .params
        .vars()
        .iter()
        .zip(sft.model.params.vars())
    {
        let (a, b) = (
            a.as_tensor().to_dtype(candle_core::DType::F32).unwrap(),
            b.as_tensor(),
        );
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0, "base weight {} moved", s.name);
    }
    for sub in ["critic", "ema"] {
        assert!(
            full.join(sub).join("adapter_config.json").is_file(),
            "{sub}"
        );
    }
    let all = |dir: &Path| {
        ["", "critic", "ema"]
            .iter()
            .flat_map(|s| adapter_bits(&dir.join(s)))
            .collect::<Vec<_>>()
    };
    let parts = tmp.path().join("parts");
    let mut a = args(&parts);
    a.train.stop_after_steps = Some(6);
    rlhf::ppo::run(&a, Some(count_reward())).unwrap();
    a.train.stop_after_steps = None;
    let (s, _) = rlhf::ppo::run(&a, Some(count_reward())).unwrap();
    assert_eq!(s.resumed_from, Some(6));
    assert_eq!(all(&full), all(&parts));
}

/// Whether two tensors are views of one buffer (no copy between them).
fn same_storage(a: &Tensor, b: &Tensor) -> bool {
    let address = |t: &Tensor| {
        let (storage, _) = t.storage_and_layout();
        &*storage as *const candle_core::Storage as usize
    };
    address(a) == address(b)
}

/// Every dense layer's weight of a backbone, by module name.
fn dense_weights(b: &rlhf::model::Backbone) -> Vec<(String, Tensor)> {
    let out = std::cell::RefCell::new(vec![]);
    b.map_linears(&|name, lin| {
        out.borrow_mut()
            .push((name.to_string(), lin.weight.clone()));
        Ok(lin.clone())
    })
    .unwrap();
    out.into_inner()
}

/// A reward model trained as an adapter on the qwen2 fixture (`rm train --use_peft`).
fn rm_adapter(dir: &Path, targets: &str) -> PathBuf {
    let data = common::toy_rankings(dir, 40, 4);
    let out = dir.join(format!("rm-{}", targets.replace(',', "-")));
    let mut a: rlhf::rm::RmTrainArgs =
        rlhf::train::args::parse_args(&["--output_dir".into(), out.display().to_string()]).unwrap();
    a.model_name_or_path = Some(common::fixture("qwen2"));
    a.dataset = Some(data);
    a.max_length = 64;
    a.lora.use_peft = true;
    a.lora.lora_target_modules = Some(targets.split(',').map(str::to_string).collect());
    a.train.learning_rate = Some(1e-2);
    a.train.max_steps = 8;
    a.train.save_steps = 0;
    a.train.seed = 2;
    rlhf::rm::train_rm(&a).unwrap();
    out
}

#[test]
fn share_base_puts_the_reward_model_on_the_policys_weights_and_scores_as_merged() {
    let tmp = tempfile::tempdir().unwrap();
    // The reward model's adapter is on fewer layers than the policy's, with another
    // rank and α/r, and the policy's adapter is made non-zero: none of it may reach
    // the reward model.
    let rm_dir = rm_adapter(tmp.path(), "q_proj,v_proj");
    let sft = common::fixture("qwen2");
    let lora = lora_args(4, 4.0, &["all-linear"]);
    let (policy, policy_adapter, reference) =
        rlhf::rollout::policy::policy_and_reference(&sft, &lora, 1, &Device::Cpu).unwrap();
    drop(reference);
    for (s, v) in policy_adapter.unwrap().params.vars() {
        if s.name.contains("lora_B") {
            v.set(
                &v.as_tensor()
                    .ones_like()
                    .unwrap()
                    .affine(0.05, 0.0)
                    .unwrap(),
            )
            .unwrap();
        }
    }
    let (shared, adapter) = rlhf::rollout::policy::scalar_on_policy_base(
        &rm_dir,
        "--reward_model",
        &sft,
        &policy.model,
        &lora,
    )
    .unwrap();
    // One copy of the base: every dense weight of the reward model is the policy's
    // buffer; the adapter's branches ride on top, unmerged.
    let policy_w = dense_weights(&policy.model.backbone);
    let shared_w = dense_weights(&shared.model.backbone);
    assert_eq!(policy_w.len(), shared_w.len());
    assert!(!same_storage(
        &policy_w[0].1,
        &policy_w[0].1.copy().unwrap()
    ));
    for ((n1, a), (n2, b)) in policy_w.iter().zip(&shared_w) {
        assert_eq!(n1, n2);
        assert!(same_storage(a, b), "{n1} was copied");
    }
    assert_eq!(adapter.r, 16);
    assert!(adapter
        .params
        .vars()
        .iter()
        .any(|(s, _)| s.name == "base_model.model.score.weight"));
    // Scores as the merged reward model (`load_scalar` merges the adapter).
    let merged = load_scalar(&rm_dir, &Device::Cpu, 0).unwrap();
    assert!(merged.normalization.is_some());
    assert_eq!(shared.normalization, merged.normalization);
    let seqs: Vec<Vec<u32>> = vec![vec![5, 9, 33, 2, 17, 8], vec![40, 41, 42], vec![7; 11]];
    let pad = merged.tokenizer.pad_token_id();
    let a: Vec<f32> = merged
        .model
        .score_last(&seqs, pad)
        .unwrap()
        .to_vec1()
        .unwrap();
    let b: Vec<f32> = shared
        .model
        .score_last(&seqs, pad)
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(a.len(), seqs.len());
    assert_eq!(b.len(), seqs.len());
    let base = load_scalar(&sft, &Device::Cpu, 0).unwrap();
    let mut moved = 0f32;
    for ((x, y), s) in a.iter().zip(&b).zip(&seqs) {
        assert!((x - y).abs() <= 1e-4 * (1.0 + x.abs()), "{x} vs {y}");
        // Against the base with the trained head: the adapter's branches did count.
        let h: Vec<f32> = base
            .model
            .backbone
            .forward(
                &Tensor::from_vec(s.clone(), (1, s.len()), &Device::Cpu).unwrap(),
                &AttentionMask::full(&[vec![1u8; s.len()]], &Device::Cpu).unwrap(),
                None,
            )
            .unwrap()
            .broadcast_matmul(&shared.model.head.weight.t().unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        moved = moved.max((h[h.len() - 1] - y).abs());
    }
    assert!(moved > 1e-3, "the branches changed nothing ({moved})");
}

#[test]
fn ppo_with_share_base_trains_a_critic_from_the_rm_adapter_and_resumes_bit_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prompts(tmp.path());
    let rm_dir = rm_adapter(tmp.path(), "q_proj,v_proj");
    let args = |out: &Path, share: bool| {
        let mut a: rlhf::ppo::PpoArgs =
            rlhf::train::args::parse_args(&["--output_dir".into(), out.display().to_string()])
                .unwrap();
        a.model_name_or_path = Some(common::fixture("qwen2"));
        a.reward_model = Some(rm_dir.clone());
        a.dataset = Some(data.clone());
        a.rollout_batch_size = 8;
        a.mini_batch_size = 4;
        a.ppo_epochs = 2;
        a.max_new_tokens = 12;
        a.num_iterations = Some(3);
        // Without --share_base: full fine-tuning, the reward model loaded merged.
        a.lora.use_peft = share;
        a.share_base = share;
        a.train.learning_rate = Some(1e-2);
        a.train.save_steps = 0;
        a.train.logging_steps = 4;
        a.train.seed = 5;
        a
    };
    let scores = |dir: &Path| -> Vec<f64> {
        std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok()?["objective/scores"].as_f64())
            .collect()
    };
    let full = tmp.path().join("full");
    let (_, task) = rlhf::ppo::run(&args(&full, true), None).unwrap();
    // The critic's adapter starts as the reward model's (rank 16, its modules, its
    // head) and is trained; it is saved as an adapter on the policy's base.
    let (_, critic) = task.adapters.as_ref().unwrap();
    assert_eq!(critic.r, 16);
    let rm_bits = adapter_bits(&rm_dir);
    let critic_bits = adapter_bits(&full.join("critic"));
    assert_eq!(
        rm_bits.iter().map(|(k, _)| k).collect::<Vec<_>>(),
        critic_bits.iter().map(|(k, _)| k).collect::<Vec<_>>()
    );
    assert_ne!(rm_bits, critic_bits, "the critic was not trained");
    let cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(full.join("critic").join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        Path::new(cfg["base_model_name_or_path"].as_str().unwrap()),
        std::fs::canonicalize(common::fixture("qwen2")).unwrap()
    );
    // The first iteration's scores (sampled before any update, from the same policy:
    // a fresh adapter adds exact zeros) are the merged reward model's: the shared
    // base changes where the weights live, not the reward.
    let merged = tmp.path().join("merged");
    rlhf::ppo::run(&args(&merged, false), None).unwrap();
    let (s, m) = (scores(&full), scores(&merged));
    assert_eq!(s.len(), 3);
    assert!((s[0] - m[0]).abs() < 1e-4, "{} vs {}", s[0], m[0]);
    // Resume.
    let parts = tmp.path().join("parts");
    let mut a = args(&parts, true);
    a.train.stop_after_steps = Some(5);
    rlhf::ppo::run(&a, None).unwrap();
    a.train.stop_after_steps = None;
    let (s, _) = rlhf::ppo::run(&a, None).unwrap();
    assert_eq!(s.resumed_from, Some(5));
    for sub in ["", "critic"] {
        assert_eq!(
            adapter_bits(&full.join(sub)),
            adapter_bits(&parts.join(sub)),
            "{sub}"
        );
    }
}

#[test]
fn share_base_errors_name_what_is_wrong() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prompts(tmp.path());
    let rm_adapter_dir = rm_adapter(tmp.path(), "q_proj,v_proj");
    let whole_rm = common::reward_model_folder(tmp.path());
    let err = |rm: &Path, peft: bool, model: &str| -> String {
        let mut a: rlhf::grpo::GrpoArgs = rlhf::train::args::parse_args(&[
            "--output_dir".into(),
            tmp.path().join("out").display().to_string(),
            "--share_base".into(),
        ])
        .unwrap();
        a.group.model_name_or_path = Some(common::fixture(model));
        a.group.reward_model = Some(rm.to_path_buf());
        a.group.dataset = Some(data.clone());
        a.group.lora.use_peft = peft;
        a.group.max_iterations = Some(1);
        rlhf::grpo::run(&a, None)
            .err()
            .expect("must fail")
            .to_string()
    };
    let e = err(&rm_adapter_dir, false, "qwen2");
    assert!(e.contains("share_base") && e.contains("--use_peft"), "{e}");
    let e = err(&whole_rm, true, "qwen2");
    assert!(e.contains("is a whole model, not an adapter"), "{e}");
    // Without --share_base, a LoRA PPO critic cannot start from an RM adapter: the
    // error points to --share_base.
    let mut p: rlhf::ppo::PpoArgs = rlhf::train::args::parse_args(&[
        "--output_dir".into(),
        tmp.path().join("ppo").display().to_string(),
        "--use_peft".into(),
    ])
    .unwrap();
    p.model_name_or_path = Some(common::fixture("qwen2"));
    p.reward_model = Some(rm_adapter_dir.clone());
    p.dataset = Some(data.clone());
    p.num_iterations = Some(1);
    let e = rlhf::ppo::run(&p, None).err().unwrap().to_string();
    assert!(
        e.contains("--reward_model") && e.contains("add --share_base"),
        "{e}"
    );
    let e = err(&rm_adapter_dir, true, "llama");
    assert!(
        e.contains("not on the policy's model") && e.contains("rm train --use_peft"),
        "{e}"
    );
    let mut a: rlhf::grpo::GrpoArgs = rlhf::train::args::parse_args(&[
        "--output_dir".into(),
        tmp.path().join("out").display().to_string(),
        "--share_base".into(),
        "--use_peft".into(),
        "--reward_cmd".into(),
        "echo 1".into(),
    ])
    .unwrap();
    a.group.model_name_or_path = Some(common::fixture("qwen2"));
    a.group.dataset = Some(data.clone());
    let e = rlhf::grpo::run(&a, None).err().unwrap().to_string();
    assert!(
        e.contains("share_base") && e.contains("--reward_cmd"),
        "{e}"
    );
    a.group.reward_cmd = None;
    let e = rlhf::grpo::run(&a, None).err().unwrap().to_string();
    assert!(e.contains("needs --reward_model"), "{e}");
    // A causal-LM adapter is not a reward model.
    let sft_adapter = tmp.path().join("sft-lora");
    rlhf::sft::run(&sft_args(
        &common::fixture("qwen2"),
        &sft_data(tmp.path()),
        &sft_adapter,
    ))
    .unwrap();
    let e = err(&sft_adapter, true, "qwen2");
    assert!(
        e.contains("a reward model's adapter") && e.contains("CAUSAL_LM"),
        "{e}"
    );
}

#[test]
fn grpo_and_rloo_run_with_share_base() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prompts(tmp.path());
    let rm_dir = rm_adapter(tmp.path(), "q_proj,v_proj");
    let group = |out: &Path| {
        let mut a: rlhf::policy_gradient::GroupArgs =
            rlhf::train::args::parse_args(&["--output_dir".into(), out.display().to_string()])
                .unwrap();
        a.model_name_or_path = Some(common::fixture("qwen2"));
        a.reward_model = Some(rm_dir.clone());
        a.dataset = Some(data.clone());
        a.rollout_batch_size = 2;
        a.num_generations = 4;
        a.mini_batch_size = 8;
        a.max_completion_length = 8;
        a.max_iterations = Some(1);
        a.lora.use_peft = true;
        a.share_base = true;
        a.train.save_steps = 0;
        a
    };
    let mut g: rlhf::grpo::GrpoArgs = rlhf::train::args::parse_args(&[
        "--output_dir".into(),
        tmp.path().join("grpo").display().to_string(),
    ])
    .unwrap();
    g.group = group(&tmp.path().join("grpo"));
    rlhf::grpo::run(&g, None).unwrap();
    let mut r: rlhf::rloo::RlooArgs = rlhf::train::args::parse_args(&[
        "--output_dir".into(),
        tmp.path().join("rloo").display().to_string(),
    ])
    .unwrap();
    r.group = group(&tmp.path().join("rloo"));
    rlhf::rloo::run(&r, None).unwrap();
    for m in ["grpo", "rloo"] {
        let text = std::fs::read_to_string(tmp.path().join(m).join("metrics.jsonl")).unwrap();
        let scores: Vec<f64> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok()?["reward"].as_f64())
            .collect();
        assert_eq!(scores.len(), 1, "{m}");
        assert!(scores[0].is_finite(), "{m}");
        assert!(
            tmp.path().join(m).join("adapter_config.json").is_file(),
            "{m}"
        );
    }
}

#[test]
fn grpo_with_lora_resumes_bit_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prompts(tmp.path());
    let args = |out: &Path| {
        let mut g: rlhf::grpo::GrpoArgs =
            rlhf::train::args::parse_args(&["--output_dir".into(), out.display().to_string()])
                .unwrap();
        let a = &mut g.group;
        a.model_name_or_path = Some(common::fixture("qwen2"));
        a.dataset = Some(data.clone());
        a.rollout_batch_size = 4;
        a.num_generations = 4;
        a.mini_batch_size = 8;
        a.num_iterations = 2;
        a.max_completion_length = 12;
        a.max_iterations = Some(3);
        a.lora.use_peft = true;
        a.train.learning_rate = Some(1e-2);
        a.train.save_steps = 0;
        a.train.seed = 5;
        g.beta = 0.04;
        g
    };
    let score = || {
        rlhf::rollout::Scorer::Function(Box::new(|_p: &[u32], r: &[u32]| {
            r.iter().filter(|&&t| t < 100).count() as f64
        }))
    };
    let full = tmp.path().join("full");
    rlhf::grpo::run(&args(&full), Some(score())).unwrap();
    let parts = tmp.path().join("parts");
    let mut a = args(&parts);
    a.group.train.stop_after_steps = Some(3);
    rlhf::grpo::run(&a, Some(score())).unwrap();
    a.group.train.stop_after_steps = None;
    rlhf::grpo::run(&a, Some(score())).unwrap();
    assert_eq!(adapter_bits(&full), adapter_bits(&parts));
}

#[test]
fn merge_writes_the_adapted_model_as_a_plain_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let s = common::rlhf_bin()
        .args(["merge", "--model"])
        .arg(common::fixture("gpt2"))
        .arg("--adapter")
        .arg(common::fixture("peft-gpt2"))
        .arg("--output_dir")
        .arg(&out)
        .output()
        .unwrap();
    assert!(s.status.success(), "{}", String::from_utf8_lossy(&s.stderr));
    assert!(out.join("model.safetensors").is_file() && !out.join("adapter_config.json").exists());
    let merged = load_causal_lm(&out, &Device::Cpu).unwrap();
    let d = worst_diff(&merged, &reference("peft-gpt2"));
    assert!(d < 1e-4, "merged folder vs peft: {d}");
    // A reward model's adapter merges into a reward-model folder with its head.
    let rm_out = tmp.path().join("rm");
    let s = common::rlhf_bin()
        .args(["merge", "--adapter"])
        .arg(common::fixture("peft-gpt2-rm"))
        .arg("--output_dir")
        .arg(&rm_out)
        .output()
        .unwrap();
    assert!(s.status.success(), "{}", String::from_utf8_lossy(&s.stderr));
    let a = load_scalar(&rm_out, &Device::Cpu, 0).unwrap();
    let b = load_scalar(&common::fixture("peft-gpt2-rm"), &Device::Cpu, 0).unwrap();
    let ids = vec![5u32, 9, 17, 33];
    assert_eq!(
        a.model
            .score_last(std::slice::from_ref(&ids), 0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
        b.model
            .score_last(&[ids], 0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    );
}

#[test]
fn adapter_folders_are_model_folders_and_bad_ones_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    // generate reads the adapter folder (tokenizer from the base, named relatively).
    let s = common::rlhf_bin()
        .args([
            "generate",
            "--prompt",
            "The cat",
            "--temperature",
            "0",
            "--max_new_tokens",
            "4",
            "--model",
        ])
        .arg(common::fixture("peft-llama"))
        .output()
        .unwrap();
    assert!(s.status.success(), "{}", String::from_utf8_lossy(&s.stderr));
    // A base that is not there.
    let bad = tmp.path().join("bad");
    std::fs::create_dir(&bad).unwrap();
    for f in ["adapter_model.safetensors", "adapter_config.json"] {
        std::fs::copy(common::fixture("peft-gpt2").join(f), bad.join(f)).unwrap();
    }
    let cfg_path = bad.join("adapter_config.json");
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["base_model_name_or_path"] = json!("../nowhere");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let s = common::rlhf_bin()
        .args(["generate", "--prompt", "x", "--model"])
        .arg(&bad)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&s.stderr);
    assert_eq!(s.status.code(), Some(2), "{err}");
    assert!(
        err.contains("base_model_name_or_path") && err.contains("nowhere"),
        "{err}"
    );
    // --use_peft on an adapter folder asks for a merge first.
    let data = sft_data(tmp.path());
    let a = sft_args(&common::fixture("peft-gpt2"), &data, &tmp.path().join("o"));
    let err = rlhf::sft::run(&a).unwrap_err().to_string();
    assert!(err.contains("rlhf merge"), "{err}");
    // A target that matches no layer names the layers there are.
    let mut a = sft_args(&common::fixture("gpt2"), &data, &tmp.path().join("o2"));
    a.lora.lora_target_modules = Some(vec!["q_proj".into()]);
    let err = rlhf::sft::run(&a).unwrap_err().to_string();
    assert!(err.contains("q_proj") && err.contains("c_attn"), "{err}");
}

/// The Python interpreter with torch, transformers and peft: the repository's pyenv
/// when there is one, else python3.
fn python_with_peft() -> Result<PathBuf, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let candidates = [root.join("pyenv/bin/python"), PathBuf::from("python3")];
    let mut why = String::new();
    for py in candidates {
        match Command::new(&py)
            .args(["-c", "import torch, transformers, peft"])
            .output()
        {
            Ok(o) if o.status.success() => return Ok(py),
            Ok(o) => {
                why = format!(
                    "{} cannot import torch, transformers, peft: {}",
                    py.display(),
                    String::from_utf8_lossy(&o.stderr)
                        .lines()
                        .last()
                        .unwrap_or("")
                )
            }
            Err(e) => why = format!("no {}: {e}", py.display()),
        }
    }
    Err(why)
}

#[test]
fn peft_loads_what_rlhf_writes() {
    let py = match python_with_peft() {
        Ok(py) => py,
        Err(why) => {
            assert!(
                std::env::var_os("RLHF_REQUIRE_PEFT").is_none(),
                "RLHF_REQUIRE_PEFT is set but {why}"
            );
            println!("skipped: {why} (the golden tests above still check the reading direction)");
            return;
        }
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(py)
        .arg(root.join("tools/make_fixtures.py"))
        .arg("--check-peft")
        .arg("--rlhf")
        .arg(env!("CARGO_BIN_EXE_rlhf"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("peft check passed"));
}
