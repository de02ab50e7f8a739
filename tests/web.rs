//! The shared web layer on a real socket: errors in one shape, the body limit, the
//! security headers and a token-guarded route.

mod common;

use axum::http::request::Parts;
use axum::routing::{get, post};
use axum::Router;
use rlhf::web::{auth, ApiError, ApiJson, Listen, Server};

#[derive(serde::Deserialize)]
struct Echo {
    text: String,
    #[allow(dead_code)]
    n: Option<u32>,
}

async fn guarded(parts: Parts) -> Result<&'static str, ApiError> {
    match auth::request_token(&parts) {
        Some((t, _)) if auth::tokens_equal(&auth::token_hash(&t), &auth::token_hash("sesame")) => {
            Ok("in")
        }
        _ => Err(ApiError::unauthorized()),
    }
}

fn start() -> (tokio::runtime::Runtime, String) {
    let rt = rlhf::web::server::runtime().unwrap();
    let router = Router::new()
        .route(
            "/echo",
            post(|ApiJson(e): ApiJson<Echo>| async move { e.text }),
        )
        .route("/guarded", get(guarded).post(guarded))
        // A page with injected markup that escaping would have stopped: the CSP must
        // stop it too. The shared script loads.
        .route(
            "/raw",
            get(|| async {
                axum::response::Html(
                    "<!doctype html><script src=\"/static/api.js\"></script>\
                     <script>window.pwned = 1</script><img src=x onerror=\"window.pwned = 2\">\
                     <a id=l href=\"javascript:window.pwned=3\">x</a>",
                )
            }),
        )
        .merge(rlhf::web::templates::static_routes(&[]));
    let listen = Listen {
        host: "127.0.0.1".into(),
        port: 0,
    };
    let bound = rt
        .block_on(Server::new(router, 1024, "test").bind(&listen))
        .unwrap();
    let url = format!("http://{}", bound.addr);
    rt.spawn(bound.serve(std::future::pending()));
    (rt, url)
}

#[test]
fn errors_limits_headers_and_tokens() {
    let (_rt, url) = start();
    let agent = common::server::agent();
    let error_of = |mut r: ureq::http::Response<ureq::Body>| -> (u16, serde_json::Value) {
        (r.status().as_u16(), r.body_mut().read_json().unwrap())
    };

    let ok = agent
        .post(&format!("{url}/echo"))
        .send_json(serde_json::json!({"text": "hi"}))
        .unwrap();
    assert_eq!(ok.status(), 200);
    let csp = ok.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(csp.contains("script-src 'self'"), "{csp}");
    assert_eq!(ok.headers()["x-content-type-options"], "nosniff");

    // A wrong type names the field; bad JSON says so; a missing content type too.
    let (status, body) = error_of(
        agent
            .post(&format!("{url}/echo"))
            .send_json(serde_json::json!({"text": 3}))
            .unwrap(),
    );
    assert_eq!(status, 400);
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("text") && msg.contains("invalid type"),
        "{msg}"
    );
    assert_eq!(body["error"]["type"], "invalid_request_error");
    let (status, body) = error_of(
        agent
            .post(&format!("{url}/echo"))
            .header("content-type", "application/json")
            .send("{nope")
            .unwrap(),
    );
    assert_eq!(status, 400);
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("not valid JSON"));
    let (status, body) = error_of(agent.post(&format!("{url}/echo")).send("text").unwrap());
    assert_eq!(status, 400);
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("application/json"));
    // A cross-site form post (no JSON content type) never reaches a handler, even one
    // that reads no body.
    let form = agent
        .post(&format!("{url}/guarded"))
        .header("cookie", "rlhf_token=sesame")
        .header("content-type", "application/x-www-form-urlencoded")
        .send("a=1")
        .unwrap();
    assert_eq!(form.status(), 400);

    // Over the 1024-byte limit: 413 in the same shape.
    let big = serde_json::json!({"text": "x".repeat(2000)});
    let (status, body) = error_of(agent.post(&format!("{url}/echo")).send_json(big).unwrap());
    assert_eq!(status, 413);
    assert_eq!(body["error"]["code"], "request_too_large");

    // Unknown path: 404 JSON.
    let (status, body) = error_of(agent.get(&format!("{url}/nope")).call().unwrap());
    assert_eq!(status, 404);
    assert!(body["error"]["message"].as_str().unwrap().contains("/nope"));

    // Tokens: none, wrong, header, cookie, query.
    assert_eq!(
        agent
            .get(&format!("{url}/guarded"))
            .call()
            .unwrap()
            .status(),
        401
    );
    let wrong = agent
        .get(&format!("{url}/guarded"))
        .header("authorization", "Bearer x")
        .call()
        .unwrap();
    assert_eq!(wrong.status(), 401);
    for r in [
        agent
            .get(&format!("{url}/guarded"))
            .header("authorization", "Bearer sesame")
            .call(),
        agent
            .get(&format!("{url}/guarded"))
            .header("cookie", "rlhf_token=sesame")
            .call(),
        agent.get(&format!("{url}/guarded?token=sesame")).call(),
    ] {
        assert_eq!(r.unwrap().status(), 200);
    }
}

#[test]
fn the_content_security_policy_stops_injected_scripts_in_a_real_browser() {
    let (rt, url) = start();
    rt.block_on(async {
        let browser = match common::browser::start().await {
            Ok(b) => b,
            Err(why) => {
                println!("skipped: {why}");
                return;
            }
        };
        let c = &browser.client;
        c.goto(&format!("{url}/raw")).await.unwrap();
        assert!(
            common::browser::wait_for(c, "return typeof api === 'function'", 10).await,
            "api.js did not load"
        );
        let _ = c
            .find(fantoccini::Locator::Id("l"))
            .await
            .unwrap()
            .click()
            .await;
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let pwned = c
            .execute("return window.pwned === undefined", vec![])
            .await
            .unwrap();
        assert_eq!(pwned, serde_json::json!(true), "an injected script ran");
        c.clone().close().await.unwrap();
    });
}
