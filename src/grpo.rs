//! GRPO (Shao et al. 2024, DeepSeekMath): no critic; each prompt's G responses are
//! their own baseline. The advantage of response i of a group is its score relative to
//! the group's,
//!   A_i = (r_i − mean(r)) / (std(r) + 1e-4)        (scale_rewards = group)
//! with the std over the whole batch (`batch`) or no scaling (`none`, Dr. GRPO), and
//! the loss is the clipped surrogate plus β·k3 KL to the reference on every token
//! (β = 0 by default, as TRL now has it). The iteration is `policy_gradient`'s.

use crate::error::Result;
use crate::policy_gradient::{GroupArgs, GroupMethod, GroupTask};
use crate::rollout::Scorer;
use crate::settings::{finite_f64, float, Range, Settings};
use crate::train::trainer::TrainSummary;
use serde::{Deserialize, Serialize};

/// How scores are scaled after the group mean is subtracted (TRL's `scale_rewards`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ScaleRewards {
    /// By the group's standard deviation.
    Group,
    /// By the standard deviation of the whole batch.
    Batch,
    /// Not at all (Dr. GRPO, Liu et al. 2025).
    None,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clap::Args)]
#[command(rename_all = "snake_case")]
pub struct GrpoArgs {
    /// β of the k3 KL penalty to the reference (0: none, TRL's default).
    #[arg(long, default_value_t = 0.0, value_parser = finite_f64)]
    pub beta: f64,
    #[arg(long, value_enum, default_value_t = ScaleRewards::Group)]
    pub scale_rewards: ScaleRewards,
    #[command(flatten)]
    #[serde(flatten)]
    pub group: GroupArgs,
}

impl Settings for GrpoArgs {
    fn validate(&self) -> Result<()> {
        self.group.validate()?;
        float("beta", self.beta, Range::AtLeast(0.0))
    }
}

/// Sample standard deviation (n − 1), as torch's `std` (TRL's group std).
fn sample_std(xs: &[f64]) -> f64 {
    if xs.len() < 2 {
        return 0.0;
    }
    let mean = xs.iter().sum::<f64>() / xs.len() as f64;
    (xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (xs.len() - 1) as f64).sqrt()
}

/// GRPO's advantages: each score minus its group's mean, scaled by `scale`.
pub fn advantages(scores: &[f64], group: usize, scale: ScaleRewards) -> Vec<f64> {
    let batch_std = sample_std(scores);
    scores
        .chunks(group)
        .flat_map(|g| {
            let mean = g.iter().sum::<f64>() / g.len() as f64;
            let std = match scale {
                ScaleRewards::Group => sample_std(g),
                ScaleRewards::Batch => batch_std,
                ScaleRewards::None => 0.0,
            };
            let div = if scale == ScaleRewards::None {
                1.0
            } else {
                std + 1e-4
            };
            g.iter().map(move |r| (r - mean) / div)
        })
        .collect()
}

pub struct Grpo {
    pub beta: f64,
    pub scale_rewards: ScaleRewards,
}

impl GroupMethod for Grpo {
    fn name(&self) -> &'static str {
        "grpo"
    }
    fn advantages(&self, scores: &[f64], _kl: &[f64], group: usize) -> Vec<f64> {
        advantages(scores, group, self.scale_rewards)
    }
    fn kl_loss_coef(&self) -> f64 {
        self.beta
    }
}

/// `rlhf grpo`.
pub fn run(args: &GrpoArgs, scorer: Option<Scorer>) -> Result<(TrainSummary, GroupTask<Grpo>)> {
    args.validate()?;
    let resolved = serde_json::to_value(args).expect("args serialize");
    let method = Grpo {
        beta: args.beta,
        scale_rewards: args.scale_rewards,
    };
    crate::policy_gradient::run(method, &args.group, &resolved, scorer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advantages_are_relative_to_the_group() {
        // torch: r = tensor([1., 2., 3., 5., 5., 5.]).view(2, 3);
        //        (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)
        let a = advantages(&[1.0, 2.0, 3.0, 5.0, 5.0, 5.0], 3, ScaleRewards::Group);
        let want = [-1.0 / 1.0001, 0.0, 1.0 / 1.0001, 0.0, 0.0, 0.0];
        for (x, y) in a.iter().zip(want) {
            assert!((x - y).abs() < 1e-9, "{a:?}");
        }
        let none = advantages(&[1.0, 2.0, 3.0, 5.0, 5.0, 5.0], 3, ScaleRewards::None);
        assert_eq!(none, [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]);
        // Batch std of [1,2,3,5,5,5] (n − 1): sqrt(14/5 · … ) computed directly.
        let b = advantages(&[1.0, 2.0, 3.0, 5.0, 5.0, 5.0], 3, ScaleRewards::Batch);
        let s = sample_std(&[1.0, 2.0, 3.0, 5.0, 5.0, 5.0]);
        assert!((b[0] + 1.0 / (s + 1e-4)).abs() < 1e-12 && b[4] == 0.0);
    }
}
