//! The admin API's OpenAPI document (`edge/src/openapi.json`) as the tests' oracle: every answer
//! the admin API gives a test must be one the document describes, so the document cannot drift
//! from the edge. [`crate::TestEdge::admin_with`], which every admin call of the tests goes
//! through, hands each exchange to [`check_call`].
//!
//! How an answer is judged:
//! - The path, without its query and any trailing `/` (the edge ignores both), is matched against
//!   the document's paths; a `{param}` segment matches any one segment, and of several matches
//!   the one with the most literal segments wins.
//! - A path the document does not have may only get the answers any path can get: 404 (no such
//!   API path), and 401 or 429 (the token is checked before the path). A listed path called with
//!   a method it does not list may get 405, 401 or 429. Their bodies are checked against the
//!   document's own `components/responses` (`NotFound`, `MethodNotAllowed`, `Unauthorized`,
//!   `TooManyRequests`).
//! - Otherwise the operation must list the status. A response with `application/json` content
//!   needs a body that validates against its schema (JSON Schema 2020-12, `$ref`s resolved in the
//!   whole document); one without content needs no body; other media types (the event stream)
//!   are not read here.
//! - A call the edge accepted (2xx) must also have sent a body the operation's `requestBody`
//!   describes: a field the edge takes but the document lacks is drift too.
//!
//! A mismatch panics, naming the call, the status, the schema and the field.

use std::collections::HashMap;
use std::sync::OnceLock;

use boon::{Compiler, SchemaIndex, Schemas};
use serde_json::Value;

/// The document, as the edge serves it.
pub use burrow_edge::openapi::DOCUMENT;

/// The document's base URI for the validator: it is added as a resource under this name, so
/// nothing is ever read from disk or the network.
const BASE: &str = "urn:burrow:admin-openapi";

/// The methods an OpenAPI path item may have.
const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// Answers any call may get, whatever its path and method: the token is checked first.
const ANY_CALL: [(u16, &str); 2] = [(401, "Unauthorized"), (429, "TooManyRequests")];

/// Checks one admin exchange: the answer with [`check`], and, when the edge accepted the call,
/// the request body with [`check_request`].
pub fn check_call(
    method: &str,
    path: &str,
    request: Option<&Value>,
    status: u16,
    body: Option<&Value>,
) {
    check(method, path, status, body);
    if (200..300).contains(&status) {
        check_request(method, path, request);
    }
}

/// Panics unless the document describes `status` with `body` (`None`: empty) as an answer to
/// `method path`.
pub fn check(method: &str, path: &str, status: u16, body: Option<&Value>) {
    let oracle = oracle();
    let call = format!("{} {path} -> {status}", method.to_ascii_uppercase());
    let response = match oracle.operation(method, path) {
        Found::Operation { pointer, op } => {
            let Some(response) = op["responses"].get(status.to_string()) else {
                let listed: Vec<&String> = op["responses"]
                    .as_object()
                    .map(|r| r.keys().collect())
                    .unwrap_or_default();
                panic!(
                    "{call}: edge/src/openapi.json lists no {status} answer for this call \
                     (#{pointer}/responses lists {listed:?})"
                );
            };
            oracle.resolve(response, format!("{pointer}/responses/{status}"))
        }
        Found::Method { template } => {
            oracle.fallback(&call, status, (405, "MethodNotAllowed"), || {
                format!("the document has {template}, but not with this method")
            })
        }
        Found::Nothing => oracle.fallback(&call, status, (404, "NotFound"), || {
            "the document has no such path".to_owned()
        }),
    };
    oracle.check_content(&call, response, body);
}

/// Panics unless `body` (`None`: none sent) is a request body the document describes for
/// `method path`. Calls that take no body are not checked: the edge ignores one.
pub fn check_request(method: &str, path: &str, body: Option<&Value>) {
    let oracle = oracle();
    let call = format!("{} {path}", method.to_ascii_uppercase());
    let Found::Operation { pointer, op } = oracle.operation(method, path) else {
        panic!("{call}: the edge accepted a call edge/src/openapi.json does not have");
    };
    let Some(request) = op.get("requestBody") else {
        return;
    };
    let (request, pointer) = oracle.resolve(request, format!("{pointer}/requestBody"));
    match body {
        None if request["required"] == true => panic!(
            "{call}: the edge accepted the call without a body, but #{pointer} says one is \
             required"
        ),
        None => {}
        Some(body) => {
            let schema = format!("{pointer}/content/application~1json/schema");
            oracle.validate(&format!("{call} (request body)"), &schema, body);
        }
    }
}

