//! Generalized advantage estimation (Schulman et al. 2016) over one response, and
//! batch whitening of advantages.

use crate::distributed::Collective;
use crate::error::Result;

/// GAE for one response of T tokens: δ_t = r_t + γ·V_{t+1} − V_t (V_T = 0 after the
/// last token), A_t = δ_t + γλ·A_{t+1}; returns R_t = A_t + V_t for the critic.
/// rewards, values: (T,) → (advantages (T,), returns (T,))
pub fn gae(rewards: &[f32], values: &[f32], gamma: f32, lam: f32) -> (Vec<f32>, Vec<f32>) {
    let t = rewards.len();
    let mut adv = vec![0f32; t];
    let mut last = 0f32;
    for i in (0..t).rev() {
        let next_value = if i + 1 < t { values[i + 1] } else { 0.0 };
        let delta = rewards[i] + gamma * next_value - values[i];
        last = delta + gamma * lam * last;
        adv[i] = last;
    }
    let returns = adv.iter().zip(values).map(|(a, v)| a + v).collect();
    (adv, returns)
}

/// Shifts and scales every token's advantage of the batch to mean 0, std 1. The
/// batch is every rank's rows in a data-parallel run (`comm`): the mean and the
/// variance are taken over all of them, in two passes as in one process.
pub fn whiten(rows: &mut [Vec<f32>], comm: &dyn Collective) -> Result<()> {
    let mut sum = [
        rows.iter().flatten().map(|&x| x as f64).sum::<f64>(),
        rows.iter().map(Vec::len).sum::<usize>() as f64,
    ];
    comm.all_reduce_sum_f64(&mut sum)?;
    let [total, n] = sum;
    if n < 2.0 {
        return Ok(());
    }
    let mean = total / n;
    let mut sq = [rows
        .iter()
        .flatten()
        .map(|&x| (x as f64 - mean).powi(2))
        .sum::<f64>()];
    comm.all_reduce_sum_f64(&mut sq)?;
    let var = sq[0] / (n - 1.0);
    let inv = 1.0 / (var.sqrt() + 1e-8);
    for x in rows.iter_mut().flatten() {
        *x = ((*x as f64 - mean) * inv) as f32;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gae_matches_a_hand_computation() {
        // γ = 1, λ = 0.5, rewards [0, 0, 1], values [0.5, 0.2, 0.4]:
        //   δ_2 = 1 + 0 − 0.4 = 0.6                 A_2 = 0.6
        //   δ_1 = 0 + 0.4 − 0.2 = 0.2               A_1 = 0.2 + 0.5·0.6 = 0.5
        //   δ_0 = 0 + 0.2 − 0.5 = −0.3              A_0 = −0.3 + 0.5·0.5 = −0.05
        //   returns = A + V = [0.45, 0.7, 1.0]
        let (a, r) = gae(&[0.0, 0.0, 1.0], &[0.5, 0.2, 0.4], 1.0, 0.5);
        for (x, y) in a.iter().zip([-0.05, 0.5, 0.6]) {
            assert!((x - y).abs() < 1e-6, "{a:?}");
        }
        for (x, y) in r.iter().zip([0.45, 0.7, 1.0]) {
            assert!((x - y).abs() < 1e-6, "{r:?}");
        }
        // λ = 1, γ = 1: the advantage is the return-to-go minus the value.
        let (a, _) = gae(&[1.0, 2.0], &[0.5, 0.5], 1.0, 1.0);
        assert_eq!(a, [2.5, 1.5]);
    }

    #[test]
    fn whitening_gives_mean_zero_unit_std() {
        let mut rows = vec![vec![1.0, 2.0], vec![3.0, 4.0, 5.0]];
        whiten(&mut rows, &crate::distributed::Single).unwrap();
        let all: Vec<f32> = rows.concat();
        let mean: f32 = all.iter().sum::<f32>() / 5.0;
        assert!(mean.abs() < 1e-6);
        let var: f32 = all.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / 4.0;
        assert!((var - 1.0).abs() < 1e-4);
    }
}
