//! The CUDA back-end against the CPU and transformers (built with `--features cuda`;
//! each test skips, with a printed reason, where no GPU can be opened). Run on a GPU:
//!
//!     cargo test --release --features cuda --test cuda
#![cfg(feature = "cuda")]

mod common;

use candle_core::{Device, Tensor};

use common::{fixture, ids_of, max_abs_diff, reference, FAMILIES};
use rlhf::model::hf::load_pretrained;
use rlhf::model::{AttentionMask, CausalLm};
use rlhf::train::optimizer::{AdamW, AdamWConfig, GradAccumulator};

fn gpu() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            println!("skipped: no GPU could be opened ({e})");
            None
        }
    }
}

/// Full-sequence logits for one unpadded sequence: (T, V), on the model's device.
fn logits(model: &CausalLm, ids: &[u32]) -> Vec<Vec<f32>> {
    let dev = &model.device;
    let t = Tensor::new(ids, dev).unwrap().unsqueeze(0).unwrap();
    let mask = AttentionMask::full(&[vec![1; ids.len()]], dev).unwrap();
    let out = model.forward(&t, &mask, None).unwrap().squeeze(0).unwrap();
    out.to_device(&Device::Cpu).unwrap().to_vec2().unwrap()
}

#[test]
fn cuda_logits_match_transformers_and_the_cpu() {
    let Some(gpu) = gpu() else { return };
    for name in FAMILIES {
        let on_gpu = load_pretrained(&fixture(name), &gpu).unwrap();
        let on_cpu = load_pretrained(&fixture(name), &Device::Cpu).unwrap();
        assert!(on_gpu.model.device.is_cuda());
        for case in reference(name)["logits"].as_array().unwrap() {
            let ids = ids_of(&case["input_ids"]);
            let expected: Vec<Vec<f32>> = serde_json::from_value(case["logits"].clone()).unwrap();
            let got = logits(&on_gpu.model, &ids);
            let vs_hf = max_abs_diff(&got, &expected);
            let vs_cpu = max_abs_diff(&got, &logits(&on_cpu.model, &ids));
            println!(
                "{name}: CUDA logits, max |diff| vs transformers {vs_hf:.2e}, vs CPU {vs_cpu:.2e}"
            );
            assert!(vs_hf <= 1e-4, "{name}: vs transformers {vs_hf}");
            assert!(vs_cpu <= 1e-4, "{name}: vs CPU {vs_cpu}");
        }
    }
}

#[test]
fn cuda_greedy_continuations_match_transformers() {
    let Some(gpu) = gpu() else { return };
    for name in FAMILIES {
        let pre = load_pretrained(&fixture(name), &gpu).unwrap();
        common::assert_greedy_matches_reference(name, &pre);
    }
}

/// Five SFT steps (forward, cross-entropy, backward, clipping, AdamW: the trainer's
/// code) on the GPU and on the CPU from the same weights and data. The first step's
/// gradients and every step's loss agree within float tolerance. The weights are
/// compared against how far training moved them: Adam divides by √v, so a gradient
/// element near zero whose last bits differ can move by up to the learning rate
/// either way, and an absolute bound on the weights would only restate that.
#[test]
fn cuda_sft_steps_match_the_cpu() {
    let Some(gpu) = gpu() else { return };
    let run = |dev: &Device| {
        let r = common::sft_steps(dev, 5);
        (r.losses, r.first_grads, r.start, r.end)
    };
    let (gpu_losses, gpu_grads, start, gpu_weights) = run(&gpu);
    let (cpu_losses, cpu_grads, cpu_start, cpu_weights) = run(&Device::Cpu);
    assert_eq!(start, cpu_start, "both start from the same weights");
    println!("SFT losses: GPU {gpu_losses:?}, CPU {cpu_losses:?}");
    assert!(
        cpu_losses[4] < cpu_losses[0],
        "the loss fell: {cpu_losses:?}"
    );
    for (g, c) in gpu_losses.iter().zip(&cpu_losses) {
        assert!(
            (g - c).abs() <= 1e-4 * c.abs().max(1.0),
            "{gpu_losses:?} vs {cpu_losses:?}"
        );
    }
    let max_abs = |a: &[f32], b: &[f32]| {
        assert_eq!(a.len(), b.len());
        assert!(!a.is_empty());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    };
    let grad_scale = cpu_grads.iter().fold(0f32, |m, g| m.max(g.abs()));
    let grad_diff = max_abs(&gpu_grads, &cpu_grads);
    println!(
        "first-step gradients: max |GPU − CPU| {grad_diff:.2e} (largest gradient {grad_scale:.2e})"
    );
    assert!(
        grad_diff <= 1e-4 * grad_scale,
        "gradients differ by {grad_diff}"
    );
    let moved = common::l2_distance(&cpu_weights, &start);
    let apart = common::l2_distance(&gpu_weights, &cpu_weights);
    println!(
        "weights after 5 steps: ‖GPU − CPU‖ = {apart:.2e}, ‖CPU − start‖ = {moved:.2e} (ratio {:.2e}); max |GPU − CPU| {:.2e}",
        apart / moved,
        max_abs(&gpu_weights, &cpu_weights)
    );
    assert!(
        moved > 0.0 && apart <= 1e-2 * moved,
        "GPU and CPU weights {apart} apart after moving {moved}"
    );
}

