//! Writing files so that a crash never leaves a half-written one: through a temporary
//! name in the same folder (`DIR/.tmp-NAME`), then a rename. A leaf module (it depends
//! only on `error`, where the read helpers live), so that the tokenizer, the model
//! folders, checkpoints, the pipeline and the commands' outputs can all write without
//! depending on each other.
//!
//! Every temporary name starts with [`TMP_PREFIX`], so what a killed run left behind
//! (a full disk, a crash between the write and the rename) is recognisable and
//! removed by [`remove_tmp_leftovers`] when the next run starts in that folder.

use serde_json::Value;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The prefix of every temporary file or folder: `.tmp-config.json`,
/// `.tmp-checkpoint-40/`.
pub const TMP_PREFIX: &str = ".tmp-";

/// Writes pretty JSON through a temporary file.
pub fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).expect("JSON values serialize") + "\n";
    write_atomic(path, text.as_bytes())
}

/// Writes a file through a temporary name in the same folder, then renames it.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = AtomicFile::create(path)?;
    f.write_all(bytes).map_err(|e| Error::write(&f.tmp, e))?;
    f.commit()
}

/// `DIR/.tmp-NAME` for `DIR/NAME`: where a file is written before it is renamed.
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut name = std::ffi::OsString::from(TMP_PREFIX);
    name.push(path.file_name().unwrap_or_default());
    path.with_file_name(name)
}

/// A file written in pieces (JSONL rows as they are produced) that appears at its
/// path only whole: the bytes go to `DIR/.tmp-NAME`, and [`AtomicFile::commit`]
/// flushes, syncs and renames it over `path`. Dropped without a commit (an error
/// midway), the temporary file is removed and a file already at `path` is untouched.
///
/// A path that exists and is not a regular file (`/dev/stdout`, a named pipe) is
/// written directly: there is nothing to rename over.
pub struct AtomicFile {
    path: PathBuf,
    /// Where the bytes go: the temporary file, or `path` itself when it is a device.
    tmp: PathBuf,
    out: Option<BufWriter<File>>,
}

impl AtomicFile {
    /// Starts writing `path`; a temporary file left by a killed earlier run is
    /// replaced (with a note).
    pub fn create(path: &Path) -> Result<Self> {
        if std::fs::metadata(path).is_ok_and(|m| !m.is_file() && !m.is_dir()) {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|e| Error::write(path, e))?;
            return Ok(AtomicFile {
                path: path.to_path_buf(),
                tmp: path.to_path_buf(),
                out: Some(BufWriter::new(file)),
            });
        }
        let tmp = tmp_path(path);
        if tmp.exists() {
            crate::note!(
                "note: removing {}, left by an interrupted run",
                tmp.display()
            );
        }
        let file = File::create(&tmp).map_err(|e| Error::write(&tmp, e))?;
        Ok(AtomicFile {
            path: path.to_path_buf(),
            tmp,
            out: Some(BufWriter::new(file)),
        })
    }

    /// The final path (what errors about this file name).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Flushes and syncs the temporary file and renames it over the final path.
    pub fn commit(mut self) -> Result<()> {
        let out = self.out.take().expect("an AtomicFile is committed once");
        let file = out
            .into_inner()
            .map_err(|e| Error::write(&self.path, e.into_error()))?;
        if self.tmp == self.path {
            return Ok(()); // a device or a pipe: written in place
        }
        file.sync_all().map_err(|e| Error::write(&self.path, e))?;
        drop(file);
        std::fs::rename(&self.tmp, &self.path).map_err(|e| Error::write(&self.path, e))
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.out.as_mut().expect("not yet committed").write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.as_mut().expect("not yet committed").flush()
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.out.take().is_some() && self.tmp != self.path {
            // Not committed: the run failed; leave no partial file behind.
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Removes every `.tmp-*` file or folder under `dir` (at any depth): what a run killed
/// mid-write left (`.tmp-checkpoint-N/` after a full disk). Each removal is noted on
/// stderr. Returns how many entries were removed.
pub fn remove_tmp_leftovers(dir: &Path) -> Result<usize> {
    let mut removed = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries {
            let entry = entry.map_err(|e| Error::read(&d, e))?;
            let path = entry.path();
            let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
            if entry.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                crate::note!(
                    "note: removing {}, left by an interrupted run",
                    path.display()
                );
                if is_dir {
                    std::fs::remove_dir_all(&path)
                } else {
                    std::fs::remove_file(&path)
                }
                .map_err(|e| Error::write(&path, e))?;
                removed += 1;
            } else if is_dir {
                stack.push(path);
            }
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_uncommitted_file_leaves_the_old_one_and_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        std::fs::write(&path, "old\n").unwrap();
        {
            let mut f = AtomicFile::create(&path).unwrap();
            writeln!(f, "new row").unwrap();
            // Dropped without commit: a failing run.
        }
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "old\n");
        assert!(!tmp_path(&path).exists());
        let mut f = AtomicFile::create(&path).unwrap();
        writeln!(f, "new row").unwrap();
        f.commit().unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new row\n");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn leftovers_are_removed_at_any_depth() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join(".tmp-checkpoint-3/sub")).unwrap();
        std::fs::write(d.join(".tmp-checkpoint-3/sub/x"), "x").unwrap();
        std::fs::create_dir_all(d.join("ema")).unwrap();
        std::fs::write(d.join("ema/.tmp-config.json"), "{").unwrap();
        std::fs::write(d.join("config.json"), "{}").unwrap();
        assert_eq!(remove_tmp_leftovers(d).unwrap(), 2);
        let mut left: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["config.json", "ema"]);
        assert_eq!(std::fs::read_dir(d.join("ema")).unwrap().count(), 0);
    }
}
