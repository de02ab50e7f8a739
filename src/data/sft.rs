//! SFT datasets in TRL's JSONL formats, tokenized with a loss mask that covers only
//! what the model should learn to write:
//!
//! - `{"prompt": str, "completion": str}`: the prompt (with the tokenizer's special
//!   tokens, e.g. BOS) is masked, the completion and a closing EOS are trained;
//! - `{"prompt": [messages], "completion": [messages]}` (conversational): rendered with
//!   the chat template; only the completion's assistant turns are trained;
//! - `{"messages": [...]}`: every assistant turn is trained, every other turn masked;
//! - `{"text": str}`: every token is trained (continued pretraining), EOS appended.
//!
//! Conversations are cut into segments by rendering growing prefixes of the message
//! list (`add_generation_prompt=true` before each assistant turn), so the mask follows
//! the template exactly, whatever its markers.

use clap::ValueEnum;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::Path;

use super::chat_template::check_role;
use super::jsonl::read_jsonl;
use super::tokenizer::Tokenizer;
use crate::error::{Error, Result};

/// A tokenized example: `loss_mask[t]` is 1 where token t is a training target.
#[derive(Debug, Clone, PartialEq)]
pub struct SftExample {
    pub ids: Vec<u32>,
    pub loss_mask: Vec<u8>,
}

/// What to do with an example longer than `max_length`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Overflow {
    /// Stop with an error naming the line (the default).
    Error,
    /// Keep the first `max_length` tokens.
    Truncate,
    /// Leave the example out and report the count.
    Skip,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadReport {
    pub rows: usize,
    pub skipped_invalid: usize,
    pub skipped_overlong: usize,
    pub truncated: usize,
}

/// Tokenization settings shared by every row.
pub struct SftTokenizing<'a> {
    pub tokenizer: &'a Tokenizer,
    /// Appended to plain completions and to conversations whose trained part holds
    /// no end token.
    pub eos: u32,
    /// Every id that ends a generation (eos list of the model).
    pub eos_ids: &'a [u32],
    pub max_length: usize,
    pub overflow: Overflow,
    /// Special-token strings in the rows' text and message content encoded as text
    /// (`Tokenizer::encode_chat`); false is transformers' default.
    pub split_special_tokens: bool,
}

/// Reads and tokenizes an SFT JSONL file. With `skip_invalid`, bad rows are counted
/// instead of stopping the run; a file with no usable row is an error either way.
pub fn load_sft(
    path: &Path,
    cfg: &SftTokenizing,
    skip_invalid: bool,
) -> Result<(Vec<SftExample>, LoadReport)> {
    let mut report = LoadReport::default();
    let mut out = vec![];
    for line in read_jsonl(path)? {
        report.rows += 1;
        let ex = match example_from_row(&line.value, cfg) {
            Ok(ex) => ex,
            Err(_) if skip_invalid => {
                report.skipped_invalid += 1;
                continue;
            }
            Err(msg) => return Err(Error::bad_file(path, Some(line.number), msg)),
        };
        if ex.ids.len() > cfg.max_length {
            match cfg.overflow {
                Overflow::Error => {
                    return Err(Error::bad_file(
                        path,
                        Some(line.number),
                        format!(
                            "example has {} tokens, more than --max_length {} (use --on_overflow truncate or skip)",
                            ex.ids.len(),
                            cfg.max_length
                        ),
                    ))
                }
                Overflow::Skip => {
                    report.skipped_overlong += 1;
                    continue;
                }
                Overflow::Truncate => {
                    let mut ex = ex;
                    ex.ids.truncate(cfg.max_length);
                    ex.loss_mask.truncate(cfg.max_length);
                    report.truncated += 1;
                    if ex.loss_mask[1..].iter().all(|&m| m == 0) {
                        // Nothing left to learn from once cut.
                        report.skipped_overlong += 1;
                        continue;
                    }
                    out.push(ex);
                    continue;
                }
            }
        }
        out.push(ex);
    }
    if out.is_empty() {
        return Err(Error::bad_file(
            path,
            None,
            format!(
                "no usable row ({} rows, {} invalid, {} over --max_length)",
                report.rows, report.skipped_invalid, report.skipped_overlong
            ),
        ));
    }
    Ok((out, report))
}

fn nonempty_str<'a>(v: &'a Value, field: &str) -> std::result::Result<&'a str, String> {
    match v.get(field) {
        Some(Value::String(s)) if s.trim().is_empty() => Err(format!("field {field:?} is empty")),
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(format!("field {field:?} must be a string")),
        None => Err(format!("field {field:?} is missing")),
    }
}

fn messages<'a>(v: &'a Value, field: &str) -> std::result::Result<&'a [Value], String> {
    let list = v
        .get(field)
        .and_then(Value::as_array)
        .ok_or_else(|| format!("field {field:?} must be a list of messages"))?;
    for (i, m) in list.iter().enumerate() {
        let Some(role) = m.get("role").and_then(Value::as_str) else {
            return Err(format!(
                "field {field:?}: message {i} needs a string \"role\""
            ));
        };
        check_role(role, i).map_err(|e| format!("field {field:?}: {e}"))?;
        match m.get("content") {
            Some(Value::String(_)) | Some(Value::Array(_)) => {}
            _ => return Err(format!("field {field:?}: message {i} needs a \"content\"")),
        }
    }
    Ok(list)
}

