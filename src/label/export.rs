//! `rlhf label export`: the labels as JSONL that the training commands read as they
//! are. Several labelers' rankings of an item become one Borda consensus ranking
//! (`consensus`), or one row per label with `per_labeler`; per-response scores and
//! flags ride along as extra fields (the readers ignore fields they do not know).
//!
//! - `rankings` (rank kind) → `rlhf rm train`: `{"prompt", "responses", "ranking",
//!   "scores", "flags", "labelers", "item_id"}`;
//! - `pairs` (rank or compare kind) → `rlhf rm train`: TRL's `{"prompt", "chosen",
//!   "rejected"}`, every strictly ordered pair of the (consensus) ranking, or each
//!   decisive comparison;
//! - `sft` (demonstrate kind) → `rlhf sft`: `{"prompt", "completion"}`, conversational
//!   when the prompt is a list of messages;
//! - `compare` (compare kind): `{"prompt", "model_a", "model_b", "response_a",
//!   "response_b", "winner": "a" | "b" | "tie" | "both_bad", "votes"}`.
//!
//! Skips are never exported; an item whose consensus ties every response is left out
//! of `rankings` (there is nothing to learn from it).

use serde_json::{json, Map, Value};
use std::collections::BTreeMap;

use super::consensus::borda;
use super::error::{LabelError, Result};
use super::store::{Item, Kind, LabelRow, Project, Store};
use crate::losses::ranked_pairs;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Rankings,
    Pairs,
    Sft,
    Compare,
}

/// The ranks of a rank label (validated when it was stored).
pub fn label_ranks(l: &LabelRow) -> Vec<u32> {
    l.payload["ranking"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_u64())
                .map(|v| v as u32)
                .collect()
        })
        .unwrap_or_default()
}

/// Per response: the mean of the labelers' 1–7 scores (null where none gave one).
fn mean_scores(labels: &[&LabelRow], k: usize) -> Vec<Value> {
    (0..k)
        .map(|i| {
            let s: Vec<f64> = labels
                .iter()
                .filter_map(|l| l.payload["scores"].get(i).and_then(Value::as_f64))
                .collect();
            if s.is_empty() {
                Value::Null
            } else {
                json!(s.iter().sum::<f64>() / s.len() as f64)
            }
        })
        .collect()
}

/// Per response: how many labelers raised each flag.
fn flag_counts(labels: &[&LabelRow], k: usize) -> Vec<Value> {
    (0..k)
        .map(|i| {
            let mut counts: BTreeMap<String, u64> = BTreeMap::new();
            for l in labels {
                for f in l.payload["flags"]
                    .get(i)
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    if let Some(f) = f.as_str() {
                        *counts.entry(f.to_string()).or_default() += 1;
                    }
                }
            }
            json!(counts)
        })
        .collect()
}

fn group<'a>(labels: &'a [LabelRow], kind: &str) -> BTreeMap<i64, Vec<&'a LabelRow>> {
    let mut by: BTreeMap<i64, Vec<&LabelRow>> = BTreeMap::new();
    for l in labels.iter().filter(|l| l.kind == kind) {
        by.entry(l.item_id).or_default().push(l);
    }
    by
}

fn need(project: &Project, kinds: &[Kind], format: &str) -> Result<()> {
    if kinds.contains(&project.kind) {
        return Ok(());
    }
    Err(LabelError::Invalid(format!(
        "--format {format} needs a {} project; this one is a {} project",
        kinds
            .iter()
            .map(|k| k.name())
            .collect::<Vec<_>>()
            .join(" or "),
        project.kind.name()
    )))
}