/// Panics unless `event` is an `Event` as the document describes it (`GET /v1/events` and the
/// webhook).
pub fn check_event(event: &Value) {
    oracle().validate("event", "/components/schemas/Event", event);
}

/// The document, parsed.
pub fn document() -> &'static Value {
    &oracle().doc
}

/// The document with every JSON schema in it compiled.
struct Oracle {
    doc: Value,
    schemas: Schemas,
    /// Compiled schemas by their JSON pointer into the document.
    compiled: HashMap<String, SchemaIndex>,
}

/// What a call names in the document.
enum Found<'d> {
    /// The operation at this pointer.
    Operation { pointer: String, op: &'d Value },
    /// The path (this template), but not the method.
    Method { template: &'d str },
    /// Not even the path.
    Nothing,
}

fn oracle() -> &'static Oracle {
    static ORACLE: OnceLock<Oracle> = OnceLock::new();
    ORACLE.get_or_init(Oracle::load)
}

impl Oracle {
    /// Parses the document and compiles the schema of every request body and response.
    fn load() -> Oracle {
        let doc: Value = serde_json::from_str(DOCUMENT)
            .unwrap_or_else(|e| panic!("edge/src/openapi.json is not JSON: {e}"));
        let mut oracle = Oracle {
            doc,
            schemas: Schemas::new(),
            compiled: HashMap::new(),
        };
        let mut compiler = Compiler::new();
        compiler.set_default_draft(boon::Draft::V2020_12);
        compiler
            .add_resource(BASE, oracle.doc.clone())
            .expect("the base URI parses");
        for pointer in oracle.schema_pointers() {
            let index = compiler
                .compile(&format!("{BASE}#{pointer}"), &mut oracle.schemas)
                .unwrap_or_else(|e| {
                    panic!(
                        "edge/src/openapi.json: the schema at #{pointer} does not compile: {e:#}"
                    )
                });
            oracle.compiled.insert(pointer, index);
        }
        oracle
    }

    /// Where the document has a JSON schema this module validates against.
    fn schema_pointers(&self) -> Vec<String> {
        let mut bodies = Vec::new();
        for (template, item) in self.doc["paths"].as_object().into_iter().flatten() {
            let item_pointer = format!("/paths/{}", escape(template));
            for method in METHODS {
                let Some(op) = item.get(method) else { continue };
                let pointer = format!("{item_pointer}/{method}");
                if let Some(request) = op.get("requestBody") {
                    bodies.push((request, format!("{pointer}/requestBody")));
                }
                for (status, response) in op["responses"].as_object().into_iter().flatten() {
                    bodies.push((response, format!("{pointer}/responses/{status}")));
                }
            }
        }
        for (name, response) in self.doc["components"]["responses"]
            .as_object()
            .into_iter()
            .flatten()
        {
            bodies.push((response, format!("/components/responses/{}", escape(name))));
        }
        let mut pointers: Vec<String> = bodies
            .into_iter()
            .map(|(body, pointer)| self.resolve(body, pointer))
            .filter(|(body, _)| body["content"].get("application/json").is_some())
            .map(|(_, pointer)| format!("{pointer}/content/application~1json/schema"))
            .collect();
        pointers.push("/components/schemas/Event".to_owned());
        pointers.sort();
        pointers.dedup();
        pointers
    }

