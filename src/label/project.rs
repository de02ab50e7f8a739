//! A project from the command line (`rlhf label new`): the prompts, and for the rank
//! and compare kinds the responses to judge, sampled from the given models with
//! `generate::generate_n` (K samples per prompt in one batch) or read from the
//! prompts file's own `"responses"` field.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

use super::error::{LabelError, Result};
use super::store::{Kind, NewItem, Project};
use crate::data::jsonl::read_jsonl;
use crate::data::prompts::Prompt;
use crate::generate::{generate_n, SamplingParams};
use crate::model::hf::load_pretrained;

/// Where a project's items come from.
pub struct Source<'a> {
    pub kind: Kind,
    pub prompts: &'a Path,
    /// rank: one model (K samples each); compare: two (one sample each); none: the
    /// rows carry `"responses"`.
    pub models: &'a [PathBuf],
    pub k: usize,
    pub sampling: SamplingParams,
    pub seed: u64,
    pub batch_size: usize,
}

/// The prompts of a file, each with its row: `{"prompt": text | messages}` or
/// `{"messages": [...]}`; with `"responses": [text, ...]` when no model samples them.
fn read_rows(path: &Path) -> Result<Vec<(usize, Value, Prompt, Value)>> {
    let mut out = vec![];
    for line in read_jsonl(path)? {
        let prompt = Prompt::from_json(&line.value, path, line.number)?;
        let value = match &prompt {
            Prompt::Text(t) if t.trim().is_empty() => {
                return Err(LabelError::input(
                    path,
                    line.number,
                    "field \"prompt\" is empty",
                ))
            }
            Prompt::Text(t) => Value::String(t.clone()),
            Prompt::Messages(m) => m.clone(),
        };
        out.push((line.number, line.value, prompt, value));
    }
    Ok(out)
}

/// The responses a row carries in `"responses"`: `k` non-empty strings.
fn row_responses(path: &Path, line: usize, row: &Value, k: usize) -> Result<Vec<String>> {
    let list = row
        .get("responses")
        .ok_or_else(|| {
            LabelError::input(
                path,
                line,
                "field \"responses\" is missing (give --model to sample them, or a list of strings per row)",
            )
        })?
        .as_array()
        .ok_or_else(|| LabelError::input(path, line, "field \"responses\" must be a list of strings"))?;
    if list.len() != k {
        return Err(LabelError::input(
            path,
            line,
            format!(
                "field \"responses\" has {} responses, expected {k}",
                list.len()
            ),
        ));
    }
    list.iter()
        .enumerate()
        .map(|(i, r)| {
            r.as_str().map(str::to_string).ok_or_else(|| {
                LabelError::input(
                    path,
                    line,
                    format!("field \"responses\": response {i} is not a string"),
                )
            })
        })
        .collect()
}

