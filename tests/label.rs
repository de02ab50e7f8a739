//! `rlhf label` without HTTP: the store (assignment with overlap, idempotent
//! submissions, undo, skips, leases), submissions' checks, and the export read back by
//! `rlhf rm train` and `rlhf sft` on the tiny fixtures; `rlhf generate
//! --num_return_sequences`.

mod common;

use rlhf::label::export::{export, Format};
use rlhf::label::store::{Kind, Labeler, NewItem, NewLabel, Project, Store};
use rlhf::label::submission::{check, Submission};
use rlhf::label::LabelError;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

fn project(kind: Kind, k: usize, overlap: usize) -> Project {
    Project {
        kind,
        k,
        overlap,
        guidelines: String::new(),
        models: match kind {
            Kind::Compare => vec!["A".into(), "B".into()],
            _ => vec!["given".into()],
        },
        settings: json!({"salt": "7"}),
    }
}

fn items(n: usize, k: usize) -> Vec<NewItem> {
    (0..n)
        .map(|i| NewItem {
            prompt: json!(format!("prompt {i}")),
            source: json!({}),
            responses: (0..k)
                .map(|j| (format!("answer {i}.{j}"), "given".into()))
                .collect(),
        })
        .collect()
}

fn store_with(dir: &Path, p: &Project, n: usize) -> Store {
    let mut s = Store::open(&dir.join("l.sqlite")).unwrap();
    s.create_project(p, &items(n, p.k)).unwrap();
    s
}

fn labeler(s: &mut Store, name: &str) -> Labeler {
    let token = s.add_labeler(name, false).unwrap();
    s.labeler_by_token(&token).unwrap().unwrap()
}

fn rank_label(client: &str, item: i64, ranking: Vec<u32>) -> NewLabel {
    NewLabel {
        client_id: client.into(),
        item_id: item,
        kind: "rank",
        payload: json!({"ranking": ranking, "scores": [null, null, null], "flags": [[], [], []]}),
        seconds: 1.5,
    }
}

const LEASE: f64 = 3600.0;

#[test]
fn each_item_goes_to_overlap_different_labelers_and_never_twice_to_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = store_with(dir.path(), &project(Kind::Rank, 3, 2), 5);
    let people: Vec<Labeler> = (0..4).map(|i| labeler(&mut s, &format!("l{i}"))).collect();
    let mut n = 0;
    // Round-robin until nobody gets anything: 5 items × overlap 2 = 10 labels.
    loop {
        let mut any = false;
        for (i, l) in people.iter().enumerate() {
            if let Some(item) = s.next_item(l, LEASE).unwrap() {
                // Asking again before answering gives the same item back.
                assert_eq!(s.next_item(l, LEASE).unwrap(), Some(item));
                n += 1;
                s.submit(
                    l,
                    &rank_label(&format!("client-{i}-{n}"), item, vec![0, 1, 2]),
                )
                .unwrap();
                any = true;
            }
        }
        if !any {
            break;
        }
    }
    let labels = s.labels().unwrap();
    assert_eq!(labels.len(), 10);
    let mut by_item: BTreeMap<i64, Vec<String>> = BTreeMap::new();
    for l in &labels {
        by_item
            .entry(l.item_id)
            .or_default()
            .push(l.labeler.clone());
    }
    assert_eq!(by_item.len(), 5);
    for (item, who) in &by_item {
        let distinct: BTreeSet<_> = who.iter().collect();
        assert_eq!((who.len(), distinct.len()), (2, 2), "item {item}: {who:?}");
    }
    for l in &people {
        assert_eq!(s.progress(l, LEASE).unwrap().remaining, 0);
    }
}

#[test]
fn a_skip_frees_the_slot_for_someone_else_but_not_for_the_skipper() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = store_with(dir.path(), &project(Kind::Rank, 3, 1), 1);
    let (a, b) = (labeler(&mut s, "a"), labeler(&mut s, "b"));
    let item = s.next_item(&a, LEASE).unwrap().unwrap();
    // Held by a: b gets nothing.
    assert_eq!(s.next_item(&b, LEASE).unwrap(), None);
    let skip = NewLabel {
        client_id: "skip-0001".into(),
        item_id: item,
        kind: "skip",
        payload: json!({"reason": "cannot judge"}),
        seconds: 2.0,
    };
    s.submit(&a, &skip).unwrap();
    assert_eq!(s.next_item(&a, LEASE).unwrap(), None);
    assert_eq!(s.next_item(&b, LEASE).unwrap(), Some(item));
}