/// The exported rows.
pub fn export(store: &Store, format: Format, per_labeler: bool) -> Result<Vec<Value>> {
    let project = store.project()?;
    let labels = store.labels()?;
    let items: BTreeMap<i64, Item> = store.items()?.into_iter().map(|i| (i.id, i)).collect();
    match format {
        Format::Rankings => {
            need(&project, &[Kind::Rank], "rankings")?;
            Ok(ranking_rows(&items, &labels, per_labeler))
        }
        Format::Pairs if project.kind == Kind::Compare => Ok(compare_rows(&project, &items, &labels, per_labeler)
            .into_iter()
            .filter_map(|r| {
                let (chosen, rejected) = match r["winner"].as_str()? {
                    "a" => ("response_a", "response_b"),
                    "b" => ("response_b", "response_a"),
                    _ => return None,
                };
                Some(json!({"prompt": r["prompt"], "chosen": r[chosen], "rejected": r[rejected], "item_id": r["item_id"]}))
            })
            .collect()),
        Format::Pairs => {
            need(&project, &[Kind::Rank, Kind::Compare], "pairs")?;
            let mut out = vec![];
            for r in ranking_rows(&items, &labels, per_labeler) {
                let ranks: Vec<u32> = r["ranking"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|v| v.as_u64().map(|v| v as u32))
                    .collect();
                for (w, l) in ranked_pairs(&ranks) {
                    let mut row = Map::new();
                    row.insert("prompt".into(), r["prompt"].clone());
                    row.insert("chosen".into(), r["responses"][w].clone());
                    row.insert("rejected".into(), r["responses"][l].clone());
                    row.insert("item_id".into(), r["item_id"].clone());
                    if let Some(who) = r.get("labeler") {
                        row.insert("labeler".into(), who.clone());
                    }
                    out.push(Value::Object(row));
                }
            }
            Ok(out)
        }
        Format::Sft => {
            need(&project, &[Kind::Demonstrate], "sft")?;
            Ok(labels
                .iter()
                .filter(|l| l.kind == "demonstrate")
                .map(|l| {
                    let item = &items[&l.item_id];
                    let text = l.payload["text"].clone();
                    let completion = if item.prompt.is_array() {
                        json!([{"role": "assistant", "content": text}])
                    } else {
                        text
                    };
                    json!({"prompt": item.prompt, "completion": completion,
                           "labeler": l.labeler, "item_id": l.item_id, "seconds": l.seconds})
                })
                .collect())
        }
        Format::Compare => {
            need(&project, &[Kind::Compare], "compare")?;
            Ok(compare_rows(&project, &items, &labels, per_labeler))
        }
    }
}

fn ranking_rows(items: &BTreeMap<i64, Item>, labels: &[LabelRow], per_labeler: bool) -> Vec<Value> {
    let mut out = vec![];
    for (id, ls) in group(labels, "rank") {
        let item = &items[&id];
        let k = item.responses.len();
        if per_labeler {
            for l in ls {
                out.push(json!({
                    "prompt": item.prompt, "responses": item.responses, "ranking": label_ranks(l),
                    "scores": l.payload["scores"], "flags": l.payload["flags"],
                    "labeler": l.labeler, "item_id": id, "seconds": l.seconds,
                    "created_at": l.created_at,
                }));
            }
            continue;
        }
        let rankings: Vec<Vec<u32>> = ls.iter().map(|l| label_ranks(l)).collect();
        let ranking = borda(&rankings);
        if ranking.iter().all(|&r| r == ranking[0]) {
            continue;
        }
        out.push(json!({
            "prompt": item.prompt, "responses": item.responses, "ranking": ranking,
            "scores": mean_scores(&ls, k), "flags": flag_counts(&ls, k),
            "labelers": ls.iter().map(|l| l.labeler.as_str()).collect::<Vec<_>>(),
            "item_id": id,
        }));
    }
    out
}

/// A compare label's verdict about the models: "a", "b", "tie" or "both_bad".
pub fn verdict(l: &LabelRow) -> &str {
    l.payload["winner"].as_str().unwrap_or("tie")
}

fn compare_rows(
    project: &Project,
    items: &BTreeMap<i64, Item>,
    labels: &[LabelRow],
    per_labeler: bool,
) -> Vec<Value> {
    let mut out = vec![];
    for (id, ls) in group(labels, "compare") {
        let item = &items[&id];
        let base = |winner: &str| {
            json!({
                "prompt": item.prompt, "model_a": project.models[0], "model_b": project.models[1],
                "response_a": item.responses[0], "response_b": item.responses[1],
                "winner": winner, "item_id": id,
            })
        };
        if per_labeler {
            for l in ls {
                let mut row = base(verdict(l));
                row["labeler"] = json!(l.labeler);
                row["seconds"] = json!(l.seconds);
                out.push(row);
            }
            continue;
        }
        let mut votes: BTreeMap<&str, usize> = BTreeMap::new();
        for l in &ls {
            *votes.entry(verdict(l)).or_default() += 1;
        }
        // The majority verdict; a tie between verdicts is a tie.
        let best = votes.values().copied().max().unwrap_or(0);
        let top: Vec<&str> = votes
            .iter()
            .filter(|(_, &n)| n == best)
            .map(|(v, _)| *v)
            .collect();
        let winner = if top.len() == 1 { top[0] } else { "tie" };
        let mut row = base(winner);
        row["votes"] = json!(votes);
        out.push(row);
    }
    out
}
