//! The per-token KL penalty against the SFT model and its coefficient β: fixed (the
//! paper's 0.02) or adaptive (Ziegler et al. 2019: move β so the measured KL tracks a
//! target over a horizon).

use serde::{Deserialize, Serialize};

/// How log π_RL − log π_SFT is turned into a per-token penalty.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum KlEstimator {
    /// log π − log π_ref (unbiased, can be negative per token).
    K1,
    /// (ρ − 1) − log ρ with ρ = π_ref/π (Schulman's k3: unbiased and never negative).
    K3,
}

pub fn kl_per_token(logp: f32, ref_logp: f32, est: KlEstimator) -> f32 {
    let d = logp - ref_logp;
    match est {
        KlEstimator::K1 => d,
        KlEstimator::K3 => (-d).exp() - 1.0 + d,
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum KlController {
    Fixed {
        beta: f64,
    },
    Adaptive {
        beta: f64,
        target: f64,
        horizon: f64,
    },
}

impl KlController {
    pub fn beta(&self) -> f64 {
        match self {
            KlController::Fixed { beta } | KlController::Adaptive { beta, .. } => *beta,
        }
    }

    /// After an iteration that measured `kl` (per sequence) over `n_steps` samples:
    /// β ← β·(1 + clip(kl/target − 1, −0.2, 0.2)·n_steps/horizon).
    pub fn update(&mut self, kl: f64, n_steps: usize) {
        if let KlController::Adaptive {
            beta,
            target,
            horizon,
        } = self
        {
            let err = (kl / *target - 1.0).clamp(-0.2, 0.2);
            *beta *= 1.0 + err * n_steps as f64 / *horizon;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimators_and_adaptive_controller() {
        assert_eq!(kl_per_token(-1.0, -1.5, KlEstimator::K1), 0.5);
        let k3 = kl_per_token(-1.0, -1.5, KlEstimator::K3);
        assert!((k3 - ((-0.5f32).exp() - 1.0 + 0.5)).abs() < 1e-7 && k3 >= 0.0);
        let mut c = KlController::Adaptive {
            beta: 0.1,
            target: 6.0,
            horizon: 10_000.0,
        };
        c.update(12.0, 256); // error clipped to +0.2 → β·(1 + 0.2·256/10000)
        assert!((c.beta() - 0.1 * (1.0 + 0.2 * 256.0 / 10_000.0)).abs() < 1e-12);
        let mut f = KlController::Fixed { beta: 0.02 };
        f.update(100.0, 10);
        assert_eq!(f.beta(), 0.02);
    }
}
