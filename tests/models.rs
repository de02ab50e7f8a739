//! Golden tests against transformers (fixtures from tools/make_fixtures.py), KV-cache
//! and padding equivalences, save/load round trips and gradients through every block.

mod common;

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use common::{ids_of, load_fixture, max_abs_diff, reference, FAMILIES};
use rlhf::generate::{generate, FinishReason, SamplingParams};
use rlhf::model::hf::{load_pretrained, save_pretrained};
use rlhf::model::{AttentionMask, CausalLm};

/// Full-sequence logits for one unpadded sequence: (T, V).
fn logits_alone(model: &CausalLm, ids: &[u32]) -> Vec<Vec<f32>> {
    let t = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let mask = AttentionMask::full(&[vec![1; ids.len()]], &Device::Cpu).unwrap();
    model
        .forward(&t, &mask, None)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap()
}

#[test]
fn logits_match_transformers() {
    for name in FAMILIES {
        let pre = load_fixture(name);
        for case in reference(name)["logits"].as_array().unwrap() {
            let ids = ids_of(&case["input_ids"]);
            let expected: Vec<Vec<f32>> = serde_json::from_value(case["logits"].clone()).unwrap();
            let got = logits_alone(&pre.model, &ids);
            let diff = max_abs_diff(&got, &expected);
            assert!(diff <= 1e-4, "{name}: max abs diff {diff}");
        }
    }
}

#[test]
fn greedy_continuations_match_transformers() {
    for name in FAMILIES {
        common::assert_greedy_matches_reference(name, &load_fixture(name));
    }
}