#[test]
fn an_expired_lease_hands_the_item_on_and_the_first_holder_cannot_submit_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = store_with(dir.path(), &project(Kind::Rank, 3, 1), 2);
    let (a, b) = (labeler(&mut s, "a"), labeler(&mut s, "b"));
    let first = s.next_item(&a, LEASE).unwrap().unwrap();
    // With a zero lease a's hold has run out: b is given the same item.
    assert_eq!(s.next_item(&b, 0.0).unwrap(), Some(first));
    s.submit(&b, &rank_label("b-000001", first, vec![0, 1, 2]))
        .unwrap();
    // a comes back: the item is taken, a is moved on and may not submit it.
    let second = s.next_item(&a, 0.0).unwrap().unwrap();
    assert_ne!(second, first);
    let err = s
        .submit(&a, &rank_label("late-0001", first, vec![0, 1, 2]))
        .unwrap_err();
    assert!(matches!(err, LabelError::Conflict(_)), "{err}");
    assert_eq!(s.count_labels().unwrap(), (1, 1));
}

#[test]
fn a_late_answer_on_an_expired_hold_whose_slot_was_taken_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = store_with(dir.path(), &project(Kind::Rank, 3, 1), 2);
    let (a, b) = (labeler(&mut s, "a"), labeler(&mut s, "b"));
    let first = s.next_item(&a, LEASE).unwrap().unwrap();
    // a's page stays open past the lease (0 s here); b takes the slot and answers.
    assert_eq!(s.next_item(&b, 0.0).unwrap(), Some(first));
    s.submit_within(&b, &rank_label("b-000001", first, vec![0, 1, 2]), 0.0)
        .unwrap();
    // a submits without asking for a new item first: refused, the item keeps one label.
    let err = s
        .submit_within(&a, &rank_label("late-0001", first, vec![0, 1, 2]), 0.0)
        .unwrap_err();
    assert!(err.to_string().contains("expired"), "{err}");
    assert_eq!(s.count_labels().unwrap(), (1, 1));
    // Within the lease the same answer is taken.
    let dir2 = tempfile::tempdir().unwrap();
    let mut s2 = store_with(dir2.path(), &project(Kind::Rank, 3, 1), 2);
    let a2 = labeler(&mut s2, "a");
    let item = s2.next_item(&a2, LEASE).unwrap().unwrap();
    s2.submit_within(&a2, &rank_label("in-time-1", item, vec![0, 1, 2]), LEASE)
        .unwrap();
}

#[test]
fn a_client_id_reused_for_a_different_answer_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = store_with(dir.path(), &project(Kind::Rank, 3, 1), 2);
    let a = labeler(&mut s, "a");
    let item = s.next_item(&a, LEASE).unwrap().unwrap();
    s.submit(&a, &rank_label("same-id-01", item, vec![0, 1, 2]))
        .unwrap();
    // The first reply was lost; the labeler changed the ranking and sent it with the
    // same id: not a retry, and the stored answer is not silently kept.
    let err = s
        .submit(&a, &rank_label("same-id-01", item, vec![2, 1, 0]))
        .unwrap_err();
    assert!(err.to_string().contains("different submission"), "{err}");
}

