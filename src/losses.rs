//! Losses as pure functions of tensors, each tested against a reference computation.
//!
//! One convention for the whole crate (see `next_token_targets`): the logits at
//! position t score the token at position t + 1.

use candle_core::{Tensor, D};

use crate::error::Result;

/// log softmax(logits)[target] for each row. logits: (N, V), targets: (N,) u32 → (N,)
///
/// The max is detached (log-sum-exp is shift-invariant), so gradients flow through
/// the exponentials only, as in PyTorch's fused kernel. On CPU the model computes
/// this from the hidden states without logits (`ops::lm_head`); this is its reference
/// and the path on other devices.
pub fn token_logprobs(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?.detach(); // (N, 1)
    let shifted = logits.broadcast_sub(&max)?; // (N, V)
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?; // (N, 1)
    let picked = shifted.gather(&targets.unsqueeze(1)?, 1)?; // (N, 1)
    Ok((picked - lse)?.squeeze(1)?)
}

/// The inputs and targets of next-token prediction for a batch of sequences.
///
/// ids: B rows of T tokens; `loss_mask[b][t]` says whether token t is a target (a
/// completion token). The logits at positions 0..T-1 predict tokens 1..T, so the
/// target of position t is `ids[t + 1]` with weight `loss_mask[t + 1]`.
/// Returns (targets (B·(T−1)) u32, weights (B·(T−1)) f32) flattened row-major.
pub fn next_token_targets(ids: &[Vec<u32>], loss_mask: &[Vec<u8>]) -> (Vec<u32>, Vec<f32>) {
    let mut targets = Vec::new();
    let mut weights = Vec::new();
    for (row, mask) in ids.iter().zip(loss_mask) {
        targets.extend_from_slice(&row[1..]);
        weights.extend(mask[1..].iter().map(|&m| f32::from(m)));
    }
    (targets, weights)
}

/// log σ(x), computed stably as min(x, 0) − log(1 + e^(−|x|)).
pub fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let neg_part = x.minimum(0f32)?;
    let softplus = (x.abs()?.neg()?.exp()? + 1.0)?.log()?;
    Ok((neg_part - softplus)?)
}

/// The comparisons a ranking implies: (winner, loser) index pairs over all C(K,2)
/// pairs of responses, tied pairs dropped. `ranks[i]` is response i's rank (0 = best).
pub fn ranked_pairs(ranks: &[u32]) -> Vec<(usize, usize)> {
    let mut pairs = vec![];
    for i in 0..ranks.len() {
        for j in i + 1..ranks.len() {
            match ranks[i].cmp(&ranks[j]) {
                std::cmp::Ordering::Less => pairs.push((i, j)),
                std::cmp::Ordering::Greater => pairs.push((j, i)),
                std::cmp::Ordering::Equal => {}
            }
        }
    }
    pairs
}

/// InstructGPT's reward-model loss (equation 1) for one prompt:
/// −1/C · Σ over its ranked pairs of log σ(r(x, y_w) − r(x, y_l)), C the number of
/// (untied) pairs. rewards: (K,) for the prompt's K responses → scalar.
pub fn ranking_loss(rewards: &Tensor, pairs: &[(usize, usize)]) -> Result<Tensor> {
    let dev = rewards.device();
    let w: Vec<u32> = pairs.iter().map(|p| p.0 as u32).collect();
    let l: Vec<u32> = pairs.iter().map(|p| p.1 as u32).collect();
    let rw = rewards.index_select(&Tensor::new(w.as_slice(), dev)?, 0)?; // (C,)
    let rl = rewards.index_select(&Tensor::new(l.as_slice(), dev)?, 0)?; // (C,)
    Ok(log_sigmoid(&(rw - rl)?)?.mean_all()?.neg()?)
}

/// DPO's loss variants, named as TRL's `loss_type`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum DpoLossType {
    /// −log σ(β h) (Rafailov et al. 2023), on summed log-probs.
    Sigmoid,
    /// (h − 1/(2β))² (Azar et al. 2023), on log-probs averaged over the response's
    /// tokens (as TRL does for IPO).
    Ipo,
}