/// Tokenizes one row; the error is a message about the row (the caller adds file and
/// line).
pub fn example_from_row(v: &Value, cfg: &SftTokenizing) -> std::result::Result<SftExample, String> {
    let tok = cfg.tokenizer;
    let enc = |t: &str, special: bool| {
        tok.encode_with(t, special, cfg.split_special_tokens)
            .map_err(|e| e.to_string())
    };
    if v.get("messages").is_some() {
        let msgs = messages(v, "messages")?;
        return conversation(cfg, msgs, 0);
    }
    if let Some(p) = v.get("prompt") {
        if v.get("completion").is_none() {
            return Err("field \"completion\" is missing (a \"prompt\" row needs one)".into());
        }
        if p.is_array() {
            let prompt = messages(v, "prompt")?;
            let completion = messages(v, "completion")?;
            if completion.is_empty() {
                return Err("field \"completion\" is an empty list".into());
            }
            let all: Vec<Value> = prompt.iter().chain(completion).cloned().collect();
            return conversation(cfg, &all, prompt.len());
        }
        let prompt = nonempty_str(v, "prompt")?;
        let completion = nonempty_str(v, "completion")?;
        let p = enc(prompt, true)?;
        let mut c = enc(completion, false)?;
        c.push(cfg.eos);
        let loss_mask = [vec![0u8; p.len()], vec![1u8; c.len()]].concat();
        return Ok(SftExample {
            ids: [p, c].concat(),
            loss_mask,
        });
    }
    if v.get("text").is_some() {
        let text = nonempty_str(v, "text")?;
        let mut ids = enc(text, true)?;
        ids.push(cfg.eos);
        let loss_mask = vec![1u8; ids.len()];
        return Ok(SftExample { ids, loss_mask });
    }
    Err("expected \"messages\", \"prompt\" + \"completion\", or \"text\"".into())
}

/// Tokenizes a conversation, training the assistant turns at index ≥ `train_from`.
fn conversation(
    cfg: &SftTokenizing,
    msgs: &[Value],
    train_from: usize,
) -> std::result::Result<SftExample, String> {
    let tok = cfg.tokenizer;
    let render = |upto: usize, gen: bool| {
        tok.apply_chat_template(&Value::Array(msgs[..upto].to_vec()), gen)
            .map_err(|e| e.to_string())
    };
    let trained: Vec<usize> = (train_from..msgs.len())
        .filter(|&i| msgs[i]["role"] == "assistant")
        .collect();
    if trained.is_empty() {
        return Err("the conversation has no assistant turn to train on".into());
    }
    if let Some(&i) = trained.iter().find(|&&i| match &msgs[i]["content"] {
        Value::String(s) => s.trim().is_empty(),
        _ => false,
    }) {
        return Err(format!("assistant message {i} is empty"));
    }
    // (text, trained) segments whose concatenation is the whole rendered conversation.
    let mut segments: Vec<(String, bool)> = vec![];
    let mut done = String::new();
    for &i in &trained {
        let before = if i == 0 {
            String::new()
        } else {
            render(i, true)?
        };
        let after = render(i + 1, false)?;
        let (Some(gap), Some(turn)) = (
            before.strip_prefix(done.as_str()),
            after.strip_prefix(before.as_str()),
        ) else {
            return Err("the chat template does not render a conversation as a growing prefix, so its assistant turns cannot be masked".into());
        };
        segments.push((gap.to_string(), false));
        segments.push((turn.to_string(), true));
        done = after;
    }
    let full = render(msgs.len(), false)?;
    let rest = full
        .strip_prefix(done.as_str())
        .ok_or("the chat template does not render a conversation as a growing prefix")?;
    segments.push((rest.to_string(), false));

    // With split_special_tokens: where the content holding special-token strings is
    // in the whole rendering, which the segments cut in order.
    let plain = if cfg.split_special_tokens {
        tok.content_spans(&Value::Array(msgs.to_vec()), false, &full)
            .map_err(|e| e.to_string())?
    } else {
        vec![]
    };
    let mut ids = vec![];
    let mut loss_mask = vec![];
    let mut last_trained_end = 0;
    let mut offset = 0;
    for (text, train) in segments {
        let start = offset;
        offset += text.len();
        if text.is_empty() {
            continue;
        }
        let within: Vec<std::ops::Range<usize>> = plain
            .iter()
            .filter(|r| r.start < offset && r.end > start)
            .map(|r| r.start.max(start) - start..r.end.min(offset) - start)
            .collect();
        let t = tok
            .encode_with_plain(&text, &within)
            .map_err(|e| e.to_string())?;
        loss_mask.extend(std::iter::repeat_n(u8::from(train), t.len()));
        ids.extend(t);
        if train {
            last_trained_end = ids.len();
        }
    }
    // The model must learn to stop: the trained part ends with an end token.
    let has_end = ids[..last_trained_end]
        .iter()
        .zip(&loss_mask)
        .any(|(id, &m)| m == 1 && cfg.eos_ids.contains(id));
    if !has_end {
        ids.insert(last_trained_end, cfg.eos);
        loss_mask.insert(last_trained_end, 1);
    }
    Ok(SftExample { ids, loss_mask })
}
