//! Binding, the layers every route gets, and shutdown.
//!
//! Every server binds 127.0.0.1 unless `--host` says otherwise (and then says on
//! stderr that it is reachable from other machines). Every route gets the
//! request-size limit, the security headers and the JSON 404. The bound address is
//! printed on stdout as `listening on http://HOST:PORT` (with `--port 0` the system
//! picks the port; tests read it from that line). Ctrl-C or SIGTERM stops taking new
//! connections and lets the open ones finish.

use axum::extract::DefaultBodyLimit;
use axum::http::header::{
    CONTENT_SECURITY_POLICY, REFERRER_POLICY, X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS,
};
use axum::http::HeaderValue;
use axum::response::Response;
use axum::Router;
use std::io::Write;
use std::net::SocketAddr;

use crate::error::{Error, Result};

/// Where a server listens: each server's `--host` (127.0.0.1 by default: this
/// machine only; 0.0.0.0 opens it to the network, every request still needing a
/// token) and `--port` (0: any free port, printed at start). The flags live with each
/// command, whose default ports differ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listen {
    pub host: String,
    pub port: u16,
}

/// Scripts and styles from this server only: no inline script, no `on*=` attribute,
/// no `javascript:` URL runs, whatever text a page shows.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'";

async fn security_headers(mut response: Response) -> Response {
    let h = response.headers_mut();
    h.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    // Links carry tokens: never send the URL to another site.
    h.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    response
}

/// Requests that change state (anything but GET, HEAD and OPTIONS) must carry a JSON
/// body (`Content-Type: application/json`): a page on another site, or another app on
/// this machine (another port of 127.0.0.1 is the same "site" to a browser, so
/// SameSite cookies do not stop it), can submit a form cross-origin, but cannot set
/// that content type without a CORS preflight this server never answers. This stops
/// cross-site requests riding on a page's cookie.
async fn json_writes_only(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    use axum::http::{header::CONTENT_TYPE, Method};
    use axum::response::IntoResponse;
    let safe = matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    );
    let json = request
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim_start()
                .to_ascii_lowercase()
                .starts_with("application/json")
        });
    if safe || json {
        return next.run(request).await;
    }
    super::error::ApiError::bad_request(
        "a request that changes state needs a JSON body (`Content-Type: application/json`)",
    )
    .into_response()
}

/// A router with the shared layers, ready to bind.
pub struct Server {
    router: Router,
    what: &'static str,
}

impl Server {
    /// `what` names the server in its start-up line ("labeling app", "OpenAI API").
    pub fn new(router: Router, max_body_bytes: usize, what: &'static str) -> Self {
        let router = router
            .fallback(super::error::fallback)
            .layer(DefaultBodyLimit::max(max_body_bytes))
            .layer(axum::middleware::from_fn(json_writes_only))
            .layer(axum::middleware::map_response(security_headers));
        Server { router, what }
    }

    /// Binds, prints the address, and serves until Ctrl-C or SIGTERM. Blocks; builds
    /// its own tokio runtime.
    pub fn run(self, listen: &Listen) -> Result<()> {
        runtime()?.block_on(self.run_async(listen, shutdown_signal()))
    }

    /// Binds, prints the address, and serves until `shutdown` completes.
    pub async fn run_async(
        self,
        listen: &Listen,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        let bound = self.bind(listen).await?;
        announce(bound.what, bound.addr)?;
        bound.serve(shutdown).await
    }

    /// Binds without serving yet (tests read the address from `Bound::addr`).
    pub async fn bind(self, listen: &Listen) -> Result<Bound> {
        let listener = tokio::net::TcpListener::bind((listen.host.as_str(), listen.port))
            .await
            .map_err(|e| bind_error(listen, e))?;
        let addr = listener.local_addr().map_err(|e| bind_error(listen, e))?;
        if !addr.ip().is_loopback() {
            crate::note!(
                "note: listening on {addr}, reachable from other machines; every request still needs a token"
            );
        }
        Ok(Bound {
            listener,
            addr,
            router: self.router,
            what: self.what,
        })
    }
}

/// A bound server, not yet serving.
pub struct Bound {
    listener: tokio::net::TcpListener,
    pub addr: SocketAddr,
    router: Router,
    what: &'static str,
}

impl Bound {
    /// Serves until `shutdown` completes, then lets open connections finish.
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        axum::serve(
            self.listener,
            self.router
                .into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|e| Error::Invalid(format!("server stopped: {e}")))
    }
}

/// A multi-threaded tokio runtime for a server.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Invalid(format!("cannot start the async runtime: {e}")))
}

fn bind_error(listen: &Listen, e: std::io::Error) -> Error {
    Error::Invalid(format!(
        "cannot listen on {}:{}: {e}",
        listen.host, listen.port
    ))
}

/// The start-up line on stdout (flushed: a test or a script waits for it).
fn announce(what: &str, addr: SocketAddr) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{what} listening on http://{addr}")
        .and_then(|()| out.flush())
        .map_err(|cause| Error::Write {
            path: "<stdout>".into(),
            cause,
        })
}

/// Completes on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
