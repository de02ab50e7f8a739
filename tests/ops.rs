//! The fused CPU kernels equal their composite candle references, in values and in
//! gradients, on random shapes (odd sizes, grouped-query heads, left padding, cached
//! prefixes).

use candle_core::{Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use rlhf::model::layers::{
    attention, attention_composite, attention_qkv, merge_heads, split_qkv, LayerNorm, RmsNorm,
};
use rlhf::model::AttentionMask;

fn randn(shape: &[usize], seed: u64) -> Var {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
    Var::from_tensor(&Tensor::from_vec(data, shape, &Device::Cpu).unwrap()).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// Σ out ⊙ R for a fixed random R: a scalar whose gradient is R.
fn probe_loss(out: &Tensor, seed: u64) -> Tensor {
    let r = randn(out.dims(), seed);
    (out * r.as_tensor()).unwrap().sum_all().unwrap()
}

fn assert_grads_match(vars: &[&Var], fused: &Tensor, composite: &Tensor, tol: f32, what: &str) {
    let gf = probe_loss(fused, 99).backward().unwrap();
    let gc = probe_loss(composite, 99).backward().unwrap();
    for (i, v) in vars.iter().enumerate() {
        let a = gf.get(v.as_tensor()).expect("fused gradient");
        let b = gc.get(v.as_tensor()).expect("composite gradient");
        let d = max_diff(a, b);
        assert!(d <= tol, "{what}: gradient {i} differs by {d}");
    }
}

#[test]
fn layer_norm_matches_composite() {
    for (rows, c) in [(1, 1), (3, 7), (5, 64), (33, 129), (300, 256)] {
        let x = randn(&[rows, c], 1);
        let w = randn(&[c], 2);
        let b = randn(&[c], 3);
        let ln = LayerNorm {
            weight: w.as_tensor().clone(),
            bias: b.as_tensor().clone(),
            eps: 1e-5,
        };
        let fused = ln.forward(x.as_tensor()).unwrap();
        let composite = ln.forward_composite(x.as_tensor()).unwrap();
        assert!(max_diff(&fused, &composite) <= 1e-4, "values ({rows}, {c})");
        assert_grads_match(
            &[&x, &w, &b],
            &fused,
            &composite,
            2e-3,
            &format!("layer_norm ({rows}, {c})"),
        );
    }
}

#[test]
fn rms_norm_matches_composite() {
    for (rows, c) in [(1, 1), (2, 3), (17, 96), (260, 255)] {
        let x = randn(&[rows, c], 4);
        let w = randn(&[c], 5);
        let n = RmsNorm {
            weight: w.as_tensor().clone(),
            eps: 1e-6,
        };
        let fused = n.forward(x.as_tensor()).unwrap();
        let composite = n.forward_composite(x.as_tensor()).unwrap();
        assert!(max_diff(&fused, &composite) <= 1e-4, "values ({rows}, {c})");
        assert_grads_match(
            &[&x, &w],
            &fused,
            &composite,
            2e-3,
            &format!("rms_norm ({rows}, {c})"),
        );
    }
}

#[test]
fn attention_matches_composite() {
    // (B, nh, nkv, T, S, hd): full causal, GQA, a cached prefix (S > T), odd sizes.
    let cases = [
        (1, 1, 1, 1, 1, 1),
        (2, 4, 4, 7, 7, 8),
        (3, 6, 2, 5, 9, 13),
        (2, 4, 1, 1, 20, 16),
        (4, 8, 4, 33, 33, 64),
    ];
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for (i, &(b, nh, nkv, t, s, hd)) in cases.iter().enumerate() {
        let q = randn(&[b, nh, t, hd], 10 + i as u64);
        let k = randn(&[b, nkv, s, hd], 20 + i as u64);
        let v = randn(&[b, nkv, s, hd], 30 + i as u64);
        let key_mask = random_left_padding(&mut rng, b, s);
        let mask = AttentionMask::new(&key_mask, t, &Device::Cpu).unwrap();
        let fused = attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), &mask).unwrap();
        let composite = merge_heads(
            &attention_composite(
                q.as_tensor(),
                k.as_tensor(),
                v.as_tensor(),
                &mask.bias(&Device::Cpu).unwrap(),
            )
            .unwrap(),
        )
        .unwrap();
        // Padding queries (no visible key) are unspecified; compare the real ones only.
        let keep = merge_heads(&query_keep(&key_mask, t, nh, hd)).unwrap();
        let (f, c) = ((&fused * &keep).unwrap(), (&composite * &keep).unwrap());
        let d = max_diff(&f, &c);
        assert!(d <= 1e-5, "case {i}: values differ by {d}");
        assert_grads_match(&[&q, &k, &v], &f, &c, 1e-4, &format!("attention case {i}"));
    }
}

