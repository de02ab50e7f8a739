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
