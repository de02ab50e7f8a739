//! Atomic checkpoints that resume exactly.
//!
//! A checkpoint is written into `OUTPUT_DIR/.tmp-checkpoint-N/`; every file and the
//! folder are fsynced; `manifest.json` (each file's size and SHA-256) is written
//! last; the folder is renamed to `checkpoint-N`, the parent fsynced, and `latest`
//! updated. Only then are old checkpoints beyond `save_total_limit` removed. On
//! resume the newest checkpoint whose manifest validates is taken, so a crash in the
//! middle of a save (a torn checkpoint) falls back to the previous one.

use rayon::prelude::*;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::error::{read_json, Error, Result};
use crate::io::write_atomic;

pub const MANIFEST_FILE: &str = "manifest.json";
pub const LATEST_FILE: &str = "latest";
const PREFIX: &str = "checkpoint-";

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::write(path, e)
}

fn sha256_file(path: &Path) -> Result<(u64, String)> {
    let mut f = File::open(path).map_err(|e| Error::read(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::read(path, e))?;
        if n == 0 {
            break;
        }
        size += n as u64;
        h.update(&buf[..n]);
    }
    let hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Ok((size, hex))
}

fn fsync(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io(path))
}

/// Every regular file under `dir`, as paths relative to it, sorted.
fn files_under(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = vec![];
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let abs = dir.join(&rel);
        for entry in std::fs::read_dir(&abs).map_err(|e| Error::read(&abs, e))? {
            let entry = entry.map_err(|e| Error::read(&abs, e))?;
            let r = rel.join(entry.file_name());
            if entry.path().is_dir() {
                stack.push(r);
            } else {
                out.push(r);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Writes checkpoint `step` with `write` filling the folder, atomically as described
/// in the module doc; then prunes to `limit` checkpoints. Returns the new folder.
pub fn save(
    output_dir: &Path,
    step: u64,
    limit: Option<usize>,
    write: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    start_save(output_dir, step, limit, write)?.wait()
}

/// `save`, returning once the files are written and hashed: the fsyncs, the manifest,
/// the rename, `latest` and pruning (waiting on the disk, not the CPU: about 40 % of
/// a save in the demo) go on on a background thread while training goes on. The
/// checkpoint appears as `checkpoint-N` only when all of it is on disk, as with
/// `save`; a crash before then leaves the previous one to resume from.
pub fn start_save(
    output_dir: &Path,
    step: u64,
    limit: Option<usize>,
    write: impl FnOnce(&Path) -> Result<()>,
) -> Result<Finishing> {
    let name = format!("{PREFIX}{step}");
    let tmp = output_dir.join(format!(".tmp-{name}"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    write(&tmp)?;
    // The files were just written, so they are read back from the page cache; the
    // large ones (weights, optimizer state) on the pool's threads at once.
    let rels = files_under(&tmp)?;
    let hashed: Vec<(u64, String)> = rels
        .par_iter()
        .map(|rel| sha256_file(&tmp.join(rel)))
        .collect::<Result<_>>()?;
    let mut files = serde_json::Map::new();
    for (rel, (size, sha)) in rels.iter().zip(hashed) {
        files.insert(
            rel.to_string_lossy().into_owned(),
            json!({"size": size, "sha256": sha}),
        );
    }
    let manifest = json!({"step": step, "files": files});
    let dir = output_dir.to_path_buf();
    let handle = std::thread::Builder::new()
        .name("rlhf-checkpoint".into())
        .spawn(move || finish(&dir, &tmp, &name, &rels, &manifest, limit))
        .map_err(io(output_dir))?;
    Ok(Finishing {
        handle: Some(handle),
    })
}

/// The durable half of a save: every file and folder fsynced, the manifest written
/// last, the folder renamed into place, `latest` updated, old checkpoints pruned.
fn finish(
    output_dir: &Path,
    tmp: &Path,
    name: &str,
    rels: &[PathBuf],
    manifest: &Value,
    limit: Option<usize>,
) -> Result<PathBuf> {
    for rel in rels {
        fsync(&tmp.join(rel))?;
    }
    for rel in rels
        .iter()
        .filter_map(|r| r.parent())
        .filter(|p| !p.as_os_str().is_empty())
    {
        fsync(&tmp.join(rel))?;
    }
    fsync(tmp)?;
    let text = serde_json::to_string_pretty(manifest).expect("JSON serializes");
    std::fs::write(tmp.join(MANIFEST_FILE), text).map_err(io(&tmp.join(MANIFEST_FILE)))?;
    fsync(&tmp.join(MANIFEST_FILE))?;
    fsync(tmp)?;
    let dest = output_dir.join(name);
    if dest.exists() {
        // A torn or older checkpoint of the same step (e.g. after falling back).
        std::fs::remove_dir_all(&dest).map_err(io(&dest))?;
    }
    std::fs::rename(tmp, &dest).map_err(io(&dest))?;
    fsync(output_dir)?;
    write_atomic(&output_dir.join(LATEST_FILE), name.as_bytes())?;
    if let Some(limit) = limit {
        prune(output_dir, limit.max(1))?;
    }
    Ok(dest)
}

/// A checkpoint being finished on its own thread (`start_save`). Dropping it waits
/// too, so no save is left half-done behind a returning trainer.
#[must_use = "wait() says whether the checkpoint was saved"]
pub struct Finishing {
    handle: Option<std::thread::JoinHandle<Result<PathBuf>>>,
}

impl Finishing {
    /// Waits for the checkpoint to be on disk; returns its folder.
    pub fn wait(mut self) -> Result<PathBuf> {
        let handle = self.handle.take().expect("joined once");
        handle
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }

    /// Waits for the save in `slot`, if there is one, and empties it.
    pub fn wait_for(slot: &mut Option<Finishing>) -> Result<()> {
        match slot.take() {
            Some(save) => save.wait().map(drop),
            None => Ok(()),
        }
    }
}

impl Drop for Finishing {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            // Unwaited, the trainer is already returning another error (or
            // panicking): this one is said on stderr rather than lost.
            if let Ok(Err(e)) = handle.join() {
                crate::note!("warning: the last checkpoint was not saved: {e}");
            }
        }
    }
}

/// Checkpoint folders under `output_dir` as (step, path), newest first.
pub fn list(output_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = vec![];
    if !output_dir.is_dir() {
        return Ok(out);
    }
    for entry in std::fs::read_dir(output_dir).map_err(|e| Error::read(output_dir, e))? {
        let entry = entry.map_err(|e| Error::read(output_dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(step) = name
            .strip_prefix(PREFIX)
            .and_then(|s| s.parse::<u64>().ok())
        {
            if entry.path().is_dir() {
                out.push((step, entry.path()));
            }
        }
    }
    out.sort_by_key(|c| std::cmp::Reverse(c.0));
    Ok(out)
}

/// Checks a checkpoint's manifest: every listed file present with its size and hash.
pub fn validate(dir: &Path) -> Result<()> {
    let manifest_path = dir.join(MANIFEST_FILE);
    if !manifest_path.exists() {
        return Err(Error::bad_file(
            &manifest_path,
            None,
            "missing: the checkpoint is incomplete",
        ));
    }
    let manifest: Value = read_json(&manifest_path)?;
    let files = manifest
        .get("files")
        .and_then(Value::as_object)
        .ok_or_else(|| Error::bad_file(&manifest_path, None, "no \"files\" object"))?;
    for (rel, meta) in files {
        let path = dir.join(rel);
        let (size, sha) = sha256_file(&path)?;
        let want_size = meta.get("size").and_then(Value::as_u64);
        let want_sha = meta.get("sha256").and_then(Value::as_str);
        if want_size != Some(size) || want_sha != Some(sha.as_str()) {
            return Err(Error::bad_file(
                &path,
                None,
                "size or SHA-256 differs from the manifest",
            ));
        }
    }
    Ok(())
}

/// The newest checkpoint that validates, reporting (on stderr) any newer torn ones.
pub fn find_resumable(output_dir: &Path) -> Result<Option<(u64, PathBuf)>> {
    for (step, dir) in list(output_dir)? {
        match validate(&dir) {
            Ok(()) => return Ok(Some((step, dir))),
            Err(e) => crate::note!("warning: skipping checkpoint {}: {e}", dir.display()),
        }
    }
    Ok(None)
}

/// Removes the oldest complete checkpoints so that at most `limit` remain.
fn prune(output_dir: &Path, limit: usize) -> Result<()> {
    let all = list(output_dir)?;
    for (_, dir) in all.into_iter().skip(limit) {
        std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torn_checkpoint_falls_back_and_limit_prunes() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();
        for step in [1, 2, 3] {
            save(out, step, Some(2), |d| {
                std::fs::write(d.join("weights.bin"), vec![step as u8; 10])
                    .map_err(|e| Error::write(d, e))
            })
            .unwrap();
        }
        let steps: Vec<u64> = list(out).unwrap().iter().map(|c| c.0).collect();
        assert_eq!(steps, [3, 2], "only the two newest remain");
        assert_eq!(
            std::fs::read_to_string(out.join(LATEST_FILE)).unwrap(),
            "checkpoint-3"
        );
        // Tear the newest: a file changes after the manifest was written.
        std::fs::write(out.join("checkpoint-3/weights.bin"), b"torn").unwrap();
        assert_eq!(find_resumable(out).unwrap().unwrap().0, 2);
        // A folder without a manifest (crash before it was written) is skipped too.
        std::fs::create_dir_all(out.join("checkpoint-9")).unwrap();
        assert_eq!(find_resumable(out).unwrap().unwrap().0, 2);
    }

    fn weights(d: &Path, byte: u8) -> Result<()> {
        std::fs::create_dir_all(d.join("sub")).map_err(|e| Error::write(d, e))?;
        // Contents that differ between the files, so that a hash listed against the
        // wrong file does not validate.
        for (i, name) in ["weights.bin", "sub/state.bin"].into_iter().enumerate() {
            std::fs::write(d.join(name), vec![byte ^ i as u8; 1 << 16])
                .map_err(|e| Error::write(d, e))?;
        }
        Ok(())
    }

    /// A save finishing in the background is in place, with a manifest that validates,
    /// once waited on, and so is one that is dropped unwaited (as when training stops
    /// with an error); the next one prunes it as `save` would.
    #[test]
    fn a_save_finishing_in_the_background_is_whole_once_waited_or_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();
        let first = start_save(out, 1, Some(1), |d| weights(d, 1)).unwrap();
        assert_eq!(first.wait().unwrap(), out.join("checkpoint-1"));
        validate(&out.join("checkpoint-1")).unwrap();
        drop(start_save(out, 2, Some(1), |d| weights(d, 2)).unwrap());
        validate(&out.join("checkpoint-2")).unwrap();
        assert!(!out.join(".tmp-checkpoint-2").exists());
        assert!(!out.join("checkpoint-1").exists(), "pruned to one");
        assert_eq!(
            std::fs::read_to_string(out.join(LATEST_FILE)).unwrap(),
            "checkpoint-2"
        );
        // A write that fails is reported by start_save itself, and nothing appears.
        let err = start_save(out, 3, None, |d| {
            Err(Error::write(d, std::io::Error::other("disk full")))
        });
        assert!(err.is_err());
        assert_eq!(find_resumable(out).unwrap().unwrap().0, 2);
    }
}
