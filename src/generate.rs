//! Batched sampling with a KV cache, returning each sampled token's log-probability.
//!
//! Prompts are left-padded into one batch, prefilled in one forward pass, then
//! decoded one token per step. Sampling follows transformers' processor order
//! (repetition penalty → temperature → top-k → top-p); the log-probability
//! returned for each token is under the model's *unmodified* distribution
//! (log-softmax of the raw logits), which is what PPO's ratio and KL penalty need.
//! All randomness comes from ChaCha streams, so a seed reproduces a run: one stream
//! for the whole batch (`generate`), or one per row (`generate_per_row`), with which
//! a row's tokens do not depend on the other rows of its batch.

use candle_core::Tensor;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

use crate::data::tokenizer::Tokenizer;
use crate::error::{Error, Result};
use crate::model::{AttentionMask, CausalLm};

/// How to pick tokens. `temperature == 0` is greedy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    pub max_new_tokens: usize,
    pub temperature: f32,
    /// Keep only the k most likely tokens (0 = off).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches top_p (1.0 = off).
    pub top_p: f32,
    /// transformers' CTRL-style penalty on tokens already in the sequence (1.0 = off).
    pub repetition_penalty: f32,
    /// Any of these ids ends a sequence (the token is kept, with its logprob).
    pub eos_token_ids: Vec<u32>,
    /// Any of these strings in the decoded completion ends it; the text is cut there.
    pub stop_strings: Vec<String>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            max_new_tokens: 64,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            eos_token_ids: vec![],
            stop_strings: vec![],
        }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        use crate::settings::{at_least, float, Range::*};
        float("temperature", self.temperature, AtLeast(0.0))?;
        float("top_p", self.top_p, LeftOpen(0.0, 1.0))?;
        float("repetition_penalty", self.repetition_penalty, Above(0.0))?;
        at_least("max_new_tokens", self.max_new_tokens, 1)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An eos id was sampled.
    Eos,
    /// A stop string appeared in the text.
    Stop,
    /// max_new_tokens was reached.
    Length,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    pub prompt_tokens: Vec<u32>,
    /// Sampled tokens, the final eos included.
    pub tokens: Vec<u32>,
    /// log π(token | prefix) for each sampled token, under the raw logits.
    pub logprobs: Vec<f32>,
    /// The decoded completion, special tokens skipped, cut at a stop string.
    pub text: String,
    pub finish_reason: FinishReason,
}

/// Where a batch's random draws come from.
enum Draws<'a> {
    /// One stream, drawn row after row at each step.
    Shared(&'a mut ChaCha8Rng),
    /// Row b draws from stream b only.
    PerRow(&'a mut [ChaCha8Rng]),
}

impl Draws<'_> {
    fn for_row(&mut self, b: usize) -> &mut ChaCha8Rng {
        match self {
            Draws::Shared(rng) => rng,
            Draws::PerRow(rngs) => &mut rngs[b],
        }
    }
}

/// Samples a completion for every prompt (token ids, any lengths) in one batch.
pub fn generate(
    model: &CausalLm,
    tokenizer: &Tokenizer,
    prompts: &[Vec<u32>],
    params: &SamplingParams,
    rng: &mut ChaCha8Rng,
) -> Result<Vec<Completion>> {
    generate_with(model, tokenizer, prompts, params, Draws::Shared(rng))
}

/// As `generate`, with prompt b's tokens drawn from `rngs[b]` alone: the same
/// prompt and stream give the same completion in any batch (up to float rounding
/// of the batched forward), which is what lets a data-parallel run sample what one
/// process with the whole batch samples.
pub fn generate_per_row(
    model: &CausalLm,
    tokenizer: &Tokenizer,
    prompts: &[Vec<u32>],
    params: &SamplingParams,
    rngs: &mut [ChaCha8Rng],
) -> Result<Vec<Completion>> {
    if rngs.len() != prompts.len() {
        return Err(Error::Invalid(format!(
            "{} random streams for {} prompts",
            rngs.len(),
            prompts.len()
        )));
    }
    generate_with(model, tokenizer, prompts, params, Draws::PerRow(rngs))
}

