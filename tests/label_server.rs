//! `rlhf label serve` on a real socket: tokens on every page and API call, clear 4xx
//! answers to malformed submissions, and a real browser (headless Chromium) that
//! ranks with a tie, flags, submits and undoes, sees the admin page's counts change,
//! and shows `<script>` and `<img onerror>` in responses as text without running them.

mod common;

use common::server::{agent, ServerProcess};
use fantoccini::Locator;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

fn run_ok(args: &[&str]) -> String {
    let o = common::rlhf_bin().args(args).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

fn token_of(link_output: &str) -> String {
    link_output
        .split("?token=")
        .nth(1)
        .unwrap()
        .trim()
        .to_string()
}

/// A rank project (K = 4, given responses) with an admin and one labeler.
fn project(dir: &Path, rows: &[Value], guidelines: &str) -> (PathBuf, String, String) {
    let prompts = dir.join("prompts.jsonl");
    let text: String = rows.iter().map(|r| r.to_string() + "\n").collect();
    std::fs::write(&prompts, text).unwrap();
    let g = dir.join("guidelines.md");
    std::fs::write(&g, guidelines).unwrap();
    let db = dir.join("labels.sqlite");
    let out = run_ok(&[
        "label",
        "new",
        "--db",
        db.to_str().unwrap(),
        "--kind",
        "rank",
        "--k",
        "4",
        "--prompts",
        prompts.to_str().unwrap(),
        "--guidelines",
        g.to_str().unwrap(),
    ]);
    let admin = token_of(&out);
    let ann = token_of(&run_ok(&[
        "label",
        "add-labeler",
        "--db",
        db.to_str().unwrap(),
        "ann",
    ]));
    (db, admin, ann)
}

fn status_and_body(r: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> (u16, Value) {
    let mut r = r.unwrap();
    let status = r.status().as_u16();
    (status, r.body_mut().read_json().unwrap_or(Value::Null))
}

#[test]
fn every_route_needs_a_token_and_malformed_submissions_get_a_clear_4xx() {
    let dir = tempfile::tempdir().unwrap();
    let rows: Vec<Value> = (0..3)
        .map(|i| json!({"prompt": format!("q{i}"), "responses": ["a", "b", "c", "d"]}))
        .collect();
    let (db, admin, ann) = project(dir.path(), &rows, "Be kind.");
    let server = ServerProcess::start([
        "label",
        "serve",
        "--db",
        db.to_str().unwrap(),
        "--max_body_bytes",
        "4096",
    ]);
    let url = &server.url;
    let a = agent();
    for path in ["/", "/label", "/admin", "/api/next", "/api/admin"] {
        let (s, body) = status_and_body(a.get(&format!("{url}{path}")).call());
        assert_eq!(s, 401, "{path}");
        assert_eq!(body["error"]["type"], "authentication_error");
        let (s, _) = status_and_body(
            a.get(&format!("{url}{path}"))
                .header("authorization", "Bearer nope")
                .call(),
        );
        assert_eq!(s, 401, "{path}");
    }
    for path in ["/api/labels", "/api/undo"] {
        let (s, _) = status_and_body(a.post(&format!("{url}{path}")).send_json(json!({})));
        assert_eq!(s, 401, "{path}");
    }
    let bearer = |t: &str| format!("Bearer {t}");
    // A labeler is not an admin.
    for path in ["/admin", "/api/admin"] {
        let (s, _) = status_and_body(
            a.get(&format!("{url}{path}"))
                .header("authorization", &bearer(&ann))
                .call(),
        );
        assert_eq!(s, 403, "{path}");
    }
    let (s, stats) = status_and_body(
        a.get(&format!("{url}/api/admin"))
            .header("authorization", &bearer(&admin))
            .call(),
    );
    assert_eq!((s, stats["labels"].clone()), (200, json!(0)));

    let (s, next) = status_and_body(
        a.get(&format!("{url}/api/next"))
            .header("authorization", &bearer(&ann))
            .call(),
    );
    assert_eq!(s, 200);
    let item = next["item"]["id"].as_i64().unwrap();
    let shown: Vec<i64> = next["item"]["responses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["index"].as_i64().unwrap())
        .collect();
    let mut sorted = shown.clone();
    sorted.sort();
    assert_eq!(sorted, [0, 1, 2, 3]);

    let post = |body: Value| {
        status_and_body(
            a.post(&format!("{url}/api/labels"))
                .header("authorization", &bearer(&ann))
                .send_json(body),
        )
    };
    let good = json!({"client_id": "client-000001", "item_id": item, "seconds": 4.2,
                      "ranking": [0, 0, 2, 3], "flags": [[], ["harmful_advice"], [], []]});
    let mut cases = vec![
        (
            json!({"client_id": "client-000002", "item_id": item, "seconds": 1, "ranking": [0, 1]}),
            400,
            "ranking: has 2 ranks for 4",
        ),
        (
            json!({"client_id": "client-000002", "item_id": item, "seconds": 1, "ranking": [0, 1, 2, 3], "scores": [9, null, null, null]}),
            400,
            "scores",
        ),
        (
            json!({"client_id": "client-000002", "item_id": item, "seconds": 1, "rankin": [0, 1, 2, 3]}),
            400,
            "unknown field `rankin`",
        ),
        (
            json!({"client_id": "client-000002", "item_id": "x", "seconds": 1}),
            400,
            "item_id",
        ),
        (
            json!({"client_id": "client-000002", "item_id": 999, "seconds": 1, "ranking": [0, 1, 2, 3]}),
            409,
            "not assigned to you",
        ),
        (
            json!({"client_id": "client-000002", "item_id": item, "seconds": 1, "ranking": [0, 1, 2, 3], "text": "x".repeat(5000)}),
            413,
            "limit",
        ),
    ];
    cases.push((good.clone(), 200, ""));
    for (body, want, says) in cases {
        let (s, reply) = post(body.clone());
        assert_eq!(s, want, "{body}: {reply}");
        if want != 200 {
            let msg = reply["error"]["message"].as_str().unwrap();
            assert!(msg.contains(says), "{msg}");
        }
    }
    // Not JSON, and no content type: 400 with a reason.
    let mut r = a
        .post(&format!("{url}/api/labels"))
        .header("authorization", &bearer(&ann))
        .header("content-type", "application/json")
        .send("{oops")
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r
        .body_mut()
        .read_to_string()
        .unwrap()
        .contains("not valid JSON"));
    // The retry of an acknowledged submission is acknowledged again, stored once.
    let (s, again) = post(good.clone());
    assert_eq!((s, again["duplicate"].clone()), (200, json!(true)));
    let (s, twice) = post(
        json!({"client_id": "client-000003", "item_id": item, "seconds": 1, "ranking": [0, 1, 2, 3]}),
    );
    assert_eq!(s, 409, "{twice}");
    // Undo, then nothing more to undo.
    let undo = || {
        status_and_body(
            a.post(&format!("{url}/api/undo"))
                .header("authorization", &bearer(&ann))
                .send_json(json!({})),
        )
    };
    assert_eq!(undo().0, 200);
    let (s, none) = undo();
    assert_eq!(s, 409);
    assert!(none["error"]["message"]
        .as_str()
        .unwrap()
        .contains("no submission to undo"));
    let (_, stats) = status_and_body(
        a.get(&format!("{url}/api/admin"))
            .header("authorization", &bearer(&admin))
            .call(),
    );
    assert_eq!(stats["labels"], 0);
    assert_eq!(stats["per_labeler"][1]["undone"], 1);
    // The personal link sets an HttpOnly cookie and drops the token from the URL.
    let no_redirect: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .build()
        .into();
    let r = no_redirect
        .get(&format!("{url}/?token={ann}"))
        .call()
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/");
    assert!(r.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .contains("HttpOnly"));
    let r = no_redirect
        .get(&format!("{url}/"))
        .header("cookie", &format!("rlhf_token={ann}"))
        .call()
        .unwrap();
    assert_eq!(r.headers()["location"], "/label");
}

const GUIDELINES: &str =
    "## How to rank\n\nPut the **most helpful, honest and harmless** response first. \
Tie two responses only when you cannot prefer either. Flag every problem you see.\n";

#[test]
fn a_labeler_ranks_with_a_tie_flags_and_submits_in_a_real_browser() {
    let dir = tempfile::tempdir().unwrap();
    let rows = vec![
        json!({"prompt": [{"role": "user", "content": "Does Ada have a pet? Answer in one sentence."}],
               "responses": ["Ada has a cat named Pip.", "I do not know whether Ada has a pet.",
                             "Ada has a cat.", "Ada has seven dragons and a castle on the moon."]}),
        json!({"prompt": "Say hello <b>bold</b>",
               "responses": ["<script>window.pwned = 1</script>hello", "<img src=x onerror=\"window.pwned = 2\">",
                             "plain hello", "<a href=\"javascript:window.pwned=3\" id=evil>click</a>"]}),
    ];
    let (db, admin, ann) = project(dir.path(), &rows, GUIDELINES);
    let server = ServerProcess::start(["label", "serve", "--db", db.to_str().unwrap()]);
    let url = server.url.clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let browser = match common::browser::start().await {
            Ok(b) => b,
            Err(why) => {
                println!("skipped: {why}");
                return;
            }
        };
        let c = &browser.client;
        let wait = |script: &'static str| async move {
            if !common::browser::wait_for(c, script, 20).await {
                let page = c.execute("return document.body.innerHTML", vec![]).await;
                panic!("timed out waiting for: {script}\npage: {page:?}");
            }
        };
        // The admin sees no labels yet.
        c.goto(&format!("{url}/admin?token={admin}")).await.unwrap();
        wait("return document.getElementById('n-labels') !== null").await;
        assert_eq!(c.find(Locator::Id("n-labels")).await.unwrap().text().await.unwrap(), "0");
        assert!(!c.current_url().await.unwrap().as_str().contains("token="));

        // The labeler's link lands on the ranking page, token out of the address bar.
        // (The admin's cookie is replaced: one browser, one person at a time.)
        c.goto(&format!("{url}/?token={ann}")).await.unwrap();
        wait("return document.querySelectorAll('#work .resp').length === 4").await;
        let here = c.current_url().await.unwrap();
        assert_eq!(here.path(), "/label");
        assert!(!here.as_str().contains("token="));
        let guide = c.find(Locator::Css(".guidelines h2")).await.unwrap().text().await.unwrap();
        assert_eq!(guide, "How to rank");

        // Keyboard: select the second card, tie it with the first, score it 5;
        // the fourth card (made-up facts) gets a flag by click.
        let body = c.find(Locator::Css("body")).await.unwrap();
        body.send_keys("jt5").await.unwrap();
        wait("return document.querySelectorAll('#work .resp')[1].classList.contains('tied')").await;
        let ranks = c
            .execute("return Array.from(document.querySelectorAll('#work .resp .rank'), e => e.textContent)", vec![])
            .await
            .unwrap();
        assert_eq!(ranks, json!(["#1", "#1", "#3", "#4"]));
        // Which stored response is where (the order is random per labeler).
        let order: Vec<usize> = serde_json::from_value(
            c.execute("return Array.from(document.querySelectorAll('#work .resp'), e => Number(e.dataset.index))", vec![])
                .await
                .unwrap(),
        )
        .unwrap();
        c.execute(
            "document.querySelectorAll('#work .resp')[3].querySelector('input.flag[value=hallucination]').click()",
            vec![],
        )
        .await
        .unwrap();
        c.execute("window.scrollTo(0, 0)", vec![]).await.unwrap();
        let png = c.screenshot().await.unwrap();
        std::fs::write(common::browser::screenshot_path("label-rank"), png).unwrap();
        c.find(Locator::Id("submit")).await.unwrap().click().await.unwrap();
        wait("return document.getElementById('status').textContent === 'Saved.'").await;

        // What was stored: the tie, the score and the flag, by stored index.
        let export = run_ok(&["label", "export", "--db", db.to_str().unwrap(), "--format", "rankings", "--per_labeler"]);
        let row: Value = serde_json::from_str(export.lines().next().unwrap()).unwrap();
        let mut want = [0u32; 4];
        for (pos, &idx) in order.iter().enumerate() {
            want[idx] = [0, 0, 2, 3][pos];
        }
        assert_eq!(row["ranking"], json!(want));
        assert_eq!(row["scores"][order[1]], 5);
        assert_eq!(row["flags"][order[3]], json!(["hallucination"]));
        assert_eq!(row["labeler"], "ann");

        // Item 2: markup in the prompt and responses is shown as text; nothing runs.
        wait("return document.getElementById('prompt').textContent.includes('<b>bold</b>')").await;
        let _ = c.find(Locator::Css("#work a")).await.map(|_| panic!("a link was rendered from a response"));
        let texts = c
            .execute("return Array.from(document.querySelectorAll('#work .resp .body'), e => e.textContent).join('|')", vec![])
            .await
            .unwrap();
        let texts = texts.as_str().unwrap();
        assert!(texts.contains("<script>window.pwned = 1</script>hello"), "{texts}");
        assert!(texts.contains("<img src=x onerror=\"window.pwned = 2\">"), "{texts}");
        let injected = c
            .execute("return document.querySelectorAll('#work img, #work script, #prompt b').length", vec![])
            .await
            .unwrap();
        assert_eq!(injected, json!(0));
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert_eq!(c.execute("return window.pwned === undefined", vec![]).await.unwrap(), json!(true));

        // Undo by key brings item 1 back; submit it again.
        body.send_keys("u").await.unwrap();
        wait("return document.getElementById('status').textContent.startsWith('Undone')").await;
        wait("return document.getElementById('prompt').textContent.includes('Ada')").await;
        body.send_keys("\u{E007}").await.unwrap(); // Enter
        wait("return document.getElementById('status').textContent === 'Saved.'").await;

        // The admin page counts the label.
        c.goto(&format!("{url}/admin?token={admin}")).await.unwrap();
        wait("return document.getElementById('n-labels') !== null").await;
        assert_eq!(c.find(Locator::Id("n-labels")).await.unwrap().text().await.unwrap(), "1");
        let ann_labels = c
            .execute("return document.querySelector('tr[data-labeler=ann] .n-labels').textContent", vec![])
            .await
            .unwrap();
        assert_eq!(ann_labels, json!("1"));
        assert_eq!(c.execute("return window.pwned === undefined", vec![]).await.unwrap(), json!(true));
        c.clone().close().await.unwrap();
    });
}

