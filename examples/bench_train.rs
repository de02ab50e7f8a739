//! Training throughput: one step = forward + cross-entropy + backward + clipping +
//! AdamW on a random GPT-2-shaped model and random tokens, through the same code the
//! trainer runs (LmTask, GradAccumulator, AdamW). Prints one JSON line with the
//! median wall time of the whole step (after one warm-up step), tokens/s, peak RSS
//! and the CPU it ran on. Driven by bench/train.py.
//!
//!     cargo run --release --example bench_train -- PRESET VOCAB BATCH SEQ STEPS

mod common;

use candle_core::Device;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::Instant;

use rlhf::data::sft::SftExample;
use rlhf::data::tokenizer::Tokenizer;
use rlhf::model::hf::Pretrained;
use rlhf::model::{presets, Arch, CausalLm};
use rlhf::train::lm_task::{LmTask, Row};
use rlhf::train::optimizer::{AdamW, AdamWConfig, GradAccumulator};

// The same allocator as the `rlhf` binary (see src/main.rs).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    rlhf::keep_freed_memory();
    let a: Vec<String> = std::env::args().collect();
    let preset = a.get(1).map_or("tiny", String::as_str);
    let num = |i: usize, d: usize| a.get(i).map_or(Ok(d), |s| s.parse()).expect("a number");
    let (vocab, batch, seq, steps) = (num(2, 8192), num(3, 16), num(4, 128), num(5, 5));
    let tok_path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer.json");
    let tokenizer = Tokenizer::from_file(&tok_path)?;
    let mut config = presets::preset(Arch::Gpt2, preset, vocab, None, Some(0))?;
    if let rlhf::model::FamilyConfig::Gpt2(c) = &mut config.family {
        c.n_positions = c.n_positions.max(seq);
    }
    let model = CausalLm::init(config, 0, &Device::Cpu)?;
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let rows: Vec<Row> = (0..batch)
        .map(|_| {
            Row::single(SftExample {
                ids: (0..seq)
                    .map(|_| rng.random_range(0..vocab as u32))
                    .collect(),
                loss_mask: vec![1; seq],
            })
        })
        .collect();
    let pre = Pretrained {
        model,
        tokenizer,
        eos_token_ids: vec![0],
    };
    let task = LmTask::new(pre, rows, vec![], batch, batch, 0);
    let params = &task.pre.model.params;
    let cfg = AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
    };
    let mut opt = AdamW::new(params, cfg);
    let mut acc = GradAccumulator::new(params);
    let refs: Vec<&Row> = task.train_rows.iter().collect();
    let mut times = vec![];
    for step in 0..=steps {
        let t = Instant::now();
        let (sum, n, _) = task.loss_sum(&refs)?;
        let loss = (sum / n as f64)?;
        let grads = loss.backward()?;
        acc.zero();
        acc.add(params, &grads)?;
        acc.clip(1.0);
        opt.update(params, &acc.buffers, 1e-4)?;
        if step > 0 {
            times.push(t.elapsed().as_secs_f64()); // the first step is a warm-up
        }
    }
    let median = common::median(&times);
    let out = serde_json::json!({
        "seconds": median,
        "tokens_per_s": (batch * seq) as f64 / median,
        "peak_rss_mb": common::peak_rss_mb().round(),
        "timed_steps": times.len(),
        "cpu": common::cpu_info(),
    });
    println!("{out}");
    Ok(())
}