fn generate_with(
    model: &CausalLm,
    tokenizer: &Tokenizer,
    prompts: &[Vec<u32>],
    params: &SamplingParams,
    mut draws: Draws,
) -> Result<Vec<Completion>> {
    params.validate()?;
    let context = model.config.context_length();
    for (index, p) in prompts.iter().enumerate() {
        if p.is_empty() {
            return Err(Error::Invalid(format!(
                "prompt {index} is empty (0 tokens)"
            )));
        }
        if p.len() + params.max_new_tokens > context {
            return Err(Error::PromptTooLong {
                index,
                prompt_tokens: p.len(),
                max_new_tokens: params.max_new_tokens,
                context,
            });
        }
    }
    if prompts.is_empty() {
        return Ok(vec![]);
    }
    // Sampling needs no gradient: through detached weights no step keeps its
    // intermediates for a backward pass.
    let model = &model.detached();
    let device = &model.device;
    let pad = tokenizer.pad_token_id();
    let width = prompts.iter().map(Vec::len).max().unwrap_or(0);

    // A prompt repeated in the batch (K samples of it) is computed once: the distinct
    // prompts are prefilled, and each row then gets a copy of its prompt's cache row
    // and logits. `row_of[b]` is row b's prompt among the distinct ones.
    let mut distinct: Vec<&Vec<u32>> = vec![];
    let mut first: HashMap<&Vec<u32>, u32> = HashMap::new();
    let row_of: Vec<u32> = prompts
        .iter()
        .map(|p| {
            *first.entry(p).or_insert_with(|| {
                distinct.push(p);
                distinct.len() as u32 - 1
            })
        })
        .collect();

    // Left-pad the distinct prompts: (U, S0).
    let mut key_mask: Vec<Vec<u8>> = Vec::with_capacity(distinct.len());
    let mut ids = Vec::with_capacity(distinct.len() * width);
    for p in &distinct {
        let n_pad = width - p.len();
        ids.extend(std::iter::repeat_n(pad, n_pad).chain(p.iter().copied()));
        key_mask.push([vec![0u8; n_pad], vec![1u8; p.len()]].concat());
    }
    let ids = Tensor::from_vec(ids, (distinct.len(), width), device)?; // (U, S0)

    let mut cache = model.new_cache();
    let mask = AttentionMask::new(&key_mask, width, device)?;
    let mut logits = last_logits(model, &ids, &mask, &mut cache)?; // U rows of V
    if distinct.len() < prompts.len() {
        cache.select_rows(&row_of)?; // (B, ...)
        logits = row_of.iter().map(|&u| logits[u as usize].clone()).collect(); // B rows
        key_mask = row_of
            .iter()
            .map(|&u| key_mask[u as usize].clone())
            .collect();
    }

    let mut out: Vec<Completion> = prompts
        .iter()
        .map(|p| Completion {
            prompt_tokens: p.clone(),
            tokens: vec![],
            logprobs: vec![],
            text: String::new(),
            finish_reason: FinishReason::Length,
        })
        .collect();
    let mut done = vec![false; prompts.len()];

    for _step in 0..params.max_new_tokens {
        let sampled = sample_rows(
            &logits,
            |b| {
                (!done[b]).then(|| {
                    let c = &out[b];
                    // Only the repetition penalty reads the history: build it only then.
                    if params.repetition_penalty != 1.0 {
                        c.prompt_tokens.iter().chain(&c.tokens).copied().collect()
                    } else {
                        vec![]
                    }
                })
            },
            params,
            &mut draws,
        );
        let mut next = Vec::with_capacity(prompts.len());
        for (b, sampled) in sampled.into_iter().enumerate() {
            let Some((token, logprob)) = sampled else {
                next.push(pad);
                continue;
            };
            let c = &mut out[b];
            c.tokens.push(token);
            c.logprobs.push(logprob);
            next.push(token);
            if params.eos_token_ids.contains(&token) {
                c.finish_reason = FinishReason::Eos;
                done[b] = true;
            } else if !params.stop_strings.is_empty() {
                let text = tokenizer.decode(&c.tokens, true)?;
                if params
                    .stop_strings
                    .iter()
                    .any(|s| text.contains(s.as_str()))
                {
                    c.finish_reason = FinishReason::Stop;
                    done[b] = true;
                }
            }
            if !done[b] && c.tokens.len() == params.max_new_tokens {
                done[b] = true;
            }
        }
        if done.iter().all(|&d| d) {
            break;
        }
        for (row, &d) in key_mask.iter_mut().zip(&done) {
            row.push(u8::from(!d));
        }
        let step_ids = Tensor::from_vec(next, (prompts.len(), 1), device)?; // (B, 1)
        let mask = AttentionMask::new(&key_mask, 1, device)?;
        logits = last_logits(model, &step_ids, &mask, &mut cache)?;
    }

    for c in &mut out {
        let body = match c.finish_reason {
            FinishReason::Eos => &c.tokens[..c.tokens.len() - 1],
            _ => &c.tokens[..],
        };
        let mut text = tokenizer.decode(body, true)?;
        if let Some(cut) = params
            .stop_strings
            .iter()
            .filter_map(|s| text.find(s.as_str()))
            .min()
        {
            text.truncate(cut);
        }
        c.text = text;
    }
    Ok(out)
}

