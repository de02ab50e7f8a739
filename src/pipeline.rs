//! `rlhf pipeline --config FILE`: InstructGPT's three steps on the user's own model and
//! data, chained: SFT on demonstrations → reward model from rankings (initialised
//! from the SFT model) → PPO-ptx from the SFT model against that reward model.
//!
//! The config file (TOML or YAML) holds `output_dir`, `model_name_or_path` and one
//! table per stage to run, `[sft]`, `[rm]`, `[ppo]`, with that stage's settings
//! under the names of its own command (`rlhf sft`, `rlhf rm train`, `rlhf ppo`). The
//! methods compared with PPO run from the same SFT model when their tables are there:
//! `[dpo]` (on its own `dataset` of comparisons), `[grpo]` and `[rloo]` (against the
//! `[rm]` reward model, or their own `reward_model` or `reward_cmd`). The
//! pipeline sets what connects the stages (each stage's model, output folder, and
//! the reward model) and refuses a table that sets them too. A stage left out is
//! skipped: without `[sft]` the base model is the policy; without `[rm]`, `[ppo]`
//! names its `reward_model`. Like the demo, a finished stage is skipped on a rerun and
//! an interrupted one resumes from its checkpoint.

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::error::{Error, Result};
use crate::io::{write_atomic, write_json};
use crate::settings::Settings;
use crate::train::args::{check_known_setting, parse_args, read_config_file, settings_from_json};

#[derive(Debug, Clone, clap::Args)]
#[command(rename_all = "snake_case")]
pub struct PipelineArgs {
    /// TOML or YAML with `output_dir`, `model_name_or_path` and `[sft]`, `[rm]`,
    /// `[ppo]` tables of each stage's settings (the flags of `rlhf sft`,
    /// `rlhf rm train` and `rlhf ppo`, without their dashes).
    #[arg(long)]
    pub config: PathBuf,
    /// Overrides the file's `output_dir`.
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
}

/// Runs a stage unless its folder holds a finished result; returns the seconds it
/// took (recorded in the stage's `.stage-done` marker, so a rerun reports them too).
pub fn stage(dir: &Path, name: &str, run: impl FnOnce() -> Result<()>) -> Result<f64> {
    let done = dir.join(".stage-done");
    if let Ok(text) = std::fs::read_to_string(&done) {
        crate::note!("{name}: already done ({}), skipping", dir.display());
        return Ok(text.trim().parse().unwrap_or(0.0));
    }
    crate::note!("stage: {name}");
    let t = Instant::now();
    run()?;
    let secs = t.elapsed().as_secs_f64();
    std::fs::create_dir_all(dir).map_err(|e| Error::write(dir, e))?;
    write_atomic(&done, format!("{secs}\n").as_bytes())?;
    Ok(secs)
}

/// A stage's settings from a table of the config file, on top of the stage's own
/// defaults, with the keys the pipeline sets (`wired`) added, and validated. Unknown
/// keys, keys the pipeline owns, a value of the wrong type and a value out of range
/// are errors naming the file, the table and the key.
pub fn stage_settings<T: clap::Args + Serialize + DeserializeOwned + Settings>(
    table: &Map<String, Value>,
    wired: &[(&str, Value)],
    file: &Path,
    section: &str,
) -> Result<T> {
    let bad = |msg: String| Error::bad_file(file, None, format!("[{section}]: {msg}"));
    let defaults: T =
        parse_args(&[]).map_err(|e| bad(format!("cannot build the stage's defaults: {e}")))?;
    let Value::Object(mut base) =
        serde_json::to_value(&defaults).map_err(|e| bad(format!("settings: {e}")))?
    else {
        return Err(bad("settings are not a table".into()));
    };
    let hidden: Vec<&str> = wired.iter().map(|(k, _)| *k).collect();
    for (key, value) in wired {
        base.insert(key.to_string(), value.clone());
    }
    let mut given = vec![];
    for (key, value) in table {
        if hidden.contains(&key.as_str()) {
            return Err(bad(format!(
                "{key:?} is set by the pipeline (it connects the stages); remove it"
            )));
        }
        check_known_setting(&base, key, &hidden).map_err(bad)?;
        given.push((key.clone(), value.clone()));
    }
    let settings: T = settings_from_json(&base, &given).map_err(bad)?;
    settings.validate().map_err(|e| bad(e.to_string()))?;
    Ok(settings)
}

fn path_value(p: &Path) -> Value {
    Value::String(p.display().to_string())
}

/// The table `name` of the config, if present.
fn table<'a>(
    config: &'a Map<String, Value>,
    name: &str,
    file: &Path,
) -> Result<Option<&'a Map<String, Value>>> {
    match config.get(name) {
        None => Ok(None),
        Some(Value::Object(t)) => Ok(Some(t)),
        Some(_) => Err(Error::bad_file(
            file,
            None,
            format!("{name:?} must be a table of settings"),
        )),
    }
}

