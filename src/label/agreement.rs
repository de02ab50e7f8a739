//! How much labelers agree. Two measures per labeler, each against the Borda
//! consensus of the *other* labelers of the same items (leave-one-out, so a labeler
//! is not compared with themselves):
//!
//! - pairwise agreement: of the response pairs that both the labeler and the others'
//!   consensus order strictly, the fraction ordered the same way (InstructGPT reports
//!   this between labelers: 72.6 ± 1.5 %);
//! - Kendall's τ-b between the labeler's ranks and the consensus ranks, averaged over
//!   items (τ-b corrects for ties; an item where either side ties everything has no
//!   τ and is left out).
//!
//! An item's disagreement is the fraction of strictly-ordered response pairs that two
//! of its labelers order oppositely, over every pair of its labelers. The compare
//! kind's win rate comes with a Wilson score interval.

use serde::Serialize;
use std::collections::BTreeMap;

use super::consensus::borda;

/// Kendall's τ-b of two rankings of the same items (lower rank = better);
/// `None` when either ranking ties everything (τ-b is 0/0).
pub fn kendall_tau_b(a: &[u32], b: &[u32]) -> Option<f64> {
    let (mut concordant, mut discordant, mut ties_a, mut ties_b) = (0i64, 0i64, 0i64, 0i64);
    for i in 0..a.len() {
        for j in i + 1..a.len() {
            let da = (a[i] as i64 - a[j] as i64).signum();
            let db = (b[i] as i64 - b[j] as i64).signum();
            match (da, db) {
                (0, 0) => {}
                (0, _) => ties_a += 1,
                (_, 0) => ties_b += 1,
                _ if da == db => concordant += 1,
                _ => discordant += 1,
            }
        }
    }
    let n_a = (concordant + discordant + ties_b) as f64; // pairs not tied in a
    let n_b = (concordant + discordant + ties_a) as f64; // pairs not tied in b
    if n_a == 0.0 || n_b == 0.0 {
        return None;
    }
    Some((concordant - discordant) as f64 / (n_a * n_b).sqrt())
}

/// (pairs both order strictly, of which ordered the same way).
pub fn pair_agreement(a: &[u32], b: &[u32]) -> (usize, usize) {
    let (mut both, mut same) = (0, 0);
    for i in 0..a.len() {
        for j in i + 1..a.len() {
            let da = (a[i] as i64 - a[j] as i64).signum();
            let db = (b[i] as i64 - b[j] as i64).signum();
            if da != 0 && db != 0 {
                both += 1;
                same += usize::from(da == db);
            }
        }
    }
    (both, same)
}

/// One labeler's agreement with the others.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LabelerAgreement {
    pub labeler: String,
    /// Items this labeler ranked that someone else ranked too.
    pub shared_items: usize,
    /// Pairwise agreement with the others' consensus (None: no comparable pair).
    pub pairwise: Option<f64>,
    /// Mean Kendall τ-b against the others' consensus (None: no item with a τ).
    pub kendall_tau: Option<f64>,
}

/// Agreement of the rankings of several items.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Agreement {
    pub per_labeler: Vec<LabelerAgreement>,
    /// Pairwise agreement over every pair of labelers on every shared item.
    pub between_labelers: Option<f64>,
    /// (item id, disagreement, labels), most disagreed first.
    pub most_disagreed: Vec<(i64, f64, usize)>,
}

/// Agreement from every item's rankings: item id → [(labeler, ranks)].
pub fn agreement(items: &BTreeMap<i64, Vec<(String, Vec<u32>)>>, top: usize) -> Agreement {
    let mut acc: BTreeMap<&str, (usize, usize, usize, f64, usize)> = BTreeMap::new();
    let (mut all_both, mut all_same) = (0, 0);
    let mut disagreed = vec![];
    for (&item, labels) in items {
        for (i, (name, ranks)) in labels.iter().enumerate() {
            let e = acc.entry(name.as_str()).or_default();
            let others: Vec<Vec<u32>> = labels
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, (_, r))| r.clone())
                .collect();
            if others.is_empty() {
                continue;
            }
            let consensus = borda(&others);
            let (both, same) = pair_agreement(ranks, &consensus);
            e.0 += 1;
            e.1 += both;
            e.2 += same;
            if let Some(t) = kendall_tau_b(ranks, &consensus) {
                e.3 += t;
                e.4 += 1;
            }
        }
        if labels.len() >= 2 {
            let (mut both, mut same) = (0, 0);
            for i in 0..labels.len() {
                for j in i + 1..labels.len() {
                    let (b, s) = pair_agreement(&labels[i].1, &labels[j].1);
                    both += b;
                    same += s;
                }
            }
            all_both += both;
            all_same += same;
            if both > 0 {
                disagreed.push((item, 1.0 - same as f64 / both as f64, labels.len()));
            }
        }
    }
    disagreed.sort_by(|a, b| b.1.total_cmp(&a.1).then(b.2.cmp(&a.2)).then(a.0.cmp(&b.0)));
    disagreed.truncate(top);
    Agreement {
        per_labeler: acc
            .into_iter()
            .map(|(name, (shared, both, same, tau, taus))| LabelerAgreement {
                labeler: name.to_string(),
                shared_items: shared,
                pairwise: (both > 0).then(|| same as f64 / both as f64),
                kendall_tau: (taus > 0).then(|| tau / taus as f64),
            })
            .collect(),
        between_labelers: (all_both > 0).then(|| all_same as f64 / all_both as f64),
        most_disagreed: disagreed,
    }
}

