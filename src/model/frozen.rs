//! Frozen models, by type: the reference policy and the reward model of PPO. A
//! `Frozen` wraps a model, exposes only what PPO reads from it, returns detached
//! tensors and gives no access to its parameters, so no optimizer can reach them.

use super::response::{response_logprobs, ResponseBatch};
use super::scalar::{PretrainedScalar, RewardNormalization};
use super::CausalLm;
use crate::data::prompts::Prompt;
use crate::data::reward_input::Response;
use crate::error::Result;

pub struct Frozen<M> {
    inner: M,
}

/// A model that can give a copy of itself with every tensor detached.
pub trait Detach {
    fn detached(&self) -> Self;
}

impl Detach for CausalLm {
    fn detached(&self) -> Self {
        CausalLm::detached(self)
    }
}

impl Detach for PretrainedScalar {
    fn detached(&self) -> Self {
        PretrainedScalar {
            model: self.model.detached(),
            ..self.clone()
        }
    }
}

impl<M: Detach> Frozen<M> {
    /// Keeps the model's detached copy: no forward through it records a graph.
    pub fn new(inner: M) -> Self {
        Frozen {
            inner: inner.detached(),
        }
    }
}

impl Frozen<CausalLm> {
    /// log π(response token | prefix) under the frozen policy, per response.
    pub fn response_logprobs(&self, batch: &ResponseBatch) -> Result<Vec<Vec<f32>>> {
        let (logp, _) = response_logprobs(&self.inner, batch, false)?;
        Ok(logp)
    }
}

impl Frozen<PretrainedScalar> {
    /// The ids the reward model reads for a prompt and a response's text (the
    /// decoded completion, its end token left out): `RewardInput`'s rule, the same
    /// as `rm train`, `rm eval` and `rm score`.
    pub fn input(&self, prompt: &Prompt, response: &str) -> Result<Vec<u32>> {
        self.inner
            .reward_input()?
            .ids(prompt, &Response::Text(response.to_string()))
    }

    /// The reward model's raw score of each input, read at its last token.
    pub fn score(&self, inputs: &[Vec<u32>]) -> Result<Vec<f64>> {
        let r = self
            .inner
            .model
            .score_last(inputs, self.inner.tokenizer.pad_token_id())?;
        Ok(r.detach().to_dtype(candle_core::DType::F64)?.to_vec1()?)
    }

    pub fn normalization(&self) -> Option<RewardNormalization> {
        self.inner.normalization
    }

    /// A scalar model for a LoRA critic that starts from this reward model: the same
    /// backbone weights (shared storage, not copied; the critic's adapter freezes
    /// them in turn) and a copy of the score head, so that training the critic's head
    /// leaves the reward model as it is.
    pub fn share_backbone(&self) -> Result<PretrainedScalar> {
        let mut p = self.inner.clone();
        let head = candle_core::Var::from_tensor(&p.model.head.weight.copy()?)?;
        p.model.params = p
            .model
            .params
            .with_var(super::scalar::SCORE_WEIGHT, head.clone());
        p.model.head.weight = head.as_tensor().clone();
        Ok(p)
    }

    /// The longest input the reward model reads.
    pub fn context_length(&self) -> usize {
        self.inner.model.config.context_length()
    }
}
