//! The admin API's OpenAPI document (`edge/src/openapi.json`): valid OpenAPI 3.1 to a real
//! validator (Python's openapi-spec-validator, from the test virtualenv), served by the edge as
//! it is, and true of every call of the API: each answer below goes through
//! `TestEdge::admin_with`, which checks it against the document (`burrow_tests::openapi`). And
//! enough for a platform: a client generated from it (Python's openapi-python-client) drives the
//! API.

use std::path::Path;
use std::process::{Command, Stdio};

use burrow_tests::services::http_service;
use burrow_tests::{TestAgent, TestEdge, WAIT, curl, openapi, request};
use serde_json::{Value, json};

/// What to do when openapi-spec-validator or openapi-python-client is missing.
const INSTALL: &str = "run `bash tests/run --install-only`: it installs openapi-spec-validator \
                       and openapi-python-client into the test virtualenv (BURROW_TEST_VENV, \
                       default ~/.cache/burrow/test-venv)";

#[test]
fn the_document_is_valid_openapi_3_1() {
    let python = burrow_tests::devservers::venv().join("bin/python");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("openapi.json");
    std::fs::write(&file, openapi::DOCUMENT).expect("write the document");
    let out = Command::new(&python)
        .args(["-m", "openapi_spec_validator", "--schema", "3.1"])
        .arg(&file)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}; {INSTALL}", python.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("No module named openapi_spec_validator"),
        "{stderr}; {INSTALL}"
    );
    // A broken `$ref` makes the validator print the whole document: the start says enough.
    let said: String = format!("{stdout}{stderr}").chars().take(4000).collect();
    assert!(
        out.status.success(),
        "edge/src/openapi.json is not valid OpenAPI 3.1:\n{said}"
    );
    assert!(stdout.contains(": OK"), "{said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_serves_the_document() {
    let edge = TestEdge::start().await;
    let (status, served) = edge.admin("GET", "/v1/openapi.json", None).await;
    assert_eq!(status, 200, "{served}");
    assert_eq!(
        &served,
        openapi::document(),
        "the document served is the file"
    );

    let token = edge.edge().admin_token.expose().to_owned();
    let headers = [("authorization".to_owned(), format!("Bearer {token}"))];
    let reply = request(
        edge.edge().admin_addr,
        "GET",
        "localhost",
        "/v1/openapi.json",
        &headers,
        Vec::new(),
    )
    .await
    .expect("admin API answers");
    let media = reply
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok());
    assert_eq!(media, Some("application/json"));

    let (status, body) = edge.admin_with("GET", "/v1/openapi.json", None, None).await;
    assert_eq!(
        status, 401,
        "the document is behind the admin token too: {body}"
    );
}