/// Runs the stages the config names; returns a summary (also written to
/// `OUTPUT_DIR/pipeline.json`).
pub fn run(args: &PipelineArgs) -> Result<Value> {
    let file = &args.config;
    let config = read_config_file(file)?;
    const TOP: [&str; 8] = [
        "output_dir",
        "model_name_or_path",
        "sft",
        "rm",
        "ppo",
        "dpo",
        "grpo",
        "rloo",
    ];
    if let Some(key) = config.keys().find(|k| !TOP.contains(&k.as_str())) {
        return Err(Error::bad_file(
            file,
            None,
            format!("unknown key {key:?} (known: {})", TOP.join(", ")),
        ));
    }
    let text = |key: &str| -> Result<Option<PathBuf>> {
        match config.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(PathBuf::from(s))),
            Some(_) => Err(Error::bad_file(
                file,
                None,
                format!("{key:?} must be a path"),
            )),
        }
    };
    let out = match (args.output_dir.clone(), text("output_dir")?) {
        (Some(o), _) | (None, Some(o)) => o,
        (None, None) => {
            return Err(Error::bad_file(
                file,
                None,
                "\"output_dir\" is missing (or give --output_dir)",
            ))
        }
    };
    let base = text("model_name_or_path")?
        .ok_or_else(|| Error::bad_file(file, None, "\"model_name_or_path\" is missing"))?;
    let (sft, rm, ppo) = (
        table(&config, "sft", file)?,
        table(&config, "rm", file)?,
        table(&config, "ppo", file)?,
    );
    let (dpo, grpo, rloo) = (
        table(&config, "dpo", file)?,
        table(&config, "grpo", file)?,
        table(&config, "rloo", file)?,
    );
    if [sft, rm, ppo, dpo, grpo, rloo].iter().all(Option::is_none) {
        return Err(Error::bad_file(
            file,
            None,
            "no stage to run: add an [sft], [rm], [ppo], [dpo], [grpo] or [rloo] table",
        ));
    }
    // Parse and validate every stage's settings before any work, so a typo or a value
    // out of range in [ppo] does not surface after an hour of SFT.
    let (sft_dir, rm_dir, ppo_dir) = (out.join("sft"), out.join("rm"), out.join("ppo"));
    let policy = if sft.is_some() {
        sft_dir.clone()
    } else {
        base.clone()
    };
    // What connects a stage to the others: the model it starts from, its folder.
    let io = |model: &Path, dir: &Path| {
        vec![
            ("model_name_or_path", path_value(model)),
            ("output_dir", path_value(dir)),
        ]
    };
    let sft_args = sft
        .map(|t| stage_settings::<crate::sft::SftArgs>(t, &io(&base, &sft_dir), file, "sft"))
        .transpose()?;
    let rm_args = rm
        .map(|t| stage_settings::<crate::rm::RmTrainArgs>(t, &io(&policy, &rm_dir), file, "rm"))
        .transpose()?;
    // An online method's wiring: the policy, its folder, and the [rm] reward model
    // unless the table scores with its own command.
    let online = |t: &Map<String, Value>, name: &str| {
        let mut wired = io(&policy, &out.join(name));
        let command = t.contains_key("reward_cmd");
        if rm.is_some() && !command {
            wired.push(("reward_model", path_value(&rm_dir)));
        } else if !command && !t.contains_key("reward_model") {
            return Err(Error::bad_file(
                file,
                None,
                format!("[{name}]: \"reward_model\" or \"reward_cmd\" is needed when there is no [rm] stage"),
            ));
        }
        Ok(wired)
    };
    let ppo_args = ppo
        .map(|t| stage_settings::<crate::ppo::PpoArgs>(t, &online(t, "ppo")?, file, "ppo"))
        .transpose()?;
    let (dpo_dir, grpo_dir, rloo_dir) = (out.join("dpo"), out.join("grpo"), out.join("rloo"));
    let dpo_args = dpo
        .map(|t| stage_settings::<crate::dpo::DpoArgs>(t, &io(&policy, &dpo_dir), file, "dpo"))
        .transpose()?;
    let grpo_args = grpo
        .map(|t| stage_settings::<crate::grpo::GrpoArgs>(t, &online(t, "grpo")?, file, "grpo"))
        .transpose()?;
    let rloo_args = rloo
        .map(|t| stage_settings::<crate::rloo::RlooArgs>(t, &online(t, "rloo")?, file, "rloo"))
        .transpose()?;

    let (mut elapsed, mut outputs) = (Map::new(), Map::new());
    let mut record = |name: &str, dir: &Path, secs: f64| {
        elapsed.insert(name.into(), json!(secs));
        outputs.insert(name.into(), path_value(dir));
    };
    if let Some(a) = &sft_args {
        let s = stage(&sft_dir, "sft", || crate::sft::run(a).map(|_| ()))?;
        record("sft", &sft_dir, s);
    }
    if let Some(a) = &rm_args {
        let s = stage(&rm_dir, "rm", || crate::rm::train_rm(a).map(|_| ()))?;
        record("rm", &rm_dir, s);
    }
    if let Some(a) = &ppo_args {
        let s = stage(&ppo_dir, "ppo", || crate::ppo::run(a, None).map(|_| ()))?;
        record("ppo", &ppo_dir, s);
    }
    if let Some(a) = &dpo_args {
        let s = stage(&dpo_dir, "dpo", || crate::dpo::run(a).map(|_| ()))?;
        record("dpo", &dpo_dir, s);
    }
    if let Some(a) = &grpo_args {
        let s = stage(&grpo_dir, "grpo", || crate::grpo::run(a, None).map(|_| ()))?;
        record("grpo", &grpo_dir, s);
    }
    if let Some(a) = &rloo_args {
        let s = stage(&rloo_dir, "rloo", || crate::rloo::run(a, None).map(|_| ()))?;
        record("rloo", &rloo_dir, s);
    }
    if ppo_args.as_ref().is_some_and(|a| a.ema.is_some()) {
        outputs.insert("ppo_ema".into(), path_value(&ppo_dir.join("ema")));
    }
    let summary = json!({"outputs": outputs, "elapsed_s": elapsed});
    write_json(&out.join("pipeline.json"), &summary)?;
    Ok(summary)
}
