//! `rlhf pipeline --config FILE` on a fixture model and tiny data: the three stages
//! chain (the RM starts from the SFT model, PPO from the SFT model against that RM), a
//! rerun skips them, and a bad table fails before any work, naming file and table.

mod common;

use serde_json::{json, Value};
use std::path::Path;

fn write_lines(path: &Path, rows: &[Value]) {
    let text: Vec<String> = rows.iter().map(Value::to_string).collect();
    std::fs::write(path, text.join("\n")).unwrap();
}

/// Data for all three stages and a config over them; returns the config's path.
fn setup(dir: &Path, ppo_extra: &str) -> std::path::PathBuf {
    let sft: Vec<Value> = (0..8)
        .map(|i| json!({"prompt": format!("The cat {i} sat on"), "completion": " the mat."}))
        .collect();
    write_lines(&dir.join("sft.jsonl"), &sft);
    let ranks: Vec<Value> = (0..6)
        .map(|i| {
            json!({"prompt": format!("The dog {i} ran to"), "responses": [" the park.", " a tree", " the the the"], "ranking": [0, 1, 2]})
        })
        .collect();
    write_lines(&dir.join("rankings.jsonl"), &ranks);
    let prompts: Vec<Value> = (0..8)
        .map(|i| json!({"prompt": format!("The bird {i} flew over")}))
        .collect();
    write_lines(&dir.join("prompts.jsonl"), &prompts);
    let config = format!(
        r#"output_dir = "{out}"
model_name_or_path = "{model}"

[sft]
dataset = "{d}/sft.jsonl"
max_steps = 2
per_device_train_batch_size = 4
max_length = 64

[rm]
dataset = "{d}/rankings.jsonl"
max_steps = 2
max_length = 64

[ppo]
dataset = "{d}/prompts.jsonl"
num_iterations = 1
rollout_batch_size = 4
mini_batch_size = 2
max_new_tokens = 6
ema = 0.9
{ppo_extra}
"#,
        out = dir.join("run").display(),
        model = common::fixture("qwen2").display(),
        d = dir.display(),
    );
    let path = dir.join("pipeline.toml");
    std::fs::write(&path, config).unwrap();
    path
}

fn run(config: &Path) -> std::process::Output {
    common::rlhf_bin()
        .args(["pipeline", "--config"])
        .arg(config)
        .output()
        .unwrap()
}

#[test]
fn the_stages_chain_and_a_rerun_skips_them() {
    let tmp = tempfile::tempdir().unwrap();
    let config = setup(tmp.path(), "");
    let o = run(&config);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = tmp.path().join("run");
    for stage in ["sft", "rm", "ppo", "ppo/ema"] {
        assert!(
            out.join(stage).join("model.safetensors").exists(),
            "{stage}"
        );
    }
    let rm_config: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("rm/config.json")).unwrap())
            .unwrap();
    assert!(rm_config["architectures"][0]
        .as_str()
        .unwrap()
        .ends_with("ForSequenceClassification"));
    // What connects the stages, as the stages themselves recorded it.
    let args = |stage: &str| -> Value {
        serde_json::from_str(
            &std::fs::read_to_string(out.join(stage).join("training_args.json")).unwrap(),
        )
        .unwrap()
    };
    let s = |p: &Path| p.display().to_string();
    assert_eq!(
        args("sft")["model_name_or_path"],
        s(&common::fixture("qwen2"))
    );
    assert_eq!(args("rm")["model_name_or_path"], s(&out.join("sft")));
    assert_eq!(args("ppo")["model_name_or_path"], s(&out.join("sft")));
    assert_eq!(args("ppo")["reward_model"], s(&out.join("rm")));
    let summary: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(summary["outputs"]["ppo_ema"], s(&out.join("ppo/ema")));

    let again = run(&config);
    assert!(again.status.success());
    let log = String::from_utf8_lossy(&again.stderr);
    assert_eq!(log.matches("already done").count(), 3, "{log}");
}

