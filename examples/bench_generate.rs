//! Generation throughput: B prompts of P random tokens, N new tokens each, sampling
//! (temperature 1), KV cache, eos ignored so every row makes exactly N tokens.
//! Prints one JSON line: the median wall time of a whole `generate` call (after one
//! warm-up call), and the CPU it ran on. Driven by bench/generate.py, which runs
//! transformers on the same model folder in the same run.
//!
//!     cargo run --release --example bench_generate -- DIR [BATCH PROMPT_LEN NEW REPEATS]

mod common;

use candle_core::Device;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::Instant;

use rlhf::generate::{generate, SamplingParams};
use rlhf::model::hf::load_pretrained;

// The same allocator as the `rlhf` binary (see src/main.rs).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    rlhf::setup_process();
    // As the `rlhf` binary runs its commands: on a worker of the pool.
    rlhf::in_worker_pool(run)
}

fn run() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dir = args
        .get(1)
        .expect("usage: bench_generate DIR [BATCH PROMPT_LEN NEW REPEATS]");
    let num = |i: usize, d: usize| args.get(i).map_or(Ok(d), |s| s.parse()).expect("a number");
    let (batch, prompt_len, new, repeats) = (num(2, 8), num(3, 32), num(4, 64), num(5, 3));
    let pre = load_pretrained(std::path::Path::new(dir), &Device::Cpu)?;
    let vocab = pre.tokenizer.vocab_size() as u32;
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let prompts: Vec<Vec<u32>> = (0..batch)
        .map(|_| {
            (0..prompt_len)
                .map(|_| rng.random_range(0..vocab))
                .collect()
        })
        .collect();
    let params = SamplingParams {
        max_new_tokens: new,
        temperature: 1.0,
        eos_token_ids: vec![],
        ..Default::default()
    };
    // One warm-up run, then the median of `repeats`.
    generate(&pre.model, &pre.tokenizer, &prompts, &params, &mut rng)?;
    let mut times = vec![];
    for _ in 0..repeats {
        let t = Instant::now();
        let out = generate(&pre.model, &pre.tokenizer, &prompts, &params, &mut rng)?;
        times.push(t.elapsed().as_secs_f64());
        assert!(out.iter().all(|c| c.tokens.len() == new));
    }
    let median = common::median(&times);
    let out = serde_json::json!({
        "seconds": median,
        "tokens_per_s": (batch * new) as f64 / median,
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new,
        "timed_calls": times.len(),
        "cpu": common::cpu_info(),
    });
    println!("{out}");
    Ok(())
}
