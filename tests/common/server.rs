//! A server under test: the `rlhf` binary started with `--port 0` on loopback, its
//! address read from the start-up line, killed when dropped.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

pub struct ServerProcess {
    pub child: Child,
    /// `http://127.0.0.1:PORT`
    pub url: String,
    /// stderr, collected by a thread (for failure messages).
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl ServerProcess {
    /// Starts `rlhf ARGS... --port 0` and waits (up to 120 s: a model may load) for
    /// the `listening on http://...` line.
    pub fn start<I, S>(args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut child = super::rlhf_bin()
            .args(args)
            .args(["--port", "0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start rlhf");
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let err_pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err_pipe).lines().map_while(Result::ok) {
                sink.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        let out = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if !sent {
                    if let Some(i) = line.find("listening on http://") {
                        let _ = tx.send(line[i + "listening on ".len()..].trim().to_string());
                        sent = true;
                    }
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(url) = rx.recv_timeout(Duration::from_millis(100)) {
                return ServerProcess { child, url, stderr };
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("server exited with {status}: {}", stderr.lock().unwrap());
            }
            assert!(
                Instant::now() < deadline,
                "server did not start: {}",
                stderr.lock().unwrap()
            );
        }
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A blocking HTTP agent that returns 4xx/5xx responses instead of erroring on them.
pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into()
}
