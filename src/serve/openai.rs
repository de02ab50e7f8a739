//! OpenAI's request and response shapes for `/v1/chat/completions` and
//! `/v1/completions`, and the checks that turn a request into engine settings. Every
//! rejected field is a 400 that names it (`param`). Unknown fields are refused too (a
//! misspelt `max_token` would otherwise be silently ignored), except `user`,
//! `metadata` and `store`, which change nothing here.

use serde::Deserialize;
use serde_json::{json, Value};

use super::encode::{Message, PromptEncoder};
use super::engine::{FinishReason, GenParams, TokenLogprob};
use crate::settings::{float, Range};
use crate::web::ApiError;

/// At most this many choices per request (OpenAI allows 128; a CPU server less).
pub const MAX_N: u64 = 16;
/// At most this many alternatives per token (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: u64 = 20;

/// `stop`: one string or a list of up to 4.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatRequest {
    pub model: Option<String>,
    pub messages: Vec<Value>,
    pub max_completion_tokens: Option<u64>,
    /// The older name of `max_completion_tokens`.
    pub max_tokens: Option<u64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub n: Option<u64>,
    pub stop: Option<Stop>,
    pub seed: Option<i64>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<u64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub user: Option<String>,
    pub metadata: Option<Value>,
    pub store: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: Value,
    pub max_tokens: Option<u64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub n: Option<u64>,
    pub stop: Option<Stop>,
    pub seed: Option<i64>,
    /// How many alternatives to report per token (0 reports the sampled token only).
    pub logprobs: Option<u64>,
    pub echo: Option<bool>,
    pub suffix: Option<String>,
    pub best_of: Option<u64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub user: Option<String>,
}

/// A checked request, ready for the engine.
#[derive(Debug, Clone)]
pub struct Checked {
    pub prompt: Vec<u32>,
    pub params: GenParams,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
}

/// The sampling fields both endpoints share.
struct Common<'a> {
    model: Option<&'a str>,
    /// (field name, value) of the length limit that was given.
    max_tokens: Option<(&'static str, u64)>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    n: Option<u64>,
    stop: Option<&'a Stop>,
    seed: Option<i64>,
    logprobs: Option<usize>,
    presence_penalty: Option<f64>,
    frequency_penalty: Option<f64>,
    stream: Option<bool>,
    stream_options: Option<&'a StreamOptions>,
}

fn setting(e: crate::Error) -> ApiError {
    match e {
        crate::Error::Setting { key, msg } => {
            ApiError::bad_field(key.clone(), format!("{key} {msg}"))
        }
        e => ApiError::bad_request(e.to_string()),
    }
}

fn check_float(key: &str, v: Option<f64>, range: Range) -> Result<(), ApiError> {
    v.map_or(Ok(()), |v| float(key, v, range).map_err(setting))
}

impl Common<'_> {
    /// Checks the fields against the served model and the prompt's length.
    fn check(
        &self,
        served: &str,
        prompt: Vec<u32>,
        context: usize,
        default_max_tokens: Option<u64>,
    ) -> Result<Checked, ApiError> {
        if let Some(m) = self.model {
            if m != served {
                return Err(ApiError {
                    param: Some("model".into()),
                    code: Some("model_not_found"),
                    ..ApiError::not_found(format!(
                        "the model `{m}` does not exist; this server serves `{served}`"
                    ))
                });
            }
        }
        check_float("temperature", self.temperature, Range::Closed(0.0, 2.0))?;
        check_float("top_p", self.top_p, Range::LeftOpen(0.0, 1.0))?;
        check_float(
            "presence_penalty",
            self.presence_penalty,
            Range::Closed(-2.0, 2.0),
        )?;
        check_float(
            "frequency_penalty",
            self.frequency_penalty,
            Range::Closed(-2.0, 2.0),
        )?;
        let n = self.n.unwrap_or(1);
        if !(1..=MAX_N).contains(&n) {
            return Err(ApiError::bad_field(
                "n",
                format!("n must be in [1, {MAX_N}], got {n}"),
            ));
        }
        let stop: Vec<String> = match self.stop {
            None => vec![],
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stop.len() > 4 {
            return Err(ApiError::bad_field(
                "stop",
                format!("stop takes at most 4 strings, got {}", stop.len()),
            ));
        }
        if stop.iter().any(String::is_empty) {
            return Err(ApiError::bad_field(
                "stop",
                "stop strings must not be empty",
            ));
        }
        if prompt.is_empty() {
            return Err(ApiError::bad_field(
                "prompt",
                "the prompt is empty (0 tokens)",
            ));
        }
        let room = context.saturating_sub(prompt.len());
        let (field, max_tokens) = match (self.max_tokens, default_max_tokens) {
            (Some((f, v)), _) => (f, v),
            (None, Some(v)) => ("max_tokens", v.min(room as u64)),
            (None, None) => ("max_completion_tokens", room as u64),
        };
        if max_tokens == 0 && self.max_tokens.is_some() {
            return Err(ApiError::bad_field(
                field,
                format!("{field} must be ≥ 1, got 0"),
            ));
        }
        if max_tokens == 0 || (prompt.len() as u64).saturating_add(max_tokens) > context as u64 {
            return Err(ApiError {
                code: Some("context_length_exceeded"),
                ..ApiError::bad_field(
                    field,
                    format!(
                        "this model's context is {context} tokens; the prompt has {} tokens and \
                         {field} is {max_tokens}",
                        prompt.len()
                    ),
                )
            });
        }
        let stream = self.stream.unwrap_or(false);
        if self.stream_options.is_some() && !stream {
            return Err(ApiError::bad_field(
                "stream_options",
                "stream_options is only allowed with stream: true",
            ));
        }
        Ok(Checked {
            prompt,
            params: GenParams {
                max_tokens: max_tokens as usize,
                temperature: self.temperature.unwrap_or(1.0) as f32,
                top_p: self.top_p.unwrap_or(1.0) as f32,
                stop,
                seed: self.seed.map(|s| s as u64),
                logprobs: self.logprobs,
                presence_penalty: self.presence_penalty.unwrap_or(0.0) as f32,
                frequency_penalty: self.frequency_penalty.unwrap_or(0.0) as f32,
            },
            n: n as usize,
            stream,
            include_usage: self.stream_options.is_some_and(|o| o.include_usage),
        })
    }
}

