//! JSON Lines reading with errors that name the file and the 1-based line.

use serde_json::Value;
use std::path::Path;

use crate::error::{read_to_string, Error, Result};

/// One parsed line: its 1-based number and the object on it.
#[derive(Debug, Clone)]
pub struct Line {
    pub number: usize,
    pub value: Value,
}

/// Reads every non-blank line of a JSONL file as a JSON object.
pub fn read_jsonl(path: &Path) -> Result<Vec<Line>> {
    let text = read_to_string(path)?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let number = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(line)
            .map_err(|e| Error::bad_file(path, Some(number), format!("malformed JSON: {e}")))?;
        if !value.is_object() {
            return Err(Error::bad_file(
                path,
                Some(number),
                "expected a JSON object",
            ));
        }
        out.push(Line { number, value });
    }
    if out.is_empty() {
        return Err(Error::bad_file(path, None, "no rows (the file is empty)"));
    }
    Ok(out)
}

/// Parses every row of a JSONL file with `parse` (given the row and its 1-based line); a row it rejects is an error naming
/// the file and line, or, with `skip_invalid`, counted and skipped. Returns the parsed
/// rows and the number skipped; a file with no usable row is an error.
pub fn parse_rows<T>(
    path: &Path,
    skip_invalid: bool,
    mut parse: impl FnMut(&Value, usize) -> std::result::Result<T, String>,
) -> Result<(Vec<T>, usize)> {
    let lines = read_jsonl(path)?;
    let rows = lines.len();
    let (mut out, mut skipped) = (Vec::with_capacity(rows), 0);
    for line in lines {
        match parse(&line.value, line.number) {
            Ok(t) => out.push(t),
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
