//! Where the reward is read: the one rule that turns (prompt, response) into the token
//! ids the reward model scores, at the last one. `rm train`, `rm eval`, `rm score`,
//! PPO's scoring and the exported `...ForSequenceClassification` folder all read the
//! reward at the same token:
//!
//! - conversational prompt (a list of messages): the conversation with the response
//!   as the assistant's turn, rendered by the chat template without a generation
//!   prompt and tokenized as transformers' `apply_chat_template(prompt + [{"role":
//!   "assistant", "content": response}], tokenize=True)` does (no special tokens
//!   added). The reward is read at the end of the templated turn, i.e. on the tokens
//!   the template closes a turn with (ChatML: `<|im_end|>` then `\n`), which are the
//!   tokens the SFT policy learned to emit;
//! - plain-text prompt: prompt (with the tokenizer's special tokens) + response +
//!   the tokenizer's eos. An end token already closing the response (any of the
//!   model's eos ids) is replaced by it.
//!
//! Either way the reward does not depend on which end token a policy stopped with:
//! before this rule, the end token was whatever followed the response, and a policy
//! trained with PPO learned to end its turns with the token the reward model paid for
//! (`<|endoftext|>` instead of `<|im_end|>`), which breaks the conversation after it.
//!
//! transformers' sequence classifiers read the score at the last token that is not
//! the config's `pad_token_id`; the ids built here end with a token other than the
//! pad whenever the pad is its own token (as in `rlhf pretrain`'s tokenizers).

use serde_json::Value;

use super::prompts::Prompt;
use super::tokenizer::Tokenizer;
use crate::error::{Error, Result};

/// A response as comparison data and `rm score` rows give it: text (the assistant's
/// content for a conversational prompt), or assistant messages (TRL's conversational
/// `chosen` / `rejected`).
#[derive(Debug, Clone, PartialEq)]
pub enum Response {
    Text(String),
    Messages(Vec<Value>),
}

impl Response {
    /// Parses a response value; the error is a message about `what` ("response 2").
    pub fn from_value(v: &Value, what: &str) -> std::result::Result<Self, String> {
        // The same shapes as a prompt's, checked by the same rules.
        Ok(match Prompt::parse(v, what)? {
            Prompt::Text(s) => Response::Text(s),
            Prompt::Messages(m) => Response::Messages(m.as_array().cloned().unwrap_or_default()),
        })
    }
}

/// The rule, with the reward model's tokenizer and end tokens.
#[derive(Debug, Clone, Copy)]
pub struct RewardInput<'a> {
    pub tokenizer: &'a Tokenizer,
    /// The tokenizer's eos: the last token of a plain-text input.
    pub eos: u32,
    /// Every id that ends a generation (the model's eos list).
    pub eos_ids: &'a [u32],
    /// Special-token strings in prompts and responses encoded as text
    /// (`Tokenizer::encode_chat`); false is transformers' default.
    pub split_special_tokens: bool,
}

impl RewardInput<'_> {
    /// The ids the reward model reads for `prompt` and `response`; the reward is the
    /// scalar head's output at the last one.
    pub fn ids(&self, prompt: &Prompt, response: &Response) -> Result<Vec<u32>> {
        match (prompt, response) {
            (Prompt::Messages(p), r) => {
                let turn = match r {
                    Response::Text(t) => {
                        vec![serde_json::json!({"role": "assistant", "content": t})]
                    }
                    Response::Messages(m) => m.clone(),
                };
                let msgs = p.as_array().ok_or_else(|| {
                    Error::Invalid("a conversational prompt must be a list of messages".into())
                })?;
                let all = Value::Array(msgs.iter().cloned().chain(turn).collect());
                self.tokenizer
                    .encode_chat(&all, false, self.split_special_tokens)
            }
            (Prompt::Text(p), Response::Text(t)) => {
                let split = self.split_special_tokens;
                let mut ids = self.tokenizer.encode_with(p, true, split)?;
                let mut r = self.tokenizer.encode_with(t, false, split)?;
                while r
                    .last()
                    .is_some_and(|x| *x == self.eos || self.eos_ids.contains(x))
                {
                    r.pop();
                }
                ids.extend(r);
                ids.push(self.eos);
                Ok(ids)
            }
            (Prompt::Text(_), Response::Messages(_)) => Err(Error::Invalid(
                "the response is a list of messages but the prompt is plain text".into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tokenizer() -> Tokenizer {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen2");
        Tokenizer::from_dir(&dir).unwrap()
    }

    #[test]
    fn chat_prompts_end_with_the_templated_turn_and_text_with_the_eos() {
        let tok = tokenizer();
        let (eos, im_end) = (
            tok.token_to_id("<|endoftext|>").unwrap(),
            tok.token_to_id("<|im_end|>").unwrap(),
        );
        let rule = RewardInput {
            tokenizer: &tok,
            eos,
            eos_ids: &[eos, im_end],
            split_special_tokens: false,
        };
        let chat = Prompt::Messages(json!([{"role": "user", "content": "hi"}]));
        let ids = rule.ids(&chat, &Response::Text("hello".into())).unwrap();
        let text = tok.decode(&ids, false).unwrap();
        assert!(
            text.ends_with("<|im_start|>assistant\nhello<|im_end|>\n"),
            "{text:?}"
        );
        // The same turn given as TRL's assistant messages.
        let as_msgs = Response::Messages(vec![json!({"role": "assistant", "content": "hello"})]);
        assert_eq!(rule.ids(&chat, &as_msgs).unwrap(), ids);

        let plain = Prompt::Text("The cat".into());
        let ids = rule.ids(&plain, &Response::Text(" sat".into())).unwrap();
        assert_eq!(*ids.last().unwrap(), eos);
        // Whichever end token the text already has, the eos is read, once.
        for end in ["<|endoftext|>", "<|im_end|>"] {
            let with = rule
                .ids(&plain, &Response::Text(format!(" sat{end}")))
                .unwrap();
            assert_eq!(with, ids, "{end}");
        }
        assert!(rule.ids(&plain, &as_msgs).is_err());
    }
}
