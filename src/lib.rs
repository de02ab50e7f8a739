//! rlhf: the InstructGPT training system (SFT → reward model from K-way rankings →
//! PPO with a per-token KL penalty and pretraining mix) on candle, in one crate.
//!
//! The modules follow the pipeline: `model` (backbones, heads, KV cache, HF import
//! and export), `data` (formats, tokenization, chat templates), `generate` (batched
//! sampling with logprobs), `losses` (pure loss functions), `train` (optimizer,
//! schedule, checkpoints, the shared loop), `pretrain` and `sft` (the stages), and
//! `cli` (the `rlhf` binary's commands).

pub mod cli;
pub mod data;
pub mod demo;
pub mod error;
pub mod generate;
pub mod losses;
pub mod model;
pub mod ops;
pub mod ppo;
pub mod pretrain;
pub mod progress;
pub mod rm;
pub mod sft;
pub mod train;

pub use error::{Error, Result};
