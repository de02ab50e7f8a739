//! Sampling one token from a row of logits (`generate::sample_token`, what every
//! decoding step does per running row): microseconds per row, the best of `passes`
//! passes over 64 random rows of `vocab` logits, on one thread, for plain sampling
//! (temperature 1) and with top-p 0.9. Prints one JSON line per setting.
//!
//!     cargo run --release --example bench_sample -- [VOCAB [PASSES]]

mod common;

use rand::{Rng, SeedableRng};
use rlhf::generate::{sample_token, SamplingParams};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize, d: usize| args.get(i).map_or(d, |s| s.parse().expect("a count"));
    let (vocab, passes) = (arg(1, 8192), arg(2, 30));
    println!("{}", common::cpu_info());
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let rows: Vec<Vec<f32>> = (0..64)
        .map(|_| {
            (0..vocab)
                .map(|_| rng.random::<f32>() * 8.0 - 4.0)
                .collect()
        })
        .collect();
    for (name, top_p) in [("plain", 1.0), ("top_p_0.9", 0.9)] {
        let params = SamplingParams {
            temperature: 1.0,
            top_p,
            ..SamplingParams::default()
        };
        let mut best = f64::MAX;
        // A checksum of the tokens: the same for two builds that sample the same.
        let mut checksum = 0u64;
        for _ in 0..passes {
            let t = std::time::Instant::now();
            for r in &rows {
                checksum =
                    checksum.wrapping_mul(31) + sample_token(r, &[], &params, &mut rng) as u64;
            }
            best = best.min(t.elapsed().as_secs_f64() / rows.len() as f64);
        }
        println!(
            "{}",
            serde_json::json!({"setting": name, "vocab": vocab, "us_per_row": best * 1e6,
                "checksum": checksum})
        );
    }
}
