//! The edge's own answers (errors, the 401 challenge): a short HTML page for browsers, plain
//! text for everyone else, each saying what went wrong and what to do. Every step of a request
//! that answers it itself renders its answer here.

use http::header::{self, HeaderValue};
use http::{HeaderMap, Response, StatusCode};

use crate::body::{self, Body};

/// Seconds a client is told to wait when the agent is away.
pub const RETRY_AFTER_SECS: u32 = 5;

/// Whether the client prefers HTML (a browser).
pub fn wants_html(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/html"))
}

/// An answer a step of a public request gives instead of letting the request go on: an error
/// page, a redirect. Boxed: a response is large, and the requests that go on need not make room
/// for one at every step.
pub type Answer = Box<Response<Body>>;

/// An error answer with a one-line explanation.
pub fn error(status: StatusCode, detail: &str, html: bool) -> Answer {
    let title = status.canonical_reason().unwrap_or("Error");
    let (text, content_type) = if html {
        (
            format!(
                "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{code} {title}</title></head>\n\
                 <body style=\"font-family:sans-serif;max-width:40em;margin:4em auto\">\n\
                 <h1>{code} {title}</h1>\n<p>{detail}</p>\n<p><small>burrow edge</small></p>\n</body></html>\n",
                code = status.as_u16(),
                title = escape(title),
                detail = escape(detail),
            ),
            "text/html; charset=utf-8",
        )
    } else {
        (format!("{detail}\n"), "text/plain; charset=utf-8")
    };
    let mut response = Response::new(body::full(text));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    match status {
        StatusCode::UNAUTHORIZED => {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"burrow\""),
            );
        }
        StatusCode::SERVICE_UNAVAILABLE => {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        _ => {}
    }
    Box::new(response)
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_for_browsers_text_for_others_and_escaped() {
        let r = error(StatusCode::BAD_GATEWAY, "nothing <here>", true);
        assert_eq!(
            r.headers()[header::CONTENT_TYPE],
            "text/html; charset=utf-8"
        );
        let r = error(StatusCode::SERVICE_UNAVAILABLE, "away", false);
        assert_eq!(r.headers()[header::RETRY_AFTER], "5");
        assert_eq!(
            r.headers()[header::CONTENT_TYPE],
            "text/plain; charset=utf-8"
        );
        assert_eq!(escape("<a href=\"x\">"), "&lt;a href=&quot;x&quot;&gt;");
    }
}
