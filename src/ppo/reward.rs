//! The reward PPO maximises (InstructGPT equation 2, first term): the reward model's
//! score for the whole response (read where `data::reward_input` reads it for every
//! command), placed on the response's last token (the eos), minus β times the KL
//! estimate on every response token. Nothing is placed on padding or after
//! the eos: a response's vectors stop at its last token.

use crate::data::prompts::Prompt;
use crate::error::{Error, Result};
use crate::generate::Completion;
use crate::model::frozen::Frozen;
use crate::model::scalar::PretrainedScalar;

/// The reward model's scores of sampled responses, normalised with its stored mean
/// and std (raw without them): read where `rm score` reads them (`RewardInput`), from
/// the prompt and the response's text. Which end token the policy stopped with is not
/// part of the input, so the policy cannot game it; a response cut at max_new_tokens
/// is closed the same way (`final_score` applies --missing_eos_penalty).
/// Re-tokenising the text can, rarely, make an input longer than PPO's setup checked
/// against the reward model's context: its earliest tokens are dropped then (the
/// reward is read at the end).
pub fn reward_model_scores(
    rm: &Frozen<PretrainedScalar>,
    prompts: &[&Prompt],
    samples: &[Completion],
) -> Result<Vec<f64>> {
    if prompts.len() != samples.len() {
        return Err(Error::Invalid(format!(
            "{} prompts for {} responses",
            prompts.len(),
            samples.len()
        )));
    }
    let context = rm.context_length();
    let inputs = prompts
        .iter()
        .zip(samples)
        .map(|(p, c)| {
            let mut ids = rm.input(p, &c.text)?;
            ids.drain(..ids.len().saturating_sub(context));
            Ok(ids)
        })
        .collect::<Result<Vec<_>>>()?;
    let raw = rm.score(&inputs)?;
    Ok(match rm.normalization() {
        Some(norm) => raw.iter().map(|&x| norm.apply(x)).collect(),
        None => raw,
    })
}

/// Per-token shaped rewards of one response: r_t = −β·kl_t, plus `score` on the last
/// token. kl: (T,) → (T,)
pub fn shaped_rewards(score: f32, kl: &[f32], beta: f32) -> Vec<f32> {
    let mut r: Vec<f32> = kl.iter().map(|k| -beta * k).collect();
    if let Some(last) = r.last_mut() {
        *last += score;
    }
    r
}

/// The score PPO sees: normalised with the reward model's mean and std, optionally
/// clipped to ±`clip`, and lowered by `missing_eos_penalty` when the response was cut
/// at max_new_tokens without an eos.
pub fn final_score(
    normalized: f64,
    clip: Option<f64>,
    ended_with_eos: bool,
    missing_eos_penalty: Option<f64>,
) -> f32 {
    let mut s = match clip {
        Some(c) => normalized.clamp(-c, c),
        None => normalized,
    };
    if !ended_with_eos {
        s -= missing_eos_penalty.unwrap_or(0.0);
    }
    s as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn score_on_the_eos_and_kl_on_every_token() {
        let r = shaped_rewards(2.0, &[0.1, -0.2, 0.3], 0.5);
        assert_eq!(r, [-0.05, 0.1, -0.15 + 2.0]);
        assert!(shaped_rewards(1.0, &[], 0.1).is_empty());
        assert_eq!(final_score(5.0, Some(3.0), true, Some(1.0)), 3.0);
        assert_eq!(final_score(0.5, None, false, Some(1.0)), -0.5);
    }
}