    /// The operation `method path` names.
    fn operation(&self, method: &str, path: &str) -> Found<'_> {
        let path = path.split(['?', '#']).next().unwrap_or_default();
        let path = match path.trim_end_matches('/') {
            "" => "/",
            trimmed => trimmed,
        };
        let segments: Vec<&str> = path.split('/').collect();
        let best = self.doc["paths"]
            .as_object()
            .into_iter()
            .flatten()
            .filter_map(|(template, item)| {
                let parts: Vec<&str> = template.split('/').collect();
                let matches = parts.len() == segments.len()
                    && parts
                        .iter()
                        .zip(&segments)
                        .all(|(part, segment)| is_param(part) || part == segment);
                let literals = parts.iter().filter(|p| !is_param(p)).count();
                matches.then_some((literals, template, item))
            })
            .max_by_key(|(literals, _, _)| *literals);
        let Some((_, template, item)) = best else {
            return Found::Nothing;
        };
        let method = method.to_ascii_lowercase();
        match item.get(&method) {
            Some(op) => Found::Operation {
                pointer: format!("/paths/{}/{method}", escape(template)),
                op,
            },
            None => Found::Method { template },
        }
    }

    /// The response for a call the document does not have: `own` (404 for an unknown path, 405
    /// for an unknown method) or one that any call may get.
    fn fallback(
        &self,
        call: &str,
        status: u16,
        own: (u16, &str),
        why: impl Fn() -> String,
    ) -> (&Value, String) {
        let Some((_, name)) = std::iter::once(own)
            .chain(ANY_CALL)
            .find(|(allowed, _)| *allowed == status)
        else {
            panic!(
                "{call}: {}, so the edge may only answer {}, 401 or 429 (edge/src/openapi.json)",
                why(),
                own.0
            );
        };
        let pointer = format!("/components/responses/{name}");
        let response = self
            .doc
            .pointer(&pointer)
            .unwrap_or_else(|| panic!("edge/src/openapi.json lacks #{pointer}"));
        (response, pointer)
    }

    /// Checks `body` against the content of `response` (the response object and its pointer).
    fn check_content(
        &self,
        call: &str,
        (response, pointer): (&Value, String),
        body: Option<&Value>,
    ) {
        let content = response.get("content").and_then(Value::as_object);
        match (content, body) {
            (None, None) => {}
            (None, Some(body)) => {
                panic!("{call}: #{pointer} has no content, but the edge answered a body: {body}")
            }
            (Some(content), body) => {
                if !content.contains_key("application/json") {
                    // Another media type (the event stream): not JSON, not read here.
                    return;
                }
                let Some(body) = body else {
                    panic!("{call}: #{pointer} has a JSON body, but the edge answered none");
                };
                let schema = format!("{pointer}/content/application~1json/schema");
                self.validate(call, &schema, body);
            }
        }
    }

    /// Validates `value` against the compiled schema at `pointer`.
    fn validate(&self, what: &str, pointer: &str, value: &Value) {
        let index = *self.compiled.get(pointer).unwrap_or_else(|| {
            panic!("{what}: no compiled schema at #{pointer} (edge/src/openapi.json)")
        });
        if let Err(e) = self.schemas.validate(value, index) {
            panic!(
                "{what}: the body does not match edge/src/openapi.json #{pointer}:\n{e}\n\
                 body: {value:#}"
            );
        }
    }

    /// Follows `$ref`s (local ones, `#/...`) from `value` at `pointer` to the object they name.
    fn resolve<'d>(&'d self, mut value: &'d Value, mut pointer: String) -> (&'d Value, String) {
        while let Some(target) = value.get("$ref").and_then(Value::as_str) {
            let Some(local) = target.strip_prefix('#') else {
                panic!("#{pointer}: `$ref` {target:?} is not local to edge/src/openapi.json");
            };
            value = self.doc.pointer(local).unwrap_or_else(|| {
                panic!("#{pointer}: `$ref` {target:?} names nothing in edge/src/openapi.json")
            });
            pointer = local.to_owned();
        }
        (value, pointer)
    }
}

/// A path template segment like `{id}`.
fn is_param(part: &str) -> bool {
    part.starts_with('{') && part.ends_with('}')
}

/// `s` as one JSON pointer token.
fn escape(s: &str) -> String {
    s.replace('~', "~0").replace('/', "~1")
}

#[cfg(test)]
mod tests {
    use std::panic::{AssertUnwindSafe, catch_unwind};

    use serde_json::json;

    use super::*;

