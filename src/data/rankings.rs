//! Comparison data for the reward model, as the labelers produce it: one prompt and
//! K ranked responses per line,
//!   `{"prompt": ..., "responses": [y1, ..., yK], "ranking": [r1, ..., rK]}`
//! (r_i the rank of response i, 0 = best, ties allowed), or TRL's preference pairs
//!   `{"prompt": ..., "chosen": ..., "rejected": ...}` (read as K = 2).
//! Prompts may be text or a list of messages (rendered with the chat template and a
//! generation prompt); responses text or assistant messages. Every response is
//! scored at the eos that ends it (appended when missing).

use serde_json::Value;
use std::path::Path;

use super::jsonl::read_jsonl;
use super::tokenizer::Tokenizer;
use crate::error::{Error, Result};
use crate::losses::ranked_pairs;

/// One prompt with its K tokenized responses and their ranking.
#[derive(Debug, Clone, PartialEq)]
pub struct Ranked {
    pub prompt: Vec<u32>,
    /// Each response's tokens, ending with an eos.
    pub responses: Vec<Vec<u32>>,
    pub ranks: Vec<u32>,
    /// (winner, loser) pairs, ties dropped.
    pub pairs: Vec<(usize, usize)>,
}

impl Ranked {
    /// prompt + response i: the sequence the reward model scores.
    pub fn sequence(&self, i: usize) -> Vec<u32> {
        [self.prompt.as_slice(), self.responses[i].as_slice()].concat()
    }
}

/// How prompts and responses become tokens.
pub struct PairTokenizing<'a> {
    pub tokenizer: &'a Tokenizer,
    pub eos: u32,
    pub eos_ids: &'a [u32],
    pub max_length: usize,
}

impl PairTokenizing<'_> {
    /// Prompt tokens: text with the tokenizer's special tokens, or a conversation
    /// rendered with a generation prompt.
    pub fn prompt(&self, p: &Value) -> std::result::Result<Vec<u32>, String> {
        match p {
            Value::String(s) if s.trim().is_empty() => Err("field \"prompt\" is empty".into()),
            Value::String(s) => self.tokenizer.encode(s, true).map_err(|e| e.to_string()),
            Value::Array(msgs) => {
                check_messages(msgs, "prompt")?;
                let text = self
                    .tokenizer
                    .apply_chat_template(p, true)
                    .map_err(|e| e.to_string())?;
                self.tokenizer
                    .encode(&text, false)
                    .map_err(|e| e.to_string())
            }
            _ => Err("field \"prompt\" must be a string or a list of messages".into()),
        }
    }

    /// Response tokens (eos appended unless it already ends with one). A response
    /// given as messages is the text the chat template adds after the prompt.
    pub fn response(
        &self,
        prompt: &Value,
        r: &Value,
        what: &str,
    ) -> std::result::Result<Vec<u32>, String> {
        let text = match r {
            Value::String(s) => s.clone(),
            Value::Array(msgs) => {
                check_messages(msgs, what)?;
                let Value::Array(pm) = prompt else {
                    return Err(format!(
                        "{what} is a list of messages but the prompt is plain text"
                    ));
                };
                let all = Value::Array(pm.iter().chain(msgs).cloned().collect());
                let render = |v: &Value, gen| {
                    self.tokenizer
                        .apply_chat_template(v, gen)
                        .map_err(|e| e.to_string())
                };
                let (before, after) = (render(prompt, true)?, render(&all, false)?);
                after
                    .strip_prefix(before.as_str())
                    .ok_or(
                        "the chat template does not render the conversation as a growing prefix",
                    )?
                    .to_string()
            }
            _ => return Err(format!("{what} must be a string or a list of messages")),
        };
        let mut ids = self
            .tokenizer
            .encode(&text, false)
            .map_err(|e| e.to_string())?;
        if !ids.last().is_some_and(|t| self.eos_ids.contains(t)) {
            ids.push(self.eos);
        }
        Ok(ids)
    }
}

