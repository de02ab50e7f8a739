//! The chat page in headless Chromium: type a message, watch the reply stream into
//! the conversation, regenerate it; text that looks like markup stays text. Saves a
//! screenshot (target/screenshots/chat.png). Skipped, with the reason printed, where
//! chromium or chromedriver is missing.

mod common;

use fantoccini::Locator;

#[test]
fn a_message_on_the_chat_page_gets_a_streamed_reply() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("nano");
    let s = common::rlhf_bin()
        // `tiny` (4 layers): slow enough that a 120-token reply arrives over many reads.
        .args(["init", "--arch", "qwen2", "--preset", "tiny", "--tokenizer"])
        .arg(common::fixture("qwen2"))
        .arg("--output_dir")
        .arg(&model)
        .output()
        .unwrap();
    assert!(s.status.success());
    let server = common::server::ServerProcess::start([
        "serve".as_ref(),
        "--model".as_ref(),
        model.as_os_str(),
    ]);
    let rt = rlhf::web::server::runtime().unwrap();
    rt.block_on(async {
        let browser = match common::browser::start().await {
            Ok(b) => b,
            Err(why) => {
                println!("skipped: {why}");
                return;
            }
        };
        let c = &browser.client;
        c.goto(&format!("{}/", server.url)).await.unwrap();
        assert!(
            common::browser::wait_for(c, "return typeof api === 'function' && !!document.getElementById('input')", 10).await,
            "the page did not load"
        );
        // Record every change of the reply's text and the streaming state, so that
        // the test sees the reply arrive, not only its end.
        c.execute(
            "window.seen = {texts: [], streaming: false};
             new MutationObserver(() => {
               const a = document.querySelector('.msg.assistant.streaming');
               if (a) { window.seen.streaming = true; window.seen.texts.push(a.querySelector('.text').textContent); }
             }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true, attributes: true});",
            vec![],
        )
        .await
        .unwrap();
        let find = |id: &'static str| c.find(Locator::Id(id));
        find("system").await.unwrap().send_keys("You are terse.").await.unwrap();
        let max = find("max-tokens").await.unwrap();
        max.clear().await.unwrap();
        max.send_keys("120").await.unwrap();
        let evil = "<img src=x onerror=\"window.pwned=1\"> hello";
        find("input").await.unwrap().send_keys(evil).await.unwrap();
        find("send").await.unwrap().click().await.unwrap();
        let done = "const a = document.querySelectorAll('.msg.assistant');
                    return a.length === 1 && !document.querySelector('.streaming')
                      && a[0].querySelector('.note') !== null";
        assert!(common::browser::wait_for(c, done, 60).await, "no finished reply");
        let state = c
            .execute(
                "const a = document.querySelector('.msg.assistant');
                 return {reply: a.querySelector('.text').textContent,
                         note: a.querySelector('.note').textContent,
                         user: document.querySelector('.msg.user .text').textContent,
                         imgs: document.querySelectorAll('#messages img').length,
                         pwned: window.pwned === undefined ? null : window.pwned,
                         error: document.getElementById('error').textContent,
                         seen: window.seen};",
                vec![],
            )
            .await
            .unwrap();
        println!("{state:#}");
        assert_eq!(state["error"], "");
        assert_eq!(state["user"], evil, "the message is shown as text");
        assert_eq!(state["imgs"], 0);
        assert_eq!(state["pwned"], serde_json::Value::Null);
        let note = state["note"].as_str().unwrap();
        assert!(note.contains("tokens in"), "the usage chunk was read: {note}");
        // The reply grew while streaming and ended as the last text streamed.
        assert_eq!(state["seen"]["streaming"], true);
        let texts = state["seen"]["texts"].as_array().unwrap();
        let reply = state["reply"].as_str().unwrap();
        let partial = texts
            .iter()
            .filter(|t| !t.as_str().unwrap().is_empty() && t.as_str() != Some(reply))
            .count();
        assert!(partial >= 1, "the reply appeared at once, not streamed: {texts:?}");
        for t in texts {
            assert!(reply.starts_with(t.as_str().unwrap()), "{t} is not a prefix of {reply:?}");
        }
        let png = c.screenshot().await.unwrap();
        std::fs::write(common::browser::screenshot_path("chat"), &png).unwrap();

        // Regenerate: the reply is replaced by a new one; still one of each.
        find("regenerate").await.unwrap().click().await.unwrap();
        assert!(common::browser::wait_for(c, done, 60).await, "no regenerated reply");
        let n = c
            .execute("return document.querySelectorAll('.msg').length", vec![])
            .await
            .unwrap();
        assert_eq!(n, 2);
        c.clone().close().await.unwrap();
    });
}
