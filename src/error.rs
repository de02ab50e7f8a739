//! The library's typed errors. Each variant carries the actual values (file, tensor,
//! shapes, lengths) so that the binary can print a message a user can act on without
//! a backtrace; `main` prints the chain and exits with code 2.

use std::path::{Path, PathBuf};

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    // The I/O error is part of the message, not a `source`: a chain printer
    // (`{:#}` at the binary's edge) would print it twice.
    #[error("cannot read {}: {cause}", path.display())]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },

    #[error("cannot write {}: {cause}", path.display())]
    Write {
        path: PathBuf,
        cause: std::io::Error,
    },

    /// A file whose content is not what was expected. `line` is 1-based when known.
    #[error("{}{}: {msg}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
    BadFile {
        path: PathBuf,
        line: Option<usize>,
        msg: String,
    },

    #[error("{}: model_type {model_type:?} is not supported (supported: gpt2, llama, qwen2)", path.display())]
    UnknownModelType { path: PathBuf, model_type: String },

    #[error("{}: tensor {name:?} is missing", path.display())]
    MissingTensor { path: PathBuf, name: String },

    #[error("{}: tensor {name:?} has shape {got:?}, the config expects {expected:?}", path.display())]
    TensorShape {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },

    #[error(
        "tokenizer has {tokenizer} tokens but the model's embedding has only {embedding} rows"
    )]
    TokenizerTooLarge { tokenizer: usize, embedding: usize },

    #[error("prompt {index} has {prompt_tokens} tokens and max_new_tokens is {max_new_tokens}, but the model's context is {context} tokens")]
    PromptTooLong {
        index: usize,
        prompt_tokens: usize,
        max_new_tokens: usize,
        context: usize,
    },

    #[error("chat template: {0}")]
    Template(String),

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// A setting or argument with an invalid value.
    #[error("{0}")]
    Invalid(String),

    /// A setting outside its allowed range: `key` is its name (its config key; the
    /// command line shows it as `--key`), `msg` the rule and the value given
    /// ("must be ≥ 0, got -1"). Built by `crate::settings`.
    #[error("{key} {msg}")]
    Setting { key: String, msg: String },

    /// An output folder a run may not write (it holds a model, or is an input).
    #[error("--output_dir {}: {what}", path.display())]
    OutputDir { path: PathBuf, what: String },

    /// A model folder of the wrong kind for a command: a reward model where a causal
    /// LM is expected, or the reverse.
    #[error("{}: {found}; expected {expected}", path.display())]
    WrongModelKind {
        path: PathBuf,
        expected: String,
        found: String,
    },

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl Error {
    pub fn read(path: &Path, cause: std::io::Error) -> Self {
        Error::Read {
            path: path.to_path_buf(),
            cause,
        }
    }

    pub fn write(path: &Path, cause: std::io::Error) -> Self {
        Error::Write {
            path: path.to_path_buf(),
            cause,
        }
    }

    pub fn bad_file(path: &Path, line: Option<usize>, msg: impl Into<String>) -> Self {
        Error::BadFile {
            path: path.to_path_buf(),
            line,
            msg: msg.into(),
        }
    }
}

/// Reads a whole file, naming it in the error.
pub fn read_to_string(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::read(path, e))?;
    String::from_utf8(bytes).map_err(|e| {
        let upto = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        let line = upto.iter().filter(|&&b| b == b'\n').count() + 1;
        Error::bad_file(path, Some(line), "invalid UTF-8")
    })
}

/// Parses a whole JSON file, naming the file and line on error.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = read_to_string(path)?;
    serde_json::from_str(&text).map_err(|e| Error::bad_file(path, Some(e.line()), e.to_string()))
}
