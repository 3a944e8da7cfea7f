//! The edge's own answers (errors, the 401 challenge): a short HTML page for browsers, plain
//! text for everyone else, each saying what went wrong and what to do. Every step of a request
//! that answers it itself renders its answer here.

use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Response, StatusCode};

use crate::body::{self, Body};

/// Seconds a client is told to wait when the agent is away.
pub const RETRY_AFTER_SECS: u32 = 5;

/// How the edge writes its own answers for a client, read from the request's headers once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// Plain text, for curl and programs.
    Text,
    /// A short HTML page, for a browser (`Accept` names `text/html`).
    Html,
    /// gRPC's trailers-only form: `200`, no body, the status in `grpc-status` and
    /// `grpc-message`, for a gRPC client (`content-type: application/grpc*`); `web` for
    /// gRPC-Web, whose answers carry its own content type.
    Grpc {
        /// gRPC-Web (`application/grpc-web*`).
        web: bool,
    },
}

impl Form {
    /// The form a request with these headers reads: gRPC when its content type is gRPC's,
    /// HTML when it accepts HTML, text otherwise.
    pub fn of(headers: &HeaderMap) -> Form {
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if let Some(rest) = strip_prefix_ignore_case(content_type, "application/grpc") {
            return Form::Grpc {
                web: strip_prefix_ignore_case(rest, "-web").is_some(),
            };
        }
        let html = headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("text/html"));
        if html { Form::Html } else { Form::Text }
    }
}

/// `s` without `prefix`, compared without case (media types are case-insensitive).
fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

/// An answer a step of a public request gives instead of letting the request go on: an error
/// page, a redirect. Boxed: a response is large, and the requests that go on need not make room
/// for one at every step.
pub type Answer = Box<Response<Body>>;

/// An error answer with a one-line explanation, in the client's `form`.
pub fn error(status: StatusCode, detail: &str, form: Form) -> Answer {
    let mut response = match form {
        Form::Html => page(status, detail),
        Form::Text => text(status, detail),
        Form::Grpc { web } => grpc(status, detail, web),
    };
    let headers = response.headers_mut();
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

/// The HTML page of an error.
fn page(status: StatusCode, detail: &str) -> Response<Body> {
    let title = status.canonical_reason().unwrap_or("Error");
    let html = format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{code} {title}</title></head>\n\
         <body style=\"font-family:sans-serif;max-width:40em;margin:4em auto\">\n\
         <h1>{code} {title}</h1>\n<p>{detail}</p>\n<p><small>burrow edge</small></p>\n</body></html>\n",
        code = status.as_u16(),
        title = escape(title),
        detail = escape(detail),
    );
    with_type(status, html, "text/html; charset=utf-8")
}

/// The plain-text answer of an error: its explanation, one line.
fn text(status: StatusCode, detail: &str) -> Response<Body> {
    with_type(status, format!("{detail}\n"), "text/plain; charset=utf-8")
}

fn with_type(status: StatusCode, text: String, content_type: &'static str) -> Response<Body> {
    let mut response = Response::new(body::full(text));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// An error in gRPC's trailers-only form: HTTP 200 with no body, and the call's status in the
/// head (`grpc-status`, `grpc-message`), which is all a gRPC client reads of a call that failed
/// before it started. An empty body ends an HTTP/2 stream with that one HEADERS frame.
fn grpc(status: StatusCode, detail: &str, web: bool) -> Response<Body> {
    let mut response = Response::new(body::empty());
    let headers = response.headers_mut();
    let content_type = if web {
        "application/grpc-web+proto"
    } else {
        "application/grpc"
    };
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        HeaderName::from_static("grpc-status"),
        HeaderValue::from(grpc_code(status).code()),
    );
    if let Ok(message) = HeaderValue::from_str(&grpc_message(detail)) {
        headers.insert(HeaderName::from_static("grpc-message"), message);
    }
    response
}

/// gRPC status codes the edge answers with (gRPC's `doc/statuscodes.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrpcCode {
    /// 2: an answer no other code fits.
    Unknown,
    /// 5: no tunnel at this address.
    NotFound,
    /// 7: the agent's port policy (or the tunnel) does not allow this.
    PermissionDenied,
    /// 8: over the tunnel's rate, or a head too large.
    ResourceExhausted,
    /// 13: a request the edge cannot route (a bad host).
    Internal,
    /// 14: the devbox, its agent or its service cannot take the call now; worth a retry.
    Unavailable,
    /// 16: no valid bearer token for an authenticated tunnel.
    Unauthenticated,
}

