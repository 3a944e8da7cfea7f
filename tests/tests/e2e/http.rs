//! Plain HTTP through the tunnel: methods, bodies, bind addresses, bulk transfers, headers.

use burrow_tests::services::{http_service, pattern, sha256_hex};
use burrow_tests::{DOMAIN, TestAgent, TestEdge, WAIT, curl, request};
use serde_json::Value;

async fn open_tunnel() -> (TestEdge, String, TestAgent) {
    let edge = TestEdge::start().await;
    let devbox = edge.devbox(Some("open")).await;
    let agent = TestAgent::start(&edge, &devbox).await;
    let key = devbox.key.clone().expect("tunnel key");
    (edge, key, agent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_and_post_reach_services_on_any_loopback_bind() {
    let (edge, key, _agent) = open_tunnel().await;
    for bind in ["0.0.0.0:0", "127.0.0.1:0", "[::1]:0"] {
        let service = http_service(bind).await;
        let port = service.addr.port();
        let got = curl(&[&edge.url(port, &key, "/hello?x=1")]).await;
        assert_eq!(got.code, 200, "GET to a service on {bind}: {got:?}");
        let json: Value = serde_json::from_str(&got.body).expect("json");
        assert_eq!(json["method"], "GET");
        assert_eq!(json["path"], "/hello");
        assert_eq!(json["query"], "x=1");

        let posted = curl(&[
            "--data-binary",
            "some form data",
            &edge.url(port, &key, "/submit"),
        ])
        .await;
        assert_eq!(posted.code, 200, "POST to a service on {bind}: {posted:?}");
        let json: Value = serde_json::from_str(&posted.body).expect("json");
        assert_eq!(json["method"], "POST");
        assert_eq!(json["len"], 14);
        assert_eq!(json["sha256"], sha256_hex(b"some form data"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_64_mib_download_and_upload_keep_their_checksums() {
    const SIZE: u64 = 64 << 20;
    let (edge, key, _agent) = open_tunnel().await;
    let service = http_service("127.0.0.1:0").await;
    let port = service.addr.port();
    let dir = tempfile::tempdir().expect("tempdir");

    let download = dir.path().join("download");
    let got = curl(&[
        "-o",
        download.to_str().expect("path"),
        &edge.url(port, &key, &format!("/bytes/{SIZE}")),
    ])
    .await;
    assert_eq!(got.code, 200, "{got:?}");
    let data = std::fs::read(&download).expect("downloaded file");
    assert_eq!(data.len() as u64, SIZE);
    let expected: Vec<u8> = (0..SIZE).map(pattern).collect();
    assert!(
        data == expected,
        "downloaded bytes differ from what the service sent"
    );

    let upload = dir.path().join("upload");
    std::fs::write(&upload, &expected).expect("write upload");
    let sent = curl(&[
        "--data-binary",
        &format!("@{}", upload.display()),
        "-H",
        "content-type: application/octet-stream",
        &edge.url(port, &key, "/upload"),
    ])
    .await;
    assert_eq!(sent.code, 200, "{}", sent.stderr);
    let json: Value = serde_json::from_str(&sent.body).expect("json");
    assert_eq!(json["len"], SIZE);
    assert_eq!(json["sha256"], sha256_hex(&expected));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_headers_are_set_and_hop_by_hop_removed() {
    let (edge, key, _agent) = open_tunnel().await;
    let service = http_service("127.0.0.1:0").await;
    let port = service.addr.port();
    let host = format!("{port}-{key}.{DOMAIN}:{}", edge.http().port());
    let headers = [
        ("connection".to_owned(), "x-private, keep-alive".to_owned()),
        ("x-private".to_owned(), "hop".to_owned()),
        ("x-forwarded-for".to_owned(), "6.6.6.6".to_owned()),
        ("x-forwarded-port".to_owned(), "1".to_owned()),
        ("forwarded".to_owned(), "for=6.6.6.6".to_owned()),
        ("x-real-ip".to_owned(), "6.6.6.6".to_owned()),
        ("x-app".to_owned(), "kept".to_owned()),
    ];
    let reply = request(edge.http(), "GET", &host, "/h", &headers, vec![])
        .await
        .expect("request");
    assert_eq!(reply.status, 200, "{}", reply.text());
    let json: Value = serde_json::from_slice(&reply.body).expect("json");
    let h = &json["headers"];
    assert_eq!(
        h["host"],
        host.as_str(),
        "the public Host reaches the service"
    );
    assert_eq!(h["x-forwarded-host"], host.as_str());
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(
        h["x-forwarded-for"], "127.0.0.1",
        "client-sent values are replaced"
    );
    assert_eq!(h["x-app"], "kept");
    for forged in ["x-forwarded-port", "forwarded", "x-real-ip"] {
        assert!(
            h.get(forged).is_none(),
            "client-sent `{forged}` reached the service: {h}"
        );
    }
    assert!(
        h.get("x-private").is_none(),
        "headers named in Connection are hop-by-hop: {h}"
    );
    assert!(h.get("keep-alive").is_none());
}

/// `rewrite_host`: the service gets `Host: localhost:{port}` (and an Origin naming the public
/// host becomes `http://localhost:{port}`), the public host stays in `X-Forwarded-Host`; the
/// setting survives an enable call that does not name it, and turns off with `false`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrite_host_sends_localhost_to_the_service() {
    let edge = TestEdge::start().await;
    let devbox = edge.devbox(Some("open")).await;
    let _agent = TestAgent::start(&edge, &devbox).await;
    let key = devbox.key.clone().expect("tunnel key");
    let service = http_service("127.0.0.1:0").await;
    let port = service.addr.port();
    let host = format!("{port}-{key}.{DOMAIN}:{}", edge.http().port());
    let enable = |body: Value| {
        let edge = &edge;
        let id = devbox.id.clone();
        let key = key.clone();
        async move {
            let (status, json) = edge
                .admin("POST", &format!("/v1/devboxes/{id}/tunnel"), Some(body))
                .await;
            assert_eq!(status, 200, "{json}");
            assert_eq!(json["tunnel_key"], key.as_str(), "the key stays");
            json["rewrite_host"]
                .as_bool()
                .expect("rewrite_host in the answer")
        }
    };
    let seen = |origin: &str| {
        let edge = &edge;
        let host = host.clone();
        let origin = origin.to_owned();
        async move {
            let headers = [("origin".to_owned(), origin)];
            let reply = request(edge.http(), "GET", &host, "/h", &headers, vec![])
                .await
                .expect("request");
            assert_eq!(reply.status, 200, "{}", reply.text());
            let json: Value = serde_json::from_slice(&reply.body).expect("json");
            json["headers"].clone()
        }
    };

    assert!(enable(serde_json::json!({"auth_mode": "open", "rewrite_host": true})).await);
    let h = seen(&format!("http://{host}")).await;
    assert_eq!(h["host"], format!("localhost:{port}").as_str());
    assert_eq!(
        h["x-forwarded-host"],
        host.as_str(),
        "the public host is kept"
    );
    assert_eq!(h["origin"], format!("http://localhost:{port}").as_str());
    let h = seen("http://elsewhere.example").await;
    assert_eq!(
        h["origin"], "http://elsewhere.example",
        "another origin is left alone"
    );

    assert!(
        enable(serde_json::json!({"auth_mode": "open"})).await,
        "not named: kept"
    );
    assert_eq!(
        seen("http://x.example").await["host"],
        format!("localhost:{port}").as_str()
    );

    assert!(!enable(serde_json::json!({"auth_mode": "open", "rewrite_host": false})).await);
    let h = seen(&format!("http://{host}")).await;
    assert_eq!(h["host"], host.as_str());
    assert_eq!(h["origin"], format!("http://{host}").as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_that_hangs_up_gets_a_502_naming_it() {
    let (edge, key, _agent) = open_tunnel().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            drop(tcp);
        }
    });
    let got = curl(&[&edge.url(port, &key, "/")]).await;
    assert_eq!(got.code, 502, "{got:?}");
    assert!(
        got.body
            .contains(&format!("the service on port {port} closed the connection")),
        "{}",
        got.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_stream_does_not_delay_another() {
    let (edge, key, _agent) = open_tunnel().await;
    // A service that accepts connections and then never reads or answers.
    let stuck = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let stuck_port = stuck.local_addr().expect("addr").port();
    let (accepted_tx, mut accepted_rx) = tokio::sync::mpsc::channel(8);
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = stuck.accept().await {
            held.push(tcp);
            let _ = accepted_tx.send(()).await;
        }
    });
    let service = http_service("127.0.0.1:0").await;
    let host = format!("{stuck_port}-{key}.{DOMAIN}");
    let http = edge.http();
    let hung =
        tokio::spawn(
            async move { request(http, "POST", &host, "/", &[], vec![0u8; 1 << 20]).await },
        );
    tokio::time::timeout(WAIT, accepted_rx.recv())
        .await
        .expect("the stuck service got its connection");
    // While that stream sits full and unanswered, other requests go through.
    for _ in 0..5 {
        let got = curl(&[&edge.url(service.addr.port(), &key, "/")]).await;
        assert_eq!(got.code, 200, "{got:?}");
    }
    assert!(
        !hung.is_finished(),
        "the stuck request is still waiting, as it should"
    );
    hung.abort();
}
