//! The skinny matmul (`ops::matmul`, what `Linear` runs for ≤ 16 rows: a decoding
//! step) against candle's matmul (the gemm crate) on GPT-2 tiny and small shapes, in
//! CPU time (steadier than wall time when other work shares the cores).
//!
//!     RAYON_NUM_THREADS=1 cargo run --release --example bench_skinny [ROWS]
//!
//! With ROWS, every shape takes that many rows (e.g. 64: a prefill chunk).

mod common;

use candle_core::{Device, Tensor};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// CPU seconds per call of `f`, the mean over `reps` calls after one warm-up.
fn per_call(reps: usize, f: impl Fn()) -> f64 {
    f(); // warm-up
    let t = common::cpu_seconds();
    for _ in 0..reps {
        f();
    }
    (common::cpu_seconds() - t) / reps as f64
}

fn main() {
    rlhf::setup_process();
    // As the `rlhf` binary runs its commands: on a worker of the pool.
    rlhf::in_worker_pool(run)
}

fn run() {
    println!("{}", common::cpu_info());
    // (rows, in, out): tiny's attention in/out, MLP up/down and LM head, then GPT-2
    // small's attention in and MLP down.
    let shapes = [
        (16, 256, 768),
        (16, 256, 256),
        (16, 256, 1024),
        (16, 1024, 256),
        (16, 256, 8192),
        (1, 256, 8192),
        (1, 256, 768),
        (16, 768, 2304),
        (16, 3072, 768),
    ];
    let rows: Option<usize> = std::env::args().nth(1).map(|a| a.parse().expect("ROWS"));
    for (n, inner, out) in shapes {
        let n = rows.unwrap_or(n);
        let x = Tensor::randn(0f32, 1.0, (n, inner), &Device::Cpu).unwrap();
        let w = Tensor::randn(0f32, 1.0, (out, inner), &Device::Cpu).unwrap();
        let flop = (2 * n * inner * out) as f64;
        let reps = (2e9 / flop).max(3.0) as usize;
        let skinny = per_call(reps, || {
            rlhf::ops::matmul::skinny_matmul(&x, &w).unwrap();
        });
        let gemm = per_call(reps, || {
            x.matmul(&w.t().unwrap()).unwrap();
        });
        println!(
            "{}",
            serde_json::json!({"rows": n, "in": inner, "out": out,
                "skinny_us": skinny * 1e6, "skinny_gflops": flop / skinny / 1e9,
                "gemm_us": gemm * 1e6, "gemm_gflops": flop / gemm / 1e9})
        );
    }
}
