//! The continuous-batching engine without HTTP: sequences packed into one KV row
//! compute what they compute alone, join and leave at step boundaries, a long prompt
//! is prefilled in chunks while the others keep decoding, a cancelled sequence
//! frees its columns, and a request's n choices share one prefill.

mod common;

use rlhf::serve::engine::{Delta, Engine, EngineConfig, Event, FinishReason, GenParams, Job};
use std::sync::atomic::Ordering;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

fn engine(max_batch: usize, prefill_chunk: usize) -> Engine {
    let pre = common::load_fixture("qwen2");
    rlhf::serve::engine_for(
        &pre,
        EngineConfig {
            max_batch,
            prefill_chunk,
        },
    )
}

fn params(max_tokens: usize, seed: u64) -> GenParams {
    GenParams {
        max_tokens,
        seed: Some(seed),
        logprobs: Some(2),
        ..GenParams::default()
    }
}

fn job(prompt: Vec<u32>, params: GenParams) -> (Job, UnboundedReceiver<Event>) {
    let (tx, rx) = unbounded_channel();
    (
        Job {
            prompt,
            params,
            n: 1,
            events: tx,
        },
        rx,
    )
}

/// Every delta received so far.
fn drain(rx: &mut UnboundedReceiver<Event>) -> Vec<Delta> {
    let mut out = vec![];
    while let Ok(e) = rx.try_recv() {
        match e {
            Event::Delta(d) => out.push(d),
            Event::Error(m) => panic!("engine error: {m}"),
        }
    }
    out
}

/// (text, [(token, logprob)], finish) of one finished choice.
fn result(deltas: &[Delta]) -> (String, Vec<(u32, f32)>, FinishReason) {
    let text = deltas.iter().map(|d| d.text.as_str()).collect();
    let lps = deltas
        .iter()
        .flat_map(|d| d.logprobs.iter().map(|l| (l.id, l.logprob)))
        .collect();
    let finish = deltas.last().and_then(|d| d.finish).expect("finished");
    (text, lps, finish)
}

fn run_to_end(e: &mut Engine) {
    while e.step().unwrap() {}
}

fn prompts() -> Vec<Vec<u32>> {
    vec![
        (10..17).collect(),
        (40..60).collect(),
        vec![7, 300, 8],
        (100..130).rev().collect(),
    ]
}

#[test]
fn packed_sequences_compute_what_they_compute_alone() {
    // Each prompt alone, then all four together, joining at different steps.
    let mut alone = vec![];
    for (i, p) in prompts().into_iter().enumerate() {
        let mut e = engine(8, 64);
        let (j, mut rx) = job(p, params(12, i as u64));
        e.add(j);
        run_to_end(&mut e);
        alone.push(result(&drain(&mut rx)));
    }
    let mut e = engine(8, 64);
    let mut rxs = vec![];
    for (i, p) in prompts().into_iter().enumerate() {
        let (j, rx) = job(p, params(12, i as u64));
        e.add(j);
        rxs.push(rx);
        // The next one joins while this one decodes.
        e.step().unwrap();
        e.step().unwrap();
    }
    run_to_end(&mut e);
    for (i, rx) in rxs.iter_mut().enumerate() {
        let (text, lps, finish) = result(&drain(rx));
        let (want_text, want_lps, want_finish) = &alone[i];
        assert_eq!(&finish, want_finish, "prompt {i}");
        assert_eq!(
            lps.iter().map(|l| l.0).collect::<Vec<_>>(),
            want_lps.iter().map(|l| l.0).collect::<Vec<_>>(),
            "prompt {i}: tokens differ"
        );
        // Bit for bit: the engine's products do not depend on the rows beside them
        // (`ops::with_row_independent_products`).
        assert_eq!(&lps, want_lps, "prompt {i}: logprobs differ");
        assert_eq!(&text, want_text, "prompt {i}");
    }
    assert_eq!(e.running(), 0);
    assert_eq!(e.stats().cache_columns.load(Ordering::SeqCst), 0);
}

#[test]
fn a_long_prompt_is_prefilled_in_chunks_while_others_decode() {
    let mut e = engine(8, 8);
    let (a, mut rx_a) = job(vec![5, 6, 7], params(40, 1));
    e.add(a);
    e.step().unwrap(); // a's prompt: its first token
    assert_eq!(drain(&mut rx_a).len(), 1);
    let long: Vec<u32> = (50..90).collect(); // 40 tokens: 5 chunks of 8
    let (b, mut rx_b) = job(long, params(3, 2));
    e.add(b);
    let mut steps_until_b = 0;
    let mut b_deltas = vec![];
    loop {
        e.step().unwrap();
        steps_until_b += 1;
        // a gets a token at every step while b prefills (one delta per token).
        let a_tokens = drain(&mut rx_a).len();
        b_deltas = drain(&mut rx_b);
        if !b_deltas.is_empty() {
            assert_eq!(a_tokens, 1);
            break;
        }
        assert_eq!(a_tokens, 1, "a stalled at step {steps_until_b}");
    }
    assert_eq!(steps_until_b, 5, "40 prompt tokens in chunks of 8");
    run_to_end(&mut e);
    b_deltas.extend(drain(&mut rx_b));
    let chunked = result(&b_deltas);

    // The same prompt prefilled in one forward, alone: the same bits.
    let mut whole = engine(8, 64);
    let (b, mut rx_b) = job((50..90).collect(), params(3, 2));
    whole.add(b);
    run_to_end(&mut whole);
    assert_eq!(chunked, result(&drain(&mut rx_b)));
}

