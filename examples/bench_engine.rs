//! The serving engine's step time, without HTTP: `n` sequences of a `prompt`-token
//! prompt decoded together for `new` tokens, on a model folder.
//!
//!     cargo run --release --example bench_engine -- MODEL_DIR [n] [prompt] [new]
//!
//! Prints JSON: seconds for the whole run, steps, and tokens/s.

use rlhf::serve::engine::{EngineConfig, GenParams, Job};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    rlhf::keep_freed_memory();
    let args: Vec<String> = std::env::args().collect();
    let dir = std::path::PathBuf::from(&args[1]);
    let arg = |i: usize, d: usize| args.get(i).map_or(d, |s| s.parse().unwrap());
    let (n, prompt, new) = (arg(2, 16), arg(3, 32), arg(4, 32));
    let pre = rlhf::serve::load(&dir).unwrap();
    let run = || {
        let mut e = rlhf::serve::engine_for(
            &pre,
            EngineConfig {
                max_batch: n,
                prefill_chunk: 64,
            },
        );
        let mut rxs = vec![];
        for i in 0..n {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            e.add(Job {
                prompt: (0..prompt as u32)
                    .map(|t| 10 + (t * 7 + i as u32) % 300)
                    .collect(),
                params: GenParams {
                    max_tokens: new,
                    seed: Some(i as u64),
                    ..GenParams::default()
                },
                n: 1,
                events: tx,
            });
            rxs.push(rx);
        }
        let t = std::time::Instant::now();
        let mut steps = 0;
        while e.step().unwrap() {
            steps += 1;
        }
        (t.elapsed().as_secs_f64(), steps)
    };
    run();
    let (secs, steps) = run();
    println!(
        "{}",
        serde_json::json!({"sequences": n, "seconds": secs, "steps": steps,
                           "tokens_per_s": (n * new) as f64 / secs})
    );
}