impl GrpcCode {
    /// The number on the wire.
    pub fn code(self) -> u16 {
        match self {
            GrpcCode::Unknown => 2,
            GrpcCode::NotFound => 5,
            GrpcCode::PermissionDenied => 7,
            GrpcCode::ResourceExhausted => 8,
            GrpcCode::Internal => 13,
            GrpcCode::Unavailable => 14,
            GrpcCode::Unauthenticated => 16,
        }
    }
}

/// The gRPC status of an answer the edge gives with this HTTP status. Close to gRPC's own
/// HTTP-to-gRPC table, with the codes a tunnel means: 404 is an unknown tunnel (`NOT_FOUND`,
/// not `UNIMPLEMENTED`), 429 the tunnel's rate (`RESOURCE_EXHAUSTED`), 421 a connection to
/// make again (`UNAVAILABLE`).
pub fn grpc_code(status: StatusCode) -> GrpcCode {
    match status {
        StatusCode::UNAUTHORIZED => GrpcCode::Unauthenticated,
        StatusCode::FORBIDDEN => GrpcCode::PermissionDenied,
        StatusCode::NOT_FOUND => GrpcCode::NotFound,
        StatusCode::TOO_MANY_REQUESTS
        | StatusCode::PAYLOAD_TOO_LARGE
        | StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => GrpcCode::ResourceExhausted,
        StatusCode::BAD_GATEWAY
        | StatusCode::SERVICE_UNAVAILABLE
        | StatusCode::GATEWAY_TIMEOUT
        | StatusCode::MISDIRECTED_REQUEST => GrpcCode::Unavailable,
        StatusCode::BAD_REQUEST | StatusCode::METHOD_NOT_ALLOWED => GrpcCode::Internal,
        _ => GrpcCode::Unknown,
    }
}

/// `grpc-message` as gRPC writes it: UTF-8, with `%` and every byte outside printable ASCII
/// percent-encoded.
fn grpc_message(detail: &str) -> String {
    let mut out = String::with_capacity(detail.len());
    for &b in detail.as_bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
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
        let r = error(StatusCode::BAD_GATEWAY, "nothing <here>", Form::Html);
        assert_eq!(
            r.headers()[header::CONTENT_TYPE],
            "text/html; charset=utf-8"
        );
        let r = error(StatusCode::SERVICE_UNAVAILABLE, "away", Form::Text);
        assert_eq!(r.headers()[header::RETRY_AFTER], "5");
        assert_eq!(
            r.headers()[header::CONTENT_TYPE],
            "text/plain; charset=utf-8"
        );
        assert_eq!(escape("<a href=\"x\">"), "&lt;a href=&quot;x&quot;&gt;");
    }

    #[test]
    fn grpc_clients_get_trailers_only_answers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc+proto"),
        );
        h.insert(header::ACCEPT, HeaderValue::from_static("text/html"));
        assert_eq!(Form::of(&h), Form::Grpc { web: false });
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("Application/gRPC-Web-Text"),
        );
        assert_eq!(Form::of(&h), Form::Grpc { web: true });
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        assert_eq!(Form::of(&h), Form::Html);

        let r = error(
            StatusCode::UNAUTHORIZED,
            "send the tunnel's token: 100% ok\u{e9}",
            Form::Grpc { web: false },
        );
        assert_eq!(r.status(), StatusCode::OK);
        assert!(hyper::body::Body::is_end_stream(r.body()), "no body");
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/grpc");
        assert_eq!(r.headers()["grpc-status"], "16");
        assert_eq!(
            r.headers()["grpc-message"],
            "send the tunnel's token: 100%25 ok%C3%A9"
        );
        let r = error(
            StatusCode::TOO_MANY_REQUESTS,
            "slow",
            Form::Grpc { web: true },
        );
        assert_eq!(r.headers()["grpc-status"], "8");
        assert_eq!(
            r.headers()[header::CONTENT_TYPE],
            "application/grpc-web+proto"
        );
        for (status, code) in [
            (404, 5),
            (403, 7),
            (503, 14),
            (502, 14),
            (400, 13),
            (500, 2),
        ] {
            let status = StatusCode::from_u16(status).expect("a status");
            assert_eq!(grpc_code(status).code(), code, "{status}");
        }
    }
}
