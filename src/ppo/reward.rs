//! The reward PPO maximises (InstructGPT equation 2, first term): the reward model's
//! score for the whole response (read where `data::reward_input` reads it for every
//! command), placed on the response's last token (the eos), minus β times the KL
//! estimate on every response token. Nothing is placed on padding or after
//! the eos: a response's vectors stop at its last token.

pub use crate::rollout::scorer::reward_model_scores;

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
