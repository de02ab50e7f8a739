//! The labeling app over HTTP: thin handlers over the store. Every page and API call
//! needs a token (a labeler's, or the admin's for the admin page); the store runs on
//! a blocking thread behind one mutex (SQLite serialises writes anyway).
//!
//! | route | who | what |
//! |---|---|---|
//! | `GET /` | any | redirects to `/label` (or `/admin` for the admin) |
//! | `GET /label` | any | the page of the project's kind |
//! | `GET /admin` | admin | progress, agreement, disagreed items, win rate |
//! | `GET /api/next` | any | the labeler's current item and progress |
//! | `POST /api/labels` | any | a label or a skip (idempotent by `client_id`) |
//! | `POST /api/undo` | any | undo the labeler's last submission |
//! | `GET /api/admin` | admin | the admin page's numbers as JSON |

use axum::extract::State;
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};

use super::assign::Progress;
use super::error::LabelError;
use super::project::{a_on_left, display_order, salt};
use super::stats::{admin_stats, prompt_text};
use super::store::{Kind, Labeler, Project, Store};
use super::submission::{check, Submission, FLAGS};
use crate::web::auth::{request_token, store_and_redirect, TokenSource};
use crate::web::templates::static_routes;
use crate::web::{ApiError, ApiJson, Listen, Server, Templates};

const TEMPLATES: &[(&str, &str)] = &[
    ("label.html", include_str!("templates/label.html")),
    ("admin.html", include_str!("templates/admin.html")),
];

const STATIC: &[(&str, &str)] = &[
    ("label.js", include_str!("static/label.js")),
    ("label.css", include_str!("static/label.css")),
];

pub struct AppState {
    store: Mutex<Store>,
    project: Project,
    salt: u64,
    guidelines_html: String,
    templates: Templates,
    lease_s: f64,
}

type Shared = Arc<AppState>;

impl From<LabelError> for ApiError {
    fn from(e: LabelError) -> Self {
        match e {
            LabelError::Field { field, msg } => {
                ApiError::bad_field(field.clone(), format!("{field}: {msg}"))
            }
            LabelError::Invalid(m) => ApiError::bad_request(m),
            LabelError::Conflict(m) => {
                ApiError::new(StatusCode::CONFLICT, "invalid_request_error", m)
            }
            LabelError::NotFound(m) => ApiError::not_found(m),
            other => ApiError::internal(other.to_string()),
        }
    }
}

/// Markdown to HTML with raw HTML shown as text and links kept only for http(s),
/// mailto and relative targets: the guidelines cannot inject markup or scripts.
pub fn render_markdown(md: &str) -> String {
    use pulldown_cmark::{Event, Parser, Tag};
    let safe_url = |u: &str| {
        let lower = u.trim().to_ascii_lowercase();
        !lower.contains(':')
            || ["http:", "https:", "mailto:"]
                .iter()
                .any(|s| lower.starts_with(s))
    };
    let events = Parser::new(md).map(|e| match e {
        Event::Html(h) | Event::InlineHtml(h) => Event::Text(h),
        Event::Start(Tag::Link {
            link_type,
            dest_url,
            title,
            id,
        }) if !safe_url(&dest_url) => Event::Start(Tag::Link {
            link_type,
            dest_url: "#".into(),
            title,
            id,
        }),
        Event::Start(Tag::Image {
            link_type,
            dest_url,
            title,
            id,
        }) if !safe_url(&dest_url) => Event::Start(Tag::Image {
            link_type,
            dest_url: "#".into(),
            title,
            id,
        }),
        other => other,
    });
    let mut html = String::new();
    pulldown_cmark::html::push_html(&mut html, events);
    html
}

