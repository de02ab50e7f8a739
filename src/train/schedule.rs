//! Learning-rate schedules with linear warmup, as transformers' `get_scheduler`
//! computes them: the factor for the optimizer step about to be taken, given how
//! many steps were completed before it.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedulerType {
    /// Warmup, then constant.
    Constant,
    /// Warmup, then linear decay to 0 at the last step.
    Linear,
    /// Warmup, then half a cosine down to 0 at the last step.
    Cosine,
}

/// Multiplier of the base learning rate after `step` completed optimizer steps.
pub fn lr_factor(kind: LrSchedulerType, step: usize, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        return step as f64 / warmup.max(1) as f64;
    }
    let decay_steps = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / decay_steps).min(1.0);
    match kind {
        LrSchedulerType::Constant => 1.0,
        LrSchedulerType::Linear => (1.0 - progress).max(0.0),
        LrSchedulerType::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use LrSchedulerType::*;

    #[test]
    fn schedules_match_transformers() {
        // transformers.get_linear_schedule_with_warmup(opt, 2, 10): lr factors for
        // steps 0..=10 → [0, .5, 1, .875, .75, .625, .5, .375, .25, .125, 0]
        let lin: Vec<f64> = (0..=10).map(|s| lr_factor(Linear, s, 2, 10)).collect();
        let want = [
            0.0, 0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0,
        ];
        for (a, b) in lin.iter().zip(want) {
            assert!((a - b).abs() < 1e-12, "{lin:?}");
        }
        // get_cosine_schedule_with_warmup(opt, 2, 10): step 6 → 0.5·(1+cos(π·4/8)) = 0.5
        assert!((lr_factor(Cosine, 6, 2, 10) - 0.5).abs() < 1e-12);
        assert!((lr_factor(Cosine, 2, 2, 10) - 1.0).abs() < 1e-12);
        assert!(lr_factor(Cosine, 10, 2, 10).abs() < 1e-12);
        // constant_with_warmup
        assert_eq!(lr_factor(Constant, 1, 4, 10), 0.25);
        assert_eq!(lr_factor(Constant, 9, 4, 10), 1.0);
        // No warmup: the first step already uses the full rate.
        assert_eq!(lr_factor(Linear, 0, 0, 4), 1.0);
    }
}