/// Attention read straight from a dense layer's (B, T, 3C) output gives the bits of
/// `split_heads` of each third into the fused kernel, in the output and in the
/// gradient of qkv (which the split path assembles from three padded copies), and
/// matches the composite reference.
#[test]
fn attention_on_qkv_has_the_bits_of_split_heads() {
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    // (B, nh, T, hd): one head, odd head sizes (off the AVX2 path), GPT-2's 64.
    for (i, &(b, nh, t, hd)) in [(1, 1, 1, 8), (2, 4, 7, 8), (3, 3, 9, 13), (2, 4, 33, 64)]
        .iter()
        .enumerate()
    {
        let c = nh * hd;
        let qkv = randn(&[b, t, 3 * c], 50 + i as u64);
        let key_mask = random_left_padding(&mut rng, b, t);
        let mask = AttentionMask::new(&key_mask, t, &Device::Cpu).unwrap();
        let x = qkv.as_tensor();
        let in_place = attention_qkv(x, nh, &mask).unwrap();
        let (q, k, v) = split_qkv(x, nh).unwrap();
        let split = attention(&q, &k, &v, &mask).unwrap();
        assert_eq!(in_place.dims(), &[b, t, c]);
        let bits = |t: &Tensor| -> Vec<u32> {
            let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            v.iter().map(|x| x.to_bits()).collect()
        };
        assert_eq!(bits(&in_place), bits(&split), "case {i}: outputs");
        let g_in_place = probe_loss(&in_place, 98).backward().unwrap();
        let g_split = probe_loss(&split, 98).backward().unwrap();
        let (g1, g2) = (g_in_place.get(x).unwrap(), g_split.get(x).unwrap());
        assert_eq!(bits(g1), bits(g2), "case {i}: gradients of qkv");
        assert!(max_diff(g1, &g1.zeros_like().unwrap()) > 0.0);

        let composite = rlhf::ops::with_composite(|| attention_qkv(x, nh, &mask)).unwrap();
        let keep = merge_heads(&query_keep(&key_mask, t, nh, hd)).unwrap();
        let (f, r) = ((&in_place * &keep).unwrap(), (&composite * &keep).unwrap());
        assert!(max_diff(&f, &r) <= 1e-5, "case {i}: against the composite");
        assert_grads_match(&[&qkv], &f, &r, 1e-4, &format!("qkv case {i}"));
    }
}

#[test]
fn attention_on_qkv_refuses_rows_that_do_not_hold_three_sets_of_heads() {
    let x = Tensor::zeros((1, 2, 10), candle_core::DType::F32, &Device::Cpu).unwrap();
    let mask = AttentionMask::new(&[vec![1, 1]], 2, &Device::Cpu).unwrap();
    let err = attention_qkv(&x, 2, &mask).unwrap_err().to_string();
    assert!(err.contains("do not hold 3 × 2 heads"), "{err}");
}

/// A key mask (B, S) with random left padding per row, leaving at least one real key.
fn random_left_padding(rng: &mut ChaCha8Rng, b: usize, s: usize) -> Vec<Vec<u8>> {
    (0..b)
        .map(|_| {
            let pad = rng.random_range(0..s);
            (0..s).map(|j| u8::from(j >= pad)).collect()
        })
        .collect()
}

/// 1 for query rows that see at least one key, 0 for padding queries: (B, nh, T, hd).
fn query_keep(key_mask: &[Vec<u8>], t: usize, nh: usize, hd: usize) -> Tensor {
    let b = key_mask.len();
    let s = key_mask[0].len();
    let mut keep = vec![0f32; b * nh * t * hd];
    for (bi, row) in key_mask.iter().enumerate() {
        for q in 0..t {
            let sees = row[..=s - t + q].iter().any(|&m| m != 0);
            if sees {
                for h in 0..nh {
                    let base = ((bi * nh + h) * t + q) * hd;
                    keep[base..base + hd].iter_mut().for_each(|x| *x = 1.0);
                }
            }
        }
    }
    Tensor::from_vec(keep, (b, nh, t, hd), &Device::Cpu).unwrap()
}