/// Runs a store call on a blocking thread.
async fn with_store<T: Send + 'static>(
    state: &Shared,
    f: impl FnOnce(&mut Store) -> super::error::Result<T> + Send + 'static,
) -> Result<T, ApiError> {
    let state = state.clone();
    tokio::task::spawn_blocking(move || {
        // A panic in an earlier call poisons the lock; the store is still sound (an
        // unfinished transaction rolls back when dropped), so keep serving.
        let mut store = state.store.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut store).map_err(ApiError::from)
    })
    .await
    .map_err(|e| ApiError::internal(format!("store task failed: {e}")))?
}

/// The labeler a request's token belongs to, and where the token came from. A link's
/// `?token=` wins over the cookie (`request_token`): opening a personal link signs in
/// as that person even where another's cookie is set (one browser shared by two).
async fn who(state: &Shared, parts: &Parts) -> Result<(Labeler, TokenSource, String), ApiError> {
    let (token, source) = request_token(parts).ok_or_else(ApiError::unauthorized)?;
    let t = token.clone();
    let found = with_store(state, move |s| s.labeler_by_token(&t)).await?;
    found
        .map(|l| (l, source, token))
        .ok_or_else(ApiError::unauthorized)
}

fn require_admin(l: &Labeler) -> Result<(), ApiError> {
    if l.is_admin {
        Ok(())
    } else {
        Err(ApiError::forbidden("the admin page needs an admin token"))
    }
}

async fn index(State(state): State<Shared>, parts: Parts) -> Result<Response, ApiError> {
    let (l, source, token) = who(&state, &parts).await?;
    if source == TokenSource::Query {
        return Ok(store_and_redirect(&parts, &token));
    }
    Ok(Redirect::to(if l.is_admin { "/admin" } else { "/label" }).into_response())
}

async fn label_page(State(state): State<Shared>, parts: Parts) -> Result<Response, ApiError> {
    let (l, source, token) = who(&state, &parts).await?;
    if source == TokenSource::Query {
        return Ok(store_and_redirect(&parts, &token));
    }
    let flags: Vec<Value> = FLAGS
        .iter()
        .map(|(k, t)| json!({"key": k, "text": t}))
        .collect();
    let data = json!({"kind": state.project.kind.name(), "k": state.project.k, "flags": flags});
    Ok(state
        .templates
        .render(
            "label.html",
            json!({
                "title": format!("Label ({})", state.project.kind.name()),
                "kind": state.project.kind.name(),
                "labeler": l.name,
                "is_admin": l.is_admin,
                "guidelines": state.guidelines_html,
                "data": data,
            }),
        )?
        .into_response())
}

async fn admin_page(State(state): State<Shared>, parts: Parts) -> Result<Response, ApiError> {
    let (l, source, token) = who(&state, &parts).await?;
    if source == TokenSource::Query {
        return Ok(store_and_redirect(&parts, &token));
    }
    require_admin(&l)?;
    let stats = with_store(&state, |s| admin_stats(s)).await?;
    Ok(state
        .templates
        .render(
            "admin.html",
            json!({"title": "Labeling: admin", "stats": stats}),
        )?
        .into_response())
}

async fn admin_api(State(state): State<Shared>, parts: Parts) -> Result<Response, ApiError> {
    let (l, _, _) = who(&state, &parts).await?;
    require_admin(&l)?;
    let stats = with_store(&state, |s| admin_stats(s)).await?;
    Ok(Json(stats).into_response())
}

#[derive(Serialize)]
struct NextResponse {
    item: Option<Value>,
    progress: Progress,
    /// Whether the labeler has a submission to undo.
    can_undo: bool,
}

/// The item as the labeler sees it: responses in the labeler's own random order
/// (each with its stored index), compare sides in the item's random order.
fn present(state: &AppState, item: &super::store::Item, labeler: &Labeler) -> Value {
    let base =
        json!({"id": item.id, "prompt": item.prompt, "prompt_text": prompt_text(&item.prompt)});
    let mut v = base;
    match state.project.kind {
        Kind::Rank => {
            let order = display_order(state.salt, item.id, labeler.id, item.responses.len());
            v["responses"] = order
                .iter()
                .map(|&i| json!({"index": i, "text": item.responses[i]}))
                .collect();
        }
        Kind::Compare => {
            let (l, r) = if a_on_left(state.salt, item.id) {
                (0, 1)
            } else {
                (1, 0)
            };
            v["left"] = json!(item.responses[l]);
            v["right"] = json!(item.responses[r]);
        }
        Kind::Demonstrate => {}
    }
    v
}

