//! The machine's f32 multiply-add ceiling: twelve independent 8-wide FMA chains per
//! thread (enough to hide the FMA latency on both FMA units), on 1 and on every
//! logical CPU, in GFLOP/s of wall time. What a matmul kernel's GFLOP/s is read
//! against (BENCHMARKS.md, issue 12: the skinny kernel runs at 85–95 GFLOP/s on two
//! threads where this gives about 90–105).
//!
//!     cargo run --release --example bench_fma_peak

mod common;

use std::time::Instant;

/// Multiply-adds per chain per thread.
const ITERS: u64 = 100_000_000;
/// Independent accumulators: 12 × 4-cycle latency covers two FMA units.
const CHAINS: usize = 12;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn chains() -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_setzero_ps(); CHAINS];
    for (i, a) in acc.iter_mut().enumerate() {
        *a = _mm256_set1_ps(i as f32);
    }
    let m = _mm256_set1_ps(1.000_000_1);
    let c = _mm256_set1_ps(1e-7);
    for _ in 0..ITERS {
        for a in acc.iter_mut() {
            *a = _mm256_fmadd_ps(*a, m, c);
        }
    }
    let mut s = 0.0;
    for a in acc {
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), a);
        s += lanes[0];
    }
    s
}

/// The same with 16-wide AVX-512 FMAs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn chains512() -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_ps(); CHAINS];
    for (i, a) in acc.iter_mut().enumerate() {
        *a = _mm512_set1_ps(i as f32);
    }
    let m = _mm512_set1_ps(1.000_000_1);
    let c = _mm512_set1_ps(1e-7);
    for _ in 0..ITERS {
        for a in acc.iter_mut() {
            *a = _mm512_fmadd_ps(*a, m, c);
        }
    }
    acc.iter().map(|&a| _mm512_reduce_add_ps(a)).sum()
}

/// GFLOP/s of `threads` threads each running `f` (which does `flops_per_thread`).
fn measure(label: &str, threads: usize, flops_per_thread: f64, f: fn() -> f32) {
    let t0 = Instant::now();
    let handles: Vec<_> = (0..threads).map(|_| std::thread::spawn(f)).collect();
    let sum: f32 = handles.into_iter().map(|h| h.join().unwrap()).sum();
    let seconds = t0.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "simd": label,
            "threads": threads,
            "gflops": threads as f64 * flops_per_thread / seconds / 1e9,
            "seconds": seconds,
            "checksum": sum,
        })
    );
}

fn main() {
    println!("{}", common::cpu_info());
    #[cfg(target_arch = "x86_64")]
    {
        if !(std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")) {
            println!("skipped: this CPU has no AVX2+FMA");
            return;
        }
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let flops = ITERS as f64 * CHAINS as f64;
        for threads in [1, cpus] {
            // SAFETY: AVX2 and FMA were detected above.
            measure("avx2", threads, flops * 16.0, || unsafe { chains() });
        }
        if std::is_x86_feature_detected!("avx512f") {
            for threads in [1, cpus] {
                // SAFETY: AVX-512F was detected just above.
                measure("avx512f", threads, flops * 32.0, || unsafe { chains512() });
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    println!("skipped: x86-64 only");
}