/// NCCL with a world of one (no launcher variables): every collective gives back
/// this rank's own values, on the GPU.
#[cfg(feature = "nccl")]
#[test]
fn nccl_world_of_one() {
    use rlhf::distributed::{nccl::Nccl, Collective};
    let Some(gpu) = gpu() else { return };
    let comm = Nccl::from_env(&gpu).unwrap();
    assert_eq!((comm.rank(), comm.world_size()), (0, 1));
    let t = Tensor::new(&[1.5f32, -2.0, 3.25], &gpu).unwrap();
    let sum = comm.all_reduce_tensor(&t).unwrap();
    assert!(sum.device().is_cuda());
    assert_eq!(sum.to_vec1::<f32>().unwrap(), [1.5, -2.0, 3.25]);
    let mut stats = [1e12f64 + 0.5, 7.0];
    comm.all_reduce_sum_f64(&mut stats).unwrap();
    assert_eq!(stats, [1e12 + 0.5, 7.0]);
    let mut bytes = *b"rank0";
    comm.broadcast(&mut bytes, 0).unwrap();
    assert_eq!(&bytes, b"rank0");
    comm.barrier().unwrap();
    println!("NCCL world of one: all-reduce, broadcast and barrier ran on the GPU");
}

/// One AdamW step on the GPU (the device update) against the CPU (the host update)
/// on the same weights and gradients, with weight decay on one parameter: the same
/// arithmetic to float rounding.
#[test]
fn cuda_adamw_step_matches_the_cpu() {
    use rlhf::model::params::{Init, ParamSpec, Params};
    let Some(gpu) = gpu() else { return };
    let specs = vec![
        ParamSpec::new("w", &[3, 4], Init::Normal(0.5)).decayed(),
        ParamSpec::new("b", &[4], Init::Normal(0.5)),
    ];
    let grads: Vec<Vec<f32>> = vec![
        (0..12).map(|i| ((i * 7 % 5) as f32 - 2.0) * 0.3).collect(),
        vec![0.5, -1.0, 1e-9, 2.0],
    ];
    let cfg = AdamWConfig {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let run = |dev: &Device| -> Vec<f32> {
        let params = Params::init(specs.clone(), 3, dev).unwrap();
        let mut opt = AdamW::new(&params, cfg).unwrap();
        let mut acc = GradAccumulator::new(&params).unwrap();
        for step in 0..3 {
            // The same gradients through a loss whose gradient they are: Σ g·p.
            let loss = params
                .vars()
                .iter()
                .zip(&grads)
                .map(|((_, v), g)| {
                    let g = Tensor::from_vec(g.clone(), v.shape(), dev).unwrap();
                    (v.as_tensor() * g).unwrap().sum_all().unwrap()
                })
                .reduce(|a, b| (a + b).unwrap())
                .unwrap();
            acc.zero().unwrap();
            acc.add(&params, &loss.backward().unwrap()).unwrap();
            opt.step(&params, &acc, 0.01 * (step + 1) as f64).unwrap();
        }
        params
            .vars()
            .iter()
            .flat_map(|(_, v)| {
                let t = v.as_tensor().to_device(&Device::Cpu).unwrap();
                t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            })
            .collect()
    };
    let (on_gpu, on_cpu) = (run(&gpu), run(&Device::Cpu));
    let diff = on_gpu
        .iter()
        .zip(&on_cpu)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    println!("AdamW, 3 steps: max |GPU − CPU| {diff:.2e}");
    assert_eq!(on_gpu.len(), 16);
    assert!(
        diff <= 1e-6,
        "the device AdamW differs from the host one by {diff}"
    );
}
