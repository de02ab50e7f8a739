//! `--bf16` on a CPU with AMX-BF16 tiles (`ops::amx`): SFT steps under autocast
//! against the same steps in f32. Skips, with a printed reason, where the CPU or its
//! kernel offers no AMX tiles. One test in this binary: autocast is process-wide.

mod common;

use common::{sft_steps, SftSteps};
use rlhf::device::DeviceSpec;

/// 8 SFT steps of the GPT-2 fixture with autocast `bf16` on the CPU.
fn steps(bf16: bool) -> SftSteps {
    rlhf::device::set_default(DeviceSpec::Cpu, bf16).unwrap();
    sft_steps(&candle_core::Device::Cpu, 8)
}

#[test]
fn bf16_autocast_steps_follow_the_f32_steps_within_bf16_rounding() {
    if !rlhf::ops::amx::available() {
        // RLHF_REQUIRE_AMX=1 (on a runner known to have AMX) makes the skip a failure.
        assert!(
            std::env::var_os("RLHF_REQUIRE_AMX").is_none(),
            "RLHF_REQUIRE_AMX is set but this CPU or its kernel offers no AMX-BF16 tiles"
        );
        println!("skipped: this CPU or its kernel offers no AMX-BF16 tiles");
        return;
    }
    let f32_run = steps(false);
    let bf16_run = steps(true);
    let (f_losses, f_grads, start, f_weights) = (
        f32_run.losses,
        f32_run.first_grads,
        f32_run.start,
        f32_run.end,
    );
    let (b_losses, b_grads, b_start, b_weights) = (
        bf16_run.losses,
        bf16_run.first_grads,
        bf16_run.start,
        bf16_run.end,
    );
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
    let (moved, apart) = (
        common::l2_distance(&f_weights, &start),
        common::l2_distance(&b_weights, &f_weights),
    );
    println!("weights after 8 steps: ‖bf16 − f32‖ = {apart:.2e}, ‖f32 − start‖ = {moved:.2e}");
    assert!(
        moved > 0.0 && apart <= 0.1 * moved,
        "bf16 and f32 weights {apart} apart after moving {moved}"
    );
}