#[test]
fn a_retried_submission_is_stored_once_and_undo_gives_the_item_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = store_with(dir.path(), &project(Kind::Rank, 3, 2), 2);
    let (a, b) = (labeler(&mut s, "a"), labeler(&mut s, "b"));
    let item = s.next_item(&a, LEASE).unwrap().unwrap();
    let label = rank_label("retry-0001", item, vec![1, 0, 2]);
    let first = s.submit(&a, &label).unwrap();
    let again = s.submit(&a, &label).unwrap();
    assert!(!first.duplicate && again.duplicate);
    assert_eq!(first.label_id, again.label_id);
    assert_eq!(s.count_labels().unwrap(), (1, 1));
    // Another labeler reusing the id, a second label for the item, an item never
    // assigned: all refused.
    s.next_item(&b, LEASE).unwrap();
    for (who, l) in [
        (&b, rank_label("retry-0001", item, vec![0, 1, 2])),
        (&a, rank_label("retry-0002", item, vec![0, 1, 2])),
        (&a, rank_label("retry-0003", 99, vec![0, 1, 2])),
    ] {
        let err = s.submit(who, &l).unwrap_err();
        assert!(matches!(err, LabelError::Conflict(_)), "{err}");
    }
    // a moves on to the other item, then undoes: the undone item comes back first.
    let other = s.next_item(&a, LEASE).unwrap().unwrap();
    assert_ne!(other, item);
    assert_eq!(s.undo_last(&a).unwrap(), item);
    assert_eq!(s.next_item(&a, LEASE).unwrap(), Some(item));
    assert_eq!(s.count_labels().unwrap(), (0, 1));
    s.submit(&a, &rank_label("retry-0004", item, vec![0, 1, 2]))
        .unwrap();
    assert_eq!(s.count_labels().unwrap(), (1, 2));
    let err = s.undo_last(&b).unwrap_err();
    assert!(err.to_string().contains("nothing") || err.to_string().contains("no submission"));
}

fn sub(v: Value) -> Submission {
    serde_json::from_value(v).unwrap()
}

#[test]
fn submissions_are_checked_against_the_project_with_the_field_named() {
    let rank = project(Kind::Rank, 3, 1);
    let base = json!({"client_id": "abcdefgh", "item_id": 1, "seconds": 2.5});
    let with = |extra: Value| {
        let mut v = base.clone();
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        sub(v)
    };
    let ok = check(
        &rank,
        &with(json!({"ranking": [0, 0, 1], "scores": [7, null, 1],
        "flags": [[], ["hallucination", "hallucination"], []]})),
        true,
    )
    .unwrap();
    // Ranks become "number strictly better"; a repeated flag is kept once.
    assert_eq!(ok.payload["ranking"], json!([0, 0, 2]));
    assert_eq!(ok.payload["flags"][1], json!(["hallucination"]));
    for (extra, field, says) in [
        (json!({"ranking": [0, 1]}), "ranking", "2 ranks for 3"),
        (json!({"ranking": [0, 1, 3]}), "ranking", "out of range"),
        (
            json!({"ranking": [1, 1, 1]}),
            "ranking",
            "ties every response",
        ),
        (
            json!({"ranking": [0, 1, 2], "scores": [8, null, null]}),
            "scores",
            "1 to 7",
        ),
        (
            json!({"ranking": [0, 1, 2], "flags": [["rude"], [], []]}),
            "flags",
            "unknown flag",
        ),
        (json!({"text": "x"}), "text", "does not apply"),
        (json!({}), "ranking", "missing"),
        (json!({"skip": "  "}), "skip", "reason"),
        (
            json!({"skip": "unsure", "ranking": [0, 1, 2]}),
            "ranking",
            "does not apply",
        ),
    ] {
        let err = check(&rank, &with(extra.clone()), true).unwrap_err();
        match &err {
            LabelError::Field { field: f, msg } => {
                assert_eq!(f, field, "{extra}: {err}");
                assert!(msg.contains(says), "{extra}: {msg}");
            }
            other => panic!("{extra}: {other}"),
        }
    }
    let mut bad_id = with(json!({"ranking": [0, 1, 2]}));
    bad_id.client_id = "x y".into();
    assert!(check(&rank, &bad_id, true)
        .unwrap_err()
        .to_string()
        .contains("client_id"));
    let mut bad_time = with(json!({"ranking": [0, 1, 2]}));
    bad_time.seconds = -1.0;
    assert!(check(&rank, &bad_time, true)
        .unwrap_err()
        .to_string()
        .contains("seconds"));
    // Compare: the side shown decides the winner.
    let cmp = project(Kind::Compare, 2, 1);
    let left = with(json!({"choice": "left"}));
    assert_eq!(check(&cmp, &left, true).unwrap().payload["winner"], "a");
    assert_eq!(check(&cmp, &left, false).unwrap().payload["winner"], "b");
    assert!(check(&cmp, &with(json!({"choice": "up"})), true).is_err());
    let demo = project(Kind::Demonstrate, 0, 1);
    assert_eq!(
        check(&demo, &with(json!({"text": "  Hello.  "})), true)
            .unwrap()
            .payload["text"],
        "Hello."
    );
}

