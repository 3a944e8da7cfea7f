//! Real dev servers behind a tunnel with `rewrite_host`: JupyterLab (its UI page, a kernel
//! started through the REST API, code run over the kernel's WebSocket) and Vite (its page, the
//! HMR WebSocket as Vite's own client opens it, an update pushed when a file changes).
//!
//! Both refuse a `Host` they do not know, as they should on a developer's machine; the edge runs
//! on `tunnel.example.com` rather than the harness's `tunnel.localhost`, because Vite trusts
//! every `*.localhost` name. Each test first shows the refusal without `rewrite_host`, then
//! enables it. Requests go to the edge's loopback port with the public `Host`, as a browser
//! would send them; WebSockets carry the public `Origin` (the edge rewrites it along with the
//! `Host`, which Jupyter and Vite compare).
//!
//! The servers come from `.ci/run` (JupyterLab in a virtualenv from PyPI, Vite from the npm
//! registry into tests/fixtures/vite-app); without them these tests fail saying so.

use std::time::Duration;

use burrow_tests::devservers::{Jupyter, Vite};
use burrow_tests::{Reply, TestAgent, TestEdge, request};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// A domain that is not `*.localhost`, like a production edge's.
const DOMAIN: &str = "tunnel.example.com";

/// The bound on one step through the tunnel (a request, a kernel's start, an HMR update).
const STEP: Duration = Duration::from_secs(30);

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// An edge on [`DOMAIN`] with an open tunnel (no `rewrite_host` yet) and its agent.
struct Tunnel {
    edge: TestEdge,
    id: String,
    key: String,
    _agent: TestAgent,
}

impl Tunnel {
    async fn open() -> Tunnel {
        let edge = TestEdge::builder().domain(DOMAIN).start().await;
        let devbox = edge.devbox(Some("open")).await;
        let agent = TestAgent::start(&edge, &devbox).await;
        Tunnel {
            id: devbox.id.clone(),
            key: devbox.key.clone().expect("an open tunnel has a key"),
            edge,
            _agent: agent,
        }
    }

    /// The public `Host` of `port`: `{port}-{key}.tunnel.example.com:{edge port}`.
    fn host(&self, port: u16) -> String {
        format!("{port}-{}.{DOMAIN}:{}", self.key, self.edge.http().port())
    }

    /// Turns `rewrite_host` on.
    async fn rewrite_host(&self) {
        let (status, json) = self
            .edge
            .admin(
                "POST",
                &format!("/v1/devboxes/{}/tunnel", self.id),
                Some(json!({"auth_mode": "open", "rewrite_host": true})),
            )
            .await;
        assert_eq!(status, 200, "{json}");
        assert_eq!(json["rewrite_host"], true, "{json}");
    }

