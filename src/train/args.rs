//! The shared training loop's settings, with TRL's flag names, and the merge of a
//! `--config FILE` (TOML or YAML, same keys) under the command line: a flag given on
//! the command line wins, then the file, then the default shown in `--help`.

use clap::parser::ValueSource;
use clap::ArgMatches;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::{Path, PathBuf};

use super::schedule::LrSchedulerType;
use crate::error::{read_to_string, Error, Result};

/// Parses one command's settings from flags, as a user would give them (the demo and
/// the pipeline build their stages' settings this way).
pub fn parse_args<T: clap::Args>(flags: &[String]) -> std::result::Result<T, clap::Error> {
    #[derive(clap::Parser)]
    struct Wrap<T: clap::Args> {
        #[command(flatten)]
        inner: T,
    }
    let argv = std::iter::once("rlhf".to_string()).chain(flags.iter().cloned());
    <Wrap<T> as clap::Parser>::try_parse_from(argv).map(|w| w.inner)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clap::Args)]
#[command(rename_all = "snake_case")]
pub struct TrainingArgs {
    /// Where the model, checkpoints and metrics go.
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
    /// Peak learning rate [default: pretrain 3e-4, sft 2e-5, rm 1e-5].
    #[arg(long)]
    pub learning_rate: Option<f64>,
    /// [default: pretrain and sft 3, rm 1 (the paper: more overfits)]
    #[arg(long)]
    pub num_train_epochs: Option<f64>,
    /// Stop after this many optimizer steps (overrides num_train_epochs when > 0).
    #[arg(long, default_value_t = -1, allow_negative_numbers = true)]
    pub max_steps: i64,
    #[arg(long, default_value_t = 8)]
    pub per_device_train_batch_size: usize,
    #[arg(long, default_value_t = 8)]
    pub per_device_eval_batch_size: usize,
    #[arg(long, default_value_t = 1)]
    pub gradient_accumulation_steps: usize,
    /// Global gradient-norm clipping (0 disables).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: usize,
    /// Warmup as a fraction of all steps (used when warmup_steps is 0).
    #[arg(long, default_value_t = 0.0)]
    pub warmup_ratio: f64,
    /// [default: pretrain and sft linear, rm cosine]
    #[arg(long, value_enum)]
    pub lr_scheduler_type: Option<LrSchedulerType>,
    /// Decoupled weight decay on matrices (not biases, norms, embeddings).
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 0.9)]
    pub adam_beta1: f64,
    /// InstructGPT uses 0.95.
    #[arg(long, default_value_t = 0.999)]
    pub adam_beta2: f64,
    #[arg(long, default_value_t = 1e-8)]
    pub adam_epsilon: f64,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Save a checkpoint every N optimizer steps (0: only at the end).
    #[arg(long, default_value_t = 500)]
    pub save_steps: usize,
    /// Keep at most this many checkpoints (the oldest are removed after a save).
    #[arg(long)]
    pub save_total_limit: Option<usize>,
    #[arg(long, default_value_t = 10)]
    pub logging_steps: usize,
    /// Evaluate every N steps (default: at the end of each epoch).
    #[arg(long)]
    pub eval_steps: Option<usize>,
    /// Resume from the newest valid checkpoint (also automatic when output_dir has one).
    #[arg(long)]
    pub resume: bool,
    /// Ignore existing checkpoints in output_dir and start over.
    #[arg(long)]
    pub overwrite_output_dir: bool,
    /// Stop after this many steps of this run, with a checkpoint (rerun to continue):
    /// for preemptible machines and time-limited jobs.
    #[arg(long)]
    pub stop_after_steps: Option<usize>,
    /// Abort after this many non-finite steps in a row.
    #[arg(long, default_value_t = 10)]
    pub max_nonfinite_steps: usize,
}

/// The defaults that differ between stages.
#[derive(Debug, Clone, Copy)]
pub struct StageDefaults {
    pub learning_rate: f64,
    pub num_train_epochs: f64,
    pub lr_scheduler_type: LrSchedulerType,
}

impl TrainingArgs {
    /// Fills the stage-dependent settings the user left unset, so that the resolved
    /// settings saved beside checkpoints show every value used.
    pub fn fill_defaults(&mut self, d: StageDefaults) {
        self.learning_rate.get_or_insert(d.learning_rate);
        self.num_train_epochs.get_or_insert(d.num_train_epochs);
        self.lr_scheduler_type.get_or_insert(d.lr_scheduler_type);
    }

    pub fn lr(&self) -> f64 {
        self.learning_rate.unwrap_or(3e-4)
    }
    pub fn epochs(&self) -> f64 {
        self.num_train_epochs.unwrap_or(3.0)
    }
    pub fn schedule(&self) -> LrSchedulerType {
        self.lr_scheduler_type.unwrap_or(LrSchedulerType::Linear)
    }

