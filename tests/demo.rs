//! `rlhf demo --quick` on a test-sized model: the stages chain, the report is
//! complete, and a rerun skips the finished stages and reproduces the numbers.
//! (The thresholds are measured on full runs, not here.)

mod common;

use serde_json::Value;

#[test]
fn quick_demo_chains_every_stage_and_writes_a_complete_report() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo");
    let run = || {
        let o = common::rlhf_bin()
            .args(["demo", "--quick", "--preset", "nano", "--output_dir"])
            .arg(&out)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    run();
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    for path in [
        "/sft/gold_score",
        "/ppo/gold_score",
        "/ppo/win_rate_vs_sft",
        "/rm/val_accuracy",
        "/ppo/kl",
        "/sft/ptx_loss",
        "/ppo/ptx_loss",
        "/ema/gold_score",
        "/elapsed_s/pretrain",
        "/elapsed_s/sft",
        "/elapsed_s/rm",
        "/elapsed_s/ppo",
        "/elapsed_s/total",
    ] {
        assert!(
            report
                .pointer(path)
                .and_then(Value::as_f64)
                .is_some_and(f64::is_finite),
            "{path} missing"
        );
    }
    for fam in ["arithmetic", "known", "unknown", "harmful"] {
        assert!(report["ppo"]["families"][fam].is_number(), "{fam}");
    }
    for stage in ["pretrain", "sft", "rm", "ppo", "ppo/ema"] {
        assert!(
            out.join(stage).join("model.safetensors").exists(),
            "{stage}"
        );
    }
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(html.contains("<svg") && html.contains("polyline") && html.contains("SFT vs PPO"));

    // Rerun: every stage is skipped and the evaluation gives the same numbers.
    let log = run();
    assert_eq!(log.matches("already done").count(), 5, "{log}");
    let again: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(again["ppo"]["gold_score"], report["ppo"]["gold_score"]);
    assert_eq!(
        again["ppo"]["win_rate_vs_sft"],
        report["ppo"]["win_rate_vs_sft"]
    );
}
