//! Active selection: the order in which items are handed out.
//!
//! - `order`: the prompts file's order;
//! - `random`: a seeded shuffle;
//! - `uncertainty`: the items whose K responses the current reward model separates
//!   least come first. An item's score is the standard deviation of the RM's raw
//!   rewards of its K responses (population std): when it is small the RM cannot tell
//!   the responses apart, so a labeler's ranking of them teaches it the most. (The
//!   smallest gap between two responses' rewards would rank an item with two
//!   near-duplicates first even when the RM orders its other responses confidently.)
//!   Identical responses are counted once: an item whose K samples are all the same
//!   text has nothing to rank and goes last, not first (its spread is 0).
//!
//! Priorities are written to `items.priority` when `label serve` starts, so a
//! retrained RM reorders the queue on the next start; items already labeled keep
//! their labels.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::Value;
use std::path::Path;

use super::error::{LabelError, Result};
use super::store::{Kind, Store};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Select {
    Order,
    Random,
    Uncertainty,
}

/// Population standard deviation.
pub fn spread(rewards: &[f64]) -> f64 {
    let n = rewards.len().max(1) as f64;
    let mean = rewards.iter().sum::<f64>() / n;
    (rewards.iter().map(|r| (r - mean) * (r - mean)).sum::<f64>() / n).sqrt()
}

/// An item's priority under `uncertainty`: the spread of the rewards of its distinct
/// responses; `f64::MAX` (last) when fewer than two responses differ.
pub fn uncertainty(responses: &[String], rewards: &[f64]) -> f64 {
    let mut seen: Vec<&str> = vec![];
    let mut distinct = vec![];
    for (r, &x) in responses.iter().zip(rewards) {
        if !seen.contains(&r.as_str()) {
            seen.push(r);
            distinct.push(x);
        }
    }
    if distinct.len() < 2 {
        f64::MAX
    } else {
        spread(&distinct)
    }
}

/// Writes the queue order for `select` (the reward model is needed, and only used,
/// for `uncertainty`). Returns the priority of every item (item id, priority).
pub fn apply(
    store: &mut Store,
    select: Select,
    reward_model: Option<&Path>,
    seed: u64,
) -> Result<Vec<(i64, Option<f64>)>> {
    let project = store.project()?;
    let items = store.items()?;
    let priorities: Vec<(i64, Option<f64>)> = match select {
        Select::Order => items.iter().map(|i| (i.id, None)).collect(),
        Select::Random => {
            let mut ids: Vec<i64> = items.iter().map(|i| i.id).collect();
            ids.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
            ids.into_iter()
                .enumerate()
                .map(|(rank, id)| (id, Some(rank as f64)))
                .collect()
        }
        Select::Uncertainty => {
            let dir = reward_model.ok_or_else(|| {
                LabelError::Invalid("--select uncertainty needs --reward_model RM_DIR".into())
            })?;
            if project.kind != Kind::Rank {
                return Err(LabelError::Invalid(format!(
                    "--select uncertainty orders rank projects; this one is a {} project",
                    project.kind.name()
                )));
            }
            let rm = crate::rm::load_reward_model(dir).map_err(|e| {
                LabelError::Invalid(format!("loading reward model from {}: {e}", dir.display()))
            })?;
            let pairs: Vec<(Value, Value)> = items
                .iter()
                .flat_map(|i| {
                    i.responses
                        .iter()
                        .map(|r| (i.prompt.clone(), Value::String(r.clone())))
                })
                .collect();
            let rewards = crate::rm::score_values(&rm, &pairs, 1024, 16)?;
            let mut at = 0;
            items
                .iter()
                .map(|i| {
                    let k = i.responses.len();
                    let s = uncertainty(&i.responses, &rewards[at..at + k]);
                    at += k;
                    (i.id, Some(s))
                })
                .collect()
        }
    };
    store.set_priorities(&priorities)?;
    Ok(priorities)
}

#[cfg(test)]
mod tests {
    #[test]
    fn spread_is_the_population_std() {
        assert_eq!(super::spread(&[1.0, 1.0, 1.0]), 0.0);
        assert!((super::spread(&[0.0, 2.0]) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn identical_responses_count_once_and_all_same_goes_last() {
        let r = |xs: &[&str]| xs.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        // "a" twice: rewards 0 and 2 of the distinct texts → std 1.
        let u = super::uncertainty(&r(&["a", "a", "b"]), &[0.0, 0.0, 2.0]);
        assert!((u - 1.0).abs() < 1e-12);
        assert_eq!(super::uncertainty(&r(&["a", "a"]), &[0.5, 0.5]), f64::MAX);
    }
}
