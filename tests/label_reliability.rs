//! 16 simulated labelers submit over HTTP while the server is killed with SIGKILL and
//! restarted, three times. Each labeler retries a failed submission with the same
//! client id until it is acknowledged. Afterwards every acknowledged label is in the
//! database, and none is stored twice.

mod common;

use common::server::ServerProcess;
use rlhf::label::store::{Kind, NewItem, Project, Store};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

const LABELERS: usize = 16;
const PER_LABELER: usize = 16;
const KILLS: usize = 4;

#[test]
fn acknowledged_labels_survive_sigkill_and_retries_are_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("labels.sqlite");
    let tokens: Vec<(String, String)> = {
        let mut s = Store::open(&db).unwrap();
        let items: Vec<NewItem> = (0..LABELERS * PER_LABELER)
            .map(|i| NewItem {
                prompt: json!(format!("prompt {i}")),
                source: json!({}),
                responses: (0..3)
                    .map(|j| (format!("r{i}.{j}"), "given".into()))
                    .collect(),
            })
            .collect();
        let p = Project {
            kind: Kind::Rank,
            k: 3,
            overlap: 2,
            guidelines: String::new(),
            models: vec!["given".into()],
            settings: json!({"salt": "1"}),
        };
        s.create_project(&p, &items).unwrap();
        (0..LABELERS)
            .map(|i| {
                let name = format!("sim{i:02}");
                let t = s.add_labeler(&name, false).unwrap();
                (name, t)
            })
            .collect()
    };
    let db_arg = db.to_str().unwrap().to_string();
    let start = || ServerProcess::start(["label", "serve", "--db", &db_arg]);
    let mut server = start();
    let url = Arc::new(RwLock::new(server.url.clone()));
    let deadline = Instant::now() + Duration::from_secs(300);
    let failed = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<Vec<(String, String, i64)>>> = Arc::default();

    let workers: Vec<_> = tokens
        .into_iter()
        .map(|(name, token)| {
            let (url, acked, failed) = (url.clone(), acked.clone(), failed.clone());
            std::thread::spawn(move || {
                let agent: ureq::Agent = ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .timeout_global(Some(Duration::from_secs(5)))
                    .build()
                    .into();
                let auth = format!("Bearer {token}");
                // Retries until a 2xx, re-reading the address (it changes on restart).
                let call = |post: Option<&Value>| -> (u16, Value) {
                    loop {
                        assert!(
                            Instant::now() < deadline,
                            "{name}: no answer before the deadline"
                        );
                        let base = url.read().unwrap().clone();
                        let r = match post {
                            Some(body) => agent
                                .post(&format!("{base}/api/labels"))
                                .header("authorization", &auth)
                                .send_json(body),
                            None => agent
                                .get(&format!("{base}/api/next"))
                                .header("authorization", &auth)
                                .call(),
                        };
                        match r {
                            Ok(mut r) if r.status().as_u16() < 500 => {
                                let s = r.status().as_u16();
                                return (s, r.body_mut().read_json().unwrap_or(Value::Null));
                            }
                            _ => std::thread::sleep(Duration::from_millis(20)),
                        }
                    }
                };
                for n in 0..PER_LABELER {
                    let (s, next) = call(None);
                    assert_eq!(s, 200, "{name}: {next}");
                    let Some(item) = next["item"]["id"].as_i64() else {
                        failed.store(true, Ordering::SeqCst);
                        panic!("{name}: ran out of items after {n}: {next}");
                    };
                    let client_id = format!("{name}-label-{n}");
                    let body = json!({"client_id": client_id, "item_id": item, "seconds": 1.0,
                                      "ranking": [n % 3, (n + 1) % 3, (n + 2) % 3]});
                    let (s, reply) = call(Some(&body));
                    if s != 200 {
                        failed.store(true, Ordering::SeqCst);
                        panic!("{name}: {body} → {s} {reply}");
                    }
                    acked.lock().unwrap().push((client_id, name.clone(), item));
                }
            })
        })
        .collect();

    // Kill the server while they work, and bring it back on the same database.
    for k in 0..KILLS {
        let before = acked.lock().unwrap().len();
        while acked.lock().unwrap().len() < before + 20 && !failed.load(Ordering::SeqCst) {
            assert!(Instant::now() < deadline, "no progress before kill {k}");
            std::thread::sleep(Duration::from_millis(10));
        }
        server.kill();
        server = start();
        *url.write().unwrap() = server.url.clone();
    }
    for w in workers {
        w.join().unwrap();
    }
    server.kill();

    let acked = acked.lock().unwrap().clone();
    assert_eq!(acked.len(), LABELERS * PER_LABELER);
    let store = Store::open(&db).unwrap();
    let labels = store.labels().unwrap();
    let stored: BTreeMap<&str, (&str, i64)> = labels
        .iter()
        .map(|l| (l.client_id.as_str(), (l.labeler.as_str(), l.item_id)))
        .collect();
    for (client_id, name, item) in &acked {
        assert_eq!(
            stored.get(client_id.as_str()),
            Some(&(name.as_str(), *item)),
            "{client_id} lost"
        );
    }
    // Nothing stored beyond what was acknowledged, and no (item, labeler) twice.
    assert_eq!(store.count_labels().unwrap(), (acked.len(), acked.len()));
    let pairs: BTreeSet<(i64, &str)> = labels
        .iter()
        .map(|l| (l.item_id, l.labeler.as_str()))
        .collect();
    assert_eq!(pairs.len(), labels.len());
    let mut per_item: BTreeMap<i64, usize> = BTreeMap::new();
    for l in &labels {
        *per_item.entry(l.item_id).or_default() += 1;
    }
    assert!(
        per_item.values().all(|&n| n <= 2),
        "an item went to more than 2 labelers"
    );
}
