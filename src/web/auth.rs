//! Tokens: how they are made, stored and read from a request.
//!
//! A token is 32 random bytes from the operating system's generator, in hex. Servers
//! keep only its SHA-256 (a leaked database or log gives no working link) and compare
//! in constant time. A request carries its token in `Authorization: Bearer TOKEN` (API
//! clients), in the `rlhf_token` cookie (pages, after the first visit), or as
//! `?token=TOKEN` (the link a person is given; the page answers by setting the cookie
//! and redirecting to the same path without the token, so it does not stay in the
//! address bar or in the history).

use axum::http::header::{AUTHORIZATION, COOKIE, LOCATION, SET_COOKIE};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use rand::rngs::OsRng;
use rand::TryRngCore;
use sha2::{Digest, Sha256};

/// The cookie a page visit stores the token in.
pub const COOKIE_NAME: &str = "rlhf_token";

/// A fresh random token: 64 hex digits.
pub fn new_token() -> String {
    let mut bytes = [0u8; 32];
    OsRng
        .try_fill_bytes(&mut bytes)
        .expect("the operating system's random generator failed");
    hex(&bytes)
}

/// SHA-256 of a token, in hex: what a server stores and compares.
pub fn token_hash(token: &str) -> String {
    hex(&Sha256::digest(token.as_bytes()))
}

/// Equality that takes the same time wherever the strings differ (lengths are not
/// secret: every hash has the same length).
pub fn tokens_equal(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Where a request's token came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenSource {
    Header,
    Cookie,
    Query,
}

/// The token a request carries, and where: the header first, then the query string
/// (a link someone opened is who they are now, whatever cookie the browser holds
/// from another link), then the cookie.
pub fn request_token(parts: &Parts) -> Option<(String, TokenSource)> {
    if let Some(v) = parts
        .headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        if let Some(t) = v.strip_prefix("Bearer ") {
            return Some((t.trim().to_string(), TokenSource::Header));
        }
    }
    if let Some(t) = parts
        .uri
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("token=")))
    {
        return Some((t.to_string(), TokenSource::Query));
    }
    for v in parts.headers.get_all(COOKIE) {
        let Ok(v) = v.to_str() else { continue };
        for pair in v.split(';') {
            if let Some(t) = pair
                .trim()
                .strip_prefix(COOKIE_NAME)
                .and_then(|r| r.strip_prefix('='))
            {
                return Some((t.to_string(), TokenSource::Cookie));
            }
        }
    }
    None
}

/// The answer to a page opened with `?token=`: store the token in an HttpOnly cookie
/// and reload the same path without it.
pub fn store_and_redirect(parts: &Parts, token: &str) -> Response {
    let rest: Vec<&str> = parts
        .uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|kv| !kv.is_empty() && !kv.starts_with("token="))
        .collect();
    let mut location = parts.uri.path().to_string();
    if !rest.is_empty() {
        location = format!("{location}?{}", rest.join("&"));
    }
    let cookie = format!("{COOKIE_NAME}={token}; HttpOnly; SameSite=Strict; Path=/");
    let mut response = StatusCode::SEE_OTHER.into_response();
    let headers = response.headers_mut();
    // Both values come from the request's own path and a hex token: valid headers.
    if let (Ok(loc), Ok(cookie)) = (
        HeaderValue::from_str(&location),
        HeaderValue::from_str(&cookie),
    ) {
        headers.insert(LOCATION, loc);
        headers.insert(SET_COOKIE, cookie);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Request;

    fn parts(uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = Request::builder().uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn tokens_are_random_hex_and_hashes_are_stable() {
        let (a, b) = (new_token(), new_token());
        assert_eq!(a.len(), 64);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
        assert_eq!(token_hash("x"), token_hash("x"));
        // SHA-256("abc"), the FIPS 180-2 test vector.
        assert_eq!(
            token_hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(tokens_equal(&a, &a.clone()));
        assert!(!tokens_equal(&a, &b));
        assert!(!tokens_equal("ab", "abc"));
    }

    #[test]
    fn a_token_is_read_from_header_cookie_or_query() {
        let h = parts("/x", &[("authorization", "Bearer abc")]);
        assert_eq!(request_token(&h), Some(("abc".into(), TokenSource::Header)));
        let c = parts("/x", &[("cookie", "a=1; rlhf_token=def; b=2")]);
        assert_eq!(request_token(&c), Some(("def".into(), TokenSource::Cookie)));
        let q = parts("/x?a=1&token=ghi", &[]);
        assert_eq!(request_token(&q), Some(("ghi".into(), TokenSource::Query)));
        assert_eq!(request_token(&parts("/x?tokens=1", &[])), None);
        // A link's token wins over a cookie left by another link.
        let both = parts("/x?token=new", &[("cookie", "rlhf_token=old")]);
        assert_eq!(
            request_token(&both),
            Some(("new".into(), TokenSource::Query))
        );
    }

    #[test]
    fn the_redirect_drops_the_token_and_keeps_the_rest() {
        let q = parts("/rank?a=1&token=ghi&b=2", &[]);
        let r = store_and_redirect(&q, "ghi");
        assert_eq!(r.status(), StatusCode::SEE_OTHER);
        assert_eq!(r.headers()[LOCATION], "/rank?a=1&b=2");
        let cookie = r.headers()[SET_COOKIE].to_str().unwrap();
        assert!(cookie.starts_with("rlhf_token=ghi;") && cookie.contains("HttpOnly"));
    }
}