/// DPO's loss for one prompt's ranked responses, averaged over its C untied pairs
/// (the reward model's equation 1 with the implicit reward β·log πθ/π_ref):
///   h = [log πθ(y_w|x) − log π_ref(y_w|x)] − [log πθ(y_l|x) − log π_ref(y_l|x)],
///   sigmoid: −1/C Σ log σ(β h),   ipo: 1/C Σ (h − 1/(2β))².
/// policy_logps: (K,) (gradients flow), ref_logps: (K,) → scalar.
pub fn dpo_loss(
    policy_logps: &Tensor,
    ref_logps: &Tensor,
    pairs: &[(usize, usize)],
    beta: f64,
    loss_type: DpoLossType,
) -> Result<Tensor> {
    let dev = policy_logps.device();
    let w: Vec<u32> = pairs.iter().map(|p| p.0 as u32).collect();
    let l: Vec<u32> = pairs.iter().map(|p| p.1 as u32).collect();
    let (w, l) = (
        Tensor::new(w.as_slice(), dev)?,
        Tensor::new(l.as_slice(), dev)?,
    );
    let logratio = (policy_logps - ref_logps.detach())?; // (K,)
    let h = (logratio.index_select(&w, 0)? - logratio.index_select(&l, 0)?)?; // (C,)
    Ok(match loss_type {
        DpoLossType::Sigmoid => log_sigmoid(&(h * beta)?)?.mean_all()?.neg()?,
        DpoLossType::Ipo => (h - 1.0 / (2.0 * beta))?.sqr()?.mean_all()?,
    })
}

/// Statistics of one PPO policy-loss evaluation (for metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PolicyStats {
    /// Fraction of tokens whose ratio was clipped.
    pub clipfrac: f64,
    /// ½·mean((log ρ)²), the approximate KL between new and old policy.
    pub approxkl: f64,
    /// Mean of ρ.
    pub ratio: f64,
}

/// PPO's clipped surrogate objective (Schulman et al. 2017, eq. 7) as a loss:
/// mean over tokens of max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)), ρ = exp(log π − log π_old).
/// logp, old_logp, advantages: (M,) over the valid response tokens → scalar.
pub fn clipped_policy_loss(
    logp: &Tensor,
    old_logp: &Tensor,
    advantages: &Tensor,
    eps: f64,
) -> Result<(Tensor, PolicyStats)> {
    let log_ratio = (logp - old_logp)?; // (M,)
    let ratio = log_ratio.exp()?; // (M,)
    let unclipped = (advantages.neg()? * &ratio)?; // (M,)
    let clipped = (advantages.neg()? * ratio.clamp(1.0 - eps, 1.0 + eps)?)?; // (M,)
    let loss = unclipped.maximum(&clipped)?.mean_all()?;
    let r: Vec<f32> = ratio.detach().to_vec1()?;
    let lr: Vec<f32> = log_ratio.detach().to_vec1()?;
    let n = r.len().max(1) as f64;
    let stats = PolicyStats {
        clipfrac: r.iter().filter(|&&x| (x as f64 - 1.0).abs() > eps).count() as f64 / n,
        approxkl: lr
            .iter()
            .map(|&x| 0.5 * (x as f64) * (x as f64))
            .sum::<f64>()
            / n,
        ratio: r.iter().map(|&x| x as f64).sum::<f64>() / n,
    };
    Ok((loss, stats))
}

/// Schulman's k3 estimate of KL(π‖π_ref) on each token, as GRPO's penalty: with
/// d = log π_ref − log π, k3 = e^d − d − 1 ≥ 0 (unbiased for samples of π, zero when
/// the policies agree). Gradients flow through `logp`. (M,), (M,) → (M,)
pub fn k3_kl(logp: &Tensor, ref_logp: &Tensor) -> Result<Tensor> {
    let d = (ref_logp.detach() - logp)?; // (M,)
    Ok(((d.exp()? - &d)? - 1.0)?)
}

/// The clipped value loss of PPO2/TRL: ½·mean max((V − R)², (V_old + clip(V − V_old,
/// −c, c) − R)²). values, old_values, returns: (M,) → scalar.
pub fn clipped_value_loss(
    values: &Tensor,
    old_values: &Tensor,
    returns: &Tensor,
    clip: f64,
) -> Result<Tensor> {
    let clipped = (old_values + (values - old_values)?.clamp(-clip, clip)?)?; // (M,)
    let a = (values - returns)?.sqr()?; // (M,)
    let b = (clipped - returns)?.sqr()?; // (M,)
    Ok((a.maximum(&b)?.mean_all()? * 0.5)?)
}

