//! Who may write an output folder, and what happens to what it already holds.
//!
//! A run's `--output_dir` is one of:
//! - new or empty (or holding only other files): the run starts there;
//! - a run with a checkpoint that validates: the run resumes from it (rerunning a
//!   command continues where it stopped; a finished run resumes at its last step and
//!   only writes its model again);
//! - a run that stopped before its first checkpoint (only `training_args.json`,
//!   `metrics.jsonl`, `runs/`): started over, with a note, as there is nothing to
//!   resume from;
//! - a model (`config.json`, `*.safetensors`) or a run without a valid checkpoint
//!   (torn `checkpoint-*` folders, or checkpoints deleted after it finished): refused,
//!   unless `--overwrite_output_dir`, which first removes every file and folder a run
//!   or a model folder consists of (other files are left alone), so that a run that
//!   fails midway never leaves the old model beside the new run's files.
//!
//! An output folder that is one of the run's input model folders is always refused:
//! the run would overwrite what it reads. Leftover `.tmp-*` entries of a killed run
//! are removed when the next run starts ([`crate::io::remove_tmp_leftovers`]).

use std::path::{Path, PathBuf};

use super::args::TrainingArgs;
use super::checkpoint;
use crate::error::{Error, Result};

/// Files of an HF model folder (weights may also be shards: every `*.safetensors`).
const MODEL_FILES: [&str; 9] = [
    "config.json",
    "adapter_config.json",
    "reward_normalization.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];
/// Files and folders a training run writes besides its model and checkpoints.
const RUN_ENTRIES: [&str; 8] = [
    "training_args.json",
    "trainer_state.json",
    "metrics.jsonl",
    checkpoint::LATEST_FILE,
    "runs",
    "ema",
    "critic",
    ".stage-done",
];

/// How a run starts in its output folder.
#[derive(Debug, Clone, PartialEq)]
pub enum Start {
    /// From scratch.
    Fresh,
    /// From this checkpoint (step, folder).
    Resume(u64, PathBuf),
}

/// What the folder holds, as far as a run is concerned.
#[derive(Debug, Default)]
struct Contents {
    /// The first model file found (`config.json`, a `*.safetensors`).
    model: Option<String>,
    /// The first run file or folder found (`training_args.json`, ...).
    run: Option<String>,
    checkpoints: usize,
}

fn is_model_entry(name: &str) -> bool {
    MODEL_FILES.contains(&name) || name.ends_with(".safetensors")
}

fn is_checkpoint(name: &str) -> bool {
    name.strip_prefix("checkpoint-")
        .is_some_and(|s| s.parse::<u64>().is_ok())
}

fn entries(dir: &Path) -> Result<Vec<String>> {
    if !dir.is_dir() {
        return Ok(vec![]);
    }
    let mut names = vec![];
    for entry in std::fs::read_dir(dir).map_err(|e| Error::read(dir, e))? {
        let entry = entry.map_err(|e| Error::read(dir, e))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

fn contents(dir: &Path) -> Result<Contents> {
    let mut c = Contents::default();
    for name in entries(dir)? {
        if is_model_entry(&name) {
            c.model.get_or_insert(name);
        } else if is_checkpoint(&name) {
            c.checkpoints += 1;
        } else if RUN_ENTRIES.contains(&name.as_str()) {
            c.run.get_or_insert(name);
        }
    }
    Ok(c)
}

fn refused(dir: &Path, what: String) -> Error {
    Error::OutputDir {
        path: dir.to_path_buf(),
        what: format!(
            "{what}; pass --overwrite_output_dir to replace it, or choose another --output_dir"
        ),
    }
}

/// Refuses an output folder that is (or resolves to, through links and `..`) one of
/// the input model folders: `inputs` are (flag, path) pairs, e.g. `("--model", dir)`.
pub fn check_not_input(output_dir: &Path, inputs: &[(&str, Option<&Path>)]) -> Result<()> {
    let Ok(out) = output_dir.canonicalize() else {
        return Ok(()); // not there yet: it cannot be an input folder
    };
    for (flag, input) in inputs {
        let Some(input) = input else { continue };
        if input.canonicalize().is_ok_and(|i| i == out) {
            return Err(Error::OutputDir {
                path: output_dir.to_path_buf(),
                what: format!(
                    "is the {flag} folder {}; the run would overwrite its own input, choose another --output_dir",
                    input.display()
                ),
            });
        }
    }
    Ok(())
}

/// Checks, without changing anything, that a run may write `output_dir` (see the
/// module doc): what every stage calls before it loads a model, so that a refusal
/// comes before minutes of loading.
pub fn check(output_dir: &Path, overwrite: bool) -> Result<()> {
    if overwrite {
        return Ok(());
    }
    decide(output_dir, &contents(output_dir)?).map(|_| ())
}

/// What a training stage checks before it loads anything: its output folder is none
/// of its input folders (`inputs`: (flag, path)) and [`check`] allows it.
pub fn check_stage(args: &TrainingArgs, inputs: &[(&str, Option<&Path>)]) -> Result<()> {
    let out = args.output_dir()?;
    check_not_input(out, inputs)?;
    check(out, args.overwrite_output_dir)
}

/// Resume from the newest valid checkpoint, else refuse a model or torn checkpoints,
/// else start fresh.
fn decide(output_dir: &Path, c: &Contents) -> Result<Start> {
    if c.checkpoints > 0 {
        if let Some((step, dir)) = checkpoint::find_resumable(output_dir)? {
            return Ok(Start::Resume(step, dir));
        }
    }
    if let Some(f) = &c.model {
        return Err(refused(
            output_dir,
            format!("holds a model ({f}) and no checkpoint to resume from"),
        ));
    }
    if c.checkpoints > 0 {
        return Err(refused(
            output_dir,
            "holds a run whose checkpoints are all incomplete".into(),
        ));
    }
    Ok(Start::Fresh)
}

/// Decides how a run starts in `output_dir` and prepares the folder: removes
/// leftovers of a killed run, clears the folder for `--overwrite_output_dir` or for
/// a run that never reached a checkpoint, refuses what [`check`] refuses.
pub fn claim(output_dir: &Path, overwrite: bool) -> Result<Start> {
    crate::io::remove_tmp_leftovers(output_dir)?;
    if overwrite {
        clear(output_dir)?;
        return Ok(Start::Fresh);
    }
    let c = contents(output_dir)?;
    let start = decide(output_dir, &c)?;
    if let (Start::Fresh, Some(f)) = (&start, &c.run) {
        crate::note!(
            "note: {} holds a run ({f}) that stopped before its first checkpoint; starting over",
            output_dir.display()
        );
        clear(output_dir)?;
    }
    Ok(start)
}

/// Whether a model folder that is not a training run (`rlhf init`) may be written:
/// not when the folder holds a model or a run, unless `overwrite`.
pub fn check_model_dir(output_dir: &Path, overwrite: bool) -> Result<()> {
    if overwrite {
        return Ok(());
    }
    let c = contents(output_dir)?;
    if let Some(f) = c.model.or(c.run) {
        return Err(refused(output_dir, format!("holds a model or a run ({f})")));
    }
    if c.checkpoints > 0 {
        return Err(refused(output_dir, "holds a run (checkpoint-*)".into()));
    }
    Ok(())
}

/// Prepares a model folder that is not a training run for writing: [`check_model_dir`],
/// then removes leftovers and, with `overwrite`, the old model and run files.
pub fn claim_for_model(output_dir: &Path, overwrite: bool) -> Result<()> {
    check_model_dir(output_dir, overwrite)?;
    crate::io::remove_tmp_leftovers(output_dir)?;
    if overwrite {
        clear(output_dir)?;
    }
    Ok(())
}

/// Removes the model files, checkpoints and run files of `dir` (nothing else).
fn clear(dir: &Path) -> Result<()> {
    for name in entries(dir)? {
        if !(is_model_entry(&name) || is_checkpoint(&name) || RUN_ENTRIES.contains(&name.as_str()))
        {
            continue;
        }
        let path = dir.join(&name);
        if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        }
        .map_err(|e| Error::write(&path, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        entries(dir).unwrap()
    }

    #[test]
    fn a_model_is_refused_a_checkpoint_resumed_and_overwrite_clears_only_run_files() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        assert_eq!(claim(&d.join("new"), false).unwrap(), Start::Fresh);

        std::fs::write(d.join("config.json"), "{}").unwrap();
        std::fs::write(d.join("model.safetensors"), "x").unwrap();
        std::fs::write(d.join("notes.txt"), "mine").unwrap();
        let err = claim(d, false).unwrap_err().to_string();
        assert!(
            err.contains("holds a model (config.json)") && err.contains("--overwrite_output_dir"),
            "{err}"
        );
        assert!(d.join("config.json").exists(), "a refusal changes nothing");

        // A valid checkpoint: resume, as a rerun does today.
        checkpoint::save(d, 4, None, |c| {
            std::fs::write(c.join("w"), "w").map_err(|e| Error::write(c, e))
        })
        .unwrap();
        assert!(matches!(claim(d, false).unwrap(), Start::Resume(4, _)));

        std::fs::write(d.join("metrics.jsonl"), "{}\n").unwrap();
        std::fs::create_dir_all(d.join(".tmp-checkpoint-8")).unwrap();
        assert_eq!(claim(d, true).unwrap(), Start::Fresh);
        assert_eq!(names(d), ["notes.txt"]);
    }

    #[test]
    fn a_run_without_checkpoint_restarts_and_a_torn_one_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        std::fs::write(d.join("training_args.json"), "{}").unwrap();
        std::fs::write(d.join("metrics.jsonl"), "{}\n").unwrap();
        assert_eq!(claim(d, false).unwrap(), Start::Fresh);
        assert!(names(d).is_empty(), "{:?}", names(d));

        std::fs::create_dir_all(d.join("checkpoint-3")).unwrap(); // no manifest
        let err = check(d, false).unwrap_err().to_string();
        assert!(err.contains("incomplete"), "{err}");
        assert!(claim_for_model(d, false).is_err());
        claim_for_model(d, true).unwrap();
        assert!(names(d).is_empty());
    }

    #[test]
    fn an_input_folder_is_never_an_output() {
        let tmp = tempfile::tempdir().unwrap();
        let model = tmp.path().join("m");
        std::fs::create_dir_all(&model).unwrap();
        let same = tmp.path().join("m/../m");
        let err = check_not_input(&same, &[("--model", Some(&model))])
            .unwrap_err()
            .to_string();
        assert!(err.contains("is the --model folder"), "{err}");
        assert!(check_not_input(&tmp.path().join("out"), &[("--model", Some(&model))]).is_ok());
    }
}
