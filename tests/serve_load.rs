//! Load and faults on loopback, bounded: 64 concurrent clients of which a quarter
//! disconnect mid-stream. Every finished request must be correct (the same reply as
//! the same request alone afterwards), the disconnected ones cancelled (at least
//! half: see the test), the server still answering, and its resident memory back
//! near its idle size.

mod common;

use common::server::{agent, ServerProcess};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::time::{Duration, Instant};

const CLIENTS: usize = 64;
const MAX_TOKENS: usize = 16;

/// VmRSS of a process in KiB (Linux).
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn health(url: &str) -> Value {
    agent()
        .get(&format!("{url}/health"))
        .call()
        .unwrap()
        .body_mut()
        .read_json()
        .unwrap()
}

fn request(i: usize) -> Value {
    json!({"messages": [{"role": "user", "content": format!("Request number {i}, go.")}],
           "max_tokens": MAX_TOKENS, "seed": i, "logprobs": true})
}

/// A streamed request on a raw socket that reads two events and hangs up.
fn disconnect_mid_stream(addr: &str, i: usize) -> usize {
    let mut body = request(i);
    body["stream"] = json!(true);
    body["max_tokens"] = json!(80); // far more than it will read
    let body = body.to_string();
    let mut sock = std::net::TcpStream::connect(addr).unwrap();
    write!(
        sock,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut reader = BufReader::new(sock.try_clone().unwrap());
    let mut events = 0;
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.starts_with("HTTP/1.1 200"), "{line}");
    while events < 2 {
        line.clear();
        if reader.read_line(&mut line).unwrap() == 0 {
            break;
        }
        if line.starts_with("data: {") {
            events += 1;
        }
    }
    sock.shutdown(std::net::Shutdown::Both).unwrap();
    events
}

/// A whole streamed request: (text, [logprob]) from its events.
fn streamed(url: &str, i: usize) -> (String, Vec<f64>, Value) {
    let mut body = request(i);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let mut r = agent()
        .post(&format!("{url}/v1/chat/completions"))
        .send_json(body)
        .unwrap();
    assert_eq!(r.status(), 200);
    let raw = r.body_mut().read_to_string().unwrap();
    assert!(raw.ends_with("data: [DONE]\n\n"), "{raw}");
    let (mut text, mut lps, mut usage) = (String::new(), vec![], Value::Null);
    for event in raw.trim_end().split("\n\n") {
        let payload = event.strip_prefix("data: ").unwrap();
        if payload == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(payload).unwrap();
        if !v["usage"].is_null() {
            usage = v["usage"].clone();
        }
        if let Some(c) = v["choices"].get(0) {
            text.push_str(c["delta"]["content"].as_str().unwrap_or(""));
            for t in c["logprobs"]["content"].as_array().into_iter().flatten() {
                lps.push(t["logprob"].as_f64().unwrap());
            }
        }
    }
    (text, lps, usage)
}

