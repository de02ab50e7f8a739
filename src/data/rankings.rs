//! Comparison data for the reward model, as the labelers produce it: one prompt and
//! K ranked responses per line,
//!   `{"prompt": ..., "responses": [y1, ..., yK], "ranking": [r1, ..., rK]}`
//! (r_i the rank of response i, 0 = best, ties allowed), or TRL's preference pairs
//!   `{"prompt": ..., "chosen": ..., "rejected": ...}` (read as K = 2).
//! Prompts may be text or a list of messages; responses text or assistant messages.
//! Every response becomes the ids the reward model reads (`reward_input`: the end of
//! the templated assistant turn for conversations, the eos for plain text).
//!
//! Comparisons between two responses the reward model reads as the same ids
//! (`chosen == rejected`, a response repeated in a K-way ranking, `"a"` and
//! `"a<|endoftext|>"` in plain text) teach nothing (their rewards are equal by
//! construction) and, ranked apart, contradict each other: they are dropped and
//! counted, and a row left with no comparison is dropped (counted too). An empty
//! response is a valid answer to rank (a model may end its turn at once) as long as
//! the row compares it with a different response; a row of empty responses only is
//! dropped by the same rule.

use serde_json::Value;
use std::path::Path;

use super::jsonl::parse_rows;
use super::prompts::Prompt;
use super::reward_input::{Response, RewardInput};
use crate::error::{Error, Result};
use crate::losses::ranked_pairs;

/// One prompt with its K responses as the reward model reads them, and their ranking.
#[derive(Debug, Clone, PartialEq)]
pub struct Ranked {
    /// prompt + response i for each of the K responses (`RewardInput::ids`): the
    /// reward of response i is read at the last token of `inputs[i]`.
    pub inputs: Vec<Vec<u32>>,
    pub ranks: Vec<u32>,
    /// (winner, loser) pairs, ties dropped.
    pub pairs: Vec<(usize, usize)>,
}

/// How prompts and responses become the reward model's inputs.
pub struct PairTokenizing<'a> {
    pub rule: RewardInput<'a>,
    pub max_length: usize,
}

impl PairTokenizing<'_> {
    /// The prompt of a row: text (not empty) or a list of messages.
    pub fn prompt(&self, p: &Value) -> std::result::Result<Prompt, String> {
        if p.as_str().is_some_and(|s| s.trim().is_empty()) {
            return Err("field \"prompt\" is empty".into());
        }
        Prompt::from_value(p, "field \"prompt\"")
    }

    /// The ids the reward model reads for `prompt` and the response value `r`
    /// (`what` names it in errors), at most `max_length` of them.
    pub fn input(
        &self,
        prompt: &Prompt,
        r: &Value,
        what: &str,
    ) -> std::result::Result<Vec<u32>, String> {
        let response = Response::from_value(r, what)?;
        let ids = self
            .rule
            .ids(prompt, &response)
            .map_err(|e| format!("{what}: {e}"))?;
        if ids.len() > self.max_length {
            return Err(format!(
                "prompt + {what} has {} tokens, more than --max_length {}",
                ids.len(),
                self.max_length
            ));
        }
        Ok(ids)
    }
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
    let mut inputs = vec![];
    for (i, r) in responses_v.iter().enumerate() {
        let what = if v.get("responses").is_some() {
            format!("response {i}")
        } else if i == 0 {
            "field \"chosen\"".into()
        } else {
            "field \"rejected\"".into()
        };
        inputs.push(cfg.input(&prompt, r, &what)?);
    }
    Ok(Ranked {
        inputs,
        ranks,
        pairs,
    })
}

impl Ranked {
    /// Drops the comparisons between responses with identical inputs; returns how
    /// many were dropped.
    pub fn drop_identical_pairs(&mut self) -> usize {
        let before = self.pairs.len();
        let inputs = &self.inputs;
        self.pairs.retain(|&(w, l)| inputs[w] != inputs[l]);
        before - self.pairs.len()
    }
}

/// Reads a comparisons file; with `skip_invalid`, bad rows are counted and skipped.
/// Comparisons between identical responses are dropped (see the module doc) and
/// their count printed. Returns the examples and the number of invalid rows skipped.
pub fn load_rankings(
    path: &Path,
    cfg: &PairTokenizing,
    skip_invalid: bool,
) -> Result<(Vec<Ranked>, usize)> {
    let (mut identical_pairs, mut identical_rows) = (0, 0);
    let mut first_identical = None;
    let result = parse_rows(path, skip_invalid, |v, line| {
        let mut r = ranked_from_row(v, cfg)?;
        let n = r.drop_identical_pairs();
        if n > 0 {
            identical_pairs += n;
            first_identical.get_or_insert(line);
        }
        if r.pairs.is_empty() {
            identical_rows += 1;
        }
        Ok(r)
    });
    if let Some(first) = first_identical {
        crate::note!(
            "{}: {identical_pairs} comparisons between identical responses dropped (chosen == rejected; first at line {first}); {identical_rows} rows left with no comparison dropped",
            path.display()
        );
    }
    let (parsed, skipped) = result?;
    let rows = parsed.len() + skipped;
    let out: Vec<Ranked> = parsed.into_iter().filter(|r| !r.pairs.is_empty()).collect();
    if out.is_empty() {
        return Err(Error::bad_file(
            path,
            None,
            format!(
                "no usable row ({rows} rows, {skipped} invalid, {identical_rows} comparing only identical responses)"
            ),
        ));
    }
    Ok((out, skipped))
}
