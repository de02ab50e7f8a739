//! Headless Chromium through chromedriver (WebDriver), for the pages' tests. Where
//! either program is missing the test is skipped with a printed reason; CI
//! (`.ci/run`) installs Debian's `chromium` and `chromium-driver`.
#![allow(dead_code)]

use fantoccini::{Client, ClientBuilder};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn find(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    names
        .iter()
        .flat_map(|n| std::env::split_paths(&path).map(move |d| d.join(n)))
        .find(|p| p.is_file())
}

/// A headless browser session; chromedriver is killed on drop.
pub struct Browser {
    pub client: Client,
    driver: Child,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// Starts chromedriver and a headless Chromium, or returns why it cannot (the test
/// then skips, printing why). Where `RLHF_REQUIRE_BROWSER` is set (CI sets it, having
/// installed Chromium), a browser that cannot start fails the test instead: a
/// browser test never passes without a browser there.
pub async fn start() -> Result<Browser, String> {
    match launch().await {
        Err(why) if std::env::var_os("RLHF_REQUIRE_BROWSER").is_some() => {
            panic!("RLHF_REQUIRE_BROWSER is set but the browser cannot start: {why}")
        }
        other => other,
    }
}

async fn launch() -> Result<Browser, String> {
    let chrome = find(&["chromium", "chromium-browser", "google-chrome"])
        .ok_or("no chromium on PATH (Debian: apt-get install chromium chromium-driver)")?;
    let driver_bin = find(&["chromedriver"])
        .ok_or("no chromedriver on PATH (Debian: apt-get install chromium-driver)")?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("no free port: {e}"))?
        .port();
    let mut driver = Command::new(driver_bin)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start chromedriver: {e}"))?;
    let caps: serde_json::Map<String, serde_json::Value> =
        serde_json::from_value(serde_json::json!({
            "goog:chromeOptions": {
                "binary": chrome,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1280,900"]
            }
        }))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        match ClientBuilder::new(connector)
            .capabilities(caps.clone())
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
        {
            Ok(client) => return Ok(Browser { client, driver }),
            Err(e) if Instant::now() > deadline => {
                let _ = driver.kill();
                return Err(format!("chromium did not start under chromedriver: {e}"));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Where screenshots go: target/screenshots/NAME.png.
pub fn screenshot_path(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join("screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(format!("{name}.png"))
}

/// Polls `check` (a script returning a value) until it returns true, up to `secs`.
pub async fn wait_for(client: &Client, script: &str, secs: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if let Ok(v) = client.execute(script, vec![]).await {
            if v.as_bool() == Some(true) {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}
