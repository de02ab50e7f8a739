//! The demo's evaluation, on prompts that no training stage saw (`World::eval_tasks`)
//! and documents the corpus never states (`World::held_out_documents`):
//! - the gold judge's score of each policy's greedy answer, per prompt and family,
//!   and PPO's win rate against SFT;
//! - KL(π ‖ π_SFT) on the eval prompts: responses sampled from π, the mean over them
//!   of Σ_t log π(y_t) − log π_SFT(y_t) (an unbiased estimate of the sequence KL);
//! - how answers end (the share of each eos id, or none), so a policy that switches
//!   its end token shows;
//! - the distinct-answer ratio, so a policy that collapses every answer to one
//!   template shows;
//! - the next-token loss on the held-out documents.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

use super::environment::{Family, Task};
use super::judge;
use crate::error::Result;
use crate::generate::{end_token_counts, generate, Completion, SamplingParams};
use crate::model::hf::Pretrained;
use crate::model::response::{response_logprobs, ResponseBatch};
use crate::train::lm_task::{lm_loss_sum, text_rows, Row};

/// Responses sampled per eval prompt for the KL and end-token figures.
pub const SAMPLES_PER_PROMPT: usize = 4;
/// Eval prompts generated at once.
const CHUNK: usize = 16;

/// A prompt as a one-turn conversation.
pub fn chat(prompt: &str) -> serde_json::Value {
    serde_json::json!([{"role": "user", "content": prompt}])
}

/// The token ids a chat model is prompted with: the conversation rendered by its
/// template with the generation prompt.
pub fn chat_ids(pre: &Pretrained, prompt: &str) -> Result<Vec<u32>> {
    let text = pre.tokenizer.apply_chat_template(&chat(prompt), true)?;
    pre.tokenizer.encode(&text, false)
}

/// Completions of a policy for chat prompts: greedy when `temperature` is 0.
pub fn complete(
    pre: &Pretrained,
    tasks: &[Task],
    per_prompt: usize,
    temperature: f32,
    max_new_tokens: usize,
    seed: u64,
) -> Result<Vec<Completion>> {
    let params = SamplingParams {
        max_new_tokens,
        temperature,
        eos_token_ids: pre.eos_token_ids.clone(),
        ..Default::default()
    };
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = vec![];
    for chunk in tasks.chunks(CHUNK) {
        let mut ids = vec![];
        for t in chunk {
            ids.extend(std::iter::repeat_n(chat_ids(pre, &t.prompt)?, per_prompt));
        }
        out.extend(generate(
            &pre.model,
            &pre.tokenizer,
            &ids,
            &params,
            &mut rng,
        )?);
    }
    Ok(out)
}

/// The mean over `samples` (drawn from the policy that gave their `logprobs`) of the
/// summed per-token log-ratio to `reference`.
pub fn sequence_kl(reference: &Pretrained, samples: &[Completion]) -> Result<f64> {
    let pad = reference.tokenizer.pad_token_id();
    let mut total = 0.0;
    for chunk in samples.chunks(CHUNK) {
        let rows: Vec<(&[u32], &[u32])> = chunk
            .iter()
            .map(|c| (c.prompt_tokens.as_slice(), c.tokens.as_slice()))
            .collect();
        let batch = ResponseBatch::new(&rows, pad, &reference.model.device)?;
        let (ref_logp, _) = response_logprobs(&reference.model, &batch, false)?;
        for (c, r) in chunk.iter().zip(&ref_logp) {
            if c.logprobs.len() != r.len() {
                return Err(crate::error::Error::Invalid(format!(
                    "KL: {} sampled log-probs against {} reference log-probs",
                    c.logprobs.len(),
                    r.len()
                )));
            }
            total += c
                .logprobs
                .iter()
                .zip(r)
                .map(|(&a, &b)| f64::from(a) - f64::from(b))
                .sum::<f64>();
        }
    }
    Ok(total / samples.len().max(1) as f64)
}

/// The share of completions ending with each end token (by its text), and "none"
/// for those cut at the length limit.
pub fn end_token_shares(pre: &Pretrained, samples: &[Completion]) -> Result<BTreeMap<String, f64>> {
    let n = samples.len().max(1) as f64;
    let mut shares = BTreeMap::new();
    let mut ended = 0;
    for (id, count) in end_token_counts(samples) {
        shares.insert(pre.tokenizer.decode(&[id], false)?, count as f64 / n);
        ended += count;
    }
    if ended < samples.len() {
        shares.insert("none".to_string(), (samples.len() - ended) as f64 / n);
    }
    Ok(shares)
}

/// Distinct answers over answers.
pub fn distinct_ratio(answers: &[String]) -> f64 {
    let distinct: BTreeSet<&String> = answers.iter().collect();
    distinct.len() as f64 / answers.len().max(1) as f64
}