/// `n` samples for every prompt, in one batch of `prompts.len() × n` sequences: the
/// result holds, per prompt, its `n` completions (InstructGPT's K samples per prompt
/// for ranking, `--num_return_sequences`).
pub fn generate_n(
    model: &CausalLm,
    tokenizer: &Tokenizer,
    prompts: &[Vec<u32>],
    n: usize,
    params: &SamplingParams,
    rng: &mut ChaCha8Rng,
) -> Result<Vec<Vec<Completion>>> {
    if n == 0 {
        return Err(Error::Invalid(
            "num_return_sequences must be ≥ 1, got 0".into(),
        ));
    }
    let repeated: Vec<Vec<u32>> = prompts
        .iter()
        .flat_map(|p| std::iter::repeat_n(p.clone(), n))
        .collect();
    let mut out = generate(model, tokenizer, &repeated, params, rng)?.into_iter();
    Ok(prompts
        .iter()
        .map(|_| out.by_ref().take(n).collect())
        .collect())
}

/// How many completions stopped at each end token (eos id → count); completions cut
/// at max_new_tokens or a stop string are not counted. A policy that learned to end
/// its turns with another token than its SFT model did shows here.
pub fn end_token_counts(completions: &[Completion]) -> BTreeMap<u32, usize> {
    let mut counts = BTreeMap::new();
    for c in completions {
        if let (FinishReason::Eos, Some(&t)) = (c.finish_reason, c.tokens.last()) {
            *counts.entry(t).or_insert(0) += 1;
        }
    }
    counts
}

/// Forward with the cache and return the last position's logits, one Vec per row.
fn last_logits(
    model: &CausalLm,
    ids: &Tensor,
    mask: &AttentionMask,
    cache: &mut crate::model::KvCache,
) -> Result<Vec<Vec<f32>>> {
    let hidden = model.backbone.forward(ids, mask, Some(cache))?; // (B, T, C)
    let t = hidden.dim(1)?;
    let last = hidden.narrow(1, t - 1, 1)?; // (B, 1, C)
    let logits = model.lm_head.forward(&last)?.squeeze(1)?; // (B, V)
    Ok(logits.to_vec2()?)
}

/// One decoding step's tokens and their log-probabilities, `None` for the rows
/// `history` gives none for (finished). Each row's distribution is computed first,
/// rows in parallel when there is enough work (the exponentials over the vocabulary
/// are most of sampling), and the draws then come in row order, so a shared stream
/// is drawn exactly as row after row (`sample_token_and_logprob` on each row).
fn sample_rows(
    logits: &[Vec<f32>],
    history: impl Fn(usize) -> Option<Vec<u32>> + Sync,
    params: &SamplingParams,
    draws: &mut Draws,
) -> Vec<Option<(u32, f32)>> {
    let row = |b: usize| history(b).map(|h| Distribution::with_lse(&logits[b], &h, params));
    let work = logits.len() * logits.first().map_or(0, Vec::len);
    let rows: Vec<Option<Distribution>> = if logits.len() > 1 && work >= SAMPLING_PARALLEL_MIN {
        (0..logits.len()).into_par_iter().map(row).collect()
    } else {
        (0..logits.len()).map(row).collect()
    };
    rows.into_iter()
        .enumerate()
        .map(|(b, d)| d.map(|d| d.draw_with_logprob(&logits[b], draws.for_row(b))))
        .collect()
}