    pub fn output_dir(&self) -> Result<&Path> {
        self.output_dir
            .as_deref()
            .ok_or_else(|| Error::Invalid("--output_dir is required".into()))
    }

    /// Checks values before any weights load.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Invalid(m));
        self.output_dir()?;
        if self.per_device_train_batch_size == 0 || self.gradient_accumulation_steps == 0 {
            return bad(
                "per_device_train_batch_size and gradient_accumulation_steps must be ≥ 1".into(),
            );
        }
        if let Some(lr) = self.learning_rate {
            if !(lr > 0.0 && lr.is_finite()) {
                return bad(format!("learning_rate must be > 0, got {lr}"));
            }
        }
        if self.max_steps <= 0
            && self.epochs().partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater)
        {
            return bad("set num_train_epochs > 0 or max_steps > 0".into());
        }
        if !(0.0..1.0).contains(&self.adam_beta1) || !(0.0..1.0).contains(&self.adam_beta2) {
            return bad("adam_beta1 and adam_beta2 must be in [0, 1)".into());
        }
        if !(0.0..=1.0).contains(&self.warmup_ratio) {
            return bad(format!(
                "warmup_ratio must be in [0, 1], got {}",
                self.warmup_ratio
            ));
        }
        if self.max_nonfinite_steps == 0 {
            return bad("max_nonfinite_steps must be ≥ 1".into());
        }
        Ok(())
    }
}

/// A path setting that must be given: `flag` names it in the error (e.g. "--dataset
/// (or --data)").
pub fn require<'a>(value: &'a Option<PathBuf>, flag: &str) -> Result<&'a Path> {
    value
        .as_deref()
        .ok_or_else(|| Error::Invalid(format!("{flag} is required")))
}

/// Reads a TOML (`.toml`) or YAML (`.yaml`/`.yml`) config file into a JSON object.
pub fn read_config_file(path: &Path) -> Result<serde_json::Map<String, Value>> {
    let text = read_to_string(path)?;
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let value: Value = match ext {
        "toml" => toml::from_str(&text).map_err(|e| {
            let line = e.span().map(|s| text[..s.start].lines().count().max(1));
            Error::bad_file(path, line, e.message().to_string())
        })?,
        "yaml" | "yml" => serde_yaml_ng::from_str(&text)
            .map_err(|e| Error::bad_file(path, e.location().map(|l| l.line()), e.to_string()))?,
        _ => {
            return Err(Error::bad_file(
                path,
                None,
                "config files must end in .toml, .yaml or .yml",
            ))
        }
    };
    match value {
        Value::Object(o) => Ok(o),
        Value::Null => Ok(Default::default()),
        _ => Err(Error::bad_file(
            path,
            Some(1),
            "expected a table of settings",
        )),
    }
}

/// Checks that `key` is one of a command's settings (`settings`: its serialized
/// arguments); otherwise the message lists the known ones, less `hidden` (keys set
/// by the caller) and `config` (a file cannot name another file).
pub fn check_known_setting(
    settings: &serde_json::Map<String, Value>,
    key: &str,
    hidden: &[&str],
) -> std::result::Result<(), String> {
    if key != "config" && settings.contains_key(key) {
        return Ok(());
    }
    let mut known: Vec<&str> = settings
        .keys()
        .map(String::as_str)
        .filter(|k| *k != "config" && !hidden.contains(k))
        .collect();
    known.sort_unstable();
    Err(format!(
        "unknown setting {key:?} (known: {})",
        known.join(", ")
    ))
}

/// Merges `config` under the parsed command line `parsed`: keys given on the command
/// line keep their value; other keys take the file's. Unknown keys are an error that
/// lists the known ones.
pub fn merge_config<T: Serialize + DeserializeOwned>(
    parsed: &T,
    matches: &ArgMatches,
    config: Option<&Path>,
) -> Result<T> {
    let Some(path) = config else {
        return Ok(
            serde_json::from_value(serde_json::to_value(parsed).expect("args serialize"))
                .expect("args round-trip"),
        );
    };
    let mut merged = match serde_json::to_value(parsed).expect("args serialize") {
        Value::Object(o) => o,
        _ => unreachable!("args are a struct"),
    };
    for (key, value) in read_config_file(path)? {
        check_known_setting(&merged, &key, &[]).map_err(|m| Error::bad_file(path, None, m))?;
        let from_cli = matches!(matches.value_source(&key), Some(ValueSource::CommandLine));
        if !from_cli {
            merged.insert(key, value);
        }
    }
    serde_json::from_value(Value::Object(merged))
        .map_err(|e| Error::bad_file(path, None, e.to_string()))
}
