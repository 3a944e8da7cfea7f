//! HTTP/2 to the services that need it: an h2c-only service (hyper with HTTP/2 only) reached
//! through the agent's port marking (`forward.http2_ports`), by HTTP/1.1 and HTTP/2 clients
//! alike; everything else keeps HTTP/1.1 to the service, gRPC-Web included.

use burrow_tests::services::{h2c_service, http_service, sha256_hex};
use burrow_tests::{TestAgent, TestEdge, curl};
use serde_json::Value;

/// `data` in a file of `dir`, as curl's `--data-binary @FILE` takes it.
fn data_file(dir: &tempfile::TempDir, data: &[u8]) -> String {
    let path = dir.path().join(format!("body-{}", data.len()));
    std::fs::write(&path, data).expect("write the body");
    format!("@{}", path.display())
}

/// A curl of `url` with `args` before it: the status and the service's JSON.
async fn json(args: &[&str], url: &str) -> (u16, Value) {
    let mut all = args.to_vec();
    all.push(url);
    let got = curl(&all).await;
    let value = serde_json::from_str(&got.body).unwrap_or(Value::Null);
    (got.code, value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_only_service_is_reached_through_its_port_marking() {
    let edge = TestEdge::start().await;
    let devbox = edge.devbox(Some("open")).await;
    let key = devbox.key.clone().expect("tunnel key");
    let service = h2c_service("127.0.0.1:0").await;
    let port = service.addr.port();
    let dir = tempfile::tempdir().expect("tempdir");

    // Unmarked, the edge speaks HTTP/1.1 to it, which it does not understand.
    let unmarked = TestAgent::start(&edge, &devbox).await;
    let got = curl(&[&edge.url(port, &key, "/plain")]).await;
    assert_eq!(got.code, 502, "an HTTP/2-only service, unmarked: {got:?}");
    unmarked.stop().await;

    let marked = port.to_string();
    let _agent = TestAgent::start_with(&edge, &devbox, &[("forward.http2_ports", &marked)]).await;
    let url = edge.url(port, &key, "/hello?x=1");
    let host = format!("{port}-{key}.tunnel.localhost:{}", edge.http().port());
    for client in [&["--http1.1"][..], &["--http2-prior-knowledge"][..]] {
        for _ in 0..3 {
            let (code, seen) = json(client, &url).await;
            assert_eq!(code, 200, "{client:?}: {seen}");
            assert_eq!(seen["version"], "HTTP/2.0", "{client:?}: {seen}");
            assert_eq!(seen["authority"], host.as_str(), "{client:?}: {seen}");
            assert_eq!(seen["path"], "/hello");
            assert_eq!(seen["query"], "x=1");
            assert!(seen["headers"].get("host").is_none(), "{seen}");
        }
        let body = "a body for an h2c service".repeat(40_000);
        let file = data_file(&dir, body.as_bytes());
        let mut args = client.to_vec();
        args.extend(["--data-binary", &file]);
        let (code, seen) = json(&args, &edge.url(port, &key, "/post")).await;
        assert_eq!(code, 200, "{client:?}: {seen}");
        assert_eq!(seen["method"], "POST");
        assert_eq!(seen["len"], body.len());
        assert_eq!(seen["sha256"], sha256_hex(body.as_bytes()));
    }
    let (code, streamed) = json(&["--http1.1"], &edge.url(port, &key, "/bytes/3000000")).await;
    assert_eq!(
        (code, streamed),
        (200, Value::Null),
        "a 3 MB body, not JSON"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_requests_and_grpc_web_keep_http_1_1_to_the_service() {
    let edge = TestEdge::start().await;
    let devbox = edge.devbox(Some("open")).await;
    let key = devbox.key.clone().expect("tunnel key");
    let _agent = TestAgent::start(&edge, &devbox).await;
    let service = http_service("127.0.0.1:0").await;
    let port = service.addr.port();
    let url = edge.url(port, &key, "/grpc.Web/Call");
    let dir = tempfile::tempdir().expect("tempdir");

    for client in [&["--http1.1"][..], &["--http2-prior-knowledge"][..]] {
        let (code, seen) = json(client, &edge.url(port, &key, "/")).await;
        assert_eq!((code, &seen["version"]), (200, &Value::from("HTTP/1.1")));

        let frame = b"\x00\x00\x00\x00\x05hello";
        let file = data_file(&dir, frame);
        let mut args = client.to_vec();
        args.extend([
            "-H",
            "content-type: application/grpc-web+proto",
            "-H",
            "x-grpc-web: 1",
            "--data-binary",
            &file,
        ]);
        let (code, seen) = json(&args, &url).await;
        assert_eq!(code, 200, "gRPC-Web over {client:?}: {seen}");
        assert_eq!(seen["version"], "HTTP/1.1");
        assert_eq!(
            seen["headers"]["content-type"],
            "application/grpc-web+proto"
        );
        assert_eq!(seen["headers"]["x-grpc-web"], "1");
        assert_eq!(seen["sha256"], sha256_hex(frame));
    }
}
