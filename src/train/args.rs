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
use crate::settings::{
    at_least, at_least_opt, finite_f64, float, float_opt, invalid, Range, Settings,
};

/// Parses one command's settings from flags, as a user would give them (the demo and
/// the pipeline build their stages' settings this way), as the `rlhf` binary does.
pub fn parse_args<T: clap::Args>(flags: &[String]) -> std::result::Result<T, clap::Error> {
    use clap::{CommandFactory, FromArgMatches};
    #[derive(clap::Parser)]
    struct Wrap<T: clap::Args> {
        #[command(flatten)]
        inner: T,
    }
    let argv = std::iter::once("rlhf".to_string()).chain(flags.iter().cloned());
    let matches = negative_numbers(Wrap::<T>::command()).try_get_matches_from(argv)?;
    Wrap::<T>::from_arg_matches(&matches).map(|w| w.inner)
}

/// Lets every option of `cmd` (and its subcommands) take a negative number: `--flag -1`
/// as well as `--flag=-1`. Which settings may be negative is for their ranges to say
/// (`crate::settings`), in an error that names the flag, not for the parser.
pub fn negative_numbers(cmd: clap::Command) -> clap::Command {
    cmd.mut_args(|a| {
        // Only options with a value (clap asserts this for flags like --packing).
        let takes_value = a.get_action().takes_values();
        a.allow_negative_numbers(takes_value)
    })
    .mut_subcommands(negative_numbers)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clap::Args)]
#[command(rename_all = "snake_case")]
pub struct TrainingArgs {
    /// Where the model, checkpoints and metrics go.
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
    /// Peak learning rate [default: pretrain 3e-4, sft 2e-5, rm 1e-5].
    #[arg(long, value_parser = finite_f64)]
    pub learning_rate: Option<f64>,
    /// [default: pretrain and sft 3, rm 1 (the paper: more overfits)]
    #[arg(long, value_parser = finite_f64)]
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
    #[arg(long, default_value_t = 1.0, value_parser = finite_f64)]
    pub max_grad_norm: f64,
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: usize,
    /// Warmup as a fraction of all steps (used when warmup_steps is 0).
    #[arg(long, default_value_t = 0.0, value_parser = finite_f64)]
    pub warmup_ratio: f64,
    /// [default: pretrain and sft linear, rm cosine]
    #[arg(long, value_enum)]
    pub lr_scheduler_type: Option<LrSchedulerType>,
    /// Decoupled weight decay on matrices (not biases, norms, embeddings).
    #[arg(long, default_value_t = 0.0, value_parser = finite_f64)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 0.9, value_parser = finite_f64)]
    pub adam_beta1: f64,
    /// InstructGPT uses 0.95.
    #[arg(long, default_value_t = 0.999, value_parser = finite_f64)]
    pub adam_beta2: f64,
    #[arg(long, default_value_t = 1e-8, value_parser = finite_f64)]
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