/// The roles a request may use.
const ROLES: [&str; 4] = ["system", "developer", "user", "assistant"];

/// `messages`: a non-empty list of {role, content}, content a string or a list of
/// text parts. `developer` is passed to the template as `system`.
pub fn parse_messages(messages: &[Value]) -> Result<Vec<Message>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::bad_field(
            "messages",
            "messages must not be empty",
        ));
    }
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let role = m.get("role").and_then(Value::as_str).ok_or_else(|| {
                ApiError::bad_field(
                    format!("messages[{i}].role"),
                    format!("messages[{i}] needs a string \"role\""),
                )
            })?;
            if !ROLES.contains(&role) {
                return Err(ApiError::bad_field(
                    format!("messages[{i}].role"),
                    format!("messages[{i}].role must be one of {ROLES:?}, got {role:?}"),
                ));
            }
            let content = match m.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => parts
                    .iter()
                    .map(|p| match (p.get("type").and_then(Value::as_str), p.get("text")) {
                        (Some("text"), Some(Value::String(t))) => Ok(t.as_str()),
                        _ => Err(ApiError::bad_field(
                            format!("messages[{i}].content"),
                            format!("messages[{i}].content: only text parts ({{\"type\": \"text\", \"text\": ...}}) are supported"),
                        )),
                    })
                    .collect::<Result<Vec<_>, _>>()?
                    .concat(),
                _ => {
                    return Err(ApiError::bad_field(
                        format!("messages[{i}].content"),
                        format!("messages[{i}] needs a \"content\" string or list of text parts"),
                    ))
                }
            };
            let role = if role == "developer" { "system" } else { role };
            Ok(Message {
                role: role.to_string(),
                content,
            })
        })
        .collect()
}

impl ChatRequest {
    pub fn check(
        &self,
        served: &str,
        encoder: &PromptEncoder,
        context: usize,
    ) -> Result<Checked, ApiError> {
        let messages = parse_messages(&self.messages)?;
        let max_tokens = match (self.max_completion_tokens, self.max_tokens) {
            (Some(a), Some(b)) if a != b => {
                return Err(ApiError::bad_field(
                    "max_tokens",
                    format!("max_tokens ({b}) and max_completion_tokens ({a}) disagree; give one"),
                ))
            }
            (Some(a), _) => Some(("max_completion_tokens", a)),
            (None, Some(b)) => Some(("max_tokens", b)),
            (None, None) => None,
        };
        let top = self.top_logprobs;
        if let Some(k) = top {
            if k > MAX_TOP_LOGPROBS {
                return Err(ApiError::bad_field(
                    "top_logprobs",
                    format!("top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {k}"),
                ));
            }
            if self.logprobs != Some(true) {
                return Err(ApiError::bad_field(
                    "top_logprobs",
                    "top_logprobs needs logprobs: true",
                ));
            }
        }
        let logprobs = (self.logprobs == Some(true)).then(|| top.unwrap_or(0) as usize);
        // Checked before the template runs, so a bad field is named even when the
        // template would refuse the conversation.
        let common = Common {
            model: self.model.as_deref(),
            max_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            n: self.n,
            stop: self.stop.as_ref(),
            seed: self.seed,
            logprobs,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            stream: self.stream,
            stream_options: self.stream_options.as_ref(),
        };
        common.check(served, vec![0], usize::MAX, None)?;
        let prompt = encoder
            .encode_messages(&messages)
            .map_err(|e| ApiError::bad_field("messages", e.to_string()))?;
        common.check(served, prompt, context, None)
    }
}

