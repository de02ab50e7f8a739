//! The official `openai` Python package against `rlhf serve`: chat completion, a
//! stream with usage, logprobs, n = 2, the completions endpoint and error cases
//! (tests/python/openai_client.py). Skipped, with the reason printed, where
//! `python3 -c "import openai"` fails.

mod common;

use std::process::Command;

#[test]
fn the_openai_python_client_works_against_the_server() {
    let probe = Command::new("python3")
        .args(["-c", "import openai"])
        .output();
    let absent = match probe {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!(
            "python3 cannot import openai (pip install openai): {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Some(format!("no python3 on PATH: {e}")),
    };
    if let Some(why) = absent {
        // CI installs the client and sets RLHF_REQUIRE_OPENAI: there it must run.
        assert!(
            std::env::var_os("RLHF_REQUIRE_OPENAI").is_none(),
            "RLHF_REQUIRE_OPENAI is set but {why}"
        );
        println!("skipped: {why}");
        return;
    }
    let model = common::fixture("qwen2");
    let s = common::server::ServerProcess::start([
        "serve".as_ref(),
        "--model".as_ref(),
        model.as_os_str(),
        "--api_key".as_ref(),
        "sesame".as_ref(),
        "--served_model_name".as_ref(),
        "tiny-qwen".as_ref(),
    ]);
    let script = common::fixtures().join("../python/openai_client.py");
    let out = Command::new("python3")
        .arg(script)
        .args([&s.url, "tiny-qwen"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "{stdout}\n{}\nserver: {}",
        String::from_utf8_lossy(&out.stderr),
        s.stderr()
    );
    assert!(stdout.contains("all openai checks passed"));
}
