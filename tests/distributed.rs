//! Data-parallel training under `mpirun -np 2` on this machine (Open MPI): two ranks
//! with per-device batch B end with the weights of one process with batch 2B, and a
//! killed rank ends the run with an error instead of a hang.
//!
//! Skipped, with the reason printed, where `mpirun` is absent (unless
//! RLHF_REQUIRE_MPI is set, as CI does). Where it is present,
//! the first test builds an `rlhf` with `--features mpi` into target/mpi (Open MPI's
//! headers and libclang are needed: `.ci/run` installs libopenmpi-dev, openmpi-bin
//! and libclang-dev).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::fixture;

/// The MPI build of `rlhf`, built once per test process; `None` (with the reason
/// printed) where Open MPI's `mpirun` is not installed.
fn mpi_rlhf() -> Option<PathBuf> {
    static BIN: OnceLock<Option<PathBuf>> = OnceLock::new();
    BIN.get_or_init(|| {
        if Command::new("mpirun").arg("--version").output().is_err() {
            // CI installs Open MPI and sets this, so that these tests run there.
            assert!(
                std::env::var_os("RLHF_REQUIRE_MPI").is_none(),
                "RLHF_REQUIRE_MPI is set but mpirun is not installed"
            );
            println!(
                "skipped: mpirun (Open MPI) is not installed (Debian: openmpi-bin libopenmpi-dev)"
            );
            return None;
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let target = root.join("target").join("mpi");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let out = Command::new(cargo)
            .args(["build", "--release", "--features", "mpi", "--bin", "rlhf"])
            .arg("--target-dir")
            .arg(&target)
            .current_dir(root)
            .output()
            .expect("running cargo");
        assert!(
            out.status.success(),
            "building rlhf with --features mpi failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(target.join("release").join("rlhf"))
    })
    .clone()
}

/// The command `mpirun -np N BIN ARGS`, allowed as root (CI runs tests as root),
/// its output captured.
fn mpirun_command(np: usize, bin: &Path, args: &[String]) -> Command {
    let mut cmd = Command::new("mpirun");
    cmd.args(["-np", &np.to_string(), "--oversubscribe"])
        .arg(bin)
        .args(args)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        // Containers often refuse the cross-memory-attach copy Open MPI tries first.
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// `mpirun -np N BIN ARGS` to its end, with a bound on its wall time.
fn mpirun(np: usize, bin: &Path, args: &[String], limit: Duration) -> Output {
    run_bounded(mpirun_command(np, bin, args), limit)
}

fn run_bounded(mut cmd: Command, limit: Duration) -> Output {
    let mut child = cmd.spawn().expect("starting the command");
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "still running after {limit:?} (a hang):\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn single(bin: &Path, args: &[String]) -> Output {
    let mut cmd = Command::new(bin);
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    run_bounded(cmd, Duration::from_secs(300))
}

fn ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// Every tensor of a safetensors file as f32, by name.
fn weights(file: &Path) -> Vec<(String, Vec<f32>)> {
    let t = candle_core::safetensors::load(file, &candle_core::Device::Cpu).unwrap();
    let mut out: Vec<(String, Vec<f32>)> = t
        .into_iter()
        .map(|(k, v)| {
            let v = v.to_dtype(candle_core::DType::F32).unwrap();
            (k, v.flatten_all().unwrap().to_vec1().unwrap())
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// The largest |a − b| over two models' weights, after checking that they hold the
/// same tensors; and the largest change from `start`, so that "equal" cannot mean
/// "neither trained".
fn compare(a: &Path, b: &Path, start: &Path) -> (f32, f32) {
    let (wa, wb, w0) = (weights(a), weights(b), weights(start));
    assert_eq!(wa.len(), wb.len());
    assert!(!wa.is_empty());
    let (mut diff, mut moved) = (0f32, 0f32);
    for ((ka, va), (kb, vb)) in wa.iter().zip(&wb) {
        assert_eq!(ka, kb);
        assert_eq!(va.len(), vb.len(), "{ka}");
        for (x, y) in va.iter().zip(vb) {
            diff = diff.max((x - y).abs());
        }
        if let Some((_, v0)) = w0.iter().find(|(k, _)| k == ka) {
            for (x, y) in va.iter().zip(v0) {
                moved = moved.max((x - y).abs());
            }
        }
    }
    (diff, moved)
}

/// (loss, grad_norm) of every logged step of a run (rank 0's metrics: the global
/// batch's loss and the norm of the summed gradients).
fn curve(run: &Path) -> Vec<(f64, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m.get("train/loss").is_some())
        .map(|m| {
            (
                m["train/loss"].as_f64().unwrap(),
                m["train/grad_norm"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// The two runs' losses and gradient norms agree step by step (1e-5 relative), and
/// their weights within 1e-5. The weights' bound is absolute, so it is read against
/// the learning rate: Adam moves every element by up to lr per step whatever its
/// gradient's size, so an element whose gradient is ~0 can move by +lr in one run and
/// −lr in the other on float-level differences of summation order (2·lr apart). The
/// runs use lr 1e-5 so that such a flip shows against the bound instead of hiding in
/// it; none happened (the measured differences are ≤ 2e-6).
fn assert_same_training(two: &Path, one: &Path, start: &Path, what: &str) {
    let (a, b) = (curve(two), curve(one));
    assert_eq!(a.len(), b.len(), "{what}: logged steps");
    assert!(a.len() >= 3, "{what}: {a:?}");
    for (i, ((la, ga), (lb, gb))) in a.iter().zip(&b).enumerate() {
        assert!(
            (la - lb).abs() <= 1e-5 * lb.abs().max(1.0),
            "{what} step {i}: loss {la} vs {lb}"
        );
        assert!(
            (ga - gb).abs() <= 1e-5 * gb.abs().max(1.0),
            "{what} step {i}: grad norm {ga} vs {gb}"
        );
    }
    let (diff, moved) = compare(
        &two.join("model.safetensors"),
        &one.join("model.safetensors"),
        start,
    );
    println!("{what}: 2 ranks vs 1 with twice the batch: losses {a:?} vs {b:?}; max |Δw| {diff:.2e} (training moved weights by up to {moved:.2e})");
    assert!(moved > 1e-6, "{what}: training moved nothing");
    assert!(diff <= 1e-5, "{what}: the runs' weights differ by {diff}");
}

fn sft_data(dir: &Path, n: usize) -> PathBuf {
    let p = dir.join("sft.jsonl");
    let rows: Vec<String> = (0..n)
        .map(|i| {
            serde_json::json!({"prompt": format!("Question {i}: what is {i} plus {}?", i % 7),
                               "completion": format!(" It is {}.", i + i % 7)})
            .to_string()
        })
        .collect();
    std::fs::write(&p, rows.join("\n")).unwrap();
    p
}

/// `sft` on the gpt2 fixture with `data` into `out`, and `flags`.
fn sft_args(data: &Path, out: &Path, flags: &[(&str, &str)]) -> Vec<String> {
    let mut a = vec![
        "sft".to_string(),
        "--model".into(),
        fixture("gpt2").display().to_string(),
    ];
    a.extend(["--dataset".into(), data.display().to_string()]);
    a.extend(["--output_dir".into(), out.display().to_string()]);
    for (k, v) in flags {
        a.extend([k.to_string(), v.to_string()]);
    }
    a
}

/// SFT on `rows` examples: 2 ranks × `batch` against 1 process × 2·`batch`, both
/// with `accum` micro-batches per step.
fn sft_two_ranks_against_one(rows: usize, batch: usize, accum: usize, steps: usize) {
    let Some(bin) = mpi_rlhf() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let data = sft_data(tmp.path(), rows);
    let (accum_flag, steps_flag) = (accum.to_string(), steps.to_string());
    let args = |out: &str, batch: usize| {
        let batch = batch.to_string();
        sft_args(
            &data,
            &tmp.path().join(out),
            &[
                ("--per_device_train_batch_size", &batch),
                ("--gradient_accumulation_steps", &accum_flag),
                ("--max_steps", &steps_flag),
                ("--learning_rate", "1e-5"),
                ("--logging_steps", "1"),
                ("--save_steps", "0"),
                ("--seed", "5"),
            ],
        )
    };
    ok(
        &mpirun(2, &bin, &args("two", batch), Duration::from_secs(300)),
        "mpirun -np 2 rlhf sft",
    );
    ok(&single(&bin, &args("one", 2 * batch)), "rlhf sft");
    assert_same_training(
        &tmp.path().join("two"),
        &tmp.path().join("one"),
        &fixture("gpt2").join("model.safetensors"),
        &format!("SFT 2 × {batch} vs 1 × {}, accumulation {accum}", 2 * batch),
    );
    // Rank 0 alone wrote the run's files: one metrics line per logged step.
    let metrics = std::fs::read_to_string(tmp.path().join("two/metrics.jsonl")).unwrap();
    let logged: Vec<u64> = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m.get("train/loss").is_some())
        .map(|m| m["step"].as_u64().unwrap())
        .collect();
    assert_eq!(
        logged,
        (1..=steps as u64).collect::<Vec<_>>(),
        "metrics written once per step"
    );
}

#[test]
fn two_ranks_sft_equal_one_process_with_twice_the_batch() {
    sft_two_ranks_against_one(24, 3, 1, 4);
}

/// 21 examples in global batches of 6: the fourth batch holds 3, all rank 0's, so
/// rank 1's shard is empty; two micro-batches per step; two epochs.
#[test]
fn two_ranks_sft_with_accumulation_and_an_empty_shard() {
    sft_two_ranks_against_one(21, 3, 2, 4);
}

#[test]
fn two_ranks_rm_equal_one_process_with_twice_the_batch() {
    let Some(bin) = mpi_rlhf() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let data = common::toy_rankings(tmp.path(), 16, 7);
    let args = |out: &str, batch: &str| {
        let mut a = strings(&[
            "rm",
            "train",
            "--model",
            "--dataset",
            "--output_dir",
            "--prompts_per_batch",
            batch,
            "--max_steps",
            "3",
            "--learning_rate",
            "1e-5",
            "--logging_steps",
            "1",
            "--max_length",
            "64",
            "--save_steps",
            "0",
            "--seed",
            "2",
        ]);
        a.insert(3, fixture("qwen2").display().to_string());
        a.insert(5, data.display().to_string());
        a.insert(7, tmp.path().join(out).display().to_string());
        a
    };
    ok(
        &mpirun(2, &bin, &args("two", "2"), Duration::from_secs(300)),
        "mpirun -np 2 rlhf rm train",
    );
    ok(&single(&bin, &args("one", "4")), "rlhf rm train");
    assert_same_training(
        &tmp.path().join("two"),
        &tmp.path().join("one"),
        &fixture("qwen2").join("model.safetensors"),
        "RM 2 × 2 prompts vs 1 × 4",
    );
}

/// Two ranks stopped after 2 of 5 steps and resumed end with the weights of two ranks
/// that ran straight through, bit for bit.
#[test]
fn two_ranks_resume_bit_for_bit() {
    let Some(bin) = mpi_rlhf() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let data = sft_data(tmp.path(), 24);
    let args = |out: &str, extra: &[&str]| {
        let mut a = sft_args(
            &data,
            &tmp.path().join(out),
            &[
                ("--per_device_train_batch_size", "3"),
                ("--max_steps", "5"),
                ("--learning_rate", "1e-3"),
                ("--save_steps", "0"),
            ],
        );
        a.extend(strings(extra));
        a
    };
    stopped_and_resumed_equals_straight(&bin, tmp.path(), args, "2");
}

/// A PPO run's inputs in `dir`: 16 prompts, pretraining text and a reward model.
struct PpoInputs {
    prompts: PathBuf,
    ptx: PathBuf,
    rm: PathBuf,
}

impl PpoInputs {
    fn new(dir: &Path) -> Self {
        let prompts = dir.join("prompts.jsonl");
        let rows: Vec<String> = (0..16)
            .map(|i| serde_json::json!({"prompt": format!("The cat {i} sat on")}).to_string())
            .collect();
        std::fs::write(&prompts, rows.join("\n")).unwrap();
        let ptx = dir.join("corpus.txt");
        let docs: Vec<String> = (0..12)
            .map(|i| format!("Document {i}: the dog ran {} times around the yard.", i * 3))
            .collect();
        std::fs::write(&ptx, docs.join("\n\n")).unwrap();
        let rm = common::reward_model_folder(dir);
        PpoInputs { prompts, ptx, rm }
    }

    /// `ppo` from the qwen2 fixture into `out`, with `flags`.
    fn args(&self, out: &Path, flags: &[&str]) -> Vec<String> {
        let mut a = strings(&["ppo"]);
        for (flag, path) in [
            ("--model", fixture("qwen2")),
            ("--dataset", self.prompts.clone()),
            ("--reward_model", self.rm.clone()),
            ("--output_dir", out.to_path_buf()),
        ] {
            a.push(flag.into());
            a.push(path.display().to_string());
        }
        a.extend(strings(&["--max_new_tokens", "6", "--save_steps", "0"]));
        a.extend(strings(flags));
        a
    }
}

/// PPO-ptx on 2 ranks × (2 prompts per rollout, minibatches of 1) against one
/// process × (4, 2), over 2 iterations of 2 PPO epochs: the same samples (each
/// sample's stream is named by its place in the run), the same minibatches (cut from
/// one shuffle of the whole batch; with one row per rank per minibatch, about a
/// third of them are all one rank's, so a rank's share is often empty), and the
/// same loss (token means over both ranks' rows, for the surrogate, the value loss
/// and the ptx loss): the same policy and critic within 1e-5.
#[test]
fn two_ranks_ppo_equal_one_process_with_twice_the_batch() {
    let Some(bin) = mpi_rlhf() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let inputs = PpoInputs::new(tmp.path());
    let ptx = inputs.ptx.display().to_string();
    let args = |out: &str, rollout: &str, mini: &str, ptx_batch: &str| {
        inputs.args(
            &tmp.path().join(out),
            &[
                "--rollout_batch_size",
                rollout,
                "--mini_batch_size",
                mini,
                "--ptx_batch_size",
                ptx_batch,
                "--ptx_data",
                &ptx,
                "--ptx_coef",
                "0.5",
                "--ppo_epochs",
                "2",
                "--num_iterations",
                "2",
                "--learning_rate",
                "1e-5",
                "--logging_steps",
                "1",
                "--seed",
                "3",
            ],
        )
    };
    ok(
        &mpirun(
            2,
            &bin,
            &args("two", "2", "1", "1"),
            Duration::from_secs(300),
        ),
        "mpirun -np 2 rlhf ppo",
    );
    ok(&single(&bin, &args("one", "4", "2", "2")), "rlhf ppo");
    let (two, one) = (tmp.path().join("two"), tmp.path().join("one"));
    assert_same_training(
        &two,
        &one,
        &fixture("qwen2").join("model.safetensors"),
        "PPO-ptx 2 × (2 prompts, minibatch 1) vs 1 × (4, 2): policy",
    );
    let (diff, moved) = compare(
        &two.join("critic/model.safetensors"),
        &one.join("critic/model.safetensors"),
        &inputs.rm.join("model.safetensors"),
    );
    println!("PPO critic: max |Δw| {diff:.2e} (moved by up to {moved:.2e})");
    assert!(moved > 1e-6, "the critic did not train");
    assert!(diff <= 1e-5, "the critics differ by {diff}");
    // The rollouts' statistics over both ranks are those of the one process's batch.
    let objective = |run: &Path| -> Vec<f64> {
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|m| m.get("objective/scores").and_then(|v| v.as_f64()))
            .collect()
    };
    let (a, b) = (objective(&two), objective(&one));
    assert_eq!(a.len(), 2);
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert!(
            (x - y).abs() <= 1e-5 * y.abs().max(1.0),
            "scores {a:?} vs {b:?}"
        );
    }
}

/// PPO on 2 ranks (each rank rolls out its own prompts; whitening and the KL
/// controller use statistics summed over both): a run stopped in the middle of an
/// iteration (after its first update) and resumed ends with the weights of 2 ranks
/// that ran straight through, bit for bit: each rank's rollouts are in the checkpoint.
#[test]
fn two_ranks_ppo_resume_bit_for_bit() {
    let Some(bin) = mpi_rlhf() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let inputs = PpoInputs::new(tmp.path());
    let args = |out: &str, extra: &[&str]| {
        let mut flags = vec![
            "--rollout_batch_size",
            "4",
            "--mini_batch_size",
            "2",
            "--ppo_epochs",
            "1",
            "--num_iterations",
            "2",
        ];
        flags.extend(extra);
        inputs.args(&tmp.path().join(out), &flags)
    };
    stopped_and_resumed_equals_straight(&bin, tmp.path(), args, "1");
    // Rank 0 alone wrote the metrics: one row per iteration.
    let metrics = std::fs::read_to_string(tmp.path().join("straight/metrics.jsonl")).unwrap();
    let iterations = metrics
        .lines()
        .filter(|l| l.contains("objective/kl"))
        .count();
    assert_eq!(
        iterations, 2,
        "one row per iteration, written once:\n{metrics}"
    );
    // The checkpoint holds both ranks' states.
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("resumed/checkpoint-4/trainer_state.json"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(state["world_size"], 2);
    assert_eq!(state["task"]["ranks"].as_array().map(Vec::len), Some(2));
}

/// Runs `args` on 2 ranks straight through into `dir/straight`, and stopped after
/// `stop` steps then rerun into `dir/resumed`: the two models are equal bit for bit.
fn stopped_and_resumed_equals_straight(
    bin: &Path,
    dir: &Path,
    args: impl Fn(&str, &[&str]) -> Vec<String>,
    stop: &str,
) {
    let limit = Duration::from_secs(300);
    ok(
        &mpirun(2, bin, &args("straight", &[]), limit),
        "uninterrupted",
    );
    let first = args("resumed", &["--stop_after_steps", stop]);
    ok(&mpirun(2, bin, &first, limit), "first part");
    assert!(!dir.join("resumed/model.safetensors").exists());
    ok(
        &mpirun(2, bin, &args("resumed", &[]), limit),
        "resumed part",
    );
    let straight = common::lm_weight_bits(&dir.join("straight"));
    assert!(!straight.is_empty());
    assert!(
        straight == common::lm_weight_bits(&dir.join("resumed")),
        "a resumed 2-rank run differs from an uninterrupted one"
    );
}

/// A launch of several ranks of a command that runs in one process is refused.
#[test]
fn non_training_commands_refuse_several_ranks() {
    let Some(bin) = mpi_rlhf() else { return };
    let args = vec![
        "generate".to_string(),
        "--model".into(),
        fixture("gpt2").display().to_string(),
        "--prompt".into(),
        "hi".into(),
    ];
    let out = mpirun(2, &bin, &args, Duration::from_secs(120));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("runs in one process") && err.contains("sft"),
        "{err}"
    );
}

/// A rank killed mid-run: mpirun ends the other rank and exits with an error naming
/// the dead one, well within the bound (no hang).
#[test]
fn a_killed_rank_stops_the_run_with_an_error() {
    let Some(bin) = mpi_rlhf() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let data = sft_data(tmp.path(), 24);
    let out_dir = tmp.path().join("killed");
    let args = sft_args(
        &data,
        &out_dir,
        &[("--max_steps", "100000"), ("--save_steps", "0")],
    );
    let mut child = mpirun_command(2, &bin, &args).spawn().unwrap();
    // Rank 1: the rlhf process whose environment says so and whose command line
    // names this run's output folder.
    let marker = out_dir.display().to_string();
    let start = Instant::now();
    let victim = loop {
        if let Some(pid) = find_rank(1, &marker) {
            if out_dir.join("training_args.json").exists() {
                break pid;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "rank 1 never started"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    std::thread::sleep(Duration::from_secs(2)); // let it train a little
    assert!(Command::new("kill")
        .args(["-9", &victim.to_string()])
        .status()
        .unwrap()
        .success());
    let killed_at = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if killed_at.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("the run did not stop within 60 s of a rank's death (a hang)");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    let err =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    println!(
        "stopped {:.1} s after rank 1 was killed; mpirun said:\n{err}",
        killed_at.elapsed().as_secs_f64()
    );
    assert!(!out.status.success(), "the run reported success");
    assert!(
        err.contains("rank 1") || err.contains("signal 9"),
        "the error does not name the dead rank: {err}"
    );
    assert!(find_rank(0, &marker).is_none(), "rank 0 is still running");
}

/// The pid of the process of MPI rank `rank` whose command line contains `marker`.
fn find_rank(rank: usize, marker: &str) -> Option<u32> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        if !cmdline.contains(marker) || cmdline.starts_with("mpirun") {
            continue;
        }
        let env = std::fs::read(entry.path().join("environ")).unwrap_or_default();
        let want = format!("OMPI_COMM_WORLD_RANK={rank}");
        if env.split(|&b| b == 0).any(|kv| kv == want.as_bytes()) {
            return Some(pid);
        }
    }
    None
}
