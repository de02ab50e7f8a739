//! Takes the README's screenshot of the chat page (docs/chat.png): serves a model with
//! the release binary, asks the questions given, and saves the page once the replies
//! have streamed in. Needs chromium and chromedriver (as the browser tests).
//!
//!     cargo build --release && cargo run --release --example chat_screenshot -- \
//!         runs/demo/ppo docs/chat.png "What is 3 + 4?" "Who is Ada?"

#[path = "../tests/common/browser.rs"]
mod browser;

use fantoccini::Locator;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (model, out, questions) = (&args[1], &args[2], &args[3..]);
    let bin = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/rlhf");
    let mut server = Command::new(bin)
        .args(["serve", "--model", model, "--port", "0"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start target/release/rlhf");
    let mut line = String::new();
    BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .rsplit_once("listening on ")
        .unwrap()
        .1
        .to_string();
    let rt = rlhf::web::server::runtime().unwrap();
    rt.block_on(async {
        let b = browser::start().await.expect("a headless browser");
        let c = &b.client;
        c.goto(&format!("{url}/")).await.unwrap();
        assert!(browser::wait_for(c, "return typeof api === 'function'", 10).await);
        for (i, q) in questions.iter().enumerate() {
            let input = c.find(Locator::Id("input")).await.unwrap();
            input.send_keys(q).await.unwrap();
            c.find(Locator::Id("send"))
                .await
                .unwrap()
                .click()
                .await
                .unwrap();
            let done = format!(
                "return document.querySelectorAll('.msg.assistant .note').length === {}",
                i + 1
            );
            assert!(browser::wait_for(c, &done, 60).await, "no reply to {q:?}");
        }
        std::fs::write(out, c.screenshot().await.unwrap()).unwrap();
        c.clone().close().await.unwrap();
    });
    let _ = server.kill();
    let _ = server.wait();
    println!("wrote {out}");
}
