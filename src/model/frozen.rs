//! Frozen models, by type: the reference policy and the reward model of PPO. A
//! `Frozen` wraps a model, exposes only what PPO reads from it, returns detached
//! tensors and gives no access to its parameters, so no optimizer can reach them.

use super::scalar::{PretrainedScalar, RewardNormalization};
use super::CausalLm;
use crate::data::tokenizer::Tokenizer;
use crate::error::Result;
use crate::ppo::rollout::ResponseBatch;

pub struct Frozen<M> {
    inner: M,
}

impl<M> Frozen<M> {
    pub fn new(inner: M) -> Self {
        Frozen { inner }
    }
}

impl Frozen<CausalLm> {
    /// log π(response token | prefix) under the frozen policy, per response.
    pub fn response_logprobs(&self, batch: &ResponseBatch) -> Result<Vec<Vec<f32>>> {
        let (logp, _) = crate::ppo::rollout::response_logprobs(&self.inner, batch, false)?;
        Ok(logp)
    }

    pub fn context_length(&self) -> usize {
        self.inner.config.context_length()
    }
}

impl Frozen<PretrainedScalar> {
    /// The reward model's raw score of prompt + response (scored at its eos).
    pub fn score(&self, seqs: &[Vec<u32>]) -> Result<Vec<f64>> {
        let r = self
            .inner
            .model
            .score_last(seqs, self.inner.tokenizer.pad_token_id())?;
        Ok(r.detach().to_dtype(candle_core::DType::F64)?.to_vec1()?)
    }

    pub fn normalization(&self) -> Option<RewardNormalization> {
        self.inner.normalization
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.inner.tokenizer
    }

    pub fn eos(&self) -> Result<u32> {
        self.inner.eos()
    }
}