/// Mean next-token loss of a policy on documents.
pub fn lm_loss(pre: &Pretrained, docs: &[String]) -> Result<f64> {
    let rows = text_rows(docs, &pre.tokenizer, pre.eos()?, 64)?;
    let (mut total, mut count) = (0.0, 0usize);
    for chunk in rows.chunks(16) {
        let refs: Vec<&Row> = chunk.iter().collect();
        let (sum, n, _) = lm_loss_sum(&pre.model, pre.tokenizer.pad_token_id(), &refs)?;
        total += sum.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        count += n;
    }
    Ok(total / count.max(1) as f64)
}

/// One eval prompt: each policy's greedy answer and the judge's score of it, by the
/// policy's name (`sft`, `ppo`, `ppo-ema`, `dpo`, `grpo`, `rloo`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PromptResult {
    pub family: Family,
    pub prompt: String,
    pub answers: BTreeMap<String, Answer>,
}

/// A greedy answer and the judge's score of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    pub text: String,
    pub score: f64,
}

/// What the report says of one policy.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PolicyEval {
    /// The judge's mean score over the eval prompts (= the families' means weighted
    /// by their prompt counts).
    pub gold_score: f64,
    pub families: BTreeMap<String, f64>,
    /// Distinct greedy answers over eval prompts.
    pub distinct_answers: f64,
    /// How the greedy answers end.
    pub end_tokens_greedy: BTreeMap<String, f64>,
    /// How responses sampled at temperature 1 on the eval prompts end.
    pub end_tokens_sampled: BTreeMap<String, f64>,
    /// Next-token loss on the held-out documents.
    pub ptx_loss_held_out: f64,
    /// Win rate against SFT on the eval prompts (1 a win, ½ a tie), from the
    /// per-prompt scores.
    pub win_rate_vs_sft: Option<f64>,
    /// KL(π ‖ π_SFT) on the eval prompts (sampled responses, summed log-ratios).
    pub kl_to_sft_eval: Option<f64>,
}

/// The judge's mean score per family and overall.
pub fn family_means(tasks: &[Task], scores: &[f64]) -> (f64, BTreeMap<String, f64>) {
    let mut per: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    for (t, &s) in tasks.iter().zip(scores) {
        let e = per.entry(t.family.name().to_string()).or_default();
        e.0 += s;
        e.1 += 1;
    }
    let total = scores.iter().sum::<f64>() / scores.len().max(1) as f64;
    (
        total,
        per.into_iter()
            .map(|(k, (s, n))| (k, s / n as f64))
            .collect(),
    )
}

/// The win rate of scores `a` against scores `b`, prompt by prompt.
pub fn win_rate(a: &[f64], b: &[f64]) -> f64 {
    let wins: f64 = a.iter().zip(b).map(|(&x, &y)| judge::win_of(x, y)).sum();
    wins / a.len().max(1) as f64
}

/// Evaluates one policy; `sft` is the reference for the KL and the win rate.
pub fn evaluate_policy(
    pre: &Pretrained,
    sft: Option<(&Pretrained, &[f64])>,
    tasks: &[Task],
    held_out_docs: &[String],
    max_new_tokens: usize,
    seed: u64,
) -> Result<(PolicyEval, Vec<String>, Vec<f64>)> {
    let answers = complete(pre, tasks, 1, 0.0, max_new_tokens, 0)?; // greedy
    let texts: Vec<String> = answers.iter().map(|c| c.text.trim().to_string()).collect();
    let scores: Vec<f64> = tasks
        .iter()
        .zip(&texts)
        .map(|(t, r)| judge::gold_score(t, r))
        .collect();
    let (gold_score, families) = family_means(tasks, &scores);
    let samples = complete(pre, tasks, SAMPLES_PER_PROMPT, 1.0, max_new_tokens, seed)?;
    let (win_rate_vs_sft, kl_to_sft_eval) = match sft {
        Some((reference, sft_scores)) => (
            Some(win_rate(&scores, sft_scores)),
            Some(sequence_kl(reference, &samples)?),
        ),
        None => (None, None),
    };
    let eval = PolicyEval {
        gold_score,
        families,
        distinct_answers: distinct_ratio(&texts),
        end_tokens_greedy: end_token_shares(pre, &answers)?,
        end_tokens_sampled: end_token_shares(pre, &samples)?,
        ptx_loss_held_out: lm_loss(pre, held_out_docs)?,
        win_rate_vs_sft,
        kl_to_sft_eval,
    };
    Ok((eval, texts, scores))
}

/// Families in a fixed order with the number of eval prompts of each.
pub fn family_counts(families: &[Family], tasks: &[Task]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for &f in families {
        let n = tasks.iter().filter(|t| t.family == f).count();
        counts.insert(f.name().to_string(), n);
    }
    counts
}
