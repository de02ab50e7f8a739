//! Where a sampled response's score comes from: the frozen reward model (normalised
//! with its stored mean and std), a user's command (`RewardCommand`: verifiers, unit
//! tests, math checkers, in any language), or a function (tests and toy tasks).

use std::path::Path;

use super::command::RewardCommand;
use crate::data::prompts::Prompt;
use crate::data::tokenizer::Tokenizer;
use crate::error::{Error, Result};
use crate::generate::Completion;
use crate::model::frozen::Frozen;
use crate::model::scalar::PretrainedScalar;

/// A programmatic score of (prompt tokens, response tokens).
pub type ScoreFn = Box<dyn Fn(&[u32], &[u32]) -> f64>;

pub enum Scorer {
    Model(Box<Frozen<PretrainedScalar>>),
    /// Its scores are used as they are (no normalisation).
    Command(RewardCommand),
    /// Used as is (no normalisation).
    Function(ScoreFn),
}

impl Scorer {
    /// The scorer the command line asks for: `--reward_model DIR` (its tokenizer and
    /// chat template must be the policy's) or `--reward_cmd CMD`, exactly one.
    pub fn from_args(
        reward_model: Option<&Path>,
        reward_cmd: Option<&str>,
        policy_tokenizer: &Tokenizer,
    ) -> Result<Self> {
        match (reward_model, reward_cmd) {
            (Some(dir), None) => {
                Self::reward_model(dir, crate::rm::load_reward_model(dir)?, policy_tokenizer)
            }
            (None, Some(cmd)) if !cmd.trim().is_empty() => {
                Ok(Scorer::Command(RewardCommand::new(cmd)))
            }
            (None, Some(_)) => Err(Error::Invalid("--reward_cmd is empty".into())),
            (Some(_), Some(_)) => Err(Error::Invalid(
                "give --reward_model or --reward_cmd, not both".into(),
            )),
            (None, None) => Err(Error::Invalid(
                "a reward is needed: --reward_model DIR or --reward_cmd CMD".into(),
            )),
        }
    }

    /// The reward model loaded from `dir` (whole, or on the policy's base with
    /// `--share_base`), frozen, once its tokenizer and reward statistics are checked.
    pub fn reward_model(
        dir: &Path,
        rm: PretrainedScalar,
        policy_tokenizer: &Tokenizer,
    ) -> Result<Self> {
        same_tokenizer(policy_tokenizer, &rm.tokenizer, "reward model")?;
        match &rm.normalization {
            None => crate::note!(
                "warning: {} has no stored reward normalisation; raw scores are used",
                dir.display()
            ),
            Some(n) => crate::rm::check_normalization(n).map_err(|msg| {
                let (file, field) = if crate::model::lora::is_adapter_dir(dir) {
                    (
                        crate::model::scalar::REWARD_STATS_FILE,
                        "reward_normalization",
                    )
                } else {
                    (crate::model::hf::CONFIG_FILE, "rlhf.reward_normalization")
                };
                Error::bad_file(
                    &dir.join(file),
                    None,
                    format!("{field}: {msg}; retrain the reward model on distinct responses"),
                )
            })?,
        }
        Ok(Scorer::Model(Box::new(Frozen::new(rm))))
    }

    /// One score per sample; `prompts[i]` is the prompt of `samples[i]`.
    pub fn scores(&self, prompts: &[&Prompt], samples: &[Completion]) -> Result<Vec<f64>> {
        if prompts.len() != samples.len() {
            return Err(Error::Invalid(format!(
                "{} prompts for {} responses",
                prompts.len(),
                samples.len()
            )));
        }
        match self {
            Scorer::Model(rm) => reward_model_scores(rm, prompts, samples),
            Scorer::Command(cmd) => {
                let texts: Vec<&str> = samples.iter().map(|c| c.text.as_str()).collect();
                cmd.scores(prompts, &texts)
            }
            Scorer::Function(f) => Ok(samples
                .iter()
                .map(|c| f(&c.prompt_tokens, &c.tokens))
                .collect()),
        }
    }
}

/// The reward model's scores of sampled responses, normalised with its stored mean
/// and std (raw without them): read where `rm score` reads them (`RewardInput`), from
/// the prompt and the response's text. Which end token the policy stopped with is not
/// part of the input, so the policy cannot game it; a response cut at max_new_tokens
/// is closed the same way. Re-tokenising the text can, rarely, make an input longer
/// than the setup checked against the reward model's context: its earliest tokens are
/// dropped then (the reward is read at the end).
pub fn reward_model_scores(
    rm: &Frozen<PretrainedScalar>,
    prompts: &[&Prompt],
    samples: &[Completion],
) -> Result<Vec<f64>> {
    if prompts.len() != samples.len() {
        return Err(Error::Invalid(format!(
            "{} prompts for {} responses",
            prompts.len(),
            samples.len()
        )));
    }
    let context = rm.context_length();
    let inputs = prompts
        .iter()
        .zip(samples)
        .map(|(p, c)| {
            let mut ids = rm.input(p, &c.text)?;
            ids.drain(..ids.len().saturating_sub(context));
            Ok(ids)
        })
        .collect::<Result<Vec<_>>>()?;
    let raw = rm.score(&inputs)?;
    Ok(match rm.normalization() {
        Some(norm) => raw.iter().map(|&x| norm.apply(x)).collect(),
        None => raw,
    })
}

/// Checks that two tokenizers encode identically (same vocabulary and rules) and use
/// the same chat template.
pub fn same_tokenizer(a: &Tokenizer, b: &Tokenizer, what: &str) -> Result<()> {
    if a.vocab_size() != b.vocab_size() || a.to_json()? != b.to_json()? {
        return Err(Error::Invalid(format!(
            "the policy's and the {what}'s tokenizers differ; they must be the same"
        )));
    }
    let ta = a.chat_template().map(|t| t.source().to_string());
    let tb = b.chat_template().map(|t| t.source().to_string());
    if ta != tb {
        return Err(Error::Invalid(format!(
            "the policy's and the {what}'s chat templates differ; they must be the same"
        )));
    }
    Ok(())
}