    /// A request to `port` through the tunnel, with the public `Host`.
    async fn request(
        &self,
        method: &str,
        port: u16,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Reply {
        let headers: Vec<(String, String)> = headers
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let host = self.host(port);
        timeout(
            STEP,
            request(
                self.edge.http(),
                method,
                &host,
                path,
                &headers,
                body.as_bytes().to_vec(),
            ),
        )
        .await
        .unwrap_or_else(|_| panic!("{method} {path} through the tunnel within {STEP:?}"))
        .unwrap_or_else(|e| panic!("{method} {path} through the tunnel: {e}"))
    }

    /// Opens `ws://{public host}{path}` through the tunnel as a page of the public origin
    /// would, offering `protocol` if any.
    async fn websocket(&self, port: u16, path: &str, protocol: Option<&str>) -> Ws {
        let host = self.host(port);
        let mut request = format!("ws://{host}{path}")
            .into_client_request()
            .expect("a WebSocket request");
        let headers = request.headers_mut();
        headers.insert(
            "origin",
            format!("http://{host}").parse().expect("an Origin value"),
        );
        if let Some(protocol) = protocol {
            headers.insert(
                "sec-websocket-protocol",
                protocol.parse().expect("a protocol value"),
            );
        }
        let tcp = TcpStream::connect(self.edge.http())
            .await
            .expect("connect to the edge");
        let handshake = tokio_tungstenite::client_async(request, MaybeTlsStream::Plain(tcp));
        let (ws, response) = match timeout(STEP, handshake).await {
            Ok(Ok(done)) => done,
            Ok(Err(e)) => panic!("the WebSocket handshake for {path}: {e}"),
            Err(_) => panic!("the WebSocket handshake for {path} within {STEP:?}"),
        };
        assert_eq!(response.status(), 101);
        if let Some(protocol) = protocol {
            assert_eq!(
                response
                    .headers()
                    .get("sec-websocket-protocol")
                    .and_then(|v| v.to_str().ok()),
                Some(protocol),
                "the server took the subprotocol"
            );
        }
        ws
    }
}

/// Waits (up to [`STEP`]) for a JSON text message that `wanted` picks, skipping others.
async fn next_json(ws: &mut Ws, what: &str, wanted: impl Fn(&Value) -> bool) -> Value {
    let mut seen = Vec::new();
    let found = timeout(STEP, async {
        while let Some(msg) = ws.next().await {
            match msg.unwrap_or_else(|e| panic!("the WebSocket failed waiting for {what}: {e}")) {
                Message::Text(text) => {
                    let value: Value = serde_json::from_str(&text)
                        .unwrap_or_else(|e| panic!("a JSON message ({e}): {text}"));
                    if wanted(&value) {
                        return Some(value);
                    }
                    seen.push(text.to_string());
                }
                Message::Close(frame) => panic!("the WebSocket closed ({frame:?}) before {what}"),
                _ => {}
            }
        }
        None
    })
    .await;
    match found {
        Ok(Some(value)) => value,
        Ok(None) => panic!("the WebSocket ended before {what}; it sent:\n{seen:#?}"),
        Err(_) => panic!("no {what} within {STEP:?}; the WebSocket sent:\n{seen:#?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jupyter_runs_code_through_the_tunnel_with_rewrite_host() {
    let tunnel = Tunnel::open().await;
    let jupyter = Jupyter::start().await;
    let port = jupyter.port;
    let auth = format!("token {}", jupyter.token);
    let auth = [("authorization", auth.as_str())];

    // Without rewrite_host, Jupyter (listening on loopback) refuses a non-local Host.
    let refused = tunnel.request("GET", port, "/api/status", &auth, "").await;
    assert_eq!(refused.status, 403, "{}", refused.text());
    jupyter
        .server
        .wait_for_log("Blocking request with non-local 'Host'", STEP)
        .await;

    tunnel.rewrite_host().await;

    // The JupyterLab page itself, as a browser opens the printed link.
    let page = tunnel
        .request(
            "GET",
            port,
            &format!("/lab?token={}", jupyter.token),
            &[],
            "",
        )
        .await;
    assert_eq!(page.status, 200, "{}", page.text());
    assert!(
        page.header("content-type")
            .is_some_and(|t| t.starts_with("text/html")),
        "{:?}",
        page.headers
    );
    let html = page.text();
    assert!(html.contains("<title>JupyterLab</title>"), "{html}");
    assert!(html.contains("jupyter-config-data"), "{html}");

    // A kernel, started through the REST API.
    let started = tunnel
        .request(
            "POST",
            port,
            "/api/kernels",
            &auth,
            r#"{"name": "python3"}"#,
        )
        .await;
    assert_eq!(started.status, 201, "{}", started.text());
    let kernel: Value = serde_json::from_slice(&started.body).expect("a kernel as JSON");
    let kernel_id = kernel["id"].as_str().expect("the kernel's id").to_owned();

    // Its channels, over a WebSocket through the tunnel (the token in the query: a browser
    // cannot set headers on a WebSocket).
    let session = burrow_tests::devservers::random_token();
    let mut ws = tunnel
        .websocket(
            port,
            &format!(
                "/api/kernels/{kernel_id}/channels?session_id={session}&token={}",
                jupyter.token
            ),
            None,
        )
        .await;
    let msg_id = burrow_tests::devservers::random_token();
    let execute = json!({
        "header": {
            "msg_id": msg_id,
            "msg_type": "execute_request",
            "username": "burrow-test",
            "session": session,
            "version": "5.3",
        },
        "parent_header": {},
        "metadata": {},
        "content": {
            "code": "print(6*7)",
            "silent": false,
            "store_history": false,
            "user_expressions": {},
            "allow_stdin": false,
            "stop_on_error": true,
        },
        "channel": "shell",
        "buffers": [],
    });
    ws.send(Message::text(execute.to_string()))
        .await
        .expect("send the execute_request");
    // The reply (shell) and the output (iopub) come in either order; the kernel's `idle`
    // status on iopub comes after all the output of the request.
    let ours = |m: &Value| m["parent_header"]["msg_id"] == msg_id.as_str();
    let (mut stdout, mut reply, mut idle) = (String::new(), None, false);
    while reply.is_none() || !idle {
        let m = next_json(&mut ws, "the rest of the answer to print(6*7)", ours).await;
        match m["msg_type"].as_str() {
            Some("stream") => {
                assert_eq!(m["channel"], "iopub", "{m}");
                assert_eq!(m["content"]["name"], "stdout", "{m}");
                stdout.push_str(m["content"]["text"].as_str().expect("stream text"));
            }
            Some("execute_reply") => {
                assert_eq!(m["channel"], "shell", "{m}");
                reply = Some(m);
            }
            Some("status") => idle = m["content"]["execution_state"] == "idle",
            _ => {}
        }
    }
    assert_eq!(stdout, "42\n", "what print(6*7) wrote");
    let reply = reply.expect("the loop ends with a reply");
    assert_eq!(reply["content"]["status"], "ok", "{reply}");
    drop(ws);

    let stopped = tunnel
        .request(
            "DELETE",
            port,
            &format!("/api/kernels/{kernel_id}"),
            &auth,
            "",
        )
        .await;
    assert_eq!(stopped.status, 204, "{}", stopped.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vite_serves_and_pushes_hmr_updates_through_the_tunnel_with_rewrite_host() {
    let tunnel = Tunnel::open().await;
    let vite = Vite::start().await;
    let port = vite.port;

    // Without rewrite_host, Vite's `server.allowedHosts` check refuses the public name.
    let refused = tunnel.request("GET", port, "/", &[], "").await;
    assert_eq!(refused.status, 403, "{}", refused.text());
    let public_name = format!("{port}-{}.{DOMAIN}", tunnel.key);
    assert!(
        refused
            .text()
            .contains(&format!("Blocked request. This host (\"{public_name}\")")),
        "{}",
        refused.text()
    );

    tunnel.rewrite_host().await;

    // The page, with Vite's client injected.
    let page = tunnel.request("GET", port, "/", &[], "").await;
    assert_eq!(page.status, 200, "{}", page.text());
    let html = page.text();
    assert!(html.contains("<title>burrow test app</title>"), "{html}");
    assert!(html.contains(r#"src="/@vite/client""#), "{html}");
    assert!(html.contains(r#"src="/src/main.js""#), "{html}");

    // Vite's client, which opens the HMR socket at its page's host with the token Vite
    // injects, offering the `vite-hmr` subprotocol.
    let client = tunnel.request("GET", port, "/@vite/client", &[], "").await;
    assert_eq!(client.status, 200, "{}", client.text());
    let client = client.text();
    assert!(
        client.contains(
            "new WebSocket(`${socketProtocol}://${socketHost}?token=${wsToken}`, \"vite-hmr\")"
        ),
        "Vite's client opens its socket another way now: update this test"
    );
    let token = client
        .lines()
        .find_map(|l| l.strip_prefix("const wsToken = \"")?.strip_suffix("\";"))
        .unwrap_or_else(|| panic!("no `const wsToken = \"...\";` in Vite's client"))
        .to_owned();

    // The modules the page imports, so Vite knows them (as it does once a browser has them).
    let main = tunnel.request("GET", port, "/src/main.js", &[], "").await;
    assert_eq!(main.status, 200, "{}", main.text());
    assert!(
        main.text().contains(r#"import "/src/style.css""#),
        "{}",
        main.text()
    );
    let style = tunnel.request("GET", port, "/src/style.css", &[], "").await;
    assert_eq!(style.status, 200, "{}", style.text());
    assert!(style.text().contains("rebeccapurple"), "{}", style.text());

    let mut ws = tunnel
        .websocket(port, &format!("/?token={token}"), Some("vite-hmr"))
        .await;
    next_json(&mut ws, "Vite's `connected`", |m| m["type"] == "connected").await;

    // An edit in the app: Vite pushes the update to the page.
    let css = vite.app.join("src/style.css");
    let mut text = std::fs::read_to_string(&css).expect("read the copy's style.css");
    text.push_str("h1 { text-decoration: underline; }\n");
    std::fs::write(&css, text).expect("edit the copy's style.css");
    let update = next_json(&mut ws, "an HMR update for style.css", |m| {
        m["type"] == "update" || m["type"] == "full-reload"
    })
    .await;
    assert_eq!(update["type"], "update", "{update}");
    let change = &update["updates"][0];
    assert_eq!(change["path"], "/src/style.css", "{update}");

    // What the page fetches next: the edited module.
    let timestamp = change["timestamp"]
        .as_u64()
        .expect("the update's timestamp");
    let edited = tunnel
        .request(
            "GET",
            port,
            &format!("/src/style.css?t={timestamp}"),
            &[],
            "",
        )
        .await;
    assert_eq!(edited.status, 200, "{}", edited.text());
    assert!(
        edited.text().contains("text-decoration: underline"),
        "{}",
        edited.text()
    );
}