fn run_ok(args: &[&str]) -> String {
    let o = common::rlhf_bin().args(args).output().unwrap();
    assert!(
        o.status.success(),
        "rlhf {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn write(path: &Path, rows: &[Value]) {
    let text: String = rows.iter().map(|r| r.to_string() + "\n").collect();
    std::fs::write(path, text).unwrap();
}

fn label_everything(
    db: &Path,
    names: &[&str],
    mut answer: impl FnMut(&str, &rlhf::label::store::Item) -> NewLabel,
) {
    let mut s = Store::open(db).unwrap();
    let people: Vec<Labeler> = names.iter().map(|n| labeler(&mut s, n)).collect();
    loop {
        let mut any = false;
        for l in &people {
            if let Some(id) = s.next_item(l, LEASE).unwrap() {
                let item = s.item(id).unwrap();
                s.submit(l, &answer(&l.name, &item)).unwrap();
                any = true;
            }
        }
        if !any {
            break;
        }
    }
}

#[test]
fn rank_export_is_read_by_rm_train_and_consensus_is_borda() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let prompts = d.join("prompts.jsonl");
    write(
        &prompts,
        &[
            json!({"prompt": [{"role": "user", "content": "Name a colour."}]}),
            json!({"prompt": [{"role": "user", "content": "Say hello."}]}),
        ],
    );
    let db = d.join("rank.sqlite");
    let qwen = common::fixture("qwen2");
    let out = run_ok(&[
        "label",
        "new",
        "--db",
        db.to_str().unwrap(),
        "--kind",
        "rank",
        "--model",
        qwen.to_str().unwrap(),
        "--prompts",
        prompts.to_str().unwrap(),
        "--k",
        "3",
        "--overlap",
        "2",
        "--max_new_tokens",
        "6",
        "--seed",
        "1",
    ]);
    assert!(out.contains("?token="), "{out}");
    {
        let s = Store::open(&db).unwrap();
        let items = s.items().unwrap();
        assert_eq!(items.len(), 2);
        assert!(items.iter().all(|i| i.responses.len() == 3));
    }
    // ann ranks in order; bob reverses the last two and ties the first two.
    let mut n = 0;
    label_everything(&db, &["ann", "bob"], |who, item| {
        n += 1;
        let ranking = if who == "ann" {
            vec![0, 1, 2]
        } else {
            vec![0, 0, 2]
        };
        NewLabel {
            client_id: format!("c-{who}-{n}-xx"),
            item_id: item.id,
            kind: "rank",
            payload: json!({"ranking": ranking, "scores": [7, 4, null], "flags": [[], ["hallucination"], []]}),
            seconds: 3.0,
        }
    });
    let s = Store::open(&db).unwrap();
    let rows = export(&s, Format::Rankings, false).unwrap();
    assert_eq!(rows.len(), 2);
    // Borda: ann [2, 1, 0] points, bob [1.5, 1.5, 0] → 3.5, 2.5, 0 → [0, 1, 2].
    for r in &rows {
        assert_eq!(r["ranking"], json!([0, 1, 2]));
        assert_eq!(r["scores"], json!([7.0, 4.0, null]));
        assert_eq!(r["flags"][1], json!({"hallucination": 2}));
        assert_eq!(r["labelers"], json!(["ann", "bob"]));
    }
    assert_eq!(export(&s, Format::Rankings, true).unwrap().len(), 4);
    // ann: 3 strict pairs per item, bob: 2 → 10 pairs per labeler row; consensus 3 each.
    assert_eq!(export(&s, Format::Pairs, true).unwrap().len(), 10);
    assert_eq!(export(&s, Format::Pairs, false).unwrap().len(), 6);
    let err = export(&s, Format::Sft, false).unwrap_err().to_string();
    assert!(err.contains("needs a demonstrate project"), "{err}");

    // The files as `label export` writes them go into `rm train` as they are.
    for (format, extra) in [("rankings", None), ("pairs", Some("--per_labeler"))] {
        let file = d.join(format!("{format}.jsonl"));
        let mut args = vec![
            "label",
            "export",
            "--db",
            db.to_str().unwrap(),
            "--format",
            format,
            "--output",
            file.to_str().unwrap(),
        ];
        args.extend(extra);
        run_ok(&args);
        let rm_out = d.join(format!("rm-{format}"));
        run_ok(&[
            "rm",
            "train",
            "--model",
            qwen.to_str().unwrap(),
            "--data",
            file.to_str().unwrap(),
            "--output_dir",
            rm_out.to_str().unwrap(),
            "--max_steps",
            "1",
            "--prompts_per_batch",
            "2",
        ]);
        assert!(rm_out.join("model.safetensors").exists());
        let eval: Value = serde_json::from_str(&run_ok(&[
            "rm",
            "eval",
            "--model",
            rm_out.to_str().unwrap(),
            "--data",
            file.to_str().unwrap(),
        ]))
        .unwrap();
        let pairs = if format == "rankings" { 6 } else { 10 };
        assert_eq!(eval["pairs"], pairs, "{eval}");
    }
}