#[test]
fn sixty_four_clients_a_quarter_disconnecting() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("nano");
    let s = common::rlhf_bin()
        .args(["init", "--arch", "qwen2", "--preset", "nano", "--tokenizer"])
        .arg(common::fixture("qwen2"))
        .arg("--output_dir")
        .arg(&model)
        .output()
        .unwrap();
    assert!(s.status.success());
    let server = ServerProcess::start(["serve".as_ref(), "--model".as_ref(), model.as_os_str()]);
    let url = server.url.clone();
    let addr = url.strip_prefix("http://").unwrap().to_string();
    let pid = server.child.id();

    // Idle size: after a first burst of as many clients (lazy allocations, the
    // worker threads' stacks and heaps, the code the burst runs): what stays resident
    // after it is the server's working size, not the requests' state. Measured
    // against one warm-up request instead, the first burst's residue (4 to 5.6 MiB
    // here) sat at the bound below and failed it once when a burst grew little.
    let warm: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let url = url.clone();
            std::thread::spawn(move || streamed(&url, 1000 + i))
        })
        .collect();
    warm.into_iter().for_each(|h| {
        h.join().unwrap();
    });
    std::thread::sleep(Duration::from_millis(300));
    let idle = rss_kib(pid).expect("/proc/PID/status");

    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(idle));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (peak, stop) = (peak.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                if let Some(r) = rss_kib(pid) {
                    peak.fetch_max(r, std::sync::atomic::Ordering::SeqCst);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let handles: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let (url, addr) = (url.clone(), addr.clone());
            std::thread::spawn(move || {
                if i % 4 == 3 {
                    Err(disconnect_mid_stream(&addr, i))
                } else {
                    Ok(streamed(&url, i))
                }
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();

    // Everything drains: nothing running or waiting, the cache empty, and each
    // disconnected client's sequence cancelled or run to its end (it asked for 80
    // tokens).
    let deadline = Instant::now() + Duration::from_secs(60);
    let h = loop {
        let h = health(&url);
        if (h["running"] == 0 && h["waiting"] == 0) || Instant::now() > deadline {
            break h;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    sampler.join().unwrap();
    assert_eq!(h["running"], 0, "{h}");
    assert_eq!(h["cache_columns"], 0, "{h}");
    // A disconnecting client's sequence is cancelled when the server next writes to
    // the closed socket. On a loaded 2-core machine the sequence can end (its 80
    // tokens, or an end token) with every event already in the socket's buffer
    // before the client thread reads its two (seen once in CI: 15 of 16), and then
    // there is nothing left to cancel. So at least half of them, and never more
    // than the clients that left.
    let cancelled = h["cancelled"].as_u64().unwrap() as usize;
    assert!(
        (CLIENTS / 8..=CLIENTS / 4).contains(&cancelled),
        "{cancelled} cancelled of {} disconnecting clients: {h}",
        CLIENTS / 4
    );
    for r in &results {
        if let Err(events) = r {
            assert_eq!(
                *events, 2,
                "a disconnecting client read its two events first"
            );
        }
    }

    // Every finished request is what the same request gives alone, now that the
    // server is idle (same seed: the same tokens; the logprobs agree to float
    // rounding, since a batch sums in another order).
    for (i, r) in results.iter().enumerate() {
        let Ok((text, lps, usage)) = r else { continue };
        let (alone_text, alone_lps, alone_usage) = streamed(&url, i);
        assert_eq!(text, &alone_text, "request {i}");
        assert_eq!(usage, &alone_usage, "request {i}");
        assert_eq!(lps.len(), alone_lps.len(), "request {i}");
        for (a, b) in lps.iter().zip(&alone_lps) {
            assert!((a - b).abs() < 1e-3, "request {i}: logprob {a} vs {b}");
        }
        let completion = usage["completion_tokens"].as_u64().unwrap() as usize;
        assert!(completion == MAX_TOKENS || completion == lps.len() + 1);
    }

    // Memory: the engine hands freed memory back when it goes idle. "Near idle":
    // at most max(4 MiB, half the burst's growth) above the idle size (measured after
    // a first burst, above). With the hand-back disabled, after = peak, which this
    // bound refuses, as it would a leak of the requests' state.
    let peak = peak.load(std::sync::atomic::Ordering::SeqCst);
    let bound = idle + (4 * 1024).max((peak - idle) / 2);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut after = rss_kib(pid).unwrap();
    while after > bound && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        after = rss_kib(pid).unwrap();
    }
    println!("resident memory: idle {idle} KiB, peak {peak} KiB, after {after} KiB");
    assert!(
        after <= bound,
        "idle {idle} KiB, peak {peak} KiB, after {after} KiB"
    );

    // Still answering.
    let (text, _, usage) = streamed(&url, 5000);
    assert!(
        usage["completion_tokens"].as_u64().is_some_and(|n| n >= 1),
        "{text} {usage}"
    );
    assert_eq!(health(&url)["status"], "ok");
}