async fn next(State(state): State<Shared>, parts: Parts) -> Result<Response, ApiError> {
    let (l, _, _) = who(&state, &parts).await?;
    let lease = state.lease_s;
    let st = state.clone();
    let resp = with_store(&state, move |s| {
        let item = match s.next_item(&l, lease)? {
            Some(id) => Some(present(&st, &s.item(id)?, &l)),
            None => None,
        };
        let progress = s.progress(&l, lease)?;
        Ok(NextResponse {
            item,
            can_undo: progress.done > 0,
            progress,
        })
    })
    .await?;
    Ok(Json(resp).into_response())
}

/// The labeler behind a request, checked before the body is read (so a request
/// without a valid token is 401 whatever its body).
pub struct Authed(Labeler);

impl axum::extract::FromRequestParts<Shared> for Authed {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Shared) -> Result<Self, ApiError> {
        who(state, parts).await.map(|(l, _, _)| Authed(l))
    }
}

async fn submit(
    State(state): State<Shared>,
    Authed(l): Authed,
    ApiJson(sub): ApiJson<Submission>,
) -> Result<Response, ApiError> {
    let label = check(&state.project, &sub, a_on_left(state.salt, sub.item_id))?;
    let lease = state.lease_s;
    let stored = with_store(&state, move |s| s.submit_within(&l, &label, lease)).await?;
    Ok(Json(stored).into_response())
}

async fn undo(State(state): State<Shared>, parts: Parts) -> Result<Response, ApiError> {
    let (l, _, _) = who(&state, &parts).await?;
    let item = with_store(&state, move |s| s.undo_last(&l)).await?;
    Ok(Json(json!({"undone_item": item})).into_response())
}

/// The router over a store (tests serve it in-process).
pub fn router(store: Store, lease_s: f64) -> super::error::Result<Router> {
    let project = store.project()?;
    let state = Arc::new(AppState {
        salt: salt(&project),
        guidelines_html: render_markdown(&project.guidelines),
        project,
        store: Mutex::new(store),
        templates: Templates::new(TEMPLATES)?,
        lease_s,
    });
    Ok(Router::new()
        .route("/", get(index))
        .route("/label", get(label_page))
        .route("/admin", get(admin_page))
        .route("/api/next", get(next))
        .route("/api/labels", post(submit))
        .route("/api/undo", post(undo))
        .route("/api/admin", get(admin_api))
        .with_state(state)
        .merge(static_routes(STATIC)))
}

/// `rlhf label serve`: serves until Ctrl-C or SIGTERM.
pub fn serve(
    store: Store,
    listen: &Listen,
    lease_s: f64,
    max_body_bytes: usize,
) -> anyhow::Result<()> {
    let router = router(store, lease_s)?;
    Server::new(router, max_body_bytes, "labeling app").run(listen)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::render_markdown;

    #[test]
    fn guidelines_markdown_renders_without_raw_html_or_script_links() {
        let html = render_markdown(
            "# Rank\n\n*Prefer* honest answers.\n\n<script>alert(1)</script>\n\n\
             Inline <img src=x onerror=alert(2)> and [bad](javascript:alert(3)) [ok](https://example.com)",
        );
        assert!(
            html.contains("<h1>Rank</h1>") && html.contains("<em>Prefer</em>"),
            "{html}"
        );
        assert!(
            !html.contains("<script>") && !html.contains("<img"),
            "{html}"
        );
        assert!(html.contains("&lt;script&gt;"), "{html}");
        assert!(!html.contains("javascript:"), "{html}");
        assert!(html.contains("href=\"https://example.com\""), "{html}");
    }
}
