//! Experience: what one rollout collects for each sampled response. The batched
//! forward passes that fill it (policy and reference log-probs, critic values) are
//! `model::response`'s; the same mask convention holds: a response's vectors have
//! exactly its length, its eos included when it has one.

use serde::{Deserialize, Serialize};

/// One sampled response and everything PPO computed about it. Vectors are (R,), R
/// the response length (its eos included when it has one).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Experience {
    pub prompt: Vec<u32>,
    pub response: Vec<u32>,
    /// log π_old(token): the policy that sampled it.
    pub logprobs: Vec<f32>,
    /// log π_SFT(token): the frozen reference.
    pub ref_logprobs: Vec<f32>,
    /// V(state before the token): the critic at rollout time.
    pub values: Vec<f32>,
    /// The reward model's score as PPO uses it (normalised, clipped, penalised).
    pub score: f32,
    /// Shaped per-token rewards: −β·KL on every token, the score on the last.
    pub rewards: Vec<f32>,
    pub advantages: Vec<f32>,
    pub returns: Vec<f32>,
    /// Whether the response ended with an eos (not cut at max_new_tokens).
    pub ended: bool,
}
