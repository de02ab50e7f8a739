//! rlhf: the InstructGPT training system (SFT → reward model from K-way rankings →
//! PPO with a per-token KL penalty and pretraining mix) on candle, in one crate.
//!
//! The modules follow the pipeline: `model` (backbones, heads, KV cache, HF import
//! and export), `data` (formats, tokenization, chat templates), `generate` (batched
//! sampling with logprobs), `io` (crash-safe file writes), `losses` (pure loss functions), `train` (optimizer,
//! schedule, checkpoints, the shared loop), `pretrain`, `sft`, `rm`, `ppo` and `dpo` (the
//! stages), `pipeline` and `demo` (the stages chained), `settings` (the ranges every
//! command's settings are checked against), `web` (the HTTP layer the servers share),
//! `label` (the labeling app), `serve` (the OpenAI-compatible server, its chat page and
//! `rlhf chat`) and
//! `cli` (the `rlhf` binary's commands).

pub mod cli;
pub mod cpu;
pub mod data;
pub mod demo;
pub mod device;
pub mod distributed;
pub mod dpo;
pub mod error;
pub mod generate;
pub mod grpo;
pub mod io;
pub mod label;
pub mod losses;
pub mod memory;
pub mod model;
pub mod ops;
pub mod pipeline;
pub mod policy_gradient;
pub mod ppo;
pub mod pretrain;
pub mod progress;
pub mod rloo;
pub mod rm;
pub mod rollout;
pub mod serve;
pub mod settings;
pub mod sft;
pub mod train;
pub mod web;

pub use error::{Error, Result};

/// `eprintln!` that never panics: a message to a closed or full stderr is dropped
/// (what it reports has happened either way; a failed write is not a failed run).
#[macro_export]
macro_rules! note {
    ($($arg:tt)*) => {
        $crate::progress::note(format_args!($($arg)*))
    };
}

/// What the `rlhf` binary and the benches set up first, before any other thread
/// starts: freed memory kept (`keep_freed_memory`) and candle's pool's workers
/// asleep between its ops (`candle_workers_sleep`).
pub fn setup_process() {
    keep_freed_memory();
    candle_workers_sleep();
}

/// Runs `f` on a thread of a rayon pool (RAYON_NUM_THREADS threads, by default one
/// per logical CPU), so that the code that drives the work is one of the pool's
/// workers: its parallel loops split work with the other workers and join them, where
/// a caller outside the pool hands every loop over and sleeps until the workers wake
/// it, two thread hand-offs per loop. Each hand-off is a wake-up through the kernel,
/// thousands of them a second in a training run. The calling thread waits, once, for
/// `f`. Where no pool can be built, `f` runs here. The workers get a main thread's
/// stack (8 MiB, reserved, not touched, until used) instead of Rust's 2 MiB: the
/// whole command runs on one of them, and candle's backward walks the graph
/// recursively.
pub fn in_worker_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    match rayon::ThreadPoolBuilder::new()
        .thread_name(|i| format!("rlhf-{i}"))
        .stack_size(8 << 20)
        .build()
    {
        Ok(pool) => pool.install(f),
        Err(_) => f(),
    }
}

/// One busy pool of worker threads, rayon's. candle 0.11 runs its elementwise ops
/// above 64K elements (residual adds, broadcasts, the adds where two gradients meet)
/// on a second pool of its own (`candle_core::utils::barrier_pool`, one worker fewer
/// than CANDLE_NUM_THREADS, by default one per core), whose workers spin 25,000
/// rounds after every op before they sleep, while rayon's workers (every matmul and
/// every fused op of ours) need the same cores. With a spin limit of 200 rounds
/// (CANDLE_BARRIER_POOL_SPIN_LIMIT) candle's workers sleep at once and are woken for
/// the next such op, so those ops stay parallel on many cores and stop taking cores
/// from rayon between them. The bits do not change (candle splits the work into the
/// same pieces whatever runs them). Measured on 2 cores (AVX2 EPYC, BENCHMARKS.md):
/// a tiny training step at 16 × 64 tokens 3840 → 4040 tok/s; CANDLE_NUM_THREADS=1
/// (no candle worker at all) measured the same there. A limit the user set is kept.
///
/// Call it while the process has one thread: it sets an environment variable, which
/// candle reads when its pool first starts. Child processes (`--reward_cmd`) inherit
/// it; it only shortens a wait.
pub fn candle_workers_sleep() {
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "200");
    }
}

/// Tells mimalloc (the binary's allocator) never to return freed memory to the kernel.
/// candle allocates a fresh buffer for every op; returned pages come back zeroed by
/// the kernel on the next allocation (measured: a third of a training step's CPU time
/// in `clear_page`, and a step 15 % faster without it). The process' peak memory is
/// unchanged (freed blocks are reused), only the memory it holds between peaks. Only
/// effective where mimalloc is the global allocator (the `rlhf` binary, benches).
pub fn keep_freed_memory() {
    // SAFETY: setting an option is a plain store in mimalloc's option table.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

/// mimalloc's `mi_option_purge_delay` (15 in its v2 option enum, which
/// libmimalloc-sys does not name); −1 disables purging, 0 purges at once.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Hands freed memory back to the kernel from now on, `SERVE_PURGE_DELAY_MS` after it
/// is freed, and collects what can go now: what a server does when it goes idle, so
/// that a burst's KV cache and activations do not stay resident. Memory freed while
/// purging was off (`keep_freed_memory`) is never handed back later, even by a forced
/// collection (tests/serve_load.rs fails when purging is switched off during work and
/// on only when idle), so purging stays on, with a delay longer than a burst's steps:
/// a forced collection purges what is pending whatever its delay.
pub fn purge_freed_memory() {
    // SAFETY: an option store is a plain write, and `mi_collect` may be called from
    // any thread at any time.
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, SERVE_PURGE_DELAY_MS);
        libmimalloc_sys::mi_collect(true);
    }
}

/// How long freed memory waits before it is handed back while the server works.
/// mimalloc's default, 10 ms, is about two decoding steps: each step's buffers went
/// back to the kernel and the next step faulted fresh zeroed pages in, with the
/// threads waiting on each other in the page faults. Measured on 16 clients (tiny
/// model, 2 cores, ten bursts of 16 requests, median): a burst took 355 ms at 10 ms,
/// 255 ms at 1 s and 265 ms with purging off, and the server's threads used 1.5 of
/// the 2 cores at 10 ms (BENCHMARKS.md, issue 12).
const SERVE_PURGE_DELAY_MS: std::ffi::c_long = 1000;

/// Returns the memory mimalloc holds but no longer uses to the kernel, then goes back
/// to keeping it (`keep_freed_memory`): what a measurement of one stage's peak memory
/// needs first, so that an earlier stage's freed buffers do not count as its own.
pub fn release_freed_memory() {
    // SAFETY: option stores and a collection of mimalloc's own empty pages; no
    // pointer is handed over. Where mimalloc is not the global allocator its heaps
    // are empty and this does nothing.
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0);
        libmimalloc_sys::mi_collect(true);
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1);
    }
}