/// Every call of the API, its answers and errors: the statuses are asserted here, the shapes by
/// the document.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_answers_as_the_document_says() {
    let edge = TestEdge::builder()
        .toml("[limits]\nadmin_failures = 3")
        .start()
        .await;

    // Create without a tunnel (an id of the edge's, then one of ours) and with one.
    let (status, plain) = edge.admin("POST", "/v1/devboxes", None).await;
    assert_eq!(status, 201, "{plain}");
    let (status, created) = edge
        .admin("POST", "/v1/devboxes", Some(json!({"id": "box.1_a-B"})))
        .await;
    assert_eq!(status, 201, "{created}");
    let (status, open) = edge
        .admin(
            "POST",
            "/v1/devboxes",
            Some(json!({"id": "open-box", "tunnel": {"auth_mode": "open"}})),
        )
        .await;
    assert_eq!(status, 201, "{open}");
    let every_option = json!({
        "auth_mode": "authenticated",
        "rewrite_host": true,
        "raw_tcp": true,
        "http_keep_alive": false,
        "wake_on_http": true,
    });
    let (status, authed) = edge
        .admin(
            "POST",
            "/v1/devboxes",
            Some(json!({"id": "auth-box", "tunnel": every_option})),
        )
        .await;
    assert_eq!(status, 201, "{authed}");
    assert!(authed["tunnel"]["auth_token"].is_string(), "{authed}");

    // Show and list, with an agent connected and traffic through the open tunnel.
    let devbox = burrow_tests::Devbox {
        id: "open-box".into(),
        agent_token: open["agent_token"].as_str().expect("agent token").into(),
        key: open["tunnel"]["tunnel_key"].as_str().map(str::to_owned),
        auth_token: None,
    };
    let _agent = TestAgent::start(&edge, &devbox).await;
    let service = http_service("127.0.0.1:0").await;
    let key = devbox.key.clone().expect("tunnel key");
    let url = edge.url(service.addr.port(), &key, "/");
    assert_eq!(curl(&[&url]).await.code, 200);
    let (status, shown) = edge.admin("GET", "/v1/devboxes/open-box", None).await;
    assert_eq!(status, 200, "{shown}");
    assert_eq!(shown["agent"]["connected"], true, "{shown}");
    let (status, shown) = edge.admin("GET", "/v1/devboxes/box.1_a-B/", None).await;
    assert_eq!(status, 200, "a trailing / is ignored: {shown}");
    let (status, list) = edge.admin("GET", "/v1/devboxes", None).await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list.as_array().map(Vec::len), Some(4), "{list}");

    // Enable on a devbox without a tunnel: open, then authenticated with every option, then
    // the same mode again (no new token), then each option alone.
    let tunnel = "/v1/devboxes/box.1_a-B/tunnel";
    let (status, enabled) = edge
        .admin("POST", tunnel, Some(json!({"auth_mode": "open"})))
        .await;
    assert_eq!(status, 200, "{enabled}");
    assert!(enabled.get("auth_token").is_none(), "{enabled}");
    let (status, enabled) = edge.admin("POST", tunnel, Some(every_option.clone())).await;
    assert_eq!(status, 200, "{enabled}");
    assert!(enabled["auth_token"].is_string(), "{enabled}");
    let (status, again) = edge.admin("POST", tunnel, Some(every_option)).await;
    assert_eq!(status, 200, "{again}");
    assert!(again.get("auth_token").is_none(), "{again}");
    for option in ["rewrite_host", "raw_tcp", "http_keep_alive", "wake_on_http"] {
        let body = json!({"auth_mode": "authenticated", option: false});
        let (status, changed) = edge.admin("POST", tunnel, Some(body)).await;
        assert_eq!(status, 200, "{option}: {changed}");
        assert_eq!(changed[option], false, "{option}: {changed}");
    }

    // Rotate both tokens; an open tunnel has no token to rotate (409).
    let (status, rotated) = edge
        .admin("POST", &format!("{tunnel}/rotate-token"), None)
        .await;
    assert_eq!(status, 200, "{rotated}");
    assert_ne!(rotated["auth_token"], enabled["auth_token"], "{rotated}");
    let (status, answer) = edge
        .admin("POST", "/v1/devboxes/open-box/tunnel/rotate-token", None)
        .await;
    assert_eq!(status, 409, "{answer}");
    let (status, answer) = edge
        .admin("POST", "/v1/devboxes/box.1_a-B/rotate-agent-token", None)
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_ne!(answer["agent_token"], created["agent_token"], "{answer}");

    // Disable, then rotating the tunnel token finds no tunnel (404); delete.
    let (status, answer) = edge.admin("DELETE", tunnel, None).await;
    assert_eq!(status, 204, "{answer}");
    let (status, answer) = edge
        .admin("POST", &format!("{tunnel}/rotate-token"), None)
        .await;
    assert_eq!(status, 404, "{answer}");
    let (status, answer) = edge.admin("DELETE", "/v1/devboxes/box.1_a-B", None).await;
    assert_eq!(status, 204, "{answer}");

    // Errors.
    let errors: [(&str, &str, Option<Value>, u16); 12] = [
        ("GET", "/v1/devboxes/box.1_a-B", None, 404),
        ("DELETE", "/v1/devboxes/box.1_a-B", None, 404),
        (
            "POST",
            "/v1/devboxes/nope/tunnel",
            Some(json!({"auth_mode": "open"})),
            404,
        ),
        ("POST", "/v1/devboxes/nope/rotate-agent-token", None, 404),
        ("GET", "/v1/nowhere", None, 404),
        ("GET", "/v1/devboxes/open-box/tunnel/elsewhere", None, 404),
        ("PUT", "/v1/devboxes", Some(json!({})), 405),
        ("GET", "/v1/devboxes/open-box/tunnel", None, 405),
        ("POST", "/v1/openapi.json", None, 405),
        ("POST", "/v1/devboxes", Some(json!({"id": "open-box"})), 409),
        (
            "POST",
            "/v1/devboxes",
            Some(json!({"id": "no spaces"})),
            400,
        ),
        ("POST", tunnel, Some(json!({"auth_mode": "sometimes"})), 400),
    ];
    for (method, path, body, want) in errors {
        let (status, answer) = edge.admin(method, path, body).await;
        assert_eq!(status, want, "{method} {path}: {answer}");
        assert!(answer["error"].is_string(), "{method} {path}: {answer}");
    }
    let bad_json = request(
        edge.edge().admin_addr,
        "POST",
        "localhost",
        "/v1/devboxes",
        &[(
            "authorization".to_owned(),
            format!("Bearer {}", edge.edge().admin_token.expose()),
        )],
        b"{\"id\": ".to_vec(),
    )
    .await
    .expect("admin API answers");
    assert_eq!(bad_json.status, 400, "{}", bad_json.text());
    let answer: Value = serde_json::from_slice(&bad_json.body).expect("JSON");
    openapi::check("POST", "/v1/devboxes", bad_json.status, Some(&answer));
    let (status, answer) = edge.admin("GET", "/v1/cluster", None).await;
    assert_eq!(status, 404, "a single edge is no cluster: {answer}");

    // Wrong tokens: 401, until the address is refused for a while (429), the right token too.
    let mut answers = Vec::new();
    for _ in 0..10 {
        let (status, answer) = edge
            .admin_with("GET", "/v1/events", None, Some("guess"))
            .await;
        answers.push(status);
        if status == 429 {
            assert!(answer["error"].is_string(), "{answer}");
            break;
        }
        assert_eq!(status, 401, "{answer}");
    }
    assert_eq!(answers.last(), Some(&429), "{answers:?}");
    let (status, answer) = edge.admin("GET", "/v1/devboxes", None).await;
    assert_eq!(status, 429, "{answer}");
    let (status, answer) = edge.admin_with("GET", "/v1/nowhere", None, None).await;
    assert_eq!(status, 429, "{answer}");
}

