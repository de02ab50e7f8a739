//! The serving engine's step time, without HTTP: `n` sequences of a `prompt`-token
//! prompt decoded together for `new` tokens, on a model folder.
//!
//!     cargo run --release --example bench_engine -- MODEL_DIR [n] [prompt] [new] [runs]
//!
//! Prints JSON: seconds for the whole run, steps, tokens/s, when the sequences' first
//! tokens were sampled (p50, p95, from the start), and the mean time of a
//! step that feeds prompt tokens (64 a step) and of a decode-only step, in wall and
//! in CPU time (all threads: with RAYON_NUM_THREADS=1 the CPU time is the work).
//! The figures are the last of `runs` runs (default 2: one to warm up; more make a
//! steady state long enough for a profiler).

mod common;

use rlhf::serve::engine::{EngineConfig, GenParams, Job};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    rlhf::setup_process();
    // As the `rlhf` binary runs its commands: on a worker of the pool.
    rlhf::in_worker_pool(run)
}

fn run() {
    let args: Vec<String> = std::env::args().collect();
    let dir = std::path::PathBuf::from(&args[1]);
    let arg = |i: usize, d: usize| args.get(i).map_or(d, |s| s.parse().unwrap());
    let (n, prompt, new, runs) = (arg(2, 16), arg(3, 32), arg(4, 32), arg(5, 2));
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
        let mut steps = vec![];
        // When each sequence's first token was sampled (its first event).
        let mut first: Vec<Option<f64>> = vec![None; n];
        loop {
            let (s, c) = (std::time::Instant::now(), common::cpu_seconds());
            if !e.step().unwrap() {
                break;
            }
            steps.push((s.elapsed().as_secs_f64(), common::cpu_seconds() - c));
            for (f, rx) in first.iter_mut().zip(rxs.iter_mut()) {
                while rx.try_recv().is_ok() {
                    f.get_or_insert(t.elapsed().as_secs_f64());
                }
            }
        }
        let mut first: Vec<f64> = first.into_iter().flatten().collect();
        first.sort_by(f64::total_cmp);
        (t.elapsed().as_secs_f64(), steps, first)
    };
    for _ in 1..runs.max(1) {
        run();
    }
    let (secs, steps, first) = run();
    assert!(!first.is_empty(), "no sequence sampled a token (n = {n})");
    let pct = |p: f64| {
        1e3 * first[((p * (first.len() - 1) as f64).round() as usize).min(first.len() - 1)]
    };
    // Steps that fed prompt tokens come first (every prompt is queued at the start).
    let prefill_steps = (n * prompt).div_ceil(64);
    let (prefill, decode) = steps.split_at(prefill_steps.min(steps.len()));
    let ms = |xs: &[(f64, f64)], f: fn(&(f64, f64)) -> f64| {
        1e3 * xs.iter().map(f).sum::<f64>() / xs.len().max(1) as f64
    };
    println!(
        "{}",
        serde_json::json!({"sequences": n, "seconds": secs, "steps": steps.len(),
                           "tokens_per_s": (n * new) as f64 / secs,
                           "first_token_ms_p50": pct(0.5), "first_token_ms_p95": pct(0.95),
                           "prefill_step_ms": ms(prefill, |s| s.0),
                           "decode_step_ms": ms(decode, |s| s.0),
                           "prefill_step_cpu_ms": ms(prefill, |s| s.1),
                           "decode_step_cpu_ms": ms(decode, |s| s.1)})
    );
}