#[test]
fn cancelled_and_finished_sequences_free_their_columns() {
    let mut e = engine(8, 64);
    let stats = e.stats();
    let mut keep = vec![];
    let mut cancel = vec![];
    for i in 0..6u64 {
        let (j, rx) = job(prompts()[i as usize % 4].clone(), params(30, i));
        e.add(j);
        if i % 2 == 0 {
            keep.push(rx);
        } else {
            cancel.push(rx);
        }
    }
    for _ in 0..3 {
        e.step().unwrap();
    }
    assert_eq!(e.running(), 6);
    let before = stats.cache_columns.load(Ordering::SeqCst);
    drop(cancel); // three clients go away
    e.step().unwrap();
    assert_eq!(e.running(), 3);
    run_to_end(&mut e);
    for rx in &mut keep {
        let (_, lps, finish) = result(&drain(rx));
        assert!(finish == FinishReason::Length || lps.len() < 30);
    }
    assert!(before > 0);
    assert_eq!(stats.cache_columns.load(Ordering::SeqCst), 0);
    assert_eq!(stats.running.load(Ordering::SeqCst), 0);
}

#[test]
fn n_choices_use_consecutive_seeds() {
    let mut e = engine(8, 64);
    let (tx, mut rx) = unbounded_channel();
    e.add(Job {
        prompt: vec![9, 10, 11],
        params: params(8, 40),
        n: 3,
        events: tx,
    });
    run_to_end(&mut e);
    let all = drain(&mut rx);
    let choice = |c: usize| {
        let ds: Vec<Delta> = all.iter().filter(|d| d.choice == c).cloned().collect();
        result(&ds)
    };
    // Choice 1 of seed 40 is choice 0 of seed 41.
    let mut e = engine(8, 64);
    let (j, mut rx41) = job(vec![9, 10, 11], params(8, 41));
    e.add(j);
    run_to_end(&mut e);
    assert_eq!(choice(1), result(&drain(&mut rx41)));
    assert_ne!(choice(0).1, choice(1).1);
    assert_ne!(choice(1).1, choice(2).1);
}

#[test]
fn n_choices_share_one_prefill_and_equal_separate_requests() {
    // A prompt longer than the chunk: three prefill steps, run once for all choices.
    let prompt: Vec<u32> = (20..40).collect();
    let mut e = engine(8, 8);
    let stats = e.stats();
    let (tx, mut rx) = unbounded_channel();
    e.add(Job {
        prompt: prompt.clone(),
        params: params(6, 70),
        n: 3,
        events: tx,
    });
    assert_eq!(e.running(), 3, "waiting choices count as running");
    run_to_end(&mut e);
    assert_eq!(stats.prefilled_tokens.load(Ordering::SeqCst), prompt.len());
    assert_eq!(stats.cache_columns.load(Ordering::SeqCst), 0);
    let all = drain(&mut rx);
    for c in 0..3 {
        let ds: Vec<Delta> = all.iter().filter(|d| d.choice == c).cloned().collect();
        // Choice c of seed 70 is what seed 70 + c gives alone, bit for bit.
        let mut alone = engine(8, 8);
        let (j, mut rx1) = job(prompt.clone(), params(6, 70 + c as u64));
        alone.add(j);
        run_to_end(&mut alone);
        assert_eq!(alone.stats().prefilled_tokens.load(Ordering::SeqCst), 20);
        assert_eq!(result(&ds), result(&drain(&mut rx1)), "choice {c}");
    }
}

#[test]
fn a_choice_that_ends_on_its_first_token_leaves_the_others_running() {
    // max_tokens 1 ends every choice at the prefill step; then 2 ends them one step on.
    for max_tokens in [1, 2] {
        let mut e = engine(8, 64);
        let (tx, mut rx) = unbounded_channel();
        e.add(Job {
            prompt: vec![9, 10, 11],
            params: params(max_tokens, 5),
            n: 4,
            events: tx,
        });
        run_to_end(&mut e);
        let all = drain(&mut rx);
        for c in 0..4 {
            let ds: Vec<Delta> = all.iter().filter(|d| d.choice == c).cloned().collect();
            assert!(ds.last().and_then(|d| d.finish).is_some(), "choice {c}");
            assert!(ds.last().unwrap().tokens <= max_tokens);
        }
        assert_eq!(e.running(), 0);
        assert_eq!(e.stats().cache_columns.load(Ordering::SeqCst), 0);
    }
}
