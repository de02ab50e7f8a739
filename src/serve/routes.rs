//! The HTTP routes: thin handlers that check a request (`openai`), submit it to the
//! engine (`engine::EngineHandle`) and turn its events into OpenAI's JSON or
//! server-sent events. A client that goes away drops its event receiver, which
//! cancels its sequences at the engine's next step.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::mpsc;

use super::encode::PromptEncoder;
use super::engine::{Delta, EngineHandle, Event, Job, SubmitError};
use super::openai::{
    chat_logprobs, completion_logprobs, finish_str, usage, ChatRequest, Checked, ChoiceOut,
    CompletionRequest,
};
use crate::web::templates::static_routes;
use crate::web::{auth, ApiError, ApiJson, Templates};

/// What every handler shares.
pub struct AppState {
    pub engine: EngineHandle,
    pub encoder: PromptEncoder,
    /// The `model` name clients use (`/v1/models`).
    pub model_name: String,
    /// SHA-256 of `--api_key`; `None`: no key needed.
    pub api_key_hash: Option<String>,
    pub templates: Templates,
    /// When the server started (unix seconds): the model's `created`.
    pub started: u64,
}

type Shared = Arc<AppState>;

/// The chat page's own static files.
pub const CHAT_STATIC: &[(&str, &str)] = &[
    ("chat.js", include_str!("static/chat.js")),
    ("chat.css", include_str!("static/chat.css")),
];

/// The chat page's template.
pub const CHAT_TEMPLATES: &[(&str, &str)] = &[("chat.html", include_str!("templates/chat.html"))];

pub fn router(state: Shared) -> Router {
    let guarded = Router::new()
        .route("/", get(chat_page))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_key,
        ));
    Router::new()
        .route("/health", get(health))
        .merge(guarded)
        .merge(static_routes(CHAT_STATIC))
        .with_state(state)
}

/// With `--api_key`: the key in `Authorization: Bearer`, the cookie, or `?token=` on
/// the page (which moves it into the cookie).
async fn require_key(State(state): State<Shared>, request: Request, next: Next) -> Response {
    let Some(want) = &state.api_key_hash else {
        return next.run(request).await;
    };
    let (parts, body) = request.into_parts();
    match auth::request_token(&parts) {
        Some((token, source)) if auth::tokens_equal(&auth::token_hash(&token), want) => {
            if source == auth::TokenSource::Query && parts.method == Method::GET {
                return auth::store_and_redirect(&parts, &token);
            }
            next.run(Request::from_parts(parts, body)).await
        }
        _ => ApiError::unauthorized().into_response(),
    }
}

async fn health(State(state): State<Shared>) -> Response {
    let s = &state.engine.stats;
    let alive = s.alive.load(Ordering::SeqCst);
    let status = if !alive {
        "engine stopped"
    } else if s.stopping.load(Ordering::SeqCst) {
        "shutting down"
    } else {
        "ok"
    };
    let body = json!({
        "status": status,
        "running": s.running.load(Ordering::SeqCst),
        "waiting": s.waiting.load(Ordering::SeqCst),
        "cache_columns": s.cache_columns.load(Ordering::SeqCst),
        "cancelled": s.cancelled.load(Ordering::SeqCst),
        "prefilled_tokens": s.prefilled_tokens.load(Ordering::SeqCst),
    });
    let status = if status == "ok" {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

async fn models(State(state): State<Shared>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": state.model_name,
            "object": "model",
            "created": state.started,
            "owned_by": "rlhf",
            "max_model_len": state.engine.context_length,
        }],
    }))
}

async fn chat_page(State(state): State<Shared>) -> Result<Response, ApiError> {
    let data = json!({"model": state.model_name, "context": state.engine.context_length});
    Ok(state
        .templates
        .render(
            "chat.html",
            json!({"title": "chat", "model": state.model_name, "data": data}),
        )?
        .into_response())
}

/// Which endpoint a generation answers.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Text,
}

async fn chat_completions(
    State(state): State<Shared>,
    ApiJson(req): ApiJson<ChatRequest>,
) -> Result<Response, ApiError> {
    let checked = req.check(
        &state.model_name,
        &state.encoder,
        state.engine.context_length,
    )?;
    generate(state, checked, Kind::Chat).await
}