/// A platform's client, generated from the document with no hand-written line, registers a
/// devbox, reads it back into typed models, rotates its tunnel token, disables its tunnel,
/// deletes it and gets a typed 404: `tests/python/generated_client.py`, the README's example.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generated_client_drives_the_api() {
    let venv = burrow_tests::devservers::venv();
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("openapi.json"), openapi::DOCUMENT).expect("write the document");

    // The README's command, plus `--fail-on-warning`: a part of the document the generator
    // cannot turn into code fails the test instead of going missing from the client. The
    // virtualenv comes first on PATH for ruff, which formats the generated code.
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![venv.join("bin")];
    paths.extend(std::env::split_paths(&path));
    let mut generate = tokio::process::Command::new(venv.join("bin/openapi-python-client"));
    generate
        .args(["generate", "--path", "openapi.json", "--meta", "none"])
        .args(["--output-path", "burrow_admin", "--fail-on-warning"])
        .current_dir(dir.path())
        .env(
            "PATH",
            std::env::join_paths(paths).expect("no `:` in the virtualenv's path"),
        );
    finish(generate, "openapi-python-client generate").await;

    let edge = TestEdge::start().await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/generated_client.py");
    let mut drive = tokio::process::Command::new(venv.join("bin/python"));
    drive
        .arg(script)
        .arg(format!("http://{}", edge.edge().admin_addr))
        .arg("generated-box")
        .env("BURROW_ADMIN_TOKEN", edge.edge().admin_token.expose())
        .env("PYTHONPATH", dir.path());
    let out = finish(drive, "generated_client.py").await;
    let seen: Value = serde_json::from_slice(&out)
        .unwrap_or_else(|e| panic!("generated_client.py printed no JSON ({e})"));

    let create = &seen["create"];
    assert_eq!(create["status"], 201, "{seen}");
    assert_eq!(create["model"], "CreatedDevbox", "{seen}");
    assert_eq!(create["tunnel_model"], "IssuedTunnel", "{seen}");
    assert_eq!(create["id"], "generated-box", "{seen}");
    assert_eq!(create["agent_token"], true, "{seen}");
    assert_eq!(create["auth_token"], true, "{seen}");
    assert_eq!(create["auth_mode"], "authenticated", "{seen}");
    assert_eq!(create["wake_on_http"], true, "{seen}");

    let get = &seen["get"];
    assert_eq!(get["status"], 200, "{seen}");
    assert_eq!(get["model"], "Devbox", "{seen}");
    assert_eq!(get["tunnel_model"], "Tunnel", "{seen}");
    assert_eq!(get["agent_model"], "AgentStatus", "{seen}");
    assert_eq!(get["id"], "generated-box", "{seen}");
    assert_eq!(
        get["last_activity_ms"],
        Value::Null,
        "no traffic yet: {seen}"
    );
    assert_eq!(get["agent_connected"], false, "{seen}");
    assert_eq!(get["auth_mode"], "authenticated", "{seen}");
    assert_eq!(get["wake_on_http"], true, "{seen}");
    assert_eq!(get["same_key"], true, "{seen}");

    let rotate = &seen["rotate"];
    assert_eq!(rotate["status"], 200, "{seen}");
    assert_eq!(rotate["model"], "IssuedTunnel", "{seen}");
    assert_eq!(rotate["new_token"], true, "{seen}");
    assert_eq!(rotate["same_key"], true, "{seen}");

    assert_eq!(seen["disable"]["status"], 204, "{seen}");
    assert_eq!(seen["disable"]["tunnel"], Value::Null, "{seen}");
    assert_eq!(seen["delete"]["status"], 204, "{seen}");
    let gone = &seen["get_deleted"];
    assert_eq!(gone["status"], 404, "{seen}");
    assert_eq!(gone["model"], "Error", "{seen}");
    assert!(
        gone["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{seen}"
    );

    // The edge agrees: the devbox is gone.
    let (status, answer) = edge.admin("GET", "/v1/devboxes/generated-box", None).await;
    assert_eq!(status, 404, "{answer}");
}

/// Runs `cmd` from the test virtualenv to the end; panics unless it succeeds. Its stdout.
async fn finish(mut cmd: tokio::process::Command, what: &str) -> Vec<u8> {
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    let out = tokio::time::timeout(WAIT * 3, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {:?}", WAIT * 3))
        .unwrap_or_else(|e| panic!("{what} cannot start ({e}): {INSTALL}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{what} failed:\n{stdout}\n{stderr}");
    out.stdout
}