/// log softmax(logits)[index], computed in f64.
pub fn log_softmax_at(logits: &[f32], index: usize) -> f32 {
    (logits[index] as f64 - log_sum_exp(logits)) as f32
}

/// log Σ exp(logits), in f64, the maximum taken out first.
fn log_sum_exp(logits: &[f32]) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    logits
        .iter()
        .map(|&x| (x as f64 - max).exp())
        .sum::<f64>()
        .ln()
        + max
}

/// Picks the next token from one row of logits. `history` is the sequence so far
/// (prompt + completion), used by the repetition penalty.
pub fn sample_token(
    logits: &[f32],
    history: &[u32],
    params: &SamplingParams,
    rng: &mut ChaCha8Rng,
) -> u32 {
    Distribution::new(logits, history, params).draw(rng).0
}

/// `sample_token` and the token's log-probability under the unmodified distribution
/// (`log_softmax_at`). With plain sampling (temperature 1, no penalty, top-k or
/// top-p) the sampling weights are exactly log_softmax_at's terms, summed in the same
/// order, so their sum gives the same bits without a second pass of exponentials.
pub fn sample_token_and_logprob(
    logits: &[f32],
    history: &[u32],
    params: &SamplingParams,
    rng: &mut ChaCha8Rng,
) -> (u32, f32) {
    Distribution::new(logits, history, params).draw_with_logprob(logits, rng)
}

/// Rows × vocabulary below which a step's rows are sampled on the calling thread.
const SAMPLING_PARALLEL_MIN: usize = 1 << 14;

/// What a draw needs from one row of logits, computed without the random stream
/// (so rows can be prepared in parallel and drawn in order).
enum Distribution {
    /// Temperature 0: the highest score (and log Σ exp(logits) when `with_lse`
    /// computed it).
    Greedy { token: u32, lse: Option<f64> },
    Weighted {
        /// Candidate ids in the order the draw walks them; `None` for the whole
        /// vocabulary in id order (plain sampling: no list of ids to build and walk).
        candidates: Option<Vec<usize>>,
        /// exp((score − max) / T) of each candidate.
        weights: Vec<f64>,
        total: f64,
        /// log Σ exp(logits) when known: the weights were its terms (plain
        /// sampling), or `with_lse` computed it.
        lse: Option<f64>,
    },
}