    /// The panic message of `f`, which must panic.
    fn panics(f: impl FnOnce()) -> String {
        let err = catch_unwind(AssertUnwindSafe(f)).expect_err("a mismatch panics");
        err.downcast_ref::<String>()
            .cloned()
            .or_else(|| err.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_default()
    }

    fn tunnel() -> Value {
        json!({
            "tunnel_key": "abcdefghijklmnopqrstuvwxyz",
            "auth_mode": "open",
            "rewrite_host": false,
            "raw_tcp": false,
            "http_keep_alive": true,
            "wake_on_http": false,
            "create_time_ms": 1_767_780_000_000_u64,
            "url_template": "http://{port}-abcdefghijklmnopqrstuvwxyz.tunnel.localhost:8080",
        })
    }

    fn devbox() -> Value {
        json!({
            "id": "box-1",
            "created_at": 1_767_780_000,
            "last_activity_ms": null,
            "agent": {"connected": false, "since": null, "rtt_ms": null},
            "tunnel": tunnel(),
        })
    }

    #[test]
    fn every_schema_compiles() {
        let oracle = oracle();
        assert!(oracle.compiled.len() >= 10, "{:?}", oracle.compiled.keys());
    }

    #[test]
    fn answers_the_document_describes_pass() {
        check("GET", "/v1/devboxes/box-1", 200, Some(&devbox()));
        check("get", "/v1/devboxes/box-1/?verbose", 200, Some(&devbox()));
        check("GET", "/v1/devboxes", 200, Some(&json!([devbox()])));
        check("DELETE", "/v1/devboxes/box-1/tunnel", 204, None);
        check("POST", "/v1/devboxes/box-1/tunnel", 200, Some(&tunnel()));
        let error = json!({"error": "no such API path: /v1/elsewhere"});
        check("GET", "/v1/elsewhere", 404, Some(&error));
        check("PUT", "/v1/devboxes", 405, Some(&error));
        check("PUT", "/v1/elsewhere", 401, Some(&error));
        check_request("POST", "/v1/devboxes", None);
        check_request(
            "POST",
            "/v1/devboxes",
            Some(&json!({"tunnel": {"auth_mode": "open"}})),
        );
        check_event(&json!({"type": "agent.connected", "at_ms": 1, "devbox": "box-1"}));
        let activity = json!({"id": "box-1", "last_activity_ms": 2});
        check_event(&json!({"type": "devbox.activity", "at_ms": 2, "devboxes": [activity]}));
    }

    #[test]
    fn a_field_the_document_lacks_is_named() {
        let mut body = devbox();
        body["tunnel"]["colour"] = json!("blue");
        let message = panics(|| check("GET", "/v1/devboxes/box-1", 200, Some(&body)));
        assert!(
            message.contains("GET /v1/devboxes/box-1 -> 200"),
            "{message}"
        );
        assert!(message.contains("/tunnel"), "{message}");
        assert!(message.contains("colour"), "{message}");
    }

    #[test]
    fn a_missing_or_mistyped_field_is_named() {
        let mut body = devbox();
        body["agent"]
            .as_object_mut()
            .expect("object")
            .remove("rtt_ms");
        let message = panics(|| check("GET", "/v1/devboxes/box-1", 200, Some(&body)));
        assert!(
            message.contains("/agent") && message.contains("rtt_ms"),
            "{message}"
        );

        let mut body = tunnel();
        body["create_time_ms"] = json!("yesterday");
        let message = panics(|| check("POST", "/v1/devboxes/x/tunnel", 200, Some(&body)));
        assert!(message.contains("/create_time_ms"), "{message}");
    }

    #[test]
    fn an_answer_the_call_cannot_give_is_refused() {
        let error = json!({"error": "x"});
        let message = panics(|| check("GET", "/v1/devboxes", 409, Some(&error)));
        assert!(message.contains("lists no 409"), "{message}");
        let message = panics(|| check("GET", "/v1/elsewhere", 200, Some(&json!([]))));
        assert!(message.contains("no such path"), "{message}");
        let message = panics(|| check("PUT", "/v1/devboxes", 404, Some(&error)));
        assert!(message.contains("not with this method"), "{message}");
        let message = panics(|| check("DELETE", "/v1/devboxes/x", 204, Some(&error)));
        assert!(message.contains("no content"), "{message}");
        let message = panics(|| check("GET", "/v1/devboxes/x", 404, Some(&json!({}))));
        assert!(message.contains("error"), "{message}");
    }

    #[test]
    fn a_request_field_the_document_lacks_is_named() {
        let body = json!({"auth_mode": "open", "paint": true});
        let message = panics(|| check_request("POST", "/v1/devboxes/x/tunnel", Some(&body)));
        assert!(
            message.contains("request body") && message.contains("paint"),
            "{message}"
        );
        let message = panics(|| check_request("POST", "/v1/devboxes/x/tunnel", None));
        assert!(message.contains("required"), "{message}");
    }

    #[test]
    fn an_event_of_the_wrong_shape_is_refused() {
        let message = panics(|| check_event(&json!({"type": "devbox.activity", "at_ms": 1})));
        assert!(message.contains("devboxes"), "{message}");
        let message = panics(|| check_event(&json!({"type": "devbox.exploded", "at_ms": 1})));
        assert!(message.contains("/type"), "{message}");
    }
}