#[test]
fn skinny_matmul_matches_matmul() {
    use rlhf::ops::matmul::skinny_matmul;
    for (n, inner, out) in [
        (1, 1, 1),
        (3, 7, 5),
        (8, 256, 768),
        (5, 33, 130),
        (16, 100, 1030),
    ] {
        let x = randn(&[n, inner], 40);
        let w = randn(&[out, inner], 41);
        let fused = skinny_matmul(x.as_tensor(), w.as_tensor()).unwrap();
        let reference = x.as_tensor().matmul(&w.as_tensor().t().unwrap()).unwrap();
        let d = max_diff(&fused, &reference);
        assert!(d <= 1e-4, "({n}, {inner}, {out}): {d}");
        assert_grads_match(
            &[&x, &w],
            &fused,
            &reference,
            1e-4,
            &format!("skinny ({n}, {inner}, {out})"),
        );
    }
}

/// Inputs scaled to [−4, 4]: both tails of GELU and SiLU, not only the middle.
fn wide(shape: &[usize], seed: u64) -> Var {
    let v = randn(shape, seed);
    Var::from_tensor(&(v.as_tensor() * 4.0).unwrap()).unwrap()
}

#[test]
fn bias_gelu_matches_composite() {
    use rlhf::model::layers::{bias_gelu, bias_gelu_composite};
    // Small shapes run on one thread, the last two in parallel chunks.
    for (rows, m) in [(1, 1), (3, 7), (33, 129), (70, 1030), (257, 512)] {
        for exact in [false, true] {
            let x = wide(&[rows, m], 50);
            let b = randn(&[m], 51);
            let fused = bias_gelu(x.as_tensor(), b.as_tensor(), exact).unwrap();
            let composite = bias_gelu_composite(x.as_tensor(), b.as_tensor(), exact).unwrap();
            let d = max_diff(&fused, &composite);
            assert!(d <= 2e-6, "values ({rows}, {m}, exact {exact}): {d}");
            assert_grads_match(
                &[&x, &b],
                &fused,
                &composite,
                // db sums `rows` terms.
                1e-5 * rows as f32,
                &format!("bias_gelu ({rows}, {m}, exact {exact})"),
            );
        }
    }
}

#[test]
fn swiglu_matches_composite() {
    use rlhf::model::layers::{swiglu, swiglu_composite};
    for shape in [vec![1], vec![3, 7], vec![2, 33, 129], vec![4, 40, 700]] {
        let g = wide(&shape, 52);
        let u = randn(&shape, 53);
        let fused = swiglu(g.as_tensor(), u.as_tensor()).unwrap();
        let composite = swiglu_composite(g.as_tensor(), u.as_tensor()).unwrap();
        let d = max_diff(&fused, &composite);
        assert!(d <= 2e-6, "values {shape:?}: {d}");
        assert_grads_match(
            &[&g, &u],
            &fused,
            &composite,
            1e-5,
            &format!("swiglu {shape:?}"),
        );
    }
}

fn random_targets(n: usize, v: usize, seed: u64) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let t: Vec<u32> = (0..n).map(|_| rng.random_range(0..v as u32)).collect();
    Tensor::from_vec(t, n, &Device::Cpu).unwrap()
}

#[test]
fn lm_head_logprobs_match_composite_kept_and_chunked() {
    use rlhf::losses::{entropy, token_logprobs};
    use rlhf::ops::lm_head::head_logprobs_with_limits;
    for (n, c, v) in [(1, 1, 1), (5, 3, 7), (37, 24, 301), (130, 64, 1000)] {
        let h = randn(&[n, c], 56);
        let w = randn(&[v, c], 57);
        let targets = random_targets(n, v, 58);
        let logits = h.as_tensor().matmul(&w.as_tensor().t().unwrap()).unwrap();
        let composite = token_logprobs(&logits, &targets).unwrap();
        let composite_h = entropy(&logits).unwrap();
        // Kept probabilities; then chunks of 1 row and of a few rows (the last one short).
        for (keep_max, chunk) in [(usize::MAX, 0), (0, 1), (0, 3 * v + 1)] {
            let what = format!("({n}, {c}, {v}) keep_max {keep_max} chunk {chunk}");
            let fused = head_logprobs_with_limits(
                h.as_tensor(),
                w.as_tensor(),
                &targets,
                false,
                keep_max,
                chunk,
            )
            .unwrap();
            let d = max_diff(&fused, &composite);
            assert!(d <= 2e-5, "values {what}: {d}");
            assert_grads_match(&[&h, &w], &fused, &composite, 2e-5 * c as f32, &what);
            let both = head_logprobs_with_limits(
                h.as_tensor(),
                w.as_tensor(),
                &targets,
                true,
                keep_max,
                chunk,
            )
            .unwrap(); // (N, 2)
            let lp = both.narrow(1, 0, 1).unwrap().squeeze(1).unwrap();
            let ent = both.narrow(1, 1, 1).unwrap().squeeze(1).unwrap();
            assert!(
                max_diff(&lp, &composite) <= 2e-5,
                "values with entropy {what}"
            );
            assert!(max_diff(&ent, &composite_h) <= 2e-5, "entropy {what}");
            assert_grads_match(&[&h, &w], &lp, &composite, 2e-5 * c as f32, &what);
        }
    }
}