#[test]
fn uncertainty_selection_hands_out_the_item_the_reward_model_separates_least_first() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let rm = common::reward_model_folder(d);
    let rows: Vec<Value> = (0..6)
        .map(|i| json!({"prompt": format!("Question {i}?"),
                        "responses": [format!("Answer {i}."), "No.".repeat(i + 1), format!("{i} {i} {i}"), "Yes"]}))
        .collect();
    let (db, _, ann) = project(d, &rows, "");
    // The expected order, from `rlhf rm score` on the same responses.
    let score_rows: Vec<Value> = rows
        .iter()
        .flat_map(|r| {
            r["responses"]
                .as_array()
                .unwrap()
                .iter()
                .map(move |x| json!({"prompt": r["prompt"], "response": x}))
        })
        .collect();
    let data = d.join("score.jsonl");
    std::fs::write(
        &data,
        score_rows
            .iter()
            .map(|r| r.to_string() + "\n")
            .collect::<String>(),
    )
    .unwrap();
    let scored = common::rm_score(&rm, &data);
    let spreads: Vec<f64> = scored
        .chunks(4)
        .map(|c| {
            let r: Vec<f64> = c.iter().map(|x| x["reward"].as_f64().unwrap()).collect();
            rlhf::label::select::spread(&r) // the four responses of a row all differ
        })
        .collect();
    let mut order: Vec<usize> = (0..6).collect();
    order.sort_by(|&a, &b| spreads[a].total_cmp(&spreads[b]));
    let server = ServerProcess::start([
        "label",
        "serve",
        "--db",
        db.to_str().unwrap(),
        "--select",
        "uncertainty",
        "--reward_model",
        rm.to_str().unwrap(),
    ]);
    let a = agent();
    let auth = format!("Bearer {ann}");
    for (n, &want) in order.iter().take(3).enumerate() {
        let (_, next) = status_and_body(
            a.get(&format!("{}/api/next", server.url))
                .header("authorization", &auth)
                .call(),
        );
        assert_eq!(
            next["item"]["prompt"], rows[want]["prompt"],
            "position {n}: spreads {spreads:?}"
        );
        let id = next["item"]["id"].as_i64().unwrap();
        let (s, _) = status_and_body(a.post(&format!("{}/api/labels", server.url)).header("authorization", &auth)
            .send_json(json!({"client_id": format!("unc-{n}-xxxx"), "item_id": id, "seconds": 1, "skip": "test"})));
        assert_eq!(s, 200);
    }
    // Without a reward model the selection is refused with the flag named.
    let o = common::rlhf_bin()
        .args([
            "label",
            "serve",
            "--db",
            db.to_str().unwrap(),
            "--select",
            "uncertainty",
            "--port",
            "0",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--reward_model"));
}
