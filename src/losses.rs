//! Losses as pure functions of tensors, each tested against a reference computation.
//!
//! One convention for the whole crate (see `next_token_targets`): the logits at
//! position t score the token at position t + 1.

use candle_core::{Tensor, D};

use crate::error::Result;

/// log softmax(logits)[target] for each row. logits: (N, V), targets: (N,) u32 → (N,)
///
/// The max is detached (log-sum-exp is shift-invariant), so gradients flow through
/// the exponentials only, as in PyTorch's fused kernel.
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

/// Σ weight · (−log p(target)) over all positions: the numerator of a token-mean
/// cross-entropy. logits: (N, V), targets: (N,), weights: (N,) → scalar.
pub fn nll_sum(logits: &Tensor, targets: &Tensor, weights: &Tensor) -> Result<Tensor> {
    let logp = token_logprobs(logits, targets)?; // (N,)
    Ok((logp * weights)?.sum_all()?.neg()?)
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
    fn nll_sum_weights_positions() {
        // torch.nn.functional.cross_entropy(logits, t, reduction='none') = [0.4076, 10.0001]
        // weights [1, 0] → 0.4076
        let logits = Tensor::new(&[[1f32, 2., 3.], [0., 0., 10.]], &Device::Cpu).unwrap();
        let t = Tensor::new(&[2u32, 0], &Device::Cpu).unwrap();
        let w = Tensor::new(&[1f32, 0.], &Device::Cpu).unwrap();
        let s: f32 = nll_sum(&logits, &t, &w).unwrap().to_scalar().unwrap();
        assert!((s - 0.407_606).abs() < 1e-5);
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
    fn targets_are_shifted_by_one() {
        let (t, w) = next_token_targets(&[vec![10, 11, 12, 13]], &[vec![0, 0, 1, 1]]);
        assert_eq!(t, [11, 12, 13]);
        // Position 0 predicts 11 (prompt: no loss); positions 1, 2 predict 12, 13.
        assert_eq!(w, [0.0, 1.0, 1.0]);
    }
}
