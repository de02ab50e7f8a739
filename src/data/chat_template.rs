//! Chat templates rendered with minijinja the way transformers renders them with
//! Jinja2: `trim_blocks`, `lstrip_blocks`, loop controls, `raise_exception`, Python's
//! string methods (`.strip()`, `.startswith()`, `.items()`, ...), a `tojson` that
//! matches Python's `json.dumps(ensure_ascii=False)` (", " and ": " separators) and
//! `strftime_now`. Variables: `messages`, `add_generation_prompt`, `tools` and the
//! special tokens (`bos_token`, `eos_token`, ...).

use minijinja::value::{Kwargs, Value as JValue};
use minijinja::{Environment, ErrorKind};
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;

/// ChatML, the template `rlhf init --chat_template chatml` installs and `rlhf
/// pretrain` gives the tokenizer it trains.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

use crate::error::{Error, Result};

const TEMPLATE_NAME: &str = "chat";

/// The roles a conversation's messages may have (OpenAI's and the templates' of the
/// supported families: `developer` is OpenAI's newer `system`, `ipython` Llama 3's
/// tool results). Another role is an error naming the file and line, before any
/// template sees it: templates treat an unknown role differently (drop it, raise,
/// or render it as a turn of its own).
pub const ROLES: [&str; 6] = [
    "system",
    "developer",
    "user",
    "assistant",
    "tool",
    "ipython",
];

/// Checks message `i`'s role; the error is a message for the caller to place.
pub fn check_role(role: &str, i: usize) -> std::result::Result<(), String> {
    if ROLES.contains(&role) {
        return Ok(());
    }
    Err(format!(
        "message {i} has role {role:?}; expected one of {}",
        ROLES.join(", ")
    ))
}

pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    /// Where the template was read from (`DIR/chat_template.jinja`), named in errors.
    origin: Option<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .field("origin", &self.origin)
            .finish()
    }
}

impl Clone for ChatTemplate {
    fn clone(&self) -> Self {
        let t =
            ChatTemplate::new(&self.source).expect("a template that compiled once compiles again");
        ChatTemplate {
            origin: self.origin.clone(),
            ..t
        }
    }
}

impl ChatTemplate {
    /// Compiles a template; a syntax error names the line.
    pub fn new(source: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .keep_trailing_newline(false)
                .build()
                .expect("default delimiters are valid"),
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(|e| Error::Template(describe(&e)))?;
        Ok(ChatTemplate {
            env,
            source: source.to_string(),
            origin: None,
        })
    }

    /// Compiles a template read from `origin` (a file, or a file and key), which
    /// every error then names.
    pub fn from_origin(source: &str, origin: &str) -> Result<Self> {
        let at = |e: Error| match e {
            Error::Template(m) => Error::Template(format!("{origin}: {m}")),
            e => e,
        };
        let mut t = Self::new(source).map_err(at)?;
        t.origin = Some(origin.to_string());
        Ok(t)
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Where the template was read from, when known.
    pub fn origin(&self) -> Option<&str> {
        self.origin.as_deref()
    }

    /// Renders `messages` (a JSON list of {role, content, ...}) with the special tokens
    /// given as template variables.
    pub fn render(
        &self,
        messages: &Value,
        add_generation_prompt: bool,
        special_tokens: &BTreeMap<String, String>,
    ) -> Result<String> {
        let mut ctx: BTreeMap<String, JValue> = special_tokens
            .iter()
            .map(|(k, v)| (k.clone(), JValue::from(v.clone())))
            .collect();
        ctx.insert(
            "messages".into(),
            JValue::from(minijinja::value::Serde(messages)),
        );
        ctx.insert(
            "add_generation_prompt".into(),
            JValue::from(add_generation_prompt),
        );
        ctx.insert("tools".into(), JValue::from(()));
        ctx.insert("documents".into(), JValue::from(()));
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| Error::Template(describe(&e)))?;
        tmpl.render(ctx).map_err(|e| {
            Error::Template(match &self.origin {
                Some(o) => format!("{o}: {}", describe(&e)),
                None => describe(&e),
            })
        })
    }
}