#[test]
fn whole_model_gradients_equal_the_composite_model() {
    use rlhf::model::hf::load_pretrained;
    use rlhf::ops::with_composite;
    // Every fixture family (GPT-2 with GELU, Llama and Qwen2 with SwiGLU and GQA), a
    // left-padded batch, the LM loss through the LM head's log-probs.
    for name in ["gpt2", "llama", "qwen2"] {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name);
        let pre = load_pretrained(&dir, &Device::Cpu).unwrap();
        let model = &pre.model;
        let ids = Tensor::new(
            &[[3u32, 14, 15, 92, 65, 35, 89], [0, 0, 27, 18, 28, 18, 28]],
            &Device::Cpu,
        )
        .unwrap();
        let mask =
            AttentionMask::full(&[vec![1; 7], vec![0, 0, 1, 1, 1, 1, 1]], &Device::Cpu).unwrap();
        // Targets: the next token at every real position of both rows.
        let positions = Tensor::new(&[0u32, 1, 2, 3, 4, 5, 9, 10, 11, 12], &Device::Cpu).unwrap();
        let targets =
            Tensor::new(&[14u32, 15, 92, 65, 35, 89, 18, 28, 18, 28], &Device::Cpu).unwrap();
        let loss = || {
            let hidden = model.backbone.forward(&ids, &mask, None).unwrap(); // (B, T, C)
            let c = hidden.dim(2).unwrap();
            let picked = hidden
                .reshape((14, c))
                .unwrap()
                .index_select(&positions, 0)
                .unwrap(); // (10, C)
            let logp = model.lm_head.token_logprobs(&picked, &targets).unwrap();
            logp.mean_all().unwrap().neg().unwrap()
        };
        let fused = loss();
        let composite = with_composite(loss);
        let d = max_diff(&fused, &composite);
        assert!(d <= 1e-5, "{name}: losses differ by {d}");
        let (gf, gc) = (fused.backward().unwrap(), composite.backward().unwrap());
        for (spec, var) in model.params.vars() {
            let a = gf.get(var.as_tensor()).expect("fused gradient");
            let b = gc.get(var.as_tensor()).expect("composite gradient");
            let scale = max_diff(b, &b.zeros_like().unwrap()).max(1e-3);
            let d = max_diff(a, b);
            assert!(
                d <= 1e-3 * scale,
                "{name}: gradient of {} differs by {d} (largest {scale})",
                spec.name
            );
        }
    }
}

/// The skinny kernel's arithmetic for one output, in scalar code: with AVX2+FMA, a W
/// row in a whole block of four runs eight lanes of fused multiply-adds over k in
/// order, reduces them as `hsum` does ((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7)), then
/// adds the tail one product at a time; the last out % 4 rows use `ops::dot`'s
/// arithmetic (separate multiply and add). This is what `rlhf generate` computed
/// before the kernel blocked several x rows together; the bits must not move.
fn skinny_output_model(w: &[f32], x: &[f32], in_block: bool) -> f32 {
    let full = w.len() / 8 * 8;
    let mut lane = [0f32; 8];
    for k in (0..full).step_by(8) {
        for j in 0..8 {
            lane[j] = if in_block {
                w[k + j].mul_add(x[k + j], lane[j])
            } else {
                lane[j] + w[k + j] * x[k + j]
            };
        }
    }
    if in_block {
        let s = [
            lane[0] + lane[4],
            lane[1] + lane[5],
            lane[2] + lane[6],
            lane[3] + lane[7],
        ];
        let mut r = (s[0] + s[2]) + (s[1] + s[3]);
        for k in full..w.len() {
            r += w[k] * x[k];
        }
        r
    } else {
        let mut tail = 0f32;
        for k in full..w.len() {
            tail += w[k] * x[k];
        }
        ((lane[0] + lane[4]) + (lane[1] + lane[5]))
            + ((lane[2] + lane[6]) + (lane[3] + lane[7]))
            + tail
    }
}

