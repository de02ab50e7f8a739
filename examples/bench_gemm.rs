//! `ops::gemm` (the gemm crate's kernels on the pool, as training runs them) on the
//! training step's shapes, in wall time on the pool, in GFLOP/s to set against
//! `examples/bench_fma_peak`: how far the products of a step are from the machine's
//! ceiling, and so what a faster kernel could still gain.
//!
//!     cargo run --release --example bench_gemm [gpt2|tiny [TOKENS [ROUNDS]]]
//!
//! Every product of GPT-2 small (12 blocks of width 768, vocabulary 50257) or tiny
//! (4 of width 256, vocabulary 8192) at TOKENS rows (default: `bench/train.py`'s
//! batch, 4×128 and 16×128) in the three layouts a dense layer uses: forward
//! y = x·Wᵀ, dx = dy·W, dW = dyᵀ·x. Each is timed once per round, the rounds interleaved, and the fastest
//! round is printed (a shared host's slow spells show in the slower rounds).

mod common;

use std::time::Instant;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// An operand: its floats and (row, column) strides.
type Operand<'a> = (&'a [f32], (usize, usize));

/// dst (m × n, row-major) = a (m × k) · b (k × n): `ops::gemm`, the path every
/// product of a training step takes.
fn product(
    (m, n, k): (usize, usize, usize),
    (a, a_s): Operand,
    (b, b_s): Operand,
    dst: &mut [f32],
) {
    rlhf::ops::gemm(m, n, k, dst, false, a, a_s, b, b_s)
}

fn main() {
    rlhf::setup_process();
    rlhf::in_worker_pool(run)
}

fn run() {
    println!("{}", common::cpu_info());
    let preset = std::env::args().nth(1).unwrap_or("gpt2".into());
    let (width, blocks, vocab, tokens) = match preset.as_str() {
        "gpt2" => (768, 12, 50257, 512),
        "tiny" => (256, 4, 8192, 2048),
        other => panic!("preset: gpt2 or tiny, not {other:?}"),
    };
    let arg = |i: usize, default: usize| {
        std::env::args()
            .nth(i)
            .map_or(default, |a| a.parse().expect("a number"))
    };
    let (t, rounds) = (arg(2, tokens), arg(3, 6).max(2));
    assert!(t > 0, "TOKENS: at least one row");
    println!("{preset}, threads {}", rayon::current_num_threads());
    // (in, out) of each block's products (c_attn, attn c_proj, c_fc, mlp c_proj), then
    // the LM head's.
    let c = width;
    let layers = [(c, 3 * c), (c, c), (c, 4 * c), (4 * c, c), (c, vocab)];
    let (mut seconds, mut flops) = (0.0, 0.0);
    for (l, (i, o)) in layers.into_iter().enumerate() {
        let times = if l < 4 { blocks as f64 } else { 1.0 };
        let x = vec![0.5f32; t * i];
        let w = vec![0.25f32; o * i];
        let dy = vec![0.125f32; t * o];
        let (mut y, mut dx, mut dw) = (vec![0f32; t * o], vec![0f32; t * i], vec![0f32; o * i]);
        let flop = 2.0 * (t * i * o) as f64;
        let mut best = [f64::MAX; 3];
        for round in 0..rounds {
            for (which, best) in best.iter_mut().enumerate() {
                let start = Instant::now();
                match which {
                    // y (t × o) = x (t × i) · Wᵀ, W stored (o, i)
                    0 => product((t, o, i), (&x, (i, 1)), (&w, (1, i)), &mut y),
                    // dx (t × i) = dy (t × o) · W (o × i)
                    1 => product((t, i, o), (&dy, (o, 1)), (&w, (i, 1)), &mut dx),
                    // dW (o × i) = dyᵀ (o × t) · x (t × i)
                    _ => product((o, i, t), (&dy, (1, o)), (&x, (i, 1)), &mut dw),
                }
                if round > 0 {
                    *best = best.min(start.elapsed().as_secs_f64()); // round 0 warms up
                }
            }
        }
        for (name, sec) in ["forward", "dx", "dW"].iter().zip(best) {
            seconds += times * sec;
            flops += times * flop;
            println!(
                "{t:>5} {i:>5} {o:>6} {name:<8} {:>9.3} ms {:>7.1} GFLOP/s",
                sec * 1e3,
                flop / sec / 1e9
            );
        }
    }
    println!(
        "the products of one step (every block and the head, forward and backward): {:.1} GFLOP in {:.1} ms, {:.1} GFLOP/s",
        flops / 1e9,
        seconds * 1e3,
        flops / seconds / 1e9
    );
}