impl CompletionRequest {
    pub fn check(
        &self,
        served: &str,
        encoder: &PromptEncoder,
        context: usize,
    ) -> Result<Checked, ApiError> {
        let text = match &self.prompt {
            Value::String(s) => s.as_str(),
            Value::Array(v) if v.len() == 1 && v[0].is_string() => v[0].as_str().unwrap_or(""),
            _ => {
                return Err(ApiError::bad_field(
                    "prompt",
                    "prompt must be a string (or a list of one string)",
                ))
            }
        };
        if self.echo == Some(true) {
            return Err(ApiError::bad_field("echo", "echo is not supported"));
        }
        if self.suffix.is_some() {
            return Err(ApiError::bad_field("suffix", "suffix is not supported"));
        }
        if let Some(b) = self.best_of {
            if b != self.n.unwrap_or(1) {
                return Err(ApiError::bad_field(
                    "best_of",
                    "best_of must equal n (or be left out)",
                ));
            }
        }
        if let Some(k) = self.logprobs {
            if k > MAX_TOP_LOGPROBS {
                return Err(ApiError::bad_field(
                    "logprobs",
                    format!("logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {k}"),
                ));
            }
        }
        let common = Common {
            model: self.model.as_deref(),
            max_tokens: self.max_tokens.map(|v| ("max_tokens", v)),
            temperature: self.temperature,
            top_p: self.top_p,
            n: self.n,
            stop: self.stop.as_ref(),
            seed: self.seed,
            logprobs: self.logprobs.map(|k| k as usize),
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            stream: self.stream,
            stream_options: self.stream_options.as_ref(),
        };
        // A completion prompt is the model's raw input (the caller may write a chat
        // format by hand), encoded as `rlhf generate --prompt` encodes it.
        let prompt = encoder
            .tokenizer()
            .encode(text, true)
            .map_err(|e| ApiError::bad_field("prompt", e.to_string()))?;
        // OpenAI's default for this endpoint: 16 tokens.
        common.check(served, prompt, context, Some(16))
    }
}

/// One choice's output gathered from its deltas.
#[derive(Debug, Clone, Default)]
pub struct ChoiceOut {
    pub text: String,
    pub logprobs: Vec<TokenLogprob>,
    pub finish: Option<FinishReason>,
    pub completion_tokens: usize,
}

pub fn finish_str(f: Option<FinishReason>) -> Value {
    match f {
        Some(FinishReason::Stop) => json!("stop"),
        Some(FinishReason::Length) => json!("length"),
        None => Value::Null,
    }
}

/// Chat logprobs: `{"content": [{token, logprob, bytes, top_logprobs}], "refusal": null}`.
pub fn chat_logprobs(enc: &PromptEncoder, lps: &[TokenLogprob]) -> Value {
    let entry = |id: u32, lp: f32| {
        let bytes = enc.token_bytes(id);
        json!({
            "token": String::from_utf8_lossy(&bytes),
            "logprob": lp,
            "bytes": bytes,
        })
    };
    let content: Vec<Value> = lps
        .iter()
        .map(|t| {
            let mut e = entry(t.id, t.logprob);
            e["top_logprobs"] = t.top.iter().map(|&(id, lp)| entry(id, lp)).collect();
            e
        })
        .collect();
    json!({"content": content, "refusal": null})
}

/// Completion logprobs: `{tokens, token_logprobs, top_logprobs, text_offset}`;
/// `offset` is where this piece starts in the whole completion text.
pub fn completion_logprobs(enc: &PromptEncoder, lps: &[TokenLogprob], mut offset: usize) -> Value {
    let mut tokens = vec![];
    let mut token_logprobs = vec![];
    let mut top = vec![];
    let mut offsets = vec![];
    for t in lps {
        let text = enc.token_text(t.id);
        offsets.push(offset);
        offset += text.len();
        tokens.push(text);
        token_logprobs.push(t.logprob);
        let alternatives: serde_json::Map<String, Value> = t
            .top
            .iter()
            .map(|&(id, lp)| (enc.token_text(id), json!(lp)))
            .collect();
        top.push(Value::Object(alternatives));
    }
    json!({"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets})
}

pub fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    })
}