#[test]
fn skinny_matmul_bits_do_not_depend_on_the_row_count() {
    use rlhf::ops::matmul::skinny_matmul;
    if !(std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")) {
        println!(
            "skipped: the bit-exact model is of the AVX2+FMA kernel, and this CPU has no AVX2+FMA"
        );
        return;
    }
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut shapes = vec![
        (16, 256, 1030),
        (17, 100, 67),
        (1, 256, 8192),
        (6, 1024, 256),
        // More rows than one x panel (96): a prompt fed whole in `rlhf generate`.
        (97, 40, 13),
        (250, 64, 70),
    ];
    for _ in 0..40 {
        shapes.push((
            rng.random_range(1..=18),
            rng.random_range(1..=300),
            rng.random_range(1..=140),
        ));
    }
    for (i, &(n, inner, out)) in shapes.iter().enumerate() {
        let x = randn(&[n, inner], 100 + i as u64);
        let w = randn(&[out, inner], 200 + i as u64);
        let y: Vec<Vec<f32>> = skinny_matmul(x.as_tensor(), w.as_tensor())
            .unwrap()
            .to_vec2()
            .unwrap();
        let xs: Vec<Vec<f32>> = x.as_tensor().to_vec2().unwrap();
        let ws: Vec<Vec<f32>> = w.as_tensor().to_vec2().unwrap();
        for b in 0..n {
            for o in 0..out {
                let want = skinny_output_model(&ws[o], &xs[b], o < out / 4 * 4);
                assert_eq!(
                    y[b][o].to_bits(),
                    want.to_bits(),
                    "({n}, {inner}, {out}) at [{b}, {o}]: {} against {want}",
                    y[b][o]
                );
            }
        }
    }
}

#[test]
fn lora_linear_matches_composite() {
    use rlhf::model::layers::{DropoutKey, Linear, LoraBranch, LoraDropout};
    use rlhf::ops::with_composite;
    // A frozen base with a bias, a trainable adapter, an input that carries a gradient,
    // with and without dropout; the fused op (values and gradients) against the branch
    // written from candle ops.
    // (dropout p, key, rows, whether the input carries a gradient)
    for (p, key, n, x_grad) in [
        (0.0, None, 7, true),
        (0.3, Some(11u64), 7, true),
        (0.3, Some(12u64), 40, false), // gemm's row count; the first layer's input
    ] {
        let (inp, out, r) = (24, 19, 4);
        let w = randn(&[out, inp], 1).as_tensor().detach();
        let bias = randn(&[out], 2).as_tensor().detach();
        let a = randn(&[r, inp], 3);
        let b = randn(&[out, r], 4);
        let x = randn(&[n, inp], 5);
        let probe = randn(&[n, out], 6).as_tensor().detach();
        let dropout_key = DropoutKey::default();
        dropout_key.set(key);
        let mut layer = Linear::new(w, Some(bias));
        layer.lora = Some(LoraBranch {
            a: a.as_tensor().clone(),
            b: b.as_tensor().clone(),
            scale: 2.0,
            dropout: LoraDropout {
                p,
                layer: 3,
                key: dropout_key,
            },
        });
        let run = || {
            // x·1 gives x an op, as a layer's input has inside a model.
            let xin = if x_grad {
                (x.as_tensor() * 1.0).unwrap()
            } else {
                x.as_tensor().detach()
            };
            let y = layer.forward(&xin).unwrap();
            let loss = (&y * &probe).unwrap().sum_all().unwrap();
            let g = loss.backward().unwrap();
            let grad = |t: &Tensor| {
                g.get(t).map_or(vec![], |g| {
                    g.flatten_all().unwrap().to_vec1::<f32>().unwrap()
                })
            };
            (
                y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                grad(x.as_tensor()),
                grad(a.as_tensor()),
                grad(b.as_tensor()),
            )
        };
        let calls = rlhf::ops::lora::fused_calls();
        let fused = run();
        assert_eq!(
            rlhf::ops::lora::fused_calls(),
            calls + 1,
            "the fused op ran"
        );
        let composite = with_composite(run);
        assert_eq!(
            rlhf::ops::lora::fused_calls(),
            calls + 1,
            "the composite branch ran"
        );
        assert_eq!(
            fused.1.is_empty(),
            !x_grad,
            "x gets a gradient only when it needs one"
        );
        // The values: the unfused layer's arithmetic on the fused kernels, bit for bit.
        let xd = x.as_tensor().detach();
        let bias = layer.bias.as_ref().unwrap();
        let base = if n <= 16 {
            rlhf::ops::matmul::skinny_matmul(&xd, &layer.weight)
                .unwrap()
                .broadcast_add(bias)
                .unwrap()
        } else {
            rlhf::ops::dense::dense(&xd, &layer.weight, Some(bias)).unwrap()
        };
        let unfused = (base + layer.lora.as_ref().unwrap().forward(&xd).unwrap()).unwrap();
        assert_eq!(
            fused.0,
            unfused.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            "p {p}"
        );
        let worst = fused
            .0
            .iter()
            .zip(&composite.0)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            worst < 1e-4,
            "p {p}: values differ from the composite's by {worst}"
        );
        for (what, f, c) in [
            ("x", &fused.1, &composite.1),
            ("A", &fused.2, &composite.2),
            ("B", &fused.3, &composite.3),
        ] {
            assert_eq!(f.len(), c.len());
            let scale = c.iter().fold(0f32, |m, v| m.max(v.abs()));
            let worst = f.iter().zip(c).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                worst <= 1e-5 * scale,
                "p {p}: d{what} differs by {worst} (scale {scale})"
            );
        }
    }
}

