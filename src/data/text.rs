//! Pretraining text: `.txt` (documents separated by blank lines) or JSONL with a
//! `text` field, tokenized, joined with the end-of-text token and cut into blocks of
//! the context length (transformers' `group_texts`).

use std::path::Path;

use super::jsonl::read_jsonl;
use super::tokenizer::Tokenizer;
use crate::error::{read_to_string, Error, Result};

/// The documents of a pretraining file.
pub fn read_documents(path: &Path) -> Result<Vec<String>> {
    let is_jsonl = matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("jsonl" | "json")
    );
    let docs: Vec<String> = if is_jsonl {
        read_jsonl(path)?
            .into_iter()
            .map(|l| match l.value.get("text") {
                Some(serde_json::Value::String(s)) => Ok(s.clone()),
                Some(_) => Err(Error::bad_file(
                    path,
                    Some(l.number),
                    "field \"text\" must be a string",
                )),
                None => Err(Error::bad_file(
                    path,
                    Some(l.number),
                    "field \"text\" is missing",
                )),
            })
            .collect::<Result<_>>()?
    } else {
        read_to_string(path)?
            .split("\n\n")
            .map(|d| d.trim().to_string())
            .collect()
    };
    let docs: Vec<String> = docs.into_iter().filter(|d| !d.trim().is_empty()).collect();
    if docs.is_empty() {
        return Err(Error::bad_file(path, None, "no text in this file"));
    }
    Ok(docs)
}

/// Tokenizes documents, appends `eos` to each, concatenates and cuts blocks of
/// `block` tokens (the remainder shorter than a block is dropped).
pub fn pack_blocks(
    docs: &[String],
    tokenizer: &Tokenizer,
    eos: u32,
    block: usize,
) -> Result<Vec<Vec<u32>>> {
    let mut stream = Vec::new();
    for d in docs {
        stream.extend(tokenizer.encode(d, false)?);
        stream.push(eos);
    }
    Ok(stream.chunks_exact(block).map(<[u32]>::to_vec).collect())
}
