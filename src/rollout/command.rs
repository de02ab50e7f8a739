//! A user's program as the reward: `--reward_cmd CMD` runs `sh -c CMD` once per batch
//! of samples, writes one JSON object per sample on its stdin,
//!   {"prompt": <the prompt as given: text or messages>, "completion": "<text>"}
//! and reads one reward per line from its stdout, in the same order. Verifiers (unit
//! tests, math checkers) plug in this way, in any language.
//!
//! Every failure is an error that says what the command did: it could not start, it
//! exited with a failure (its last stderr lines are quoted), it printed too few or too
//! many lines, or a line that is not a finite number. A reward is never made up.

use std::io::{Read, Write};
use std::process::{Command, Stdio};

use crate::data::prompts::Prompt;
use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct RewardCommand {
    pub command: String,
}

impl RewardCommand {
    pub fn new(command: impl Into<String>) -> Self {
        RewardCommand {
            command: command.into(),
        }
    }

    fn fail(&self, msg: impl std::fmt::Display) -> Error {
        Error::Invalid(format!("--reward_cmd {:?}: {msg}", self.command))
    }

    /// One reward per (prompt, completion), in order.
    pub fn scores(&self, prompts: &[&Prompt], completions: &[&str]) -> Result<Vec<f64>> {
        let mut input = String::new();
        for (p, c) in prompts.iter().zip(completions) {
            let prompt = match p {
                Prompt::Text(t) => serde_json::Value::String(t.clone()),
                Prompt::Messages(m) => m.clone(),
            };
            input.push_str(&serde_json::json!({"prompt": prompt, "completion": c}).to_string());
            input.push('\n');
        }
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(&self.command)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| self.fail(format!("cannot start: {e}")))?;
        // Write stdin from a thread: a command that prints before reading all of its
        // input would otherwise deadlock against a full pipe.
        let mut stdin = child.stdin.take().expect("piped stdin");
        let writer = std::thread::spawn(move || {
            // A command that exits without reading its input is judged by its exit
            // status and output below, not by the broken pipe.
            let _ = stdin.write_all(input.as_bytes());
        });
        let mut stdout = String::new();
        let mut stderr = String::new();
        let out_pipe = child.stdout.take().expect("piped stdout");
        let mut err_pipe = child.stderr.take().expect("piped stderr");
        let err_reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err_pipe.read_to_string(&mut s);
            s
        });
        std::io::BufReader::new(out_pipe)
            .read_to_string(&mut stdout)
            .map_err(|e| self.fail(format!("reading its output: {e}")))?;
        let status = child
            .wait()
            .map_err(|e| self.fail(format!("waiting for it: {e}")))?;
        let _ = writer.join();
        if let Ok(s) = err_reader.join() {
            stderr = s;
        }
        if !status.success() {
            let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            return Err(self.fail(format!(
                "exited with {status}{}",
                if tail.is_empty() {
                    String::new()
                } else {
                    format!("; its stderr ends with:\n{}", tail.join("\n"))
                }
            )));
        }
        let lines: Vec<&str> = stdout.lines().filter(|l| !l.trim().is_empty()).collect();
        if lines.len() != completions.len() {
            return Err(self.fail(format!(
                "printed {} reward lines for {} completions (expected one number per line, in order)",
                lines.len(),
                completions.len()
            )));
        }
        lines
            .iter()
            .enumerate()
            .map(|(i, l)| match l.trim().parse::<f64>() {
                Ok(x) if x.is_finite() => Ok(x),
                _ => Err(self.fail(format!(
                    "output line {}: {:?} is not a finite number",
                    i + 1,
                    l.trim()
                ))),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prompts(n: usize) -> Vec<Prompt> {
        (0..n).map(|i| Prompt::Text(format!("p{i}"))).collect()
    }

    fn run(cmd: &str, completions: &[&str]) -> Result<Vec<f64>> {
        let p = prompts(completions.len());
        let refs: Vec<&Prompt> = p.iter().collect();
        RewardCommand::new(cmd).scores(&refs, completions)
    }

    #[test]
    fn one_reward_per_line_in_order() {
        // The reward is the completion's length, computed by a shell pipeline from the
        // JSON the command is given.
        let got = run(
            r#"while IFS= read -r line; do c=${line##*\"completion\":\"}; c=${c%\"\}}; echo ${#c}; done"#,
            &["ab", "", "hello"],
        )
        .unwrap();
        assert_eq!(got, [2.0, 0.0, 5.0]);
    }

    #[test]
    fn failures_are_errors_that_say_what_happened() {
        let err = |cmd: &str| run(cmd, &["a", "b"]).unwrap_err().to_string();
        let e = err("echo broken >&2; exit 3");
        assert!(e.contains("exit status: 3") && e.contains("broken"), "{e}");
        let e = err("cat >/dev/null; echo 1");
        assert!(
            e.contains("printed 1 reward lines for 2 completions"),
            "{e}"
        );
        let e = err("cat >/dev/null; echo 1; echo nan");
        assert!(e.contains("line 2") && e.contains("\"nan\""), "{e}");
        let e = err("cat >/dev/null; echo 1; echo x");
        assert!(e.contains("not a finite number"), "{e}");
        let e = err("/nonexistent/program");
        assert!(e.contains("exited with"), "{e}");
    }
}
