//! The shared loop's behaviour with config files and non-finite losses.

mod common;

use candle_core::Device;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;

use rlhf::model::params::{Init, ParamSpec};
use rlhf::model::Params;
use rlhf::train::args::TrainingArgs;
use rlhf::train::trainer::{train, LossParts, TrainTask};

fn sft_cli(dir: &Path, extra: &[&str]) -> std::process::Output {
    let data = dir.join("d.jsonl");
    let rows: Vec<String> = (0..6)
        .map(|i| json!({"prompt": format!("q{i}"), "completion": format!("a{i}")}).to_string())
        .collect();
    std::fs::write(&data, rows.join("\n")).unwrap();
    common::rlhf_bin()
        .args(["sft", "--model"])
        .arg(common::fixture("gpt2"))
        .arg("--data")
        .arg(&data)
        .arg("--output_dir")
        .arg(dir.join("out"))
        .args(extra)
        .output()
        .unwrap()
}

fn resolved(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("out/training_args.json")).unwrap())
        .unwrap()
}

#[test]
fn config_files_set_defaults_and_flags_override_them() {
    for (name, body) in [
        ("c.toml", "learning_rate = 0.001\nmax_steps = 3\nper_device_train_batch_size = 2\nmax_length = 48\npacking = true\n"),
        ("c.yaml", "learning_rate: 0.001\nmax_steps: 3\nper_device_train_batch_size: 2\nmax_length: 48\npacking: true\n"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join(name);
        std::fs::write(&cfg, body).unwrap();
        let out = sft_cli(dir.path(), &["--config", cfg.to_str().unwrap(), "--max_steps", "2"]);
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        // bench/ppo.py reads the training call's wall time from this line.
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("sft: 2 steps in "),
            "{name}"
        );
        let r = resolved(dir.path());
        assert_eq!(r["max_steps"], 2, "{name}: the flag wins");
        assert_eq!(r["learning_rate"], 0.001, "{name}: the file sets it");
        assert_eq!(r["per_device_train_batch_size"], 2);
        assert_eq!(r["packing"], true);
        assert_eq!(r["max_length"], 48);
        assert_eq!(r["adam_beta1"], 0.9, "{name}: defaults fill the rest");
    }
}