impl Distribution {
    fn new(logits: &[f32], history: &[u32], params: &SamplingParams) -> Distribution {
        // The logits themselves unless a penalty changes them (no copy of the row).
        let mut scores = std::borrow::Cow::Borrowed(logits);
        if params.repetition_penalty != 1.0 {
            // transformers' RepetitionPenaltyLogitsProcessor: shrink toward less likely.
            let p = params.repetition_penalty;
            let mut seen = history.to_vec();
            seen.sort_unstable();
            seen.dedup();
            let scores = scores.to_mut();
            for &t in &seen {
                if let Some(s) = scores.get_mut(t as usize) {
                    *s = if *s < 0.0 { *s * p } else { *s / p };
                }
            }
        }
        let scores: &[f32] = &scores;
        if params.temperature == 0.0 {
            return Distribution::Greedy {
                token: argmax(scores) as u32,
                lse: None,
            };
        }
        let inv_t = 1.0 / params.temperature as f64;
        let cut = (params.top_k > 0 && params.top_k < scores.len()) || params.top_p < 1.0;
        if !cut {
            // The whole vocabulary in id order: the same max, weights and sum as the
            // candidate list below would give, without the list.
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let weights: Vec<f64> = scores
                .iter()
                .map(|&x| ((x as f64 - max) * inv_t).exp())
                .collect();
            let total: f64 = weights.iter().sum();
            // The logits unchanged, (x − max)·1 = x − max: `total` is log_sum_exp's
            // sum, term for term.
            let plain = params.repetition_penalty == 1.0 && params.temperature == 1.0;
            return Distribution::Weighted {
                candidates: None,
                weights,
                total,
                lse: plain.then(|| total.ln() + max),
            };
        }
        // Candidate ids: the whole vocabulary unless top-k or top-p cut it. Only top-p
        // needs an order.
        let mut candidates: Vec<usize> = (0..scores.len()).collect();
        if params.top_k > 0 && params.top_k < candidates.len() {
            let k = params.top_k;
            // Highest score first; ties keep the lower id (a total, deterministic order).
            candidates.select_nth_unstable_by(k - 1, |&a, &b| {
                scores[b].total_cmp(&scores[a]).then(a.cmp(&b))
            });
            candidates.truncate(k);
            // A step holds every row's distribution at once: not a vocabulary each.
            candidates.shrink_to_fit();
        }
        let max = candidates
            .iter()
            .map(|&i| scores[i])
            .fold(f32::NEG_INFINITY, f32::max) as f64;
        let weight = |i: usize| ((scores[i] as f64 - max) * inv_t).exp();
        if params.top_p < 1.0 {
            candidates.sort_unstable_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
        }
        let mut weights: Vec<f64> = candidates.iter().map(|&i| weight(i)).collect();
        if params.top_p < 1.0 {
            // The smallest head of the sorted candidates whose mass reaches top_p; the
            // kept weights are the same numbers, so they are truncated, not recomputed.
            let total: f64 = weights.iter().sum();
            let mut cum = 0.0;
            let keep = weights
                .iter()
                .position(|&w| {
                    cum += w / total;
                    cum >= params.top_p as f64
                })
                .map_or(candidates.len(), |i| i + 1);
            candidates.truncate(keep);
            candidates.shrink_to_fit();
            weights.truncate(keep);
            weights.shrink_to_fit();
        }
        let total: f64 = weights.iter().sum();
        Distribution::Weighted {
            candidates: Some(candidates),
            weights,
            total,
            lse: None,
        }
    }

    /// `new`, with log Σ exp(logits) computed here when the weights do not give it.
    fn with_lse(logits: &[f32], history: &[u32], params: &SamplingParams) -> Distribution {
        let mut d = Distribution::new(logits, history, params);
        let (Distribution::Greedy { lse, .. } | Distribution::Weighted { lse, .. }) = &mut d;
        if lse.is_none() {
            *lse = Some(log_sum_exp(logits));
        }
        d
    }

    /// The token, and log Σ exp(logits) when known.
    fn draw(&self, rng: &mut ChaCha8Rng) -> (u32, Option<f64>) {
        match self {
            Distribution::Greedy { token, lse } => (*token, *lse),
            Distribution::Weighted {
                candidates,
                weights,
                total,
                lse,
            } => {
                let r = rng.random::<f64>() * total;
                let id = |k: usize| candidates.as_ref().map_or(k, |c| c[k]) as u32;
                let mut cum = 0.0;
                for (k, w) in weights.iter().enumerate() {
                    cum += w;
                    if r < cum {
                        return (id(k), *lse);
                    }
                }
                (id(weights.len() - 1), *lse)
            }
        }
    }

    /// The token and its log-probability under the unmodified `logits`.
    fn draw_with_logprob(&self, logits: &[f32], rng: &mut ChaCha8Rng) -> (u32, f32) {
        let (token, lse) = self.draw(rng);
        let lse = lse.unwrap_or_else(|| log_sum_exp(logits));
        (token, (logits[token as usize] as f64 - lse) as f32)
    }
}

