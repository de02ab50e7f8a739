//! Writing files so that a crash never leaves a half-written one: through a temporary
//! name in the same folder, then a rename. A leaf module (it depends only on
//! `error`, where the read helpers live), so that the tokenizer, the model folders,
//! checkpoints and the pipeline can all write without depending on each other.

use serde_json::Value;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Writes pretty JSON through a temporary file.
pub fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).expect("JSON values serialize") + "\n";
    write_atomic(path, text.as_bytes())
}

/// Writes a file through a temporary name in the same folder, then renames it.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_path(path);
    std::fs::write(&tmp, bytes).map_err(|e| Error::write(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::write(path, e))
}

/// `DIR/NAME.tmp` for `DIR/NAME`: where a file is written before it is renamed.
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}