#[test]
fn unknown_or_malformed_config_settings_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "lerning_rate = 0.1\n").unwrap();
    let out = sft_cli(dir.path(), &["--config", cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml")
            && err.contains("unknown setting \"lerning_rate\"")
            && err.contains("learning_rate"),
        "{err}"
    );

    std::fs::write(&cfg, "max_steps = \"many\"\n").unwrap();
    let out = sft_cli(dir.path(), &["--config", cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad.toml"));

    let out = sft_cli(dir.path(), &["--max_steps", "2", "--learning_rate", "0"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("learning_rate must be > 0"));
}

/// A one-parameter task whose loss is (p − 3)² on steps not listed in `nan_at`, NaN
/// on the listed ones.
struct Quadratic {
    params: Params,
    nan_at: Vec<usize>,
}

impl TrainTask for Quadratic {
    fn batches_per_epoch(&self) -> usize {
        1
    }
    fn batch_weight(&self, _: usize, _: usize) -> rlhf::Result<f64> {
        Ok(1.0)
    }
    fn batch_loss(&mut self, epoch: usize, _: usize) -> rlhf::Result<LossParts> {
        let p = self.params.get("p");
        let target = if self.nan_at.contains(&epoch) {
            f32::NAN
        } else {
            3.0
        };
        let sum = (p - target as f64)?.sqr()?.sum_all()?;
        Ok(LossParts { sum, tokens: 1 })
    }
    fn params(&self) -> &Params {
        &self.params
    }
    fn evaluate(&mut self) -> rlhf::Result<BTreeMap<String, f64>> {
        Ok(BTreeMap::new())
    }
    fn save_model(&self, dir: &Path) -> rlhf::Result<()> {
        rlhf::model::hf::save_safetensors(&self.params.to_hf()?, &dir.join("model.safetensors"))
    }
}

fn quadratic(nan_at: Vec<usize>) -> Quadratic {
    let params = Params::init(
        vec![ParamSpec::new("p", &[1], Init::Zeros)],
        0,
        &Device::Cpu,
    )
    .unwrap();
    Quadratic { params, nan_at }
}

fn loop_args(out: &Path, steps: i64) -> TrainingArgs {
    let mut a = common_train_args(out);
    a.max_steps = steps;
    a
}

fn common_train_args(out: &Path) -> TrainingArgs {
    use clap::Parser;
    #[derive(Parser)]
    struct P {
        #[command(flatten)]
        t: TrainingArgs,
    }
    let mut t = P::parse_from(["x", "--output_dir", out.to_str().unwrap()]).t;
    t.learning_rate = Some(0.1);
    t.save_steps = 0;
    t.logging_steps = 1;
    t.max_nonfinite_steps = 3;
    t
}

#[test]
fn nonfinite_steps_are_skipped_counted_and_abort_when_consecutive() {
    let dir = tempfile::tempdir().unwrap();
    let mut task = quadratic(vec![2, 5]);
    let out = dir.path().join("a");
    let s = train(&mut task, &loop_args(&out, 20), &Value::Null, "test").unwrap();
    assert_eq!(s.state.skipped_nonfinite_steps, 2);
    let p: Vec<f32> = task.params.get("p").to_vec1().unwrap();
    assert!(p[0].is_finite() && p[0] > 0.5, "{p:?}");
    let logged: Vec<Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(logged.last().unwrap()["train/skipped_nonfinite_steps"], 2.0);

    // Three in a row: abort with a clear message, and no checkpoint holds NaN.
    let mut task = quadratic(vec![4, 5, 6, 7]);
    let out = dir.path().join("b");
    let mut args = loop_args(&out, 20);
    args.save_steps = 2;
    let err = train(&mut task, &args, &Value::Null, "test")
        .unwrap_err()
        .to_string();
    assert!(err.contains("3 non-finite steps in a row"), "{err}");
    for (_, ckpt) in rlhf::train::checkpoint::list(&out).unwrap() {
        let t =
            candle_core::safetensors::load(ckpt.join("model.safetensors"), &Device::Cpu).unwrap();
        let v: Vec<f32> = t["p"].to_vec1().unwrap();
        assert!(v[0].is_finite());
    }
}

/// Records the order of the loop's calls; its loss takes at least `LOSS_SLEEP`, its
/// preparation `PREPARE_SLEEP`.
struct Traced {
    params: Params,
    events: Vec<String>,
    step_seconds: Vec<f64>,
}

const LOSS_SLEEP: f64 = 0.02;
const PREPARE_SLEEP: f64 = 0.5;

impl TrainTask for Traced {
    fn batches_per_epoch(&self) -> usize {
        2
    }
    fn prepare_batch(&mut self, epoch: usize, index: usize) -> rlhf::Result<()> {
        self.events.push(format!("prepare {epoch}.{index}"));
        std::thread::sleep(std::time::Duration::from_secs_f64(PREPARE_SLEEP));
        Ok(())
    }
    fn batch_weight(&self, _: usize, _: usize) -> rlhf::Result<f64> {
        Ok(1.0)
    }
    fn batch_loss(&mut self, epoch: usize, index: usize) -> rlhf::Result<LossParts> {
        self.events.push(format!("loss {epoch}.{index}"));
        std::thread::sleep(std::time::Duration::from_secs_f64(LOSS_SLEEP));
        let sum = (self.params.get("p") - 3.0)?.sqr()?.sum_all()?;
        Ok(LossParts { sum, tokens: 1 })
    }
    fn params(&self) -> &Params {
        &self.params
    }
    fn evaluate(&mut self) -> rlhf::Result<BTreeMap<String, f64>> {
        Ok(BTreeMap::new())
    }
    fn save_model(&self, dir: &Path) -> rlhf::Result<()> {
        rlhf::model::hf::save_safetensors(&self.params.to_hf()?, &dir.join("model.safetensors"))
    }
    fn after_update(&mut self) -> rlhf::Result<()> {
        self.events.push("update".into());
        Ok(())
    }
    fn record_step_seconds(&mut self, seconds: f64) {
        self.events.push("timed".into());
        self.step_seconds.push(seconds);
    }
}

/// PPO's `time/update` comes from here: the step's time covers the losses, backward
/// and the update, and leaves out the preparation (PPO's rollout).
#[test]
fn each_step_is_timed_whole_after_its_preparation() {
    let dir = tempfile::tempdir().unwrap();
    let params = Params::init(
        vec![ParamSpec::new("p", &[1], Init::Zeros)],
        0,
        &Device::Cpu,
    )
    .unwrap();
    let mut task = Traced {
        params,
        events: vec![],
        step_seconds: vec![],
    };
    let mut args = loop_args(&dir.path().join("t"), 2);
    args.gradient_accumulation_steps = 2;
    train(&mut task, &args, &Value::Null, "test").unwrap();
    let step = |e: usize| {
        [
            format!("prepare {e}.0"),
            format!("prepare {e}.1"),
            format!("loss {e}.0"),
            format!("loss {e}.1"),
            "update".into(),
            "timed".into(),
        ]
    };
    assert_eq!(task.events, [step(0), step(1)].concat());
    for s in &task.step_seconds {
        assert!(
            (2.0 * LOSS_SLEEP..PREPARE_SLEEP).contains(s),
            "a step took {s} s: both losses, not the preparation"
        );
    }
}
