//! `--bf16` on a CPU with AMX-BF16 tiles (`ops::amx`): SFT steps under autocast
//! against the same steps in f32. Skips, with a printed reason, where the CPU or its
//! kernel offers no AMX tiles. One test in this binary: autocast is process-wide.

mod common;

use common::fixture;
use rlhf::data::sft::SftExample;
use rlhf::device::DeviceSpec;
use rlhf::model::hf::load_pretrained;
use rlhf::train::lm_task::{LmTask, Row};
use rlhf::train::optimizer::{AdamW, AdamWConfig, GradAccumulator};

/// Losses of 8 steps, the first step's gradients, and the weights before and after.
type Run = (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>);

fn sft_steps(bf16: bool) -> Run {
    rlhf::device::set_default(DeviceSpec::Cpu, bf16).unwrap();
    let dev = candle_core::Device::Cpu;
    let host =
        |t: &candle_core::Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
    let pre = load_pretrained(&fixture("gpt2"), &dev).unwrap();
    let rows: Vec<Row> = (0..4u32)
        .map(|r| {
            Row::single(SftExample {
                ids: (0..24).map(|i| (r * 31 + i * 7 + 3) % 300).collect(),
                loss_mask: (0..24).map(|i| u8::from(i >= 8)).collect(),
            })
        })
        .collect();
    let task = LmTask::new(pre, rows, vec![], 4, 4, 0);
    let params = &task.pre.model.params;
    let flat = || -> Vec<f32> {
        params
            .vars()
            .iter()
            .flat_map(|(_, v)| host(v.as_tensor()))
            .collect()
    };
    let start = flat();
    let cfg = AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
    };
    let mut opt = AdamW::new(params, cfg).unwrap();
    let mut acc = GradAccumulator::new(params).unwrap();
    let refs: Vec<&Row> = task.train_rows.iter().collect();
    let (mut losses, mut first_grads) = (vec![], vec![]);
    for step in 0..8 {
        let (sum, n, _) = task.loss_sum(&refs).unwrap();
        let loss = (sum / n as f64).unwrap();
        losses.push(loss.to_scalar::<f32>().unwrap());
        let grads = loss.backward().unwrap();
        if step == 0 {
            for (_, v) in params.vars() {
                first_grads.extend(host(grads.get(v.as_tensor()).unwrap()));
            }
        }
        acc.zero().unwrap();
        acc.add(params, &grads).unwrap();
        acc.clip(1.0).unwrap();
        opt.step(params, &acc, 1e-3).unwrap();
    }
    (losses, first_grads, start, flat())
}

#[test]
fn bf16_autocast_steps_follow_the_f32_steps_within_bf16_rounding() {
    if !rlhf::ops::amx::available() {
        println!("skipped: this CPU or its kernel offers no AMX-BF16 tiles");
        return;
    }
    let (f_losses, f_grads, start, f_weights) = sft_steps(false);
    let (b_losses, b_grads, b_start, b_weights) = sft_steps(true);
    rlhf::device::set_default(DeviceSpec::Cpu, false).unwrap();
    assert_eq!(start, b_start, "both start from the same weights");
    println!("SFT losses: f32 {f_losses:?}, bf16 {b_losses:?}");
    assert!(b_losses[7] < b_losses[0], "the loss fell: {b_losses:?}");
    // The products ran in bf16: the first loss is not f32's to the bit.
    assert_ne!(
        f_losses[0].to_bits(),
        b_losses[0].to_bits(),
        "autocast changed nothing"
    );
    for (b, f) in b_losses.iter().zip(&f_losses) {
        assert!(
            (b - f).abs() <= 3e-3 * f.abs(),
            "{b_losses:?} vs {f_losses:?}"
        );
    }
    let scale = f_grads.iter().fold(0f32, |m, g| m.max(g.abs()));
    let diff = f_grads
        .iter()
        .zip(&b_grads)
        .map(|(f, b)| (f - b).abs())
        .fold(0f32, f32::max);
    println!("first-step gradients: max |bf16 − f32| {diff:.2e} (largest gradient {scale:.2e})");
    assert!(
        diff > 0.0 && diff <= 4e-2 * scale,
        "gradients differ by {diff}"
    );
    let norm = |a: &[f32], b: &[f32]| -> f64 {
        a.iter()
            .zip(b)
            .map(|(x, y)| ((x - y) as f64).powi(2))
            .sum::<f64>()
            .sqrt()
    };
    let (moved, apart) = (norm(&f_weights, &start), norm(&b_weights, &f_weights));
    println!("weights after 8 steps: ‖bf16 − f32‖ = {apart:.2e}, ‖f32 − start‖ = {moved:.2e}");
    assert!(
        moved > 0.0 && apart <= 0.1 * moved,
        "bf16 and f32 weights {apart} apart after moving {moved}"
    );
}