/// The Wilson score interval of a proportion `p` observed over `n` trials, at
/// normal quantile `z` (1.96 for 95 %). Better than the normal ("Wald") interval at
/// small n and near 0 or 1, where Wald's can leave [0, 1].
pub fn wilson_interval(p: f64, n: f64, z: f64) -> (f64, f64) {
    if n <= 0.0 {
        return (0.0, 1.0);
    }
    let z2 = z * z;
    let centre = (p + z2 / (2.0 * n)) / (1.0 + z2 / n);
    let half = z / (1.0 + z2 / n) * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kendall_tau_b_by_hand() {
        // By hand: 5 concordant, 1 discordant pair, no ties → 4/6.
        let t = kendall_tau_b(&[0, 1, 2, 3], &[0, 2, 1, 3]).unwrap();
        assert!((t - 2.0 / 3.0).abs() < 1e-12, "{t}");
        // One pair tied in a: 5 concordant, n_a = 5, n_b = 6 → 5/√30.
        let t = kendall_tau_b(&[0, 0, 2, 3], &[0, 1, 2, 3]).unwrap();
        assert!((t - 0.912_870_929_175_276_9).abs() < 1e-12, "{t}");
        assert_eq!(kendall_tau_b(&[0, 1, 2], &[2, 1, 0]), Some(-1.0));
        assert_eq!(kendall_tau_b(&[0, 0], &[0, 1]), None);
    }

    #[test]
    fn pairwise_agreement_leaves_ties_out() {
        // Pairs (0,1) tie in a: out; (0,2) same; (1,2) same → 2 of 2.
        assert_eq!(pair_agreement(&[0, 0, 2], &[0, 1, 2]), (2, 2));
        assert_eq!(pair_agreement(&[0, 1, 2], &[2, 1, 0]), (3, 0));
    }

    #[test]
    fn each_labeler_is_compared_with_the_others_consensus() {
        let mut items = BTreeMap::new();
        // Item 1: ann and bob agree, cat reverses.
        items.insert(
            1,
            vec![
                ("ann".to_string(), vec![0, 1, 2]),
                ("bob".to_string(), vec![0, 1, 2]),
                ("cat".to_string(), vec![2, 1, 0]),
            ],
        );
        // Item 2: only ann: no comparison.
        items.insert(2, vec![("ann".to_string(), vec![1, 0])]);
        // Item 3: ann and bob agree.
        items.insert(
            3,
            vec![
                ("ann".to_string(), vec![0, 1]),
                ("bob".to_string(), vec![0, 1]),
            ],
        );
        let a = agreement(&items, 10);
        let by: BTreeMap<_, _> = a
            .per_labeler
            .iter()
            .map(|l| (l.labeler.as_str(), l))
            .collect();
        // ann vs consensus(bob, cat) on item 1 = a full tie: no strict pair, no τ;
        // vs bob on item 3: 1 of 1.
        assert_eq!(by["ann"].shared_items, 2);
        assert_eq!(by["ann"].pairwise, Some(1.0));
        assert_eq!(by["ann"].kendall_tau, Some(1.0));
        // cat vs consensus(ann, bob) = [0, 1, 2]: all three pairs reversed.
        assert_eq!(by["cat"].pairwise, Some(0.0));
        assert_eq!(by["cat"].kendall_tau, Some(-1.0));
        // Between labelers: item 1 has 9 strict pairs over 3 labeler pairs, 3 same;
        // item 3 one pair, same → 4 / 10.
        assert!((a.between_labelers.unwrap() - 0.4).abs() < 1e-12);
        let (item, d, n) = a.most_disagreed[0];
        assert_eq!((item, n), (1, 3));
        assert!((d - 2.0 / 3.0).abs() < 1e-12, "{d}");
        assert_eq!(a.most_disagreed[1], (3, 0.0, 2));
    }

    #[test]
    fn wilson_interval_by_hand() {
        // Python: p, n, z = 0.8, 10, 1.959963984540054
        //   c = (p + z*z/(2*n)) / (1 + z*z/n)
        //   h = z / (1 + z*z/n) * math.sqrt(p*(1-p)/n + z*z/(4*n*n))
        //   (c - h, c + h) → (0.4901624715366418, 0.9433178485456248)
        let (lo, hi) = wilson_interval(0.8, 10.0, 1.959_963_984_540_054);
        assert!((lo - 0.490_162_471_536_641_8).abs() < 1e-12, "{lo}");
        assert!((hi - 0.943_317_848_545_624_8).abs() < 1e-12, "{hi}");
        let (lo, hi) = wilson_interval(1.0, 5.0, 1.96);
        assert!(lo > 0.5 && hi == 1.0);
    }
}