fn describe(e: &minijinja::Error) -> String {
    let mut msg = match e.kind() {
        ErrorKind::InvalidOperation if e.detail().is_some() => {
            e.detail().unwrap_or_default().to_string()
        }
        _ => e.to_string(),
    };
    if let Some(line) = e.line() {
        msg = format!("line {line}: {msg}");
    }
    msg
}

fn raise_exception(msg: String) -> std::result::Result<JValue, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

fn strftime_now(format: String) -> String {
    chrono::Local::now().format(&format).to_string()
}

/// `json.dumps(x, ensure_ascii=False, indent=indent, sort_keys=sort_keys)`.
fn tojson(value: JValue, kwargs: Kwargs) -> std::result::Result<JValue, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let mut json = serde_json::to_value(&value)
        .map_err(|e| minijinja::Error::new(ErrorKind::BadSerialization, e.to_string()))?;
    if sort_keys.unwrap_or(false) {
        json = sorted(json);
    }
    let mut out = Vec::new();
    let written = match indent {
        Some(n) => {
            let pad = " ".repeat(n);
            let mut ser = serde_json::Serializer::with_formatter(
                &mut out,
                serde_json::ser::PrettyFormatter::with_indent(pad.as_bytes()),
            );
            json.serialize(&mut ser)
        }
        None => {
            let mut ser = serde_json::Serializer::with_formatter(&mut out, PythonFormatter);
            json.serialize(&mut ser)
        }
    };
    written.map_err(|e| minijinja::Error::new(ErrorKind::BadSerialization, e.to_string()))?;
    let text = String::from_utf8(out).expect("serde_json writes UTF-8");
    Ok(JValue::from_safe_string(text))
}

fn sorted(v: Value) -> Value {
    match v {
        Value::Object(map) => {
            let mut entries: Vec<(String, Value)> = map.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(entries.into_iter().map(|(k, v)| (k, sorted(v))).collect())
        }
        Value::Array(a) => Value::Array(a.into_iter().map(sorted).collect()),
        other => other,
    }
}

/// Python's default `json.dumps` separators: ", " between items, ": " after keys.
struct PythonFormatter;

impl serde_json::ser::Formatter for PythonFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }
    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }
    fn begin_object_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
    ) -> std::io::Result<()> {
        writer.write_all(b": ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn render(src: &str, messages: Value, gen: bool) -> Result<String> {
        let special = BTreeMap::from([("eos_token".to_string(), "</s>".to_string())]);
        ChatTemplate::new(src)?.render(&messages, gen, &special)
    }

    #[test]
    fn tojson_uses_python_separators_and_keeps_unicode() {
        let out = render(
            "{{ messages[0] | tojson }}",
            json!([{"role": "user", "content": "héllo <b>"}]),
            false,
        )
        .unwrap();
        assert_eq!(out, r#"{"role": "user", "content": "héllo <b>"}"#);
    }

    #[test]
    fn raise_exception_surfaces_the_message() {
        let err = render(
            "{% if messages[0].role != 'system' %}{{ raise_exception('System first!') }}{% endif %}",
            json!([{"role": "user", "content": "x"}]),
            false,
        )
        .unwrap_err();
        assert!(err.to_string().contains("System first!"), "{err}");
    }

    #[test]
    fn python_methods_loop_controls_and_trim_blocks() {
        let src = "{% for m in messages %}\n  {% if loop.index0 == 1 %}{% break %}{% endif %}\n{{ m.content.strip() | upper }}{{ eos_token }}\n{% endfor %}";
        let out = render(
            src,
            json!([{"role": "user", "content": "  a "}, {"role": "user", "content": "b"}]),
            false,
        )
        .unwrap();
        assert_eq!(out, "A</s>\n");
    }
}