async fn completions(
    State(state): State<Shared>,
    ApiJson(req): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    let checked = req.check(
        &state.model_name,
        &state.encoder,
        state.engine.context_length,
    )?;
    generate(state, checked, Kind::Text).await
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn generate(state: Shared, c: Checked, kind: Kind) -> Result<Response, ApiError> {
    let (tx, rx) = mpsc::unbounded_channel();
    let prompt_tokens = c.prompt.len();
    let job = Job {
        prompt: c.prompt,
        params: c.params.clone(),
        n: c.n,
        events: tx,
    };
    state.engine.submit(job).map_err(|e| match e {
        SubmitError::QueueFull => ApiError::queue_full(state.engine.queue_capacity),
        SubmitError::Stopped => ApiError::unavailable("the generation engine has stopped"),
        SubmitError::ShuttingDown => ApiError::unavailable("the server is shutting down"),
    })?;
    let head = Head {
        id: format!(
            "{}-{}",
            if kind == Kind::Chat {
                "chatcmpl"
            } else {
                "cmpl"
            },
            &auth::new_token()[..24]
        ),
        created: unix_now(),
        model: state.model_name.clone(),
        kind,
        prompt_tokens,
        n: c.n,
        logprobs: c.params.logprobs.is_some(),
        include_usage: c.include_usage,
    };
    if c.stream {
        Ok(stream(state, head, rx))
    } else {
        collect(&state, &head, rx)
            .await
            .map(|v| Json(v).into_response())
    }
}

/// What a response says besides the generated text.
struct Head {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
    prompt_tokens: usize,
    n: usize,
    logprobs: bool,
    include_usage: bool,
}

/// Waits for every choice to finish and builds the whole response.
async fn collect(
    state: &AppState,
    head: &Head,
    mut rx: mpsc::UnboundedReceiver<Event>,
) -> Result<Value, ApiError> {
    let mut choices = vec![ChoiceOut::default(); head.n];
    let mut done = 0;
    while done < head.n {
        match rx.recv().await {
            Some(Event::Delta(d)) => {
                let c = &mut choices[d.choice];
                c.text.push_str(&d.text);
                c.logprobs.extend(d.logprobs);
                if d.finish.is_some() {
                    c.finish = d.finish;
                    c.completion_tokens = d.tokens;
                    done += 1;
                }
            }
            Some(Event::Error(m)) => return Err(ApiError::internal(m)),
            None => return Err(ApiError::unavailable("the generation engine has stopped")),
        }
    }
    let completion_tokens = choices.iter().map(|c| c.completion_tokens).sum();
    let enc = &state.encoder;
    let choices: Vec<Value> = choices
        .iter()
        .enumerate()
        .map(|(i, c)| match head.kind {
            Kind::Chat => json!({
                "index": i,
                "message": {"role": "assistant", "content": c.text, "refusal": null},
                "logprobs": if head.logprobs { chat_logprobs(enc, &c.logprobs) } else { Value::Null },
                "finish_reason": finish_str(c.finish),
            }),
            Kind::Text => json!({
                "index": i,
                "text": c.text,
                "logprobs": if head.logprobs { completion_logprobs(enc, &c.logprobs, 0) } else { Value::Null },
                "finish_reason": finish_str(c.finish),
            }),
        })
        .collect();
    Ok(json!({
        "id": head.id,
        "object": if head.kind == Kind::Chat { "chat.completion" } else { "text_completion" },
        "created": head.created,
        "model": head.model,
        "system_fingerprint": null,
        "choices": choices,
        "usage": usage(head.prompt_tokens, completion_tokens),
    }))
}

/// One server-sent event carrying JSON.
pub fn sse_data(v: &Value) -> String {
    format!("data: {v}\n\n")
}

/// The stream's terminator.
pub const SSE_DONE: &str = "data: [DONE]\n\n";

/// Streams chunks as server-sent events: per choice a first chunk with the role
/// (chat), then one chunk per delta, the last content chunk with `finish_reason`,
/// the usage chunk when asked, then `data: [DONE]`.
fn stream(state: Shared, head: Head, mut rx: mpsc::UnboundedReceiver<Event>) -> Response {
    let (out, body) = mpsc::channel::<Result<String, Infallible>>(64);
    tokio::spawn(async move {
        let chunk = |choices: Vec<Value>| {
            let mut v = json!({
                "id": head.id,
                "object": if head.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" },
                "created": head.created,
                "model": head.model,
                "system_fingerprint": null,
                "choices": choices,
            });
            if head.include_usage {
                v["usage"] = Value::Null;
            }
            v
        };
        let send = |text: String| {
            let out = out.clone();
            async move { out.send(Ok(text)).await.is_ok() }
        };
        if head.kind == Kind::Chat {
            for i in 0..head.n {
                let first = chunk(vec![json!({
                    "index": i,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": null,
                    "finish_reason": null,
                })]);
                if !send(sse_data(&first)).await {
                    return;
                }
            }
        }
        let mut offsets = vec![0usize; head.n];
        let (mut done, mut completion_tokens) = (0, 0);
        while done < head.n {
            let event = tokio::select! {
                e = rx.recv() => e,
                () = out.closed() => return, // the client left: dropping rx cancels
            };
            let d: Delta = match event {
                Some(Event::Delta(d)) => d,
                Some(Event::Error(m)) => {
                    let _ = send(sse_data(&ApiError::internal(m).body())).await;
                    let _ = send(SSE_DONE.into()).await;
                    return;
                }
                None => {
                    let e = ApiError::unavailable("the generation engine has stopped");
                    let _ = send(sse_data(&e.body())).await;
                    return;
                }
            };
            if d.finish.is_some() {
                done += 1;
                completion_tokens += d.tokens;
            } else if d.text.is_empty() && d.logprobs.is_empty() {
                continue; // nothing released by this token yet
            }
            let logprobs = match (head.logprobs, head.kind) {
                (false, _) => Value::Null,
                (true, Kind::Chat) => chat_logprobs(&state.encoder, &d.logprobs),
                (true, Kind::Text) => {
                    completion_logprobs(&state.encoder, &d.logprobs, offsets[d.choice])
                }
            };
            offsets[d.choice] += d.text.len();
            let choice = match head.kind {
                Kind::Chat => json!({
                    "index": d.choice,
                    "delta": {"content": d.text},
                    "logprobs": logprobs,
                    "finish_reason": finish_str(d.finish),
                }),
                Kind::Text => json!({
                    "index": d.choice,
                    "text": d.text,
                    "logprobs": logprobs,
                    "finish_reason": finish_str(d.finish),
                }),
            };
            if !send(sse_data(&chunk(vec![choice]))).await {
                return;
            }
        }
        if head.include_usage {
            let mut last = chunk(vec![]);
            last["usage"] = usage(head.prompt_tokens, completion_tokens);
            if !send(sse_data(&last)).await {
                return;
            }
        }
        let _ = send(SSE_DONE.into()).await;
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(body));
    (
        [
            (CONTENT_TYPE, "text/event-stream"),
            (CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}
