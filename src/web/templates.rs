//! HTML pages from minijinja templates compiled into the binary, and the static files
//! (CSS, JavaScript) they load. There is no build step: the files under
//! `src/web/static/` and each server's own are embedded with `include_str!`.
//!
//! Every template whose name ends in `.html` auto-escapes what it prints; values for
//! scripts are passed with `tojson` (minijinja escapes `<`, `>`, `&` and `'` in it),
//! so a prompt or a model output is text wherever it lands.

use axum::extract::Path;
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use minijinja::Environment;
use serde::Serialize;
use std::sync::Arc;

use super::error::ApiError;

/// The layout every page extends: it loads `/static/style.css` and `/static/api.js`.
pub const BASE: (&str, &str) = ("base.html", include_str!("static/base.html"));

/// The shared static files.
pub const SHARED_STATIC: &[(&str, &str)] = &[
    ("style.css", include_str!("static/style.css")),
    ("api.js", include_str!("static/api.js")),
];

/// A set of compiled templates.
#[derive(Clone)]
pub struct Templates {
    env: Arc<Environment<'static>>,
}

impl Templates {
    /// Compiles `base.html` and the given (name, source) templates. A template that
    /// does not compile is a bug in the binary, reported with its name and line.
    pub fn new(templates: &[(&'static str, &'static str)]) -> crate::Result<Self> {
        let mut env = Environment::new();
        // Auto-escape HTML for .html templates (minijinja's default callback).
        env.set_auto_escape_callback(minijinja::default_auto_escape_callback);
        env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
        for (name, source) in std::iter::once(&BASE).chain(templates) {
            env.add_template(name, source)
                .map_err(|e| crate::Error::Template(format!("{name}: {e:#}")))?;
        }
        Ok(Templates { env: Arc::new(env) })
    }

    /// Renders a page.
    pub fn render(&self, name: &str, ctx: impl Serialize) -> Result<Html<String>, ApiError> {
        self.env
            .get_template(name)
            .and_then(|t| t.render(minijinja::value::Serde(&ctx)))
            .map(Html)
            .map_err(|e| ApiError::internal(format!("rendering {name}: {e:#}")))
    }
}

/// `GET /static/{name}` for the shared files and `extra` (a server's own scripts).
pub fn static_routes<S: Clone + Send + Sync + 'static>(
    extra: &'static [(&'static str, &'static str)],
) -> Router<S> {
    Router::new().route(
        "/static/{name}",
        get(move |Path(name): Path<String>| async move { static_file(&name, extra) }),
    )
}

fn static_file(name: &str, extra: &[(&str, &'static str)]) -> Response {
    let Some((_, body)) = SHARED_STATIC.iter().chain(extra).find(|(n, _)| *n == name) else {
        return ApiError::not_found(format!("no static file {name:?}")).into_response();
    };
    let kind = match name.rsplit('.').next() {
        Some("css") => "text/css; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("svg") => "image/svg+xml",
        _ => "text/plain; charset=utf-8",
    };
    ([(CONTENT_TYPE, kind), (CACHE_CONTROL, "no-cache")], *body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_templates_escape_untrusted_text_and_tojson_is_script_safe() {
        let t = Templates::new(&[(
            "page.html",
            "{% extends 'base.html' %}{% block body %}<p>{{ text }}</p>\
             <script type=\"application/json\" id=d>{{ text|tojson }}</script>{% endblock %}",
        )])
        .unwrap();
        let evil = "<script>alert(1)</script><img src=x onerror=alert(2)>'\"&";
        let html = t
            .render(
                "page.html",
                minijinja::context! { text => evil, title => "t" },
            )
            .unwrap()
            .0;
        assert!(!html.contains("<script>alert"), "{html}");
        assert!(!html.contains("<img src=x"), "{html}");
        assert!(
            html.contains("&lt;script&gt;alert(1)&lt;&#x2f;script&gt;"),
            "{html}"
        );
        // The JSON copy has no raw '<' either.
        let json_part = html.split("id=d>").nth(1).unwrap();
        assert!(
            json_part.starts_with('"')
                && !json_part[..json_part.find("</script>").unwrap()].contains('<')
        );
    }

    #[test]
    fn unknown_static_files_are_404_and_known_ones_typed() {
        let r = static_file("style.css", &[]);
        assert_eq!(r.headers()[CONTENT_TYPE], "text/css; charset=utf-8");
        assert_eq!(static_file("../Cargo.toml", &[]).status(), 404);
        let r = static_file("x.js", &[("x.js", "1")]);
        assert_eq!(r.headers()[CONTENT_TYPE], "text/javascript; charset=utf-8");
    }
}