#[test]
fn dense_layer_matches_composite() {
    use rlhf::model::layers::Linear;
    use rlhf::ops::with_composite;
    // The dense op (bias in the gemm's epilogue, dx, dW and db in one backward)
    // against candle's matmul and broadcast add: with and without a bias, a trainable
    // or a constant weight, an input with and without a gradient; gemm's row counts.
    // (rows, bias, trainable weight and bias, input with a gradient)
    for (n, with_bias, trainable, x_grad) in [
        (40, true, true, true),
        (40, false, true, true),
        (130, true, true, false),
        (33, true, false, false), // inference: no gradient anywhere
    ] {
        let (inp, out) = (48, 37);
        let w = randn(&[out, inp], 1);
        let b = randn(&[out], 2);
        let x = randn(&[n, inp], 3);
        let layer = Linear::new(
            if trainable {
                w.as_tensor().clone()
            } else {
                w.as_tensor().detach()
            },
            with_bias.then(|| {
                if trainable {
                    b.as_tensor().clone()
                } else {
                    b.as_tensor().detach()
                }
            }),
        );
        let probe = randn(&[n, out], 4).as_tensor().detach();
        let run = || {
            let xin = if x_grad {
                (x.as_tensor() * 1.0).unwrap() // an op, as a layer's input has
            } else {
                x.as_tensor().detach()
            };
            let y = layer.forward(&xin).unwrap();
            let values = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            if !(trainable || x_grad) {
                return (values, vec![]);
            }
            let g = (&y * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let grads = [x.as_tensor(), w.as_tensor(), b.as_tensor()].map(|t| {
                g.get(t)
                    .map(|g| g.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            });
            (values, grads.to_vec())
        };
        let calls = rlhf::ops::dense::calls();
        let fused = run();
        assert_eq!(rlhf::ops::dense::calls(), calls + 1, "the dense op ran");
        let composite = with_composite(run);
        assert_eq!(rlhf::ops::dense::calls(), calls + 1, "the composite ran");
        let close = |f: &[f32], c: &[f32], what: &str| {
            assert_eq!(f.len(), c.len(), "{what}: lengths");
            assert!(!c.is_empty(), "{what}: empty");
            let scale = c.iter().fold(0f32, |m, v| m.max(v.abs()));
            let worst = f.iter().zip(c).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                worst <= 1e-5 * scale,
                "n {n} bias {with_bias}: {what} differs by {worst} (scale {scale})"
            );
        };
        close(&fused.0, &composite.0, "y");
        for (i, what) in ["dx", "dW", "db"].iter().enumerate() {
            let Some(g) = fused.1.get(i) else { continue };
            let c = &composite.1[i];
            let wanted = [x_grad, trainable, trainable && with_bias][i];
            assert_eq!(g.is_some(), wanted, "n {n}: {what} given only when wanted");
            assert_eq!(c.is_some(), wanted, "n {n}: composite {what}");
            if let (Some(g), Some(c)) = (g, c) {
                close(g, c, what);
            }
        }
    }
}