#[test]
fn demonstrations_export_into_sft_and_comparisons_into_pairs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let gpt2 = common::fixture("gpt2");
    // Demonstrations: a text prompt and a conversation.
    let prompts = d.join("p.jsonl");
    write(
        &prompts,
        &[
            json!({"prompt": "Write a greeting."}),
            json!({"messages": [{"role": "user", "content": "Hi?"}]}),
        ],
    );
    let db = d.join("demo.sqlite");
    run_ok(&[
        "label",
        "new",
        "--db",
        db.to_str().unwrap(),
        "--kind",
        "demonstrate",
        "--prompts",
        prompts.to_str().unwrap(),
    ]);
    let mut n = 0;
    label_everything(&db, &["ann"], |_, item| {
        n += 1;
        NewLabel {
            client_id: format!("demo-{n}-xxxx"),
            item_id: item.id,
            kind: "demonstrate",
            payload: json!({"text": format!("Hello number {n}.")}),
            seconds: 9.0,
        }
    });
    let sft_file = d.join("sft.jsonl");
    run_ok(&[
        "label",
        "export",
        "--db",
        db.to_str().unwrap(),
        "--format",
        "sft",
        "--output",
        sft_file.to_str().unwrap(),
    ]);
    let rows: Vec<Value> = std::fs::read_to_string(&sft_file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["completion"], "Hello number 1.");
    assert_eq!(
        rows[1]["completion"],
        json!([{"role": "assistant", "content": "Hello number 2."}])
    );
    let qwen = common::fixture("qwen2");
    let sft_out = d.join("sft-out");
    run_ok(&[
        "sft",
        "--model",
        qwen.to_str().unwrap(),
        "--data",
        sft_file.to_str().unwrap(),
        "--output_dir",
        sft_out.to_str().unwrap(),
        "--max_steps",
        "1",
    ]);
    assert!(sft_out.join("model.safetensors").exists());

    // Comparisons: two models, one sample each; the verdicts export as pairs.
    let cmp_prompts = d.join("c.jsonl");
    write(
        &cmp_prompts,
        &(0..4)
            .map(|i| json!({"prompt": format!("Count to {i}.")}))
            .collect::<Vec<_>>(),
    );
    let cdb = d.join("cmp.sqlite");
    run_ok(&[
        "label",
        "new",
        "--db",
        cdb.to_str().unwrap(),
        "--kind",
        "compare",
        "--model",
        gpt2.to_str().unwrap(),
        "--model",
        gpt2.to_str().unwrap(),
        "--prompts",
        cmp_prompts.to_str().unwrap(),
        "--max_new_tokens",
        "5",
    ]);
    let mut n = 0;
    label_everything(&cdb, &["ann"], |_, item| {
        n += 1;
        let winner = ["a", "a", "b", "tie"][n - 1];
        NewLabel {
            client_id: format!("cmp-{n}-xxxx"),
            item_id: item.id,
            kind: "compare",
            payload: json!({"choice": "left", "a_on_left": true, "winner": winner}),
            seconds: 1.0,
        }
    });
    let s = Store::open(&cdb).unwrap();
    let cmp = export(&s, Format::Compare, false).unwrap();
    assert_eq!(cmp.len(), 4);
    assert_eq!(cmp[0]["model_a"], gpt2.display().to_string());
    let pairs = export(&s, Format::Pairs, false).unwrap();
    assert_eq!(pairs.len(), 3);
    assert_eq!(pairs[2]["chosen"], cmp[2]["response_b"]);
    let stats = rlhf::label::stats::admin_stats(&s).unwrap();
    let w = stats.win_rate.unwrap();
    assert_eq!((w.a_wins, w.b_wins, w.ties), (2, 1, 1));
    assert!((w.a_win_rate.unwrap() - 2.5 / 4.0).abs() < 1e-12);
    let (lo, hi) = w.interval_95.unwrap();
    assert!(lo < 0.625 && 0.625 < hi);
    // One labeler per item here: the interval counts the 4 items.
    let (wlo, whi) = rlhf::label::agreement::wilson_interval(0.625, 4.0, 1.959_963_984_540_054);
    assert!((lo - wlo).abs() < 1e-12 && (hi - whi).abs() < 1e-12);
}

