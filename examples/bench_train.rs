//! Training throughput: one step = forward + cross-entropy + backward + clipping +
//! AdamW on a random GPT-2-shaped model and random tokens, through the same code the
//! trainer runs (LmTask, GradAccumulator, AdamW). Prints one JSON line with the
//! median wall time of the whole step (after one warm-up step), tokens/s, peak RSS
//! and the CPU it ran on. Driven by bench/train.py.
//!
//!     cargo run --release --example bench_train -- PRESET VOCAB BATCH SEQ STEPS [DEVICE [bf16]]
//!
//! DEVICE is `cpu` (the default) or `cuda[:N]` in a build with `--features cuda`;
//! `bf16` turns on autocast (on the CPU: AMX tiles, refused where there are none). On a GPU the timer waits for the device's queue
//! (the gradient norm is read back every step, and the device is synchronised before
//! the clock is read).

mod common;

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
    rlhf::setup_process();
    // As the `rlhf` binary runs its commands: on a worker of the pool.
    rlhf::in_worker_pool(run)
}

fn run() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    let preset = a.get(1).map_or("tiny", String::as_str);
    let num = |i: usize, d: usize| a.get(i).map_or(Ok(d), |s| s.parse()).expect("a number");
    let (vocab, batch, seq, steps) = (num(2, 8192), num(3, 16), num(4, 128), num(5, 5));
    let spec: rlhf::device::DeviceSpec = a
        .get(6)
        .map_or("cpu", String::as_str)
        .parse()
        .map_err(anyhow::Error::msg)?;
    rlhf::device::set_default(spec, a.get(7).is_some_and(|s| s == "bf16"))?;
    let device = rlhf::device::default();
    let tok_path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer.json");
    let tokenizer = Tokenizer::from_file(&tok_path)?;
    let mut config = presets::preset(Arch::Gpt2, preset, vocab, None, Some(0))?;
    if let rlhf::model::FamilyConfig::Gpt2(c) = &mut config.family {
        c.n_positions = c.n_positions.max(seq);
    }
    let model = CausalLm::init(config, 0, &device)?;
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
    let mut opt = AdamW::new(params, cfg)?;
    let mut acc = GradAccumulator::new(params)?;
    let refs: Vec<&Row> = task.train_rows.iter().collect();
    let mut times = vec![];
    for step in 0..=steps {
        let t = Instant::now();
        let (sum, n, _) = task.loss_sum(&refs)?;
        let loss = (sum / n as f64)?;
        let grads = loss.backward()?;
        acc.zero()?;
        acc.add_final(params, &grads)?;
        acc.clip(1.0)?;
        opt.step(params, &acc, 1e-4)?;
        rlhf::device::synchronize(&device)?;
        if step > 0 {
            times.push(t.elapsed().as_secs_f64()); // the first step is a warm-up
        }
    }
    let median = common::median(&times);
    // Where a step's time goes: three more steps with the device synchronised after
    // each part (which serialises them, so these are not added to the figure above).
    let mut phases: [Vec<f64>; 4] = Default::default();
    for _ in 0..3 {
        let mut t = Instant::now();
        let mut lap = |i: usize, t: &mut Instant| -> anyhow::Result<()> {
            rlhf::device::synchronize(&device)?;
            phases[i].push(t.elapsed().as_secs_f64());
            *t = Instant::now();
            Ok(())
        };
        let (sum, n, _) = task.loss_sum(&refs)?;
        let loss = (sum / n as f64)?;
        lap(0, &mut t)?;
        let grads = loss.backward()?;
        lap(1, &mut t)?;
        acc.zero()?;
        acc.add_final(params, &grads)?;
        acc.clip(1.0)?;
        lap(2, &mut t)?;
        opt.step(params, &acc, 1e-4)?;
        lap(3, &mut t)?;
    }
    let phase = |i: usize| (common::median(&phases[i]) * 1e4).round() / 1e4;
    let out = serde_json::json!({
        "seconds": median,
        "tokens_per_s": (batch * seq) as f64 / median,
        "peak_rss_mb": common::peak_rss_mb().round(),
        "timed_steps": times.len(),
        "cpu": common::cpu_info(),
        "device": spec.to_string(),
        "bf16": rlhf::device::autocast_bf16(),
        "phases_s": {
            "forward_and_loss": phase(0),
            "backward": phase(1),
            "accumulate_and_clip": phase(2),
            "adamw": phase(3),
        },
    });
    println!("{out}");
    Ok(())
}
