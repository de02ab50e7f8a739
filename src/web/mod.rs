//! The HTTP layer shared by `rlhf serve` (the OpenAI-compatible server and its chat
//! page) and `rlhf label` (the labeling app): binding and shutdown, tokens, errors in
//! one JSON shape, a JSON extractor whose rejections use that shape, the request-size
//! limit, security headers, HTML templates with auto-escaping and the shared static
//! files. Nothing here knows about models or labels.
//!
//! Model outputs and prompts are untrusted text. Two rules keep them inert: templates
//! auto-escape every `.html` render (data handed to scripts goes through `tojson`,
//! which escapes `<`, `>` and `&`), and every page is served with a Content Security
//! Policy that allows scripts from `/static/` only, so an injected inline script or
//! `onerror` attribute would not run even if it slipped through.

pub mod auth;
pub mod error;
pub mod json;
pub mod server;
pub mod templates;

pub use auth::{new_token, token_hash, TokenSource};
pub use error::ApiError;
pub use json::ApiJson;
pub use server::{Bound, Listen, Server};
pub use templates::Templates;