#[test]
fn bad_project_input_names_the_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let prompts = d.join("p.jsonl");
    write(
        &prompts,
        &[
            json!({"prompt": "a", "responses": ["x", "y"]}),
            json!({"prompt": "b", "responses": ["x"]}),
        ],
    );
    let db = d.join("l.sqlite");
    let o = common::rlhf_bin()
        .args([
            "label",
            "new",
            "--db",
            db.to_str().unwrap(),
            "--kind",
            "rank",
            "--k",
            "2",
            "--prompts",
            prompts.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("p.jsonl:2") && err.contains("\"responses\" has 1 responses, expected 2"),
        "{err}"
    );
    for (args, says) in [
        (vec!["--kind", "rank", "--k", "1"], "--k must be ≥ 2"),
        (vec!["--kind", "compare", "--model", "x"], "--model twice"),
        (
            vec!["--kind", "rank", "--overlap", "0"],
            "--overlap must be ≥ 1",
        ),
    ] {
        let o = common::rlhf_bin()
            .args([
                "label",
                "new",
                "--db",
                db.to_str().unwrap(),
                "--prompts",
                prompts.to_str().unwrap(),
            ])
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
    }
    let o = common::rlhf_bin()
        .args([
            "label",
            "export",
            "--db",
            d.join("none.sqlite").to_str().unwrap(),
            "--format",
            "rankings",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no such labeling database"));
}

#[test]
fn generate_draws_k_samples_per_prompt_in_one_call() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("p.jsonl");
    write(
        &prompts,
        &[
            json!({"prompt": "Hello", "id": "a"}),
            json!({"prompt": "World", "id": "b"}),
        ],
    );
    let gpt2 = common::fixture("gpt2");
    let out = run_ok(&[
        "generate",
        "--model",
        gpt2.to_str().unwrap(),
        "--prompts",
        prompts.to_str().unwrap(),
        "--num_return_sequences",
        "3",
        "--max_new_tokens",
        "4",
        "--batch_size",
        "1",
    ]);
    let rows: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 6);
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(r["prompt_index"], i / 3);
        assert_eq!(r["sample_index"], i % 3);
        assert_eq!(r["id"], ["a", "b"][i / 3]);
        assert_eq!(
            r["token_ids"].as_array().unwrap().len(),
            r["logprobs"].as_array().unwrap().len()
        );
    }
    // The samples of a prompt differ (temperature 1 over a random model's vocabulary).
    let texts: BTreeSet<String> = rows[..3]
        .iter()
        .map(|r| r["token_ids"].to_string())
        .collect();
    assert!(texts.len() > 1, "{texts:?}");
}
