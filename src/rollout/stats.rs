//! Statistics of a batch of samples that every method logs (under its own names):
//! response lengths, how many ended with an eos, and which end token each used.

use crate::generate::{end_token_counts, Completion, FinishReason};

#[derive(Debug, Clone, PartialEq)]
pub struct SampleStats {
    pub mean_length: f64,
    /// Responses that ended with an eos (not cut at max_new_tokens).
    pub num_eos: usize,
    /// (eos id, share of all responses that ended with it), for every eos id.
    pub end_token_shares: Vec<(u32, f64)>,
}

impl SampleStats {
    pub fn of(samples: &[Completion], eos_ids: &[u32]) -> Self {
        let n = samples.len().max(1) as f64;
        let ends = end_token_counts(samples);
        SampleStats {
            mean_length: samples.iter().map(|c| c.tokens.len() as f64).sum::<f64>() / n,
            num_eos: samples
                .iter()
                .filter(|c| c.finish_reason == FinishReason::Eos)
                .count(),
            end_token_shares: eos_ids
                .iter()
                .map(|id| (*id, ends.get(id).copied().unwrap_or(0) as f64 / n))
                .collect(),
        }
    }
}

/// Mean and population standard deviation.
pub fn mean_std(xs: &[f64]) -> (f64, f64) {
    let n = xs.len().max(1) as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n;
    (mean, var.sqrt())
}
