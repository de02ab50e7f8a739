//! The policy an RL method trains and the frozen reference it is held to: the SFT
//! model as loaded (with a fresh LoRA adapter under `--use_peft`) and, for the
//! reference, the same base with the adapter off (no second copy of the weights) or,
//! without LoRA, a second load of the SFT folder.

use candle_core::Device;
use std::path::Path;

use crate::error::Result;
use crate::model::frozen::Frozen;
use crate::model::hf::{load_pretrained, Pretrained};
use crate::model::lora::{reference_of, Adapter, LoraArgs};
use crate::model::CausalLm;

/// (policy, its adapter when `--use_peft`, the frozen reference).
pub fn policy_and_reference(
    sft: &Path,
    lora: &LoraArgs,
    seed: u64,
    dev: &Device,
) -> Result<(Pretrained, Option<Adapter>, Frozen<CausalLm>)> {
    let mut policy = load_pretrained(sft, dev)?;
    let adapter = lora.attach(&mut policy.model, sft, seed)?;
    let reference = Frozen::new(match &adapter {
        Some(_) => reference_of(&policy.model)?,
        None => load_pretrained(sft, dev)?.model,
    });
    Ok((policy, adapter, reference))
}