    /// Checks values before any weights load: every setting in its range (README,
    /// "Settings"), the first one outside it named in the error.
    pub fn validate(&self) -> Result<()> {
        use Range::*;
        self.output_dir()?;
        float_opt("learning_rate", self.learning_rate, Above(0.0))?;
        float_opt("num_train_epochs", self.num_train_epochs, AtLeast(0.0))?;
        at_least("max_steps", self.max_steps, -1)?;
        if self.max_steps <= 0 && self.epochs() <= 0.0 {
            return Err(invalid(
                "num_train_epochs",
                "must be > 0 when max_steps is not set (> 0), got 0",
            ));
        }
        at_least(
            "per_device_train_batch_size",
            self.per_device_train_batch_size,
            1,
        )?;
        at_least(
            "per_device_eval_batch_size",
            self.per_device_eval_batch_size,
            1,
        )?;
        at_least(
            "gradient_accumulation_steps",
            self.gradient_accumulation_steps,
            1,
        )?;
        float("max_grad_norm", self.max_grad_norm, AtLeast(0.0))?;
        float("warmup_ratio", self.warmup_ratio, Closed(0.0, 1.0))?;
        float("weight_decay", self.weight_decay, AtLeast(0.0))?;
        float("adam_beta1", self.adam_beta1, HalfOpen(0.0, 1.0))?;
        float("adam_beta2", self.adam_beta2, HalfOpen(0.0, 1.0))?;
        float("adam_epsilon", self.adam_epsilon, Above(0.0))?;
        at_least_opt("save_total_limit", self.save_total_limit, 1)?;
        at_least("max_nonfinite_steps", self.max_nonfinite_steps, 1)?;
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
    // JSON has no inf or nan (serde_json turns them into null), so a non-finite float
    // is refused here, by its key, before the file becomes JSON.
    let non_finite = |found: Option<(Vec<String>, f64)>| match found {
        Some((at, v)) => Err(Error::bad_file(
            path,
            None,
            format!("{} must be a finite number, got {v}", setting_name(&at)),
        )),
        None => Ok(()),
    };
    let value: Value = match ext {
        "toml" => {
            let value = toml::from_str(&text).map_err(|e| {
                let line = e.span().map(|s| text[..s.start].lines().count().max(1));
                Error::bad_file(path, line, e.message().to_string())
            })?;
            let typed: toml::Value = toml::from_str(&text)
                .map_err(|e| Error::bad_file(path, None, e.message().to_string()))?;
            non_finite(non_finite_toml(&typed, &mut vec![]))?;
            value
        }
        "yaml" | "yml" => {
            let value = serde_yaml_ng::from_str(&text).map_err(|e| {
                Error::bad_file(path, e.location().map(|l| l.line()), e.to_string())
            })?;
            let typed: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text)
                .map_err(|e| Error::bad_file(path, None, e.to_string()))?;
            non_finite(non_finite_yaml(&typed, &mut vec![]))?;
            value
        }
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

/// How a config error names the key at `at`: `gamma`, or `[ppo]: gamma` inside a table.
fn setting_name(at: &[String]) -> String {
    match at {
        [] => "the file".into(),
        [key] => key.clone(),
        [tables @ .., key] => format!("[{}]: {key}", tables.join(".")),
    }
}

/// The first non-finite float in a TOML document, with its key path.
fn non_finite_toml(v: &toml::Value, at: &mut Vec<String>) -> Option<(Vec<String>, f64)> {
    match v {
        toml::Value::Float(f) if !f.is_finite() => Some((at.clone(), *f)),
        toml::Value::Table(t) => t.iter().find_map(|(k, v)| {
            at.push(k.clone());
            let found = non_finite_toml(v, at);
            at.pop();
            found
        }),
        toml::Value::Array(a) => a.iter().enumerate().find_map(|(i, v)| {
            at.push(i.to_string());
            let found = non_finite_toml(v, at);
            at.pop();
            found
        }),
        _ => None,
    }
}

/// The first non-finite float in a YAML document (`.inf`, `.nan`), with its key path.
fn non_finite_yaml(v: &serde_yaml_ng::Value, at: &mut Vec<String>) -> Option<(Vec<String>, f64)> {
    use serde_yaml_ng::Value as Y;
    let mut within = |key: String, v: &Y| {
        at.push(key);
        let found = non_finite_yaml(v, at);
        at.pop();
        found
    };
    match v {
        Y::Number(n) => n
            .as_f64()
            .filter(|f| !f.is_finite())
            .map(|f| (at.clone(), f)),
        Y::Mapping(m) => m.iter().find_map(|(k, v)| {
            let key = match k {
                Y::String(s) => s.clone(),
                k => serde_yaml_ng::to_string(k)
                    .map(|s| s.trim().to_string())
                    .unwrap_or_default(),
            };
            within(key, v)
        }),
        Y::Sequence(s) => s
            .iter()
            .enumerate()
            .find_map(|(i, v)| within(i.to_string(), v)),
        Y::Tagged(t) => non_finite_yaml(&t.value, at),
        _ => None,
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

/// Settings from their JSON form: `base` (known to deserialize) with `overrides` (a
/// config file's keys) on top. serde's type error has no key ("invalid type: string
/// \"fast\", expected f64"), so on failure each override is tried alone on `base`
/// and the first that fails is named.
pub fn settings_from_json<T: DeserializeOwned>(
    base: &serde_json::Map<String, Value>,
    overrides: &[(String, Value)],
) -> std::result::Result<T, String> {
    let with = |pairs: &[(String, Value)]| {
        let mut merged = base.clone();
        merged.extend(pairs.iter().cloned());
        serde_json::from_value::<T>(Value::Object(merged))
    };
    with(overrides).map_err(|e| {
        overrides
            .iter()
            .find_map(|pair| {
                with(std::slice::from_ref(pair))
                    .err()
                    .map(|e| format!("{}: {e}", pair.0))
            })
            .unwrap_or_else(|| e.to_string())
    })
}

/// A command's settings as it runs with them: the parsed command line `parsed` over
/// the `config` file (keys given on the command line keep their value; other keys
/// take the file's), then validated. Unknown keys are an error that lists the known
/// ones; a setting out of range is named as its flag (`--max_grad_norm`) when it came
/// from the command line, as the file and its key when it came from the file.
pub fn resolve<T: Settings + Clone + Serialize + DeserializeOwned>(
    parsed: &T,
    matches: &ArgMatches,
    config: Option<&Path>,
) -> Result<T> {
    let Some(path) = config else {
        parsed.validate().map_err(crate::settings::as_flag)?;
        return Ok(parsed.clone());
    };
    // Every value is finite (clap's parser refuses inf and nan), so the JSON form is
    // exact.
    let Value::Object(base) =
        serde_json::to_value(parsed).map_err(|e| Error::Invalid(format!("settings: {e}")))?
    else {
        return Err(Error::Invalid("settings are not a table".into()));
    };
    let mut from_file = vec![];
    for (key, value) in read_config_file(path)? {
        check_known_setting(&base, &key, &[]).map_err(|m| Error::bad_file(path, None, m))?;
        let from_cli = matches!(matches.value_source(&key), Some(ValueSource::CommandLine));
        if !from_cli {
            from_file.push((key, value));
        }
    }
    let settings: T =
        settings_from_json(&base, &from_file).map_err(|m| Error::bad_file(path, None, m))?;
    settings.validate().map_err(|e| match e {
        Error::Setting { key, msg } if from_file.iter().any(|(k, _)| *k == key) => {
            Error::bad_file(path, None, format!("{key} {msg}"))
        }
        e => crate::settings::as_flag(e),
    })?;
    Ok(settings)
}
