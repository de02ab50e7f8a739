//! What the admin page shows, computed from the store: progress per labeler, their
//! agreement with the others, the most disagreed items, and for the compare kind
//! model A's win rate with a 95 % Wilson interval.

use serde::Serialize;
use std::collections::BTreeMap;

use super::agreement::{agreement, wilson_interval, Agreement};
use super::error::Result;
use super::export::{label_ranks, verdict};
use super::store::{Kind, Store};

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LabelerProgress {
    pub name: String,
    pub is_admin: bool,
    /// Live labels, skips included.
    pub labels: usize,
    pub skips: usize,
    /// Labels undone by the labeler.
    pub undone: usize,
    /// Median seconds per label (None before the first).
    pub median_seconds: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WinRate {
    pub model_a: String,
    pub model_b: String,
    pub a_wins: usize,
    pub b_wins: usize,
    pub ties: usize,
    pub both_bad: usize,
    /// (A wins + ½ ties) / (A wins + B wins + ties); both-bad verdicts left out.
    pub a_win_rate: Option<f64>,
    /// 95 % Wilson score interval of `a_win_rate`, counting each compared item once:
    /// the labels of one item (with `--overlap` > 1) are not independent trials, so
    /// counting them would make the interval too narrow.
    pub interval_95: Option<(f64, f64)>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Disagreed {
    pub item_id: i64,
    pub prompt: String,
    pub disagreement: f64,
    pub labels: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AdminStats {
    pub kind: &'static str,
    pub items: usize,
    pub overlap: usize,
    /// Items with `overlap` live non-skip labels.
    pub complete_items: usize,
    pub labels: usize,
    pub per_labeler: Vec<LabelerProgress>,
    pub agreement: Option<Agreement>,
    pub most_disagreed: Vec<Disagreed>,
    pub win_rate: Option<WinRate>,
}

/// The text of a prompt (the last user message of a conversation), for display.
pub fn prompt_text(prompt: &serde_json::Value) -> String {
    match prompt {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Array(msgs) => msgs
            .iter()
            .rev()
            .find(|m| m["role"] == "user")
            .or(msgs.last())
            .and_then(|m| m["content"].as_str())
            .unwrap_or_default()
            .to_string(),
        other => other.to_string(),
    }
}

fn median(mut xs: Vec<f64>) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    Some(if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    })
}

pub fn admin_stats(store: &Store) -> Result<AdminStats> {
    let project = store.project()?;
    let labels = store.labels()?;
    let items = store.items()?;
    let undone: BTreeMap<String, usize> = {
        let mut st = store.conn.prepare(
            "SELECT b.name, COUNT(*) FROM labels l JOIN labelers b ON b.id = l.labeler_id
             WHERE l.undone_at IS NOT NULL GROUP BY b.name",
        )?;
        let rows = st.query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as usize))
        })?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    let per_labeler = store
        .labelers()?
        .into_iter()
        .map(|b| {
            let mine: Vec<_> = labels.iter().filter(|l| l.labeler == b.name).collect();
            LabelerProgress {
                labels: mine.len(),
                skips: mine.iter().filter(|l| l.kind == "skip").count(),
                undone: undone.get(&b.name).copied().unwrap_or(0),
                median_seconds: median(mine.iter().map(|l| l.seconds).collect()),
                name: b.name,
                is_admin: b.is_admin,
            }
        })
        .collect();
    let mut answered: BTreeMap<i64, usize> = BTreeMap::new();
    for l in labels.iter().filter(|l| l.kind != "skip") {
        *answered.entry(l.item_id).or_default() += 1;
    }
    let complete_items = answered.values().filter(|&&n| n >= project.overlap).count();
    let prompt_of: BTreeMap<i64, String> = items
        .iter()
        .map(|i| (i.id, prompt_text(&i.prompt)))
        .collect();

    let (mut agree, mut most_disagreed, mut win_rate) = (None, vec![], None);
    if project.kind == Kind::Rank {
        let mut by_item: BTreeMap<i64, Vec<(String, Vec<u32>)>> = BTreeMap::new();
        for l in labels.iter().filter(|l| l.kind == "rank") {
            by_item
                .entry(l.item_id)
                .or_default()
                .push((l.labeler.clone(), label_ranks(l)));
        }
        let a = agreement(&by_item, 10);
        most_disagreed = a
            .most_disagreed
            .iter()
            .map(|&(item_id, disagreement, labels)| Disagreed {
                item_id,
                prompt: prompt_of.get(&item_id).cloned().unwrap_or_default(),
                disagreement,
                labels,
            })
            .collect();
        agree = Some(a);
    }
    if project.kind == Kind::Compare {
        let count = |v: &str| {
            labels
                .iter()
                .filter(|l| l.kind == "compare" && verdict(l) == v)
                .count()
        };
        let (a, b, t, bad) = (count("a"), count("b"), count("tie"), count("both_bad"));
        let n = (a + b + t) as f64;
        let rate = (n > 0.0).then(|| (a as f64 + 0.5 * t as f64) / n);
        let items_judged = labels
            .iter()
            .filter(|l| l.kind == "compare" && ["a", "b", "tie"].contains(&verdict(l)))
            .map(|l| l.item_id)
            .collect::<std::collections::BTreeSet<_>>()
            .len() as f64;
        win_rate = Some(WinRate {
            model_a: project.models[0].clone(),
            model_b: project.models[1].clone(),
            a_wins: a,
            b_wins: b,
            ties: t,
            both_bad: bad,
            a_win_rate: rate,
            interval_95: rate.map(|p| wilson_interval(p, items_judged, 1.959_963_984_540_054)),
        });
    }
    Ok(AdminStats {
        kind: project.kind.name(),
        items: items.len(),
        overlap: project.overlap,
        complete_items,
        labels: labels.len(),
        per_labeler,
        agreement: agree,
        most_disagreed,
        win_rate,
    })
}
