//! Prompts in TRL's prompt-only format: `{"prompt": "text"}`, `{"prompt": [messages]}`
//! (conversational) or `{"messages": [...]}`; and their tokenization, with the chat
//! template for conversations.

use serde_json::Value;
use std::path::Path;

use super::chat_template::check_role;
use super::jsonl::read_jsonl;
use super::tokenizer::Tokenizer;
use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// Plain text, tokenized with the tokenizer's special tokens (BOS where it adds one).
    Text(String),
    /// A conversation, rendered with the chat template and a generation prompt.
    Messages(Value),
}

impl Prompt {
    /// Parses one JSONL object; `path` and `line` name the source in errors.
    pub fn from_json(v: &Value, path: &Path, line: usize) -> Result<Self> {
        let field = v
            .get("prompt")
            .map(|p| ("prompt", p))
            .or_else(|| v.get("messages").map(|m| ("messages", m)));
        let Some((name, value)) = field else {
            return Err(Error::bad_file(
                path,
                Some(line),
                "expected a \"prompt\" (string or list of messages) or a \"messages\" field",
            ));
        };
        Self::from_value(value, &format!("field {name:?}"))
            .map_err(|m| Error::bad_file(path, Some(line), m))
    }

    /// Parses a prompt value (text or a list of messages); the error is a message
    /// about `what` (`field "prompt"`). A conversation must end with the user's turn
    /// (the model answers it): a system message alone, or one ending with an
    /// assistant or tool turn, is an error.
    pub fn from_value(v: &Value, what: &str) -> std::result::Result<Self, String> {
        let p = Self::parse(v, what)?;
        if let Prompt::Messages(Value::Array(msgs)) = &p {
            let last = msgs.last().and_then(|m| m["role"].as_str()).unwrap_or("");
            if last != "user" {
                return Err(format!(
                    "{what}: the conversation ends with a {last:?} message; a prompt must end with the user's turn"
                ));
            }
        }
        Ok(p)
    }

    /// Text or a list of messages with known roles, whatever their order (the shape
    /// of a response too).
    pub(crate) fn parse(v: &Value, what: &str) -> std::result::Result<Self, String> {
        match v {
            Value::String(s) => Ok(Prompt::Text(s.clone())),
            Value::Array(msgs) => {
                check_messages(msgs, what)?;
                Ok(Prompt::Messages(v.clone()))
            }
            _ => Err(format!("{what} must be a string or a list of messages")),
        }
    }

    /// Token ids for generation. With `split_special_tokens`, special-token strings
    /// in the text or in the messages' content are encoded as text
    /// (`Tokenizer::encode_chat`).
    pub fn tokenize(&self, tokenizer: &Tokenizer, split_special_tokens: bool) -> Result<Vec<u32>> {
        match self {
            Prompt::Text(t) => tokenizer.encode_with(t, true, split_special_tokens),
            Prompt::Messages(m) => tokenizer.encode_chat(m, true, split_special_tokens),
        }
    }
}

/// Reads a prompts JSONL file; each entry keeps its source line and original object.
pub fn read_prompts(path: &Path) -> Result<Vec<(usize, Value, Prompt)>> {
    read_jsonl(path)?
        .into_iter()
        .map(|l| {
            let p = Prompt::from_json(&l.value, path, l.number)?;
            Ok((l.number, l.value, p))
        })
        .collect()
}

/// Checks a non-empty list of messages, each with a string "role" and a "content";
/// the error is a message about `what`.
fn check_messages(msgs: &[Value], what: &str) -> std::result::Result<(), String> {
    for (i, m) in msgs.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str);
        let Some(role) = role.filter(|_| m.get("content").is_some()) else {
            return Err(format!(
                "{what}: message {i} needs a string \"role\" and a \"content\""
            ));
        };
        check_role(role, i).map_err(|e| format!("{what}: {e}"))?;
    }
    if msgs.is_empty() {
        return Err(format!("{what} is an empty list"));
    }
    Ok(())
}