fn check_messages(msgs: &[Value], field: &str) -> std::result::Result<(), String> {
    if msgs.is_empty() {
        return Err(format!("field {field:?} is an empty list"));
    }
    for (i, m) in msgs.iter().enumerate() {
        if !m.get("role").is_some_and(Value::is_string) || m.get("content").is_none() {
            return Err(format!(
                "field {field:?}: message {i} needs a string \"role\" and a \"content\""
            ));
        }
    }
    Ok(())
}

/// Parses one line into a ranked example; errors are messages about the row.
pub fn ranked_from_row(v: &Value, cfg: &PairTokenizing) -> std::result::Result<Ranked, String> {
    let prompt_v = v.get("prompt").ok_or("field \"prompt\" is missing")?;
    let (responses_v, ranks): (Vec<&Value>, Vec<u32>) = if let Some(rs) = v.get("responses") {
        let rs = rs.as_array().ok_or("field \"responses\" must be a list")?;
        let ranking = v
            .get("ranking")
            .ok_or("field \"ranking\" is missing")?
            .as_array()
            .ok_or("field \"ranking\" must be a list of integers")?;
        if rs.len() < 2 {
            return Err(format!(
                "field \"responses\" has {} response(s); a ranking needs at least 2",
                rs.len()
            ));
        }
        if ranking.len() != rs.len() {
            return Err(format!(
                "field \"ranking\" has {} ranks for {} responses",
                ranking.len(),
                rs.len()
            ));
        }
        let mut ranks = vec![];
        for r in ranking {
            let r = r
                .as_u64()
                .ok_or_else(|| format!("field \"ranking\": {r} is not a non-negative integer"))?;
            if r as usize >= rs.len() {
                return Err(format!(
                    "field \"ranking\": rank {r} is out of range 0..={}",
                    rs.len() - 1
                ));
            }
            ranks.push(r as u32);
        }
        (rs.iter().collect(), ranks)
    } else if v.get("chosen").is_some() || v.get("rejected").is_some() {
        let c = v.get("chosen").ok_or("field \"chosen\" is missing")?;
        let r = v.get("rejected").ok_or("field \"rejected\" is missing")?;
        (vec![c, r], vec![0, 1])
    } else {
        return Err("expected \"responses\" + \"ranking\", or \"chosen\" + \"rejected\"".into());
    };
    let pairs = ranked_pairs(&ranks);
    if pairs.is_empty() {
        return Err("all responses are tied: there is no comparison to learn from".into());
    }
    let prompt = cfg.prompt(prompt_v)?;
    let mut responses = vec![];
    for (i, r) in responses_v.iter().enumerate() {
        let what = if v.get("responses").is_some() {
            format!("response {i}")
        } else if i == 0 {
            "field \"chosen\"".into()
        } else {
            "field \"rejected\"".into()
        };
        let ids = cfg.response(prompt_v, r, &what)?;
        if prompt.len() + ids.len() > cfg.max_length {
            return Err(format!(
                "prompt + {what} has {} tokens, more than --max_length {}",
                prompt.len() + ids.len(),
                cfg.max_length
            ));
        }
        responses.push(ids);
    }
    Ok(Ranked {
        prompt,
        responses,
        ranks,
        pairs,
    })
}

/// Reads a comparisons file; with `skip_invalid`, bad rows are counted and skipped.
/// Returns the examples and the number skipped.
pub fn load_rankings(
    path: &Path,
    cfg: &PairTokenizing,
    skip_invalid: bool,
) -> Result<(Vec<Ranked>, usize)> {
    let mut out = vec![];
    let mut skipped = 0;
    let lines = read_jsonl(path)?;
    let rows = lines.len();
    for line in lines {
        match ranked_from_row(&line.value, cfg) {
            Ok(r) => out.push(r),
            Err(_) if skip_invalid => skipped += 1,
            Err(msg) => return Err(Error::bad_file(path, Some(line.number), msg)),
        }
    }
    if out.is_empty() {
        return Err(Error::bad_file(
            path,
            None,
            format!("no usable row ({rows} rows, {skipped} invalid)"),
        ));
    }
    Ok((out, skipped))
}
