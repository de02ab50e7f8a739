//! RLOO (Ahmadian et al. 2024, "Back to Basics"): REINFORCE with a leave-one-out
//! baseline. Each of a prompt's k responses gets the reward
//!   R_i = r_i − β·Σ_t log(π(y_t)/π_ref(y_t))      (the sequence's KL folded in)
//! and the advantage R_i minus the mean of the other k − 1 responses' rewards,
//!   A_i = R_i − 1/(k−1) Σ_{j≠i} R_j,
//! optimised with the clipped surrogate (`policy_gradient`), no KL term in the loss.

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::policy_gradient::{GroupArgs, GroupMethod, GroupTask};
use crate::rollout::Scorer;
use crate::settings::{finite_f64, float, Range, Settings};
use crate::train::trainer::TrainSummary;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clap::Args)]
#[command(rename_all = "snake_case")]
pub struct RlooArgs {
    /// β of the KL to the reference folded into each response's reward.
    #[arg(long, default_value_t = 0.05, value_parser = finite_f64)]
    pub beta: f64,
    #[command(flatten)]
    #[serde(flatten)]
    pub group: GroupArgs,
}

impl Settings for RlooArgs {
    fn validate(&self) -> Result<()> {
        self.group.validate()?;
        float("beta", self.beta, Range::AtLeast(0.0))
    }
}

/// RLOO's advantages: each response's KL-penalised reward minus the mean of the
/// others' in its group of `k`.
pub fn advantages(scores: &[f64], kl: &[f64], k: usize, beta: f64) -> Vec<f64> {
    let rewards: Vec<f64> = scores.iter().zip(kl).map(|(r, d)| r - beta * d).collect();
    rewards
        .chunks(k)
        .flat_map(|g| {
            let total: f64 = g.iter().sum();
            let others = (g.len() - 1).max(1) as f64;
            g.iter().map(move |r| r - (total - r) / others)
        })
        .collect()
}

pub struct Rloo {
    pub beta: f64,
}

impl GroupMethod for Rloo {
    fn name(&self) -> &'static str {
        "rloo"
    }
    fn advantages(&self, scores: &[f64], kl: &[f64], group: usize) -> Vec<f64> {
        advantages(scores, kl, group, self.beta)
    }
    fn kl_loss_coef(&self) -> f64 {
        0.0
    }
}

/// `rlhf rloo`.
pub fn run(args: &RlooArgs, scorer: Option<Scorer>) -> Result<(TrainSummary, GroupTask<Rloo>)> {
    args.validate()?;
    let resolved = serde_json::to_value(args).expect("args serialize");
    crate::policy_gradient::run(Rloo { beta: args.beta }, &args.group, &resolved, scorer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_baseline_is_the_mean_of_the_others() {
        // k = 3: rewards [1, 2, 6] → baselines [4, 3.5, 1.5].
        let a = advantages(&[1.0, 2.0, 6.0, 0.0, 0.0], &[0.0; 5], 3, 0.1);
        assert_eq!(&a[..3], [-3.0, -1.5, 4.5]);
        // The KL is folded into the reward: 1 − 0.5·2 = 0 vs 1.
        let a = advantages(&[1.0, 1.0], &[2.0, 0.0], 2, 0.5);
        assert_eq!(a, [-1.0, 1.0]);
        // Advantages of a group sum to zero.
        let a = advantages(&[0.3, 1.7, -2.0, 4.0], &[0.1, 0.2, 0.3, 0.4], 4, 0.05);
        assert!(a.iter().sum::<f64>().abs() < 1e-12);
    }
}
