//! Response batches: prompt + response rows padded into one batch, and the forward
//! passes that score their response tokens one by one (log-probs under a causal LM,
//! values under a scalar model). Shared by the RL methods (PPO's rollout and update,
//! the frozen reference policy) and free of any of them.
//!
//! Mask convention (`losses`): in a row `prompt ++ response`, the logits (and the
//! critic's value) at position P − 1 + j belong to response token j — the state
//! before the token is emitted. Padding and anything after the eos never appear: a
//! response's vectors have exactly its length.

use candle_core::Tensor;

use super::packed::Packed;
use super::scalar::ScalarModel;
use super::{AttentionMask, CausalLm};
use crate::error::Result;

/// A batch of prompt + response rows, packed (`model::packed`: several short rows
/// share one row of the batch, each attending only to itself, and rows that begin
/// alike, such as responses to one prompt, share that prefix when that saves enough),
/// and the flat positions of (R·W) whose outputs score response tokens.
pub struct ResponseBatch {
    pub ids: Tensor, // (R, W)
    pub mask: AttentionMask,
    pub positions: Tensor, // (M,) u32 into the flattened (R·W)
    pub targets: Tensor,   // (M,) u32: the response tokens
    /// Response length of each given row (splits the M outputs back per row; a row
    /// is one prompt + response, whichever row of `ids` it was packed into).
    pub lengths: Vec<usize>,
    /// The temperature the responses were sampled at: log-probs (and entropies) are
    /// those of softmax(logits / T), the distribution the samples came from (as TRL
    /// computes them), so that an RL method's ratio and KL describe the sampling
    /// policy. 1 by default.
    pub temperature: f32,
}

impl ResponseBatch {
    pub fn new(rows: &[(&[u32], &[u32])], pad: u32, device: &candle_core::Device) -> Result<Self> {
        // The state before response token 0 is the prompt's last token.
        if let Some(i) = rows.iter().position(|(p, _)| p.is_empty()) {
            return Err(crate::error::Error::Invalid(format!(
                "response row {i} has an empty prompt"
            )));
        }
        let packed = Packed::new(rows, pad, device)?;
        let mut positions = vec![];
        let mut targets = vec![];
        let mut lengths = vec![];
        for (i, (p, r)) in rows.iter().enumerate() {
            for (j, &t) in r.iter().enumerate() {
                positions.push(packed.flat(i, p.len() - 1 + j) as u32);
                targets.push(t);
            }
            lengths.push(r.len());
        }
        let m = positions.len();
        Ok(ResponseBatch {
            ids: packed.ids,
            mask: packed.mask,
            positions: Tensor::from_vec(positions, m, device)?,
            targets: Tensor::from_vec(targets, m, device)?,
            lengths,
            temperature: 1.0,
        })
    }

    /// The same batch, scored at temperature `t` (see `temperature`).
    pub fn with_temperature(mut self, t: f32) -> Self {
        self.temperature = t;
        self
    }

    /// Hidden states scaled so that the (bias-free) LM head gives logits / T.
    fn tempered(&self, hidden: Tensor) -> Result<Tensor> {
        if self.temperature == 1.0 {
            return Ok(hidden);
        }
        Ok((hidden / self.temperature as f64)?)
    }

    /// Splits a flat (M,) tensor into one vector per row.
    pub fn split(&self, flat: &Tensor) -> Result<Vec<Vec<f32>>> {
        let v: Vec<f32> = flat.detach().to_vec1()?;
        let mut out = vec![];
        let mut at = 0;
        for &n in &self.lengths {
            out.push(v[at..at + n].to_vec());
            at += n;
        }
        Ok(out)
    }
}

/// log π(response token) for every response token of the batch (M,), with the
/// per-token entropy (detached) when asked. Gradients flow when the model is trainable.
pub fn logprobs_of(
    model: &CausalLm,
    batch: &ResponseBatch,
    with_entropy: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let hidden = model.backbone.forward(&batch.ids, &batch.mask, None)?; // (R, W, C)
    let (b, t, c) = hidden.dims3()?;
    let picked = batch.tempered(
        hidden
            .reshape((b * t, c))?
            .index_select(&batch.positions, 0)?,
    )?; // (M, C)
    if with_entropy {
        let (logp, ent) = model
            .lm_head
            .token_logprobs_and_entropy(&picked, &batch.targets)?; // (M,) each
        return Ok((logp, Some(ent)));
    }
    Ok((model.lm_head.token_logprobs(&picked, &batch.targets)?, None)) // (M,)
}

/// The critic's value of the state before each response token (M,).
pub fn values_of(critic: &ScalarModel, batch: &ResponseBatch) -> Result<Tensor> {
    let v = critic.forward(&batch.ids, &batch.mask)?; // (R, W)
    Ok(v.flatten_all()?.index_select(&batch.positions, 0)?)
}

/// One vector per response row.
pub type PerRow = Vec<Vec<f32>>;

/// Response positions whose logits are materialised at once when no gradient is
/// needed: bounds the (positions × vocabulary) buffers during scoring.
const SCORING_CHUNK: usize = 128;

/// Detached per-row log-probs (and entropies) of the batch's responses under `model`.
pub fn response_logprobs(
    model: &CausalLm,
    batch: &ResponseBatch,
    with_entropy: bool,
) -> Result<(PerRow, Option<PerRow>)> {
    // Through detached weights the forward records no graph, so each layer's
    // intermediates are freed as it goes instead of living until the end.
    let model = &model.detached();
    let hidden = model.backbone.forward(&batch.ids, &batch.mask, None)?; // (R, W, C)
    let (b, t, c) = hidden.dims3()?;
    let hidden = hidden.reshape((b * t, c))?; // (R·W, C)
    let m = batch.positions.dim(0)?;
    let (mut logp, mut ent) = (Vec::with_capacity(m), Vec::with_capacity(m));
    for start in (0..m).step_by(SCORING_CHUNK) {
        let n = SCORING_CHUNK.min(m - start);
        let picked =
            batch.tempered(hidden.index_select(&batch.positions.narrow(0, start, n)?, 0)?)?; // (n, C)
        let targets = batch.targets.narrow(0, start, n)?; // (n,)
        if with_entropy {
            let (lp, h) = model
                .lm_head
                .token_logprobs_and_entropy(&picked, &targets)?; // (n,) each
            logp.extend(lp.to_vec1::<f32>()?);
            ent.extend(h.to_vec1::<f32>()?);
        } else {
            logp.extend(
                model
                    .lm_head
                    .token_logprobs(&picked, &targets)?
                    .to_vec1::<f32>()?,
            );
        }
    }
    let logp = batch.split(&Tensor::from_vec(logp, m, &model.device)?)?;
    let ent = if with_entropy {
        Some(batch.split(&Tensor::from_vec(ent, m, &model.device)?)?)
    } else {
        None
    };
    Ok((logp, ent))
}