#[test]
fn a_bad_table_fails_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    for (extra, want) in [
        (
            "lerning_rate = 0.1",
            "[ppo]: unknown setting \"lerning_rate\"",
        ),
        (
            "reward_model = \"elsewhere\"",
            "[ppo]: \"reward_model\" is set by the pipeline",
        ),
        // Issue 16: the type error did not name the key.
        (
            "kl_coef = \"big\"",
            "[ppo]: kl_coef: invalid type: string \"big\", expected f64",
        ),
        // Issue 16: nan became JSON null ("invalid type: null"), without the key.
        (
            "gamma = nan",
            "[ppo]: gamma must be a finite number, got NaN",
        ),
        ("cliprange = -1", "[ppo]: cliprange must be ≥ 0, got -1"),
        // Issue 16: rejected only after SFT and the reward model had run.
        (
            "max_new_tokens = 0",
            "[ppo]: max_new_tokens must be ≥ 1, got 0",
        ),
    ] {
        let config = setup(tmp.path(), "");
        let text = std::fs::read_to_string(&config).unwrap();
        // A key the table already sets is replaced (TOML refuses duplicates).
        let key = extra.split(" = ").next().unwrap();
        let text = match text.lines().find(|l| l.starts_with(&format!("{key} = "))) {
            Some(line) => text.replace(line, extra),
            None => text.replace("ema = 0.9", &format!("ema = 0.9\n{extra}")),
        };
        std::fs::write(&config, text).unwrap();
        let o = run(&config);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{extra}: {err}");
        assert!(
            err.contains("pipeline.toml") && err.contains(want),
            "{extra}: {err}"
        );
        assert!(!tmp.path().join("run/sft").exists(), "{extra}: SFT ran");
    }
}

#[test]
fn the_example_config_in_the_repository_is_valid() {
    use rlhf::pipeline::stage_settings;
    use rlhf::train::args::read_config_file;
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/pipeline.toml");
    let config = read_config_file(&file).unwrap();
    let table = |name: &str| config[name].as_object().unwrap().clone();
    let wired = |keys: &[&'static str]| -> Vec<(&'static str, Value)> {
        keys.iter().map(|k| (*k, json!("x"))).collect()
    };
    let io = ["model_name_or_path", "output_dir"];
    stage_settings::<rlhf::sft::SftArgs>(&table("sft"), &wired(&io), &file, "sft").unwrap();
    stage_settings::<rlhf::rm::RmTrainArgs>(&table("rm"), &wired(&io), &file, "rm").unwrap();
    let ppo = [io[0], io[1], "reward_model"];
    let a =
        stage_settings::<rlhf::ppo::PpoArgs>(&table("ppo"), &wired(&ppo), &file, "ppo").unwrap();
    assert_eq!(a.ema, Some(0.992));
}

#[test]
fn dpo_grpo_and_rloo_run_from_the_same_sft_model() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().display().to_string();
    let extra = format!(
        r#"
[dpo]
dataset = "{d}/rankings.jsonl"
max_steps = 2
max_length = 64

[grpo]
dataset = "{d}/prompts.jsonl"
max_iterations = 1
rollout_batch_size = 2
num_generations = 2
mini_batch_size = 2
max_completion_length = 4

[rloo]
dataset = "{d}/prompts.jsonl"
reward_cmd = "while IFS= read -r l; do echo ${{#l}}; done"
max_iterations = 1
rollout_batch_size = 2
num_generations = 2
mini_batch_size = 4
max_completion_length = 4
"#
    );
    let config = setup(tmp.path(), &extra);
    let o = run(&config);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = tmp.path().join("run");
    let args = |stage: &str| -> Value {
        serde_json::from_str(
            &std::fs::read_to_string(out.join(stage).join("training_args.json")).unwrap(),
        )
        .unwrap()
    };
    let sft = out.join("sft").display().to_string();
    for stage in ["dpo", "grpo", "rloo"] {
        assert!(
            out.join(stage).join("model.safetensors").exists(),
            "{stage}"
        );
        assert_eq!(args(stage)["model_name_or_path"], sft.as_str(), "{stage}");
    }
    assert_eq!(
        args("grpo")["reward_model"],
        out.join("rm").display().to_string().as_str()
    );
    assert_eq!(args("rloo")["reward_model"], Value::Null);
    assert!(args("rloo")["reward_cmd"]
        .as_str()
        .unwrap()
        .contains("read"));
}

#[test]
fn an_online_method_without_a_reward_is_refused_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("p.toml");
    std::fs::write(
        &config,
        format!(
            "output_dir = \"{}\"\nmodel_name_or_path = \"{}\"\n[grpo]\ndataset = \"x.jsonl\"\n",
            tmp.path().join("run").display(),
            common::fixture("qwen2").display()
        ),
    )
    .unwrap();
    let o = run(&config);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("[grpo]: \"reward_model\" or \"reward_cmd\" is needed"),
        "{err}"
    );
    assert!(!tmp.path().join("run").exists());
}
