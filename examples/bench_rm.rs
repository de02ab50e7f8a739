//! Reward-model training throughput in comparisons/s: P prompts × K responses per
//! step, every response forwarded once, all C(K,2) comparisons in the loss; one step
//! = forward + loss + backward + clipping + AdamW through `RmTask`. Prints one JSON
//! line: the median wall time of the whole step (after one warm-up step), and the
//! CPU it ran on. Driven by bench/rm.py.
//!
//!     cargo run --release --example bench_rm -- PRESET VOCAB K PROMPTS PROMPT_LEN RESPONSE_LEN STEPS

mod common;

use candle_core::Device;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::Instant;

use rlhf::data::rankings::Ranked;
use rlhf::data::tokenizer::Tokenizer;
use rlhf::losses::ranked_pairs;
use rlhf::model::scalar::{scalar_specs, PretrainedScalar, ScalarModel};
use rlhf::model::{presets, Arch, Params};
use rlhf::rm::RmTask;
use rlhf::train::optimizer::{AdamW, AdamWConfig, GradAccumulator};

// The same allocator as the `rlhf` binary (see src/main.rs).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    rlhf::setup_process();
    // As the `rlhf` binary runs its commands: on a worker of the pool.
    rlhf::in_worker_pool(run)
}

fn run() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    let preset = a.get(1).map_or("tiny", String::as_str);
    let num = |i: usize, d: usize| a.get(i).map_or(Ok(d), |s| s.parse()).expect("a number");
    let (vocab, k, prompts, plen, rlen, steps) = (
        num(2, 8192),
        num(3, 4),
        num(4, 2),
        num(5, 64),
        num(6, 64),
        num(7, 3),
    );
    let tok_path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer.json");
    let tokenizer = Tokenizer::from_file(&tok_path)?;
    let config = presets::preset(Arch::Gpt2, preset, vocab, None, Some(0))?;
    let params = Params::init(scalar_specs(&config), 0, &Device::Cpu)?;
    let model = ScalarModel::from_params(config, params, &Device::Cpu)?;
    let rm = PretrainedScalar {
        model,
        tokenizer,
        eos_token_ids: vec![0],
        normalization: None,
        fresh_head: true,
    };
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut toks =
        |n: usize| -> Vec<u32> { (0..n).map(|_| rng.random_range(1..vocab as u32)).collect() };
    let ranks: Vec<u32> = (0..k as u32).collect();
    let set: Vec<Ranked> = (0..prompts)
        .map(|_| {
            let prompt = toks(plen);
            Ranked {
                inputs: (0..k)
                    .map(|_| [prompt.clone(), toks(rlen)].concat())
                    .collect(),
                ranks: ranks.clone(),
                pairs: ranked_pairs(&ranks),
            }
        })
        .collect();
    let task = RmTask::new(rm, vec![], vec![], prompts, 0);
    let params = &task.rm.model.params;
    let mut opt = AdamW::new(
        params,
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.0,
        },
    )?;
    let mut acc = GradAccumulator::new(params)?;
    let refs: Vec<&Ranked> = set.iter().collect();
    let mut times = vec![];
    for step in 0..=steps {
        let t = Instant::now();
        let (sum, _, _) = task.batch_loss_sum(&refs)?;
        let grads = (sum / prompts as f64)?.backward()?;
        acc.zero()?;
        acc.add_final(params, &grads)?;
        acc.clip(1.0)?;
        opt.step(params, &acc, 1e-5)?;
        if step > 0 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    let median = common::median(&times);
    let comparisons = prompts * k * (k - 1) / 2;
    let out = serde_json::json!({
        "seconds": median,
        "comparisons_per_s": comparisons as f64 / median,
        "sequences": prompts * k,
        "comparisons": comparisons,
        "timed_steps": times.len(),
        "cpu": common::cpu_info(),
    });
    println!("{out}");
    Ok(())
}
