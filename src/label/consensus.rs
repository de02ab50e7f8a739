//! Several labelers' rankings of one item become one ranking by the Borda count with
//! ties: a response earns, from each labeler, one point per response ranked strictly
//! below it and half a point per response tied with it. The consensus rank of a
//! response is the number of responses with strictly more points (0 = best, equal
//! totals tie), the convention of the rankings format. Borda is chosen over ranked
//! pairs because it uses every labeler's full ranking, handles ties without a rule of
//! its own and never produces a cycle; on two labelers who disagree it ties.
//!
//! Ranks everywhere here are "number of responses strictly better" (competition
//! ranking), so ties are explicit: [0, 0, 2] is two best responses tied.

/// Competition ranks of `ranks` (any order-preserving numbers, lower = better):
/// each becomes the number of entries strictly better.
pub fn normalize(ranks: &[u32]) -> Vec<u32> {
    ranks
        .iter()
        .map(|r| ranks.iter().filter(|o| *o < r).count() as u32)
        .collect()
}

/// Borda points of each response in one ranking.
pub fn borda_points(ranks: &[u32]) -> Vec<f64> {
    ranks
        .iter()
        .map(|r| {
            let below = ranks.iter().filter(|o| *o > r).count() as f64;
            let tied = ranks.iter().filter(|o| *o == r).count() as f64 - 1.0;
            below + 0.5 * tied
        })
        .collect()
}

/// The Borda consensus of several rankings of the same K responses (at least one).
pub fn borda(rankings: &[Vec<u32>]) -> Vec<u32> {
    let k = rankings.first().map_or(0, Vec::len);
    let mut total = vec![0.0; k];
    for r in rankings {
        for (t, p) in total.iter_mut().zip(borda_points(r)) {
            *t += p;
        }
    }
    // Points are multiples of 0.5: compare in halves, exactly.
    let halves: Vec<i64> = total.iter().map(|t| (t * 2.0).round() as i64).collect();
    halves
        .iter()
        .map(|h| halves.iter().filter(|o| *o > h).count() as u32)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_are_normalized_to_competition_ranks() {
        assert_eq!(normalize(&[0, 0, 1, 2]), [0, 0, 2, 3]);
        assert_eq!(normalize(&[5, 1, 1]), [2, 0, 0]);
    }

    #[test]
    fn borda_by_hand() {
        // One ranking: its own order.
        assert_eq!(borda(&[vec![2, 0, 1]]), [2, 0, 1]);
        // Points: A: 2+1+1 = 4, B: 1+2+0.5 = 3.5, C: 0+0+0.5 = 0.5 → A, B, C.
        let r = borda(&[vec![0, 1, 2], vec![1, 0, 2], vec![0, 2, 2]]);
        assert_eq!(r, [0, 1, 2]);
        // Two labelers who disagree completely: a tie.
        assert_eq!(borda(&[vec![0, 1], vec![1, 0]]), [0, 0]);
        // Ties inside a ranking: [0, 0, 2] gives 1.5, 1.5, 0.
        assert_eq!(borda_points(&[0, 0, 2]), [1.5, 1.5, 0.0]);
        // Majority wins over a 3-cycle of preferences with Borda's totals:
        // A>B>C, B>C>A, C>A>B → all 3 points: a three-way tie, not a cycle.
        let cyc = borda(&[vec![0, 1, 2], vec![2, 0, 1], vec![1, 2, 0]]);
        assert_eq!(cyc, [0, 0, 0]);
    }
}