/// Entropy of each row's distribution: logits (M, V) → (M,), detached. (On CPU,
/// `ops::lm_head` computes it with the log-probs; this is its reference.)
pub fn entropy(logits: &Tensor) -> Result<Tensor> {
    let logits = logits.detach();
    let max = logits.max_keepdim(D::Minus1)?; // (M, 1)
    let shifted = logits.broadcast_sub(&max)?; // (M, V)
    let e = shifted.exp()?; // (M, V)
    let z = e.sum_keepdim(D::Minus1)?; // (M, 1)
    let p = e.broadcast_div(&z)?; // (M, V)

    // H = log Z − Σ p·x (with x shifted)
    Ok((z.log()?.squeeze(1)? - (p * shifted)?.sum(D::Minus1)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn token_logprobs_matches_reference() {
        // torch: logits = [[1., 2., 3.], [0., 0., 10.]]; t = [2, 0]
        //   torch.log_softmax(logits, -1).gather(1, t[:, None]).squeeze(1)
        //   → tensor([-0.4076059, -10.0000908])
        let logits = Tensor::new(&[[1f32, 2., 3.], [0., 0., 10.]], &Device::Cpu).unwrap();
        let t = Tensor::new(&[2u32, 0], &Device::Cpu).unwrap();
        let lp: Vec<f32> = token_logprobs(&logits, &t).unwrap().to_vec1().unwrap();
        assert!((lp[0] - -0.407_605_96).abs() < 1e-6, "{lp:?}");
        assert!((lp[1] - -10.000_091).abs() < 1e-5, "{lp:?}");
    }

    #[test]
    fn ranking_loss_matches_reference_with_a_tie() {
        // Four responses, response 2 best, responses 0 and 3 tied:
        //   r = torch.tensor([0.5, -1.0, 2.0, 0.3]); rank = [1, 2, 0, 1]
        //   pairs = [(i, j) for i, j in itertools.combinations(range(4), 2) if rank[i] != rank[j]]
        //   → 5 pairs (the tied pair (0, 3) dropped)
        //   -torch.stack([F.logsigmoid(r[w] - r[l]) for each (winner w, loser l)]).mean()
        //   → 0.17204168438911438
        let ranks = [1, 2, 0, 1];
        let pairs = ranked_pairs(&ranks);
        assert_eq!(pairs, [(0, 1), (2, 0), (2, 1), (3, 1), (2, 3)]);
        let r = Tensor::new(&[0.5f32, -1.0, 2.0, 0.3], &Device::Cpu).unwrap();
        let loss: f32 = ranking_loss(&r, &pairs).unwrap().to_scalar().unwrap();
        assert!((loss - 0.172_041_68).abs() < 1e-6, "{loss}");
    }

    #[test]
    fn log_sigmoid_is_stable() {
        let x = Tensor::new(&[-100f32, 0.0, 100.0], &Device::Cpu).unwrap();
        let y: Vec<f32> = log_sigmoid(&x).unwrap().to_vec1().unwrap();
        assert!(
            (y[0] + 100.0).abs() < 1e-4 && (y[1] - (0.5f32).ln()).abs() < 1e-6 && y[2].abs() < 1e-6,
            "{y:?}"
        );
    }

    #[test]
    fn clipped_losses_match_reference() {
        // logp = torch.tensor([-1.0, -0.5, -2.0]); old = torch.tensor([-1.2, -0.5, -1.0])
        // adv = torch.tensor([1.0, -1.0, 2.0]); ratio = (logp - old).exp()
        // torch.max(-adv * ratio, -adv * ratio.clamp(0.8, 1.2)).mean() → -0.3119196593761444
        //   (ratios 1.2214, 1.0, 0.3679: two of three outside [0.8, 1.2])
        // values = torch.tensor([0.5, 1.5]); old_v = torch.tensor([0.0, 1.0]); ret = torch.tensor([1.0, 0.0])
        // vc = old_v + (values - old_v).clamp(-0.2, 0.2)
        // 0.5 * torch.max((values - ret) ** 2, (vc - ret) ** 2).mean() → 0.7225000262260437
        let d = &Device::Cpu;
        let logp = Tensor::new(&[-1.0f32, -0.5, -2.0], d).unwrap();
        let old = Tensor::new(&[-1.2f32, -0.5, -1.0], d).unwrap();
        let adv = Tensor::new(&[1.0f32, -1.0, 2.0], d).unwrap();
        let (loss, stats) = clipped_policy_loss(&logp, &old, &adv, 0.2).unwrap();
        let loss: f32 = loss.to_scalar().unwrap();
        assert!((loss - -0.311_919_66).abs() < 1e-6, "{loss}");
        assert!((stats.clipfrac - 2.0 / 3.0).abs() < 1e-9, "{stats:?}");
        let v = Tensor::new(&[0.5f32, 1.5], d).unwrap();
        let ov = Tensor::new(&[0.0f32, 1.0], d).unwrap();
        let ret = Tensor::new(&[1.0f32, 0.0], d).unwrap();
        let vl: f32 = clipped_value_loss(&v, &ov, &ret, 0.2)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!((vl - 0.7225).abs() < 1e-6, "{vl}");
    }

    #[test]
    fn entropy_of_uniform_and_peaked() {
        let l = Tensor::new(&[[0f32, 0., 0., 0.], [100., 0., 0., 0.]], &Device::Cpu).unwrap();
        let h: Vec<f32> = entropy(&l).unwrap().to_vec1().unwrap();
        assert!(
            (h[0] - 4f32.ln()).abs() < 1e-5 && h[1].abs() < 1e-5,
            "{h:?}"
        );
    }

    #[test]
    fn targets_are_shifted_by_one() {
        let (t, w) = next_token_targets(&[vec![10, 11, 12, 13]], &[vec![0, 0, 1, 1]]);
        assert_eq!(t, [11, 12, 13]);
        // Position 0 predicts 11 (prompt: no loss); positions 1, 2 predict 12, 13.
        assert_eq!(w, [0.0, 1.0, 1.0]);
    }

    #[test]
    fn dpo_loss_matches_torch() {
        // Reference: torch, float64, K = 3, pairs (0,1), (2,1), (2,0), β = 0.1:
        //   h = (pol[w]-ref[w]) - (pol[l]-ref[l]);
        //   (-F.logsigmoid(beta*h)).mean() and ((h - 1/(2*beta))**2).mean(),
        //   with pol.grad from .backward().
        let dev = candle_core::Device::Cpu;
        let pol = candle_core::Var::new(&[-12.5f64, -15.0, -9.25], &dev).unwrap();
        let reference = Tensor::new(&[-13.0f64, -14.0, -10.0], &dev).unwrap();
        let pairs = [(0, 1), (2, 1), (2, 0)];
        let cases = [
            (
                DpoLossType::Sigmoid,
                0.6370509273260346,
                [
                    0.001039339028141302,
                    0.03063104891397239,
                    -0.03167038794211369,
                ],
            ),
            (
                DpoLossType::Ipo,
                15.125,
                [0.8333333333333335, 4.5, -5.333333333333333],
            ),
        ];
        for (kind, want, want_grad) in cases {
            let loss = dpo_loss(pol.as_tensor(), &reference, &pairs, 0.1, kind).unwrap();
            let got = loss.to_scalar::<f64>().unwrap();
            assert!((got - want).abs() < 1e-12, "{kind:?}: {got} vs {want}");
            let grads = loss.backward().unwrap();
            let g: Vec<f64> = grads.get(pol.as_tensor()).unwrap().to_vec1().unwrap();
            for (a, b) in g.iter().zip(want_grad) {
                assert!(
                    (a - b).abs() < 1e-12,
                    "{kind:?}: grad {g:?} vs {want_grad:?}"
                );
            }
        }
    }

    #[test]
    fn k3_is_zero_at_agreement_and_its_gradient_is_one_minus_the_ratio() {
        let dev = candle_core::Device::Cpu;
        let logp = candle_core::Var::new(&[-1.0f64, -2.0, -0.5], &dev).unwrap();
        let reference = Tensor::new(&[-1.0f64, -1.5, -1.0], &dev).unwrap();
        let k3 = k3_kl(logp.as_tensor(), &reference).unwrap();
        let got: Vec<f64> = k3.to_vec1().unwrap();
        let want = [0.0, 0.5f64.exp() - 0.5 - 1.0, (-0.5f64).exp() + 0.5 - 1.0];
        for (a, b) in got.iter().zip(want) {
            assert!((a - b).abs() < 1e-12 && *a >= 0.0, "{got:?}");
        }
        // d k3 / d log π = 1 − e^d.
        let g: Vec<f64> = k3
            .sum_all()
            .unwrap()
            .backward()
            .unwrap()
            .get(logp.as_tensor())
            .unwrap()
            .to_vec1()
            .unwrap();
        let want = [0.0, 1.0 - 0.5f64.exp(), 1.0 - (-0.5f64).exp()];
        for (a, b) in g.iter().zip(want) {
            assert!((a - b).abs() < 1e-12, "{g:?}");
        }
    }
}