#[test]
fn kv_cache_steps_equal_full_forward() {
    for name in FAMILIES {
        let pre = load_fixture(name);
        let ids: Vec<u32> = (0..12).map(|i| (i * 37 + 5) % 300).collect();
        let full = logits_alone(&pre.model, &ids);
        let mut cache = pre.model.new_cache();
        // Prefill 5 tokens, then one at a time.
        let mut stepped: Vec<Vec<f32>> = vec![];
        let mut pos = 0;
        for len in [5, 1, 1, 1, 1, 1, 1, 1] {
            let chunk = &ids[pos..pos + len];
            let t = Tensor::new(chunk, &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let mask = AttentionMask::new(&[vec![1; pos + len]], len, &Device::Cpu).unwrap();
            let out = pre.model.forward(&t, &mask, Some(&mut cache)).unwrap();
            stepped.extend(out.squeeze(0).unwrap().to_vec2::<f32>().unwrap());
            pos += len;
        }
        assert_eq!(cache.seq_len(), 12);
        let diff = max_abs_diff(&stepped, &full);
        assert!(diff <= 1e-4, "{name}: cached vs full {diff}");
    }
}

#[test]
fn left_padded_batch_equals_each_sequence_alone() {
    for name in FAMILIES {
        let pre = load_fixture(name);
        let seqs: Vec<Vec<u32>> = vec![vec![5, 17, 42], vec![9, 8, 7, 6, 5, 4, 3], vec![100]];
        let width = 7;
        let pad = pre.tokenizer.pad_token_id();
        let mut ids = vec![];
        let mut mask = vec![];
        for s in &seqs {
            ids.extend(std::iter::repeat_n(pad, width - s.len()).chain(s.iter().copied()));
            mask.push([vec![0u8; width - s.len()], vec![1u8; s.len()]].concat());
        }
        let t = Tensor::from_vec(ids, (3, width), &Device::Cpu).unwrap();
        let m = AttentionMask::full(&mask, &Device::Cpu).unwrap();
        let batch = pre.model.forward(&t, &m, None).unwrap();
        for (b, s) in seqs.iter().enumerate() {
            let alone = logits_alone(&pre.model, s);
            let rows: Vec<Vec<f32>> = batch
                .get(b)
                .unwrap()
                .narrow(0, width - s.len(), s.len())
                .unwrap()
                .to_vec2()
                .unwrap();
            let diff = max_abs_diff(&rows, &alone);
            assert!(diff <= 1e-4, "{name} row {b}: {diff}");
        }
        // The same holds through batched generation: each prompt's greedy completion
        // equals its completion alone.
        let params = SamplingParams {
            max_new_tokens: 8,
            temperature: 0.0,
            ..Default::default()
        };
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let together = generate(&pre.model, &pre.tokenizer, &seqs, &params, &mut rng).unwrap();
        assert_eq!(
            together.len(),
            seqs.len(),
            "{name}: one completion per prompt"
        );
        for (s, c) in seqs.iter().zip(&together) {
            let alone = generate(
                &pre.model,
                &pre.tokenizer,
                std::slice::from_ref(s),
                &params,
                &mut rng,
            )
            .unwrap();
            assert_eq!(c.tokens, alone[0].tokens, "{name}");
        }
    }
}

#[test]
fn save_then_load_is_bit_identical() {
    for name in FAMILIES {
        let pre = load_fixture(name);
        let dir = tempfile::tempdir().unwrap();
        save_pretrained(&pre, dir.path()).unwrap();
        let back = load_pretrained(dir.path(), &Device::Cpu).unwrap();
        let (va, vb) = (pre.model.params.vars(), back.model.params.vars());
        assert_eq!(va.len(), vb.len(), "{name}: parameter count");
        for ((spec, a), (spec_b, b)) in va.iter().zip(vb) {
            assert_eq!(spec.name, spec_b.name, "{name}");
            let a: Vec<f32> = a.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            let b: Vec<f32> = b.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(a.len(), b.len(), "{name}: {}", spec.name);
            assert!(
                a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{name}: {}",
                spec.name
            );
        }
        assert_eq!(back.eos_token_ids, pre.eos_token_ids, "{name}");
        assert_eq!(
            back.tokenizer
                .chat_template()
                .map(|t| t.source().to_string()),
            pre.tokenizer
                .chat_template()
                .map(|t| t.source().to_string())
        );
        // The safetensors header carries the metadata transformers requires.
        let bytes = std::fs::read(dir.path().join("model.safetensors")).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(meta.metadata().as_ref().unwrap()["format"], "pt");
    }
}

#[test]
fn every_parameter_gets_a_finite_nonzero_gradient() {
    for name in FAMILIES {
        let pre = load_fixture(name);
        let ids = Tensor::new(
            &[[3u32, 14, 15, 92, 65, 35], [0, 0, 27, 18, 28, 18]],
            &Device::Cpu,
        )
        .unwrap();
        let mask =
            AttentionMask::full(&[vec![1; 6], vec![0, 0, 1, 1, 1, 1]], &Device::Cpu).unwrap();
        let logits = pre.model.forward(&ids, &mask, None).unwrap(); // (B, T, V)
                                                                    // A loss that touches every position and vocabulary entry non-trivially.
        let weights = Tensor::rand(0f32, 1f32, logits.dims(), &Device::Cpu).unwrap();
        let loss = (logits.sqr().unwrap() * weights)
            .unwrap()
            .mean_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        for (spec, var) in pre.model.params.vars() {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient for {}", spec.name));
            let g = g
                .to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            assert!(
                g.iter().all(|x| x.is_finite()),
                "{name}: non-finite gradient for {}",
                spec.name
            );
            assert!(
                g.iter().any(|&x| x != 0.0),
                "{name}: zero gradient for {}",
                spec.name
            );
        }
    }
}

#[test]
fn sampling_is_reproducible_and_reports_finish_reasons() {
    let pre = load_fixture("qwen2");
    let prompts = vec![vec![5u32, 6, 7], vec![10, 11]];
    let params = SamplingParams {
        max_new_tokens: 10,
        temperature: 1.0,
        top_p: 0.9,
        eos_token_ids: pre.eos_token_ids.clone(),
        ..Default::default()
    };
    let run = |seed| {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        generate(&pre.model, &pre.tokenizer, &prompts, &params, &mut rng).unwrap()
    };
    let (a, b) = (run(11), run(11));
    assert_eq!(a, b);
    for c in &a {
        assert_eq!(c.tokens.len(), c.logprobs.len());
        assert!(c.logprobs.iter().all(|&l| l <= 0.0 && l.is_finite()));
        match c.finish_reason {
            FinishReason::Eos => assert!(pre.eos_token_ids.contains(c.tokens.last().unwrap())),
            FinishReason::Length => assert_eq!(c.tokens.len(), 10),
            FinishReason::Stop => unreachable!("no stop strings given"),
        }
    }
}

#[test]
fn stop_strings_end_generation_and_cut_the_text() {
    let pre = load_fixture("gpt2");
    let prompt = pre.tokenizer.encode("The cat sat on", true).unwrap();
    let params = SamplingParams {
        max_new_tokens: 20,
        temperature: 0.0,
        ..Default::default()
    };
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let free = generate(
        &pre.model,
        &pre.tokenizer,
        std::slice::from_ref(&prompt),
        &params,
        &mut rng,
    )
    .unwrap();
    let text = &free[0].text;
    assert!(text.chars().count() >= 4, "{text:?}");
    // Stop on a piece of what greedy decoding produces anyway.
    let stop: String = text.chars().skip(2).take(2).collect();
    let params = SamplingParams {
        stop_strings: vec![stop.clone()],
        ..params
    };
    let cut = generate(&pre.model, &pre.tokenizer, &[prompt], &params, &mut rng).unwrap();
    assert_eq!(cut[0].finish_reason, FinishReason::Stop);
    assert!(!cut[0].text.contains(&stop));
    assert!(text.starts_with(&cut[0].text));
    assert!(cut[0].tokens.len() < free[0].tokens.len());
}

/// An RL method's log-probs are those of the distribution its samples came from:
/// softmax(logits / T) at the sampling temperature T, as TRL computes them.
#[test]
fn response_logprobs_follow_the_sampling_temperature() {
    use rlhf::model::response::{logprobs_of, response_logprobs, ResponseBatch};
    let pre = common::load_fixture("qwen2");
    let (prompt, response) = (vec![5u32, 9, 13], vec![17u32, 4, 250]);
    let rows = [(prompt.as_slice(), response.as_slice())];
    let ids = candle_core::Tensor::new(&[[5u32, 9, 13, 17, 4]], &candle_core::Device::Cpu).unwrap();
    let mask =
        rlhf::model::AttentionMask::full(&[vec![1u8; 5]], &candle_core::Device::Cpu).unwrap();
    let logits: Vec<Vec<f32>> = pre
        .model
        .forward(&ids, &mask, None)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap();
    for t in [1.0f32, 0.7, 2.0] {
        let batch = ResponseBatch::new(&rows, 0, &candle_core::Device::Cpu)
            .unwrap()
            .with_temperature(t);
        let (lp, _) = logprobs_of(&pre.model, &batch, false).unwrap();
        let lp: Vec<f32> = lp.to_vec1().unwrap();
        let (detached, _) = response_logprobs(&pre.model, &batch, false).unwrap();
        for (j, &tok) in response.iter().enumerate() {
            let row: Vec<f32> = logits[2 + j].iter().map(|x| x / t).collect();
            let want = rlhf::generate::log_softmax_at(&row, tok as usize);
            assert!(
                (lp[j] - want).abs() < 1e-4,
                "T={t} token {j}: {} vs {want}",
                lp[j]
            );
            assert!((detached[0][j] - want).abs() < 1e-4, "T={t} token {j}");
        }
    }
}

/// With a stream per row, a prompt's sampled tokens do not depend on the other rows
/// of its batch (what lets data-parallel PPO sample what one process samples): each
/// prompt alone, with its stream, gives the tokens it gets in a batch of six rows of
/// three prompts of different lengths (so with left padding, and repeated prompts
/// computed once); with one shared stream they differ.
#[test]
fn a_stream_per_row_samples_the_same_tokens_in_any_batch() {
    use rlhf::generate::generate_per_row;
    use rlhf::rollout::sample_stream;
    let pre = load_fixture("qwen2");
    let prompts: Vec<Vec<u32>> = ["The cat sat on", "Hello", "A dog ran to the park and"]
        .iter()
        .map(|p| pre.tokenizer.encode(p, true).unwrap())
        .collect();
    let params = SamplingParams {
        max_new_tokens: 12,
        temperature: 1.0,
        ..Default::default()
    };
    let streams = |positions: &[usize]| -> Vec<ChaCha8Rng> {
        positions.iter().map(|&g| sample_stream(9, g)).collect()
    };
    // Repeated prompts (computed once, each row with a copy of its prompt's cache)
    // still sample with their own streams.
    let repeated: Vec<Vec<u32>> = [0, 1, 0, 2, 1, 0]
        .iter()
        .map(|&i| prompts[i].clone())
        .collect();
    let batch = generate_per_row(
        &pre.model,
        &pre.tokenizer,
        &repeated,
        &params,
        &mut streams(&[0, 1, 2, 3, 4, 5]),
    )
    .unwrap();
    assert_ne!(
        batch[0].tokens, batch[2].tokens,
        "two samples of one prompt"
    );
    for (g, prompt) in repeated.iter().enumerate() {
        let alone = generate_per_row(
            &pre.model,
            &pre.tokenizer,
            std::slice::from_ref(prompt),
            &params,
            &mut streams(&[g]),
        )
        .unwrap();
        assert_eq!(alone[0].tokens, batch[g].tokens, "prompt {g}");
        assert!(batch[g].tokens.len() >= 2);
    }
    // One stream for the batch: row 1 draws after row 0 at every step.
    let shared = generate(
        &pre.model,
        &pre.tokenizer,
        &prompts,
        &params,
        &mut sample_stream(9, 0),
    )
    .unwrap();
    assert_eq!(shared[0].tokens.first(), batch[0].tokens.first());
    assert_ne!(
        shared.iter().map(|c| c.tokens.clone()).collect::<Vec<_>>(),
        [0, 1, 3].map(|b| batch[b].tokens.clone())
    );
    // The number of streams must match the number of prompts.
    let err = generate_per_row(
        &pre.model,
        &pre.tokenizer,
        &prompts,
        &params,
        &mut streams(&[0, 1]),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("2 random streams for 3 prompts"),
        "{err}"
    );
}

/// Prompt + response rows of mixed lengths, some beginning alike: three responses to
/// one prompt (two of them also sharing their first two tokens), an exact repeat, and
/// a row that is another's prefix.
fn rows_sharing_prefixes() -> Vec<(Vec<u32>, Vec<u32>)> {
    vec![
        (vec![5, 9, 13, 21, 2, 8], vec![17, 4, 250, 7]),
        (vec![3], vec![11, 12]),
        (vec![40, 41], vec![42]),
        (vec![7, 7, 7], vec![9, 9, 9, 9, 9, 9]),
        (vec![100], vec![101]),
        (vec![5, 9, 13, 21, 2, 8], vec![17, 4, 99]),
        (vec![5, 9, 13, 21, 2, 8], vec![3]),
        (vec![7, 7, 7], vec![9, 9, 9, 9, 9, 9]),
        (vec![40, 41], vec![42, 43, 44]),
    ]
}

/// A batch of rows of mixed lengths is packed (short rows share a row of the batch,
/// rows that begin alike share that prefix) and each row still gets what it gets
/// alone: log-probs under the LM, with and without a graph, and the reward model's
/// score at its last token, in every family (learned positions and rotary ones).
#[test]
fn a_packed_batch_scores_each_row_as_it_scores_alone() {
    use rlhf::model::response::{logprobs_of, response_logprobs, ResponseBatch};
    use rlhf::model::scalar::load_scalar;
    let dev = Device::Cpu;
    let rows = rows_sharing_prefixes();
    let refs: Vec<(&[u32], &[u32])> = rows.iter().map(|(p, r)| (&p[..], &r[..])).collect();
    let tokens: usize = rows.iter().map(|(p, r)| p.len() + r.len()).sum();
    for family in FAMILIES {
        let pre = load_fixture(family);
        let batch = ResponseBatch::new(&refs, 0, &dev).unwrap();
        let (packed_rows, width) = batch.ids.dims2().unwrap();
        assert!(
            packed_rows * width < rows.len() * 10,
            "{family}: {packed_rows} rows of {width} for {} sequences of at most 10",
            rows.len()
        );
        // Real slots (a query that sees a key): fewer than the rows' tokens, since
        // shared prefixes are laid once.
        let real = (0..packed_rows)
            .flat_map(|b| (0..width).map(move |t| (b, t)))
            .filter(|&(b, t)| batch.mask.causal.visible(b, t).next().is_some())
            .count();
        // Laid once: the prompt of 6 by two of its three rows, the repeated row of 9,
        // and the row of 3 that begins another.
        assert_eq!(
            real,
            tokens - 2 * 6 - 9 - 3,
            "{family}: shared prefixes laid once"
        );
        assert_eq!(batch.mask.sequences, rows.len());
        let (graph, _) = logprobs_of(&pre.model, &batch, false).unwrap();
        let graph = batch.split(&graph).unwrap();
        let (detached, _) = response_logprobs(&pre.model, &batch, false).unwrap();
        for (i, row) in refs.iter().enumerate() {
            let alone = ResponseBatch::new(std::slice::from_ref(row), 0, &dev).unwrap();
            let (want, _) = response_logprobs(&pre.model, &alone, false).unwrap();
            for (got, what) in [(&graph[i], "graph"), (&detached[i], "detached")] {
                assert_eq!(got.len(), want[0].len());
                for (a, b) in got.iter().zip(&want[0]) {
                    assert!((a - b).abs() < 1e-5, "{family} {what} row {i}: {a} vs {b}");
                }
            }
        }
        let rm = load_scalar(&common::fixture(family), &dev, 0).unwrap();
        let seqs: Vec<Vec<u32>> = rows
            .iter()
            .map(|(p, r)| [&p[..], &r[..]].concat())
            .collect();
        let before = rm.model.sequences_forwarded.get();
        let scores: Vec<f32> = rm.model.score_last(&seqs, 0).unwrap().to_vec1().unwrap();
        assert_eq!(rm.model.sequences_forwarded.get() - before, seqs.len());
        for (i, s) in seqs.iter().enumerate() {
            let alone: Vec<f32> = rm
                .model
                .score_last(std::slice::from_ref(s), 0)
                .unwrap()
                .to_vec1()
                .unwrap();
            assert!(
                (scores[i] - alone[0]).abs() < 1e-5,
                "{family} score {i}: {} vs {}",
                scores[i],
                alone[0]
            );
        }
    }
}

/// The causal-LM loss of a batch whose rows (single examples and rows of several)
/// are packed into fewer rows, rows that begin alike sharing that prefix, equals the
/// sum of each row's loss alone, and so do its gradients, in every family.
#[test]
fn a_packed_lm_batch_has_the_loss_and_gradients_of_its_rows_alone() {
    use rlhf::data::sft::SftExample;
    use rlhf::train::lm_task::{lm_loss_sum, pack, packed_batch, Row};
    let ex = |ids: &[u32], mask: &[u8]| SftExample {
        ids: ids.to_vec(),
        loss_mask: mask.to_vec(),
    };
    let mut rows = pack(
        vec![ex(&[5, 9, 13], &[0, 1, 1]), ex(&[21, 2, 8], &[1, 1, 1])],
        8,
    ); // one row of two examples
    rows.push(Row::single(ex(
        &[1, 2, 3, 4, 5, 6, 7],
        &[0, 0, 1, 1, 1, 1, 1],
    )));
    rows.push(Row::single(ex(&[40, 41], &[0, 1])));
    rows.push(Row::single(ex(&[70, 71, 72, 73, 74], &[1, 1, 1, 1, 1])));
    // Rows beginning alike (laid once): the prefix's last position has a target of
    // its own in each (21 and 40), and a repeat of the first.
    rows.push(Row::single(ex(&[5, 9, 13, 21], &[0, 0, 1, 1])));
    rows.push(Row::single(ex(&[5, 9, 13, 40, 41], &[0, 0, 1, 1, 1])));
    rows.push(Row::single(ex(&[5, 9, 13, 21], &[0, 0, 1, 1])));
    let refs: Vec<&Row> = rows.iter().collect();
    // The batch really shares: the three rows beginning 5 9 13 lay it once (6 of 33
    // tokens saved, above the 1/16 threshold); the row of two examples, which begins
    // alike too, stays whole.
    let packed = packed_batch(&refs, 0, &Device::Cpu).unwrap();
    let s = &packed.spans;
    assert_eq!(s[0].shared, 0);
    assert!(
        s[4..7]
            .iter()
            .all(|x| x.shared == 3 && x.prefix == s[4].prefix),
        "{s:?}"
    );
    for family in FAMILIES {
        let pre = load_fixture(family);
        let (sum, n, tokens) = lm_loss_sum(&pre.model, 0, &refs).unwrap();
        assert_eq!(tokens, 6 + 7 + 2 + 5 + 4 + 5 + 4);
        let mut want_n = 0;
        let alone: Vec<Tensor> = refs
            .iter()
            .map(|row| {
                let (s, k, _) = lm_loss_sum(&pre.model, 0, std::slice::from_ref(row)).unwrap();
                want_n += k;
                s
            })
            .collect();
        assert_eq!(n, want_n);
        assert_same_loss_and_gradients(family, &pre.model.params, &sum, &alone);
    }
}

/// `batch` has the value and every parameter's gradient of the sum of `alone` (1e-4
/// relative).
fn assert_same_loss_and_gradients(
    family: &str,
    params: &rlhf::model::params::Params,
    batch: &Tensor,
    alone: &[Tensor],
) {
    let mut want_sum = 0f32;
    let mut want_grads: Vec<Option<Tensor>> = vec![None; params.vars().len()];
    for s in alone {
        want_sum += s.to_scalar::<f32>().unwrap();
        let g = s.backward().unwrap();
        for (slot, (_, var)) in want_grads.iter_mut().zip(params.vars()) {
            if let Some(gv) = g.get(var.as_tensor()) {
                *slot = Some(match slot.take() {
                    Some(acc) => (acc + gv).unwrap(),
                    None => gv.clone(),
                });
            }
        }
    }
    let got = batch.to_scalar::<f32>().unwrap();
    assert!(
        (got - want_sum).abs() < 1e-4 * want_sum.abs(),
        "{family}: {got} vs {want_sum}"
    );
    let grads = batch.backward().unwrap();
    let mut compared = 0;
    for ((spec, var), want) in params.vars().into_iter().zip(&want_grads) {
        let Some(want) = want else { continue };
        let got = grads
            .get(var.as_tensor())
            .expect("a gradient in the batch too");
        let max_abs =
            |t: &Tensor| -> f32 { t.abs().unwrap().max_all().unwrap().to_scalar().unwrap() };
        let scale = max_abs(want).max(1e-3);
        let diff = max_abs(&(got - want).unwrap());
        assert!(
            diff <= 1e-4 * scale,
            "{family} {}: {diff} (scale {scale})",
            spec.name
        );
        compared += 1;
    }
    assert!(compared > 4, "{family}: {compared} gradients compared");
}

/// Rows that share prefixes (laid once, `model::packed`) give the summed log-probs and
/// reward-model scores of the rows alone, and the same gradients: the prefix's
/// gradient gathers what each continuation sends back to it, as it would from each
/// row's own copy.
#[test]
fn shared_prefixes_have_the_loss_and_gradients_of_their_rows_alone() {
    use rlhf::model::response::{logprobs_of, ResponseBatch};
    use rlhf::model::scalar::load_scalar;
    let dev = Device::Cpu;
    let rows = rows_sharing_prefixes();
    let refs: Vec<(&[u32], &[u32])> = rows.iter().map(|(p, r)| (&p[..], &r[..])).collect();
    let log_likelihood = |model: &CausalLm, rows: &[(&[u32], &[u32])]| -> Tensor {
        let batch = ResponseBatch::new(rows, 0, &dev).unwrap();
        logprobs_of(model, &batch, false)
            .unwrap()
            .0
            .sum_all()
            .unwrap()
    };
    for family in FAMILIES {
        let pre = load_fixture(family);
        let alone: Vec<Tensor> = refs
            .iter()
            .map(|row| log_likelihood(&pre.model, std::slice::from_ref(row)))
            .collect();
        let batch = log_likelihood(&pre.model, &refs);
        assert_same_loss_and_gradients(family, &pre.model.params, &batch, &alone);

        let rm = load_scalar(&common::fixture(family), &dev, 0).unwrap();
        let seqs: Vec<Vec<u32>> = rows
            .iter()
            .map(|(p, r)| [&p[..], &r[..]].concat())
            .collect();
        // Squared, so that the gradient is not the same for every row.
        let score = |seqs: &[Vec<u32>]| -> Tensor {
            rm.model
                .score_last(seqs, 0)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
        };
        let alone: Vec<Tensor> = seqs
            .iter()
            .map(|s| score(std::slice::from_ref(s)))
            .collect();
        assert_same_loss_and_gradients(family, &rm.model.params, &score(&seqs), &alone);
    }
}