/// Reads the prompts and makes every item's responses.
pub fn build_items(src: &Source) -> Result<(Vec<NewItem>, Vec<String>)> {
    let rows = read_rows(src.prompts)?;
    let per_model = match src.kind {
        Kind::Rank => src.k,
        Kind::Compare => 1,
        Kind::Demonstrate => 0,
    };
    let model_names: Vec<String> = match (src.kind, src.models.len()) {
        (Kind::Demonstrate, _) => vec![],
        (Kind::Rank, 0) => vec!["given".into()],
        (Kind::Compare, 0) => vec!["A".into(), "B".into()],
        _ => src.models.iter().map(|m| m.display().to_string()).collect(),
    };
    // responses[row] = [(text, model)]
    let mut responses: Vec<Vec<(String, String)>> = vec![vec![]; rows.len()];
    if src.kind != Kind::Demonstrate && src.models.is_empty() {
        let k = if src.kind == Kind::Rank { src.k } else { 2 };
        for ((line, row, _, _), out) in rows.iter().zip(&mut responses) {
            for (i, r) in row_responses(src.prompts, *line, row, k)?
                .into_iter()
                .enumerate()
            {
                let model = model_names.get(i).unwrap_or(&model_names[0]).clone();
                out.push((r, model));
            }
        }
    }
    for (m, dir) in src.models.iter().enumerate() {
        let pre = load_pretrained(dir, &crate::device::default()).map_err(|e| {
            LabelError::Invalid(format!("loading model from {}: {e}", dir.display()))
        })?;
        let params = SamplingParams {
            eos_token_ids: pre.eos_token_ids.clone(),
            ..src.sampling.clone()
        };
        let mut ids = vec![];
        for (line, _, p, _) in &rows {
            // Prompts are text from outside: special-token strings in them stay text.
            let t = p.tokenize(&pre.tokenizer, true)?;
            if t.is_empty() || t.len() + params.max_new_tokens > pre.model.config.context_length() {
                return Err(LabelError::input(
                    src.prompts,
                    *line,
                    format!(
                        "prompt has {} tokens and max_new_tokens is {}; {}'s context is {} tokens",
                        t.len(),
                        params.max_new_tokens,
                        dir.display(),
                        pre.model.config.context_length()
                    ),
                ));
            }
            ids.push(t);
        }
        let mut rng = ChaCha8Rng::seed_from_u64(src.seed.wrapping_add(m as u64));
        let bar = crate::progress::bar(rows.len() as u64, "sampling");
        for (chunk, out) in ids
            .chunks(src.batch_size.max(1))
            .zip(responses.chunks_mut(src.batch_size.max(1)))
        {
            let samples = generate_n(
                &pre.model,
                &pre.tokenizer,
                chunk,
                per_model,
                &params,
                &mut rng,
            )?;
            for (o, group) in out.iter_mut().zip(samples) {
                o.extend(
                    group
                        .into_iter()
                        .map(|c| (c.text.trim().to_string(), model_names[m].clone())),
                );
            }
            bar.inc(chunk.len() as u64);
        }
        bar.finish_and_clear();
    }
    let items = rows
        .into_iter()
        .zip(responses)
        .map(|((_, source, _, prompt), responses)| NewItem {
            prompt,
            source,
            responses,
        })
        .collect();
    Ok((items, model_names))
}

/// The project record: the kind, K, overlap, guidelines, and the settings the items
/// were made with plus a random salt for the per-labeler orders and compare sides.
pub fn project(src: &Source, overlap: usize, guidelines: String, models: Vec<String>) -> Project {
    let salt: u64 = rand::rng().random();
    Project {
        kind: src.kind,
        k: match src.kind {
            Kind::Rank => src.k,
            Kind::Compare => 2,
            Kind::Demonstrate => 0,
        },
        overlap,
        guidelines,
        models,
        settings: json!({
            "sampling": src.sampling,
            "seed": src.seed,
            "salt": salt.to_string(),
        }),
    }
}

/// The project's salt (a number in `settings.salt`).
pub fn salt(project: &Project) -> u64 {
    project.settings["salt"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// The order in which `labeler` sees the `k` responses of `item`: a permutation that
/// is random across labelers and items but the same on every reload.
pub fn display_order(salt: u64, item: i64, labeler: i64, k: usize) -> Vec<usize> {
    use rand::seq::SliceRandom;
    let seed =
        salt ^ (item as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (labeler as u64).rotate_left(32);
    let mut order: Vec<usize> = (0..k).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    order
}

/// Whether model A's response of a compare item is shown on the left: random per item.
pub fn a_on_left(salt: u64, item: i64) -> bool {
    ChaCha8Rng::seed_from_u64(salt ^ (item as u64).wrapping_mul(0xD1B5_4A32_D192_ED03)).random()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_orders_are_permutations_stable_per_labeler_and_vary() {
        let a = display_order(7, 3, 1, 4);
        assert_eq!(a, display_order(7, 3, 1, 4));
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, [0, 1, 2, 3]);
        let distinct: std::collections::BTreeSet<Vec<usize>> =
            (0..20).map(|l| display_order(7, 3, l, 4)).collect();
        assert!(distinct.len() > 5, "{distinct:?}");
        let left = (0..200).filter(|&i| a_on_left(7, i)).count();
        assert!((60..140).contains(&left), "{left}");
    }
}
