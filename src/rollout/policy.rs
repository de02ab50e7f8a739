//! The policy an RL method trains and the frozen reference it is held to: the SFT
//! model as loaded (with a fresh LoRA adapter under `--use_peft`) and, for the
//! reference, the same base with the adapter off (no second copy of the weights) or,
//! without LoRA, a second load of the SFT folder.

use candle_core::Device;
use std::path::Path;

use crate::error::{Error, Result};
use crate::model::frozen::Frozen;
use crate::model::hf::{load_pretrained, Pretrained};
use crate::model::lora::{is_adapter_dir, reference_of, Adapter, AdapterFile, LoraArgs};
use crate::model::scalar::{scalar_adapter_on, PretrainedScalar};
use crate::model::CausalLm;
use crate::rollout::Scorer;
use crate::settings::invalid;

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

/// `--share_base`: a reward model or critic saved as an adapter on the policy's own
/// base (`rlhf rm train --use_peft --model SFT`), attached unmerged to the policy's
/// frozen base instead of loaded merged as a second copy of the weights. `flag`
/// names the folder's flag in errors. The adapter comes back as trainable variables
/// (a critic trains them; a reward model is wrapped in `Frozen`).
pub fn scalar_on_policy_base(
    dir: &Path,
    flag: &str,
    sft: &Path,
    policy: &CausalLm,
    lora: &LoraArgs,
) -> Result<(PretrainedScalar, Adapter)> {
    let remedy = format!(
        "make one with `rlhf rm train --use_peft --model {}`, or drop --share_base",
        sft.display()
    );
    if !is_adapter_dir(dir) {
        return Err(Error::Invalid(format!(
            "--share_base: {flag} {} is a whole model, not an adapter on the policy's base; {remedy}",
            dir.display(),
        )));
    }
    let file = AdapterFile::read(dir)?;
    let base = file.base(None)?;
    if std::fs::canonicalize(&base).ok() != std::fs::canonicalize(sft).ok() {
        return Err(Error::Invalid(format!(
            "--share_base: {flag} {} is an adapter on {}, not on the policy's model {}; {remedy}",
            dir.display(),
            base.display(),
            sft.display()
        )));
    }
    scalar_adapter_on(&file, policy, lora.lora_dropout)
}

/// What `--share_base` needs: `--use_peft`, and a reward model folder (the adapter
/// that shares the policy's base) rather than a reward command.
pub fn share_base_needs(
    share_base: bool,
    lora: &LoraArgs,
    reward_model: Option<&Path>,
    reward_cmd: Option<&str>,
) -> Result<()> {
    if share_base && reward_cmd.is_some() {
        return Err(invalid(
            "share_base",
            "shares the reward model's base, but --reward_cmd gives the reward: drop one of them",
        ));
    }
    if share_base && !lora.use_peft {
        return Err(invalid(
            "share_base",
            "needs --use_peft: without LoRA every model has its own weights",
        ));
    }
    if share_base && reward_model.is_none() {
        return Err(invalid(
            "share_base",
            "needs --reward_model: an adapter on the policy's base (`rlhf rm train --use_peft`)",
        ));
    }
    Ok(())
}

/// What scores an RL run's samples: the caller's own scorer (tests, toy tasks), else
/// `--reward_model` (attached to the policy's base with `--share_base`, loaded whole
/// otherwise) or `--reward_cmd`.
pub fn run_scorer(
    given: Option<Scorer>,
    (reward_model, reward_cmd): (Option<&Path>, Option<&str>),
    share_base: bool,
    (sft, policy): (&Path, &Pretrained),
    lora: &LoraArgs,
) -> Result<Scorer> {
    match (given, share_base, reward_model) {
        (Some(s), _, _) => Ok(s),
        (None, true, Some(dir)) => Scorer::reward_model(
            dir,
            scalar_on_policy_base(dir, "--reward_model", sft, &policy.model, lora)?.0,
            &policy.tokenizer,
        ),
        (None, _, _) => Scorer::from_args(reward_model, reward_cmd, &policy.tokenizer),
    }
}