fn argmax(xs: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// A step's rows, prepared in parallel, draw from a shared stream exactly as
    /// `sample_token_and_logprob` row after row would, and from per-row streams as
    /// each row alone, one draw per running row (none at temperature 0); finished
    /// rows draw nothing. The fingerprint pins the tokens and log-prob bits to those
    /// of the sequential `sample` before this split (96230ba).
    #[test]
    fn a_steps_rows_sample_as_row_after_row() {
        let vocab = SAMPLING_PARALLEL_MIN / 4 + 3; // 6 rows: the parallel path
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let logits: Vec<Vec<f32>> = (0..6)
            .map(|_| {
                (0..vocab)
                    .map(|_| rng.random::<f32>() * 8.0 - 4.0)
                    .collect()
            })
            .collect();
        let running = [true, false, true, true, false, true];
        let settings = [
            params(1.0),
            params(0.7),
            params(0.0),
            SamplingParams {
                top_p: 0.8,
                top_k: 40,
                repetition_penalty: 1.3,
                ..params(1.2)
            },
        ];
        let bits = |v: &[Option<(u32, f32)>]| -> Vec<Option<(u32, u32)>> {
            v.iter().map(|o| o.map(|(t, l)| (t, l.to_bits()))).collect()
        };
        let mut fingerprint = 0xcbf2_9ce4_8422_2325u64; // FNV-1a over tokens and bits
        for p in &settings {
            let history = |b: usize| running[b].then(|| vec![b as u32, 7, 9]);
            let mut shared = ChaCha8Rng::seed_from_u64(11);
            let got = sample_rows(&logits, history, p, &mut Draws::Shared(&mut shared));
            let mut sequential = ChaCha8Rng::seed_from_u64(11);
            let want: Vec<Option<(u32, f32)>> = (0..6)
                .map(|b| {
                    history(b).map(|h| sample_token_and_logprob(&logits[b], &h, p, &mut sequential))
                })
                .collect();
            assert_eq!(bits(&got), bits(&want), "shared stream, {p:?}");
            assert_eq!(
                shared.random::<u64>(),
                sequential.random::<u64>(),
                "as many draws"
            );
            for (t, l) in got.iter().flatten() {
                for byte in [t.to_le_bytes(), l.to_bits().to_le_bytes()].concat() {
                    fingerprint = (fingerprint ^ byte as u64).wrapping_mul(0x100_0000_01b3);
                }
            }

            let mut streams: Vec<ChaCha8Rng> = (0..6).map(ChaCha8Rng::seed_from_u64).collect();
            let got = sample_rows(&logits, history, p, &mut Draws::PerRow(&mut streams));
            for (b, (got, stream)) in got.iter().zip(&mut streams).enumerate() {
                let mut own = ChaCha8Rng::seed_from_u64(b as u64);
                let want =
                    history(b).map(|h| sample_token_and_logprob(&logits[b], &h, p, &mut own));
                assert_eq!(bits(&[*got]), bits(&[want]), "row {b}'s own stream, {p:?}");
                let draws = usize::from(running[b] && p.temperature != 0.0);
                let mut fresh = ChaCha8Rng::seed_from_u64(b as u64);
                for _ in 0..draws {
                    fresh.random::<f64>();
                }
                assert_eq!(
                    stream.random::<u64>(),
                    fresh.random::<u64>(),
                    "row {b}: {draws} draws"
                );
            }
        }
        assert_eq!(
            fingerprint, GOLDEN,
            "not the tokens and bits of 96230ba's `sample`"
        );
    }

    /// `a_steps_rows_sample_as_row_after_row`'s fingerprint.
    const GOLDEN: u64 = 16_412_741_962_811_351_588;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            ..Default::default()
        }
    }

    #[test]
    fn end_tokens_are_counted_for_completions_that_stopped_at_one() {
        let c = |tokens: Vec<u32>, finish_reason| Completion {
            prompt_tokens: vec![5],
            tokens,
            logprobs: vec![],
            text: String::new(),
            finish_reason,
        };
        let counts = end_token_counts(&[
            c(vec![7, 2], FinishReason::Eos),
            c(vec![2], FinishReason::Eos),
            c(vec![7, 0], FinishReason::Eos),
            c(vec![7, 0], FinishReason::Length), // cut: its last token is not an end
            c(vec![], FinishReason::Stop),
        ]);
        assert_eq!(counts, BTreeMap::from([(0, 1), (2, 2)]));
    }

    #[test]
    fn greedy_picks_the_first_maximum() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        assert_eq!(
            sample_token(&[0.1, 2.0, 2.0, -1.0], &[], &params(0.0), &mut rng),
            1
        );
    }

    #[test]
    fn repetition_penalty_follows_transformers() {
        // Token 1 (score 2.0) seen → 2.0 / 4 = 0.5 < token 2's 1.0; negative scores
        // are multiplied: token 0 (-1.0) → -4.0.
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let p = SamplingParams {
            repetition_penalty: 4.0,
            ..params(0.0)
        };
        assert_eq!(sample_token(&[-1.0, 2.0, 1.0], &[1, 0], &p, &mut rng), 2);
    }

    #[test]
    fn top_k_one_is_greedy_and_top_p_keeps_the_nucleus() {
        let logits = [0.0f32, 3.0, 2.9, -5.0];
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let k1 = SamplingParams {
            top_k: 1,
            ..params(1.0)
        };
        for _ in 0..50 {
            assert_eq!(sample_token(&logits, &[], &k1, &mut rng), 1);
        }
        // p(1) ≈ 0.50, p(2) ≈ 0.45, p(0) ≈ 0.025: top_p 0.9 keeps exactly {1, 2}.
        let p9 = SamplingParams {
            top_p: 0.9,
            ..params(1.0)
        };
        let mut seen = [0usize; 4];
        for _ in 0..2000 {
            seen[sample_token(&logits, &[], &p9, &mut rng) as usize] += 1;
        }
        assert_eq!(seen[0] + seen[3], 0);
        assert!(seen[1] > 800 && seen[2] > 800, "{seen:?}");
    }

    #[test]
    fn temperature_sampling_matches_softmax_frequencies() {
        let logits = [0.0f32, (2.0f32).ln()]; // p = 1/3, 2/3
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let n = 30_000;
        let ones = (0..n)
            .filter(|_| sample_token(&logits, &[], &params(1.0), &mut rng) == 1)
            .count();
        let freq = ones as f64 / n as f64;
        assert!((freq - 2.0 / 3.0).abs() < 0.01, "{freq}");
        // Temperature 2 flattens: p ∝ exp(x/2) → 1 : √2, p(1) = √2/(1+√2) ≈ 0.586.
        let t2 = params(2.0);
        let ones = (0..n)
            .filter(|_| sample_token(&logits, &[], &t2, &mut rng) == 1)
            .count();
        let freq = ones as f64 / n as f64;
        assert!((freq - 0.5858).abs() < 0.01, "{freq}");
    }

    #[test]
    fn same_seed_same_samples() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let draw = |seed| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            (0..20)
                .map(|_| sample_token(&logits, &[], &params(1.0), &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        assert_ne!(draw(3), draw(4));
    }

    #[test]
    fn the_sampled_logprob_has_log_softmax_at_bits() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let logits: Vec<f32> = (0..1000).map(|_| rng.random_range(-8.0f32..8.0)).collect();
        let settings = [
            params(1.0),
            params(0.7),
            SamplingParams {
                top_k: 20,
                ..params(1.0)
            },
            SamplingParams {
                top_p: 0.9,
                ..params(1.0)
            },
            SamplingParams {
                repetition_penalty: 1.3,
                ..params(1.0)
            },
        ];
        for (n, p) in settings.iter().enumerate() {
            let (mut a, mut b) = (ChaCha8Rng::seed_from_u64(9), ChaCha8Rng::seed_from_u64(9));
            for _ in 0..50 {
                let (token, logprob) = sample_token_and_logprob(&logits, &[3, 4], p, &mut a);
                assert_eq!(
                    token,
                    sample_token(&logits, &[3, 4], p, &mut b),
                    "setting {n}"
                );
                let expected = log_softmax_at(&logits, token as usize);
                assert_eq!(logprob.to_bits(), expected.to_bits(), "setting {n}");
            }
        }
    }

    #[test]
    fn log_softmax_at_is_normalised() {
        let logits = [1.0f32, 2.0, 3.0];
        let total: f64 = (0..3)
            .map(|i| (log_softmax_at(&logits, i) as f64).exp())
            .sum();
        assert!((total - 1.0).abs() < 1e-6);
        let expected = 3.0 - (1f64.exp() + 2f64.exp() + 3f64.exp()).ln();
        assert!((log_softmax_at(&logits, 2) as f64 - expected).abs() < 1e-6);
    }
}
