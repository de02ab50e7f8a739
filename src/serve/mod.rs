//! `rlhf serve`: an OpenAI-compatible HTTP server with continuous batching, and its
//! chat page at `/`; `rlhf chat`: the same engine in a terminal.
//!
//! - `engine`: the scheduler (one packed KV-cache row, chunked prefill, per-request
//!   sampling) on its own thread, fed through a bounded queue.
//! - `encode`: message content → token ids with special-token strings as text.
//! - `text`: how much streamed text may be released (stop strings across tokens).
//! - `openai`: request checks and response shapes; `routes`: the HTTP handlers.
//! - `chat_cli`: the terminal chat.

pub mod chat_cli;
pub mod encode;
pub mod engine;
pub mod openai;
pub mod routes;
pub mod text;

use anyhow::{Context, Result};
use clap::Args;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::model::hf::{load_pretrained, Pretrained};
use crate::settings::{at_least, Settings};
use crate::web::{Listen, Server, Templates};
use engine::{Engine, EngineConfig};

#[derive(Debug, Clone, Args)]
#[command(rename_all = "snake_case")]
pub struct ServeArgs {
    /// HF model folder (config.json, model.safetensors, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// Address to bind. The default answers this machine only.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to bind (0: any free port, printed at start).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` (the chat page: open it once with ?token=KEY).
    #[arg(long)]
    pub api_key: Option<String>,
    /// The model name clients pass as `model` (default: the folder's name).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Sequences decoded together, at most (1: one request at a time).
    #[arg(long, default_value_t = 16)]
    pub max_batch: usize,
    /// Requests waiting for a place in the batch, at most; more get 429.
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// Prompt tokens fed per engine step, at most: a long prompt delays the running
    /// sequences by one chunk per step.
    #[arg(long, default_value_t = 64)]
    pub prefill_chunk: usize,
    /// Request bodies larger than this get 413.
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
}

impl Settings for ServeArgs {
    fn validate(&self) -> crate::Result<()> {
        at_least("max_batch", self.max_batch, 1)?;
        at_least("max_queue", self.max_queue, 1)?;
        at_least("prefill_chunk", self.prefill_chunk, 1)?;
        at_least("max_body_bytes", self.max_body_bytes, 1024)
    }
}

/// Loads a model folder for serving.
pub fn load(dir: &Path) -> Result<Pretrained> {
    load_pretrained(dir, &crate::device::default())
        .with_context(|| format!("loading model from {}", dir.display()))
}

/// An engine for a loaded model (its eos ids end sequences).
pub fn engine_for(pre: &Pretrained, config: EngineConfig) -> Engine {
    Engine::new(
        pre.model.clone(),
        pre.tokenizer.clone(),
        pre.eos_token_ids.clone(),
        config,
    )
}

/// The server for `a` (not yet bound) and its engine's handle: what `run` serves,
/// and what tests serve in-process.
pub fn build(a: &ServeArgs) -> Result<(Server, engine::EngineHandle)> {
    let pre = load(&a.model)?;
    let encoder = encode::PromptEncoder::new(pre.tokenizer.clone())?;
    if pre.tokenizer.chat_template().is_none() {
        crate::note!(
            "note: {} has no chat template: /v1/chat/completions will answer 400; /v1/completions works",
            a.model.display()
        );
    }
    let config = EngineConfig {
        max_batch: a.max_batch,
        prefill_chunk: a.prefill_chunk,
    };
    let engine = engine::spawn(engine_for(&pre, config), a.max_queue)?;
    let model_name = a.served_model_name.clone().unwrap_or_else(|| {
        std::fs::canonicalize(&a.model)
            .ok()
            .as_deref()
            .unwrap_or(&a.model)
            .file_name()
            .map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned())
    });
    let mut templates = vec![];
    templates.extend_from_slice(routes::CHAT_TEMPLATES);
    let state = routes::AppState {
        engine: engine.clone(),
        encoder,
        model_name,
        api_key_hash: a.api_key.as_deref().map(crate::web::token_hash),
        templates: Templates::new(&templates)?,
        started: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    };
    let server = Server::new(
        routes::router(Arc::new(state)),
        a.max_body_bytes,
        "OpenAI API",
    );
    Ok((server, engine))
}

/// `rlhf serve`, with settings already validated. Ctrl-C or SIGTERM stops taking
/// connections and generations (503 on a kept-alive connection); the open streams
/// finish.
pub fn run(a: &ServeArgs) -> Result<()> {
    let (server, engine) = build(a)?;
    let listen = Listen {
        host: a.host.clone(),
        port: a.port,
    };
    let shutdown = async move {
        crate::web::server::shutdown_signal().await;
        engine.shutdown();
    };
    crate::web::server::runtime()?.block_on(server.run_async(&listen, shutdown))?;
    Ok(())
}
