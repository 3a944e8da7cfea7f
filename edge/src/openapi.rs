//! The admin API's OpenAPI 3.1 document (`openapi.json` beside this file): every call, request
//! body and answer of [`crate::admin`], for the platform developers who write a client, and
//! served as is at `GET /v1/openapi.json`.
//!
//! The document is the contract, so it is kept true by tests rather than by care: the unit
//! tests below check that it names every route `admin.rs` serves and nothing else, and the
//! end-to-end tests check every admin answer they get against its schemas
//! (`tests/src/openapi.rs`) and the whole document with a real OpenAPI validator.

/// The document, as JSON text.
pub const DOCUMENT: &str = include_str!("openapi.json");

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use serde_json::Value;

    use super::DOCUMENT;

    /// The methods an OpenAPI path item may have.
    const METHODS: [&str; 8] = [
        "get", "put", "post", "delete", "options", "head", "patch", "trace",
    ];

    fn document() -> Value {
        serde_json::from_str(DOCUMENT).expect("openapi.json is JSON")
    }

    /// The operations of the document: `(method, path template)`, lowercase methods.
    fn operations(doc: &Value) -> BTreeSet<(String, String)> {
        let mut ops = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for method in METHODS.iter().filter(|m| item.get(**m).is_some()) {
                ops.insert(((*method).to_owned(), path.clone()));
            }
        }
        ops
    }

    /// The routes `admin.rs` matches, read from its source: every `Method::X, [segments]`
    /// pattern, a quoted segment taken literally and a bound one (`id`) as `{id}`. Patterns
    /// with a wildcard (the 405 arm) are not routes.
    fn served(source: &str) -> BTreeSet<(String, String)> {
        let mut routes = BTreeSet::new();
        let mut rest = source;
        while let Some(at) = rest.find("Method::") {
            rest = &rest[at + "Method::".len()..];
            let method: String = rest.chars().take_while(char::is_ascii_uppercase).collect();
            let Some(list) = rest[method.len()..]
                .trim_start()
                .strip_prefix(',')
                .and_then(|r| r.trim_start().strip_prefix('['))
            else {
                continue;
            };
            let Some(end) = list.find(']') else { continue };
            let path: Option<String> = list[..end]
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|segment| match segment.strip_prefix('"') {
                    Some(quoted) => quoted.strip_suffix('"').map(|s| format!("/{s}")),
                    None if segment.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                        && segment != "_" =>
                    {
                        Some(format!("/{{{segment}}}"))
                    }
                    None => None,
                })
                .collect();
            if let Some(path) = path {
                routes.insert((method.to_ascii_lowercase(), path));
            }
        }
        routes
    }

    #[test]
    fn is_an_openapi_3_1_document_behind_the_admin_token() {
        let doc = document();
        assert_eq!(doc["openapi"], "3.1.0");
        assert!(doc["info"]["title"].is_string() && doc["info"]["version"].is_string());
        let scheme = &doc["components"]["securitySchemes"]["adminToken"];
        assert_eq!(scheme["type"], "http");
        assert_eq!(scheme["scheme"], "bearer");
        assert_eq!(doc["security"], serde_json::json!([{ "adminToken": [] }]));
    }

    #[test]
    fn names_every_route_admin_serves_and_no_other() {
        let routes = served(include_str!("admin.rs"));
        assert!(
            routes.len() >= 9,
            "found only {routes:?} in admin.rs: has its route match changed shape?"
        );
        let documented = operations(&document());
        let undocumented: Vec<_> = routes.difference(&documented).collect();
        assert!(
            undocumented.is_empty(),
            "admin.rs serves {undocumented:?}, which openapi.json lacks"
        );
        let unserved: Vec<_> = documented.difference(&routes).collect();
        assert!(
            unserved.is_empty(),
            "openapi.json has {unserved:?}, which admin.rs does not route (as a \
             `(&Method::X, [\"v1\", ...])` match arm)"
        );
    }

    #[test]
    fn route_reading_sees_literals_bindings_and_skips_wildcards() {
        let source = r#"
            (&Method::POST, ["v1", "devboxes", id, "tunnel"]) => self.enable(id),
            (&Method::GET, ["v1", "cluster"]) => self.cluster(),
            (_, ["v1", "devboxes", _]) => Err(not_allowed()),
            (&Method::DELETE, ["v1", "devboxes", _]) => unreachable(),
        "#;
        let expected: BTreeSet<(String, String)> =
            [("post", "/v1/devboxes/{id}/tunnel"), ("get", "/v1/cluster")]
                .iter()
                .map(|(m, p)| ((*m).to_owned(), (*p).to_owned()))
                .collect();
        assert_eq!(served(source), expected);
    }

    #[test]
    fn every_reference_resolves() {
        fn walk(doc: &Value, node: &Value, at: &str, bad: &mut Vec<String>) {
            match node {
                Value::Object(map) => {
                    if let Some(target) = map.get("$ref").and_then(Value::as_str) {
                        let resolves = target
                            .strip_prefix('#')
                            .is_some_and(|pointer| doc.pointer(pointer).is_some());
                        if !resolves {
                            bad.push(format!("{at}: {target}"));
                        }
                    }
                    for (key, value) in map {
                        walk(doc, value, &format!("{at}/{key}"), bad);
                    }
                }
                Value::Array(items) => {
                    for (i, value) in items.iter().enumerate() {
                        walk(doc, value, &format!("{at}/{i}"), bad);
                    }
                }
                _ => {}
            }
        }
        let doc = document();
        let mut bad = Vec::new();
        walk(&doc, &doc, "", &mut bad);
        assert!(bad.is_empty(), "references to nothing: {bad:?}");
    }

    #[test]
    fn every_call_lists_the_answers_any_call_can_get() {
        let doc = document();
        for (method, path) in operations(&doc) {
            let responses = &doc["paths"][&path][&method]["responses"];
            for (status, name) in [("401", "Unauthorized"), ("429", "TooManyRequests")] {
                assert_eq!(
                    responses[status]["$ref"],
                    format!("#/components/responses/{name}"),
                    "{method} {path}: {status}"
                );
            }
            let summary = &doc["paths"][&path][&method]["summary"];
            assert!(summary.is_string(), "{method} {path} has no summary");
        }
    }

    #[test]
    fn a_devbox_shows_its_tunnel_as_issued_without_the_token() {
        let doc = document();
        let schemas = &doc["components"]["schemas"];
        let mut issued = schemas["IssuedTunnel"].clone();
        let shown = &schemas["Tunnel"];
        issued["properties"]
            .as_object_mut()
            .expect("properties")
            .remove("auth_token");
        assert_eq!(issued["properties"], shown["properties"]);
        assert_eq!(issued["required"], shown["required"]);
        assert_eq!(shown["additionalProperties"], false);
    }
}
