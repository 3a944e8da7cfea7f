//! Metrics as operators get them: the agent's and the edge's `/metrics` pass `promtool check
//! metrics`, and a real Prometheus server scrapes both and answers queries with the series a
//! dashboard needs, with values that match the traffic sent. Also `/healthz` and `/readyz`.

use std::process::Stdio;
use std::time::Duration;

use burrow_tests::services::http_service;
use burrow_tests::testkit::ports::{ClosedPort, ReservedPort};
use burrow_tests::testkit::{AsyncChildGuard, Lines};
use burrow_tests::{TestAgent, TestEdge, WAIT, curl};
use serde_json::Value;

/// The address from Prometheus's `msg="Listening on" address=127.0.0.1:PORT` log line.
fn listening_addr(line: &str) -> String {
    line.split("address=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no address in `{line}`"))
        .to_owned()
}

async fn get(url: &str) -> (u16, String) {
    let c = curl(&[url]).await;
    (c.code, c.body)
}

async fn promtool_accepts(text: &str) {
    let mut child = tokio::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs (apt-get install prometheus)");
    let mut stdin = child.stdin.take().expect("stdin");
    tokio::io::AsyncWriteExt::write_all(&mut stdin, text.as_bytes())
        .await
        .expect("write");
    drop(stdin);
    let out = child.wait_with_output().await.expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_agent_and_edge() {
    let edge = TestEdge::builder()
        .toml("[metrics]\nlisten = \"127.0.0.1:0\"")
        .start()
        .await;
    let edge_metrics = edge.edge().metrics_addr.expect("edge metrics listener");
    let devbox = edge.devbox(Some("open")).await;
    let key = devbox.key.clone().expect("key");
    // The agent's metrics port is named in its config, not bound on `:0`: the agent denies
    // the configured port to the tunnel, which this test checks.
    let agent_metrics_port = ReservedPort::new();
    let agent_port = agent_metrics_port.port();
    let agent_listen = agent_metrics_port.addr().to_string();
    let _agent =
        TestAgent::start_with(&edge, &devbox, &[("metrics.listen", agent_listen.as_str())]).await;
    let agent_metrics = format!("http://{agent_listen}");

    // Health endpoints.
    assert_eq!(get(&format!("{agent_metrics}/healthz")).await.0, 200);
    let (code, body) = get(&format!("{agent_metrics}/readyz")).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(get(&format!("http://{edge_metrics}/healthz")).await.0, 200);
    assert_eq!(get(&format!("http://{edge_metrics}/readyz")).await.0, 200);

    // Traffic: 5 successes, one 502, one request for the agent's own metrics port (403).
    let service = http_service("127.0.0.1:0").await;
    for _ in 0..5 {
        let got = curl(&[
            "--data-binary",
            "0123456789",
            &edge.url(service.addr.port(), &key, "/"),
        ])
        .await;
        assert_eq!(got.code, 200);
    }
    let closed = ClosedPort::new();
    assert_eq!(curl(&[&edge.url(closed.port(), &key, "/")]).await.code, 502);
    assert_eq!(
        curl(&[&edge.url(agent_port, &key, "/metrics")]).await.code,
        403,
        "the metrics port is never forwarded"
    );

    let (_, agent_text) = get(&format!("{agent_metrics}/metrics")).await;
    let (_, edge_text) = get(&format!("http://{edge_metrics}/metrics")).await;
    promtool_accepts(&agent_text).await;
    promtool_accepts(&edge_text).await;
    assert!(
        !agent_text.contains(&key) && !edge_text.contains(&key),
        "no tunnel keys in metrics"
    );
    assert!(!edge_text.contains(&devbox.id), "no devbox ids in metrics");

    // A real Prometheus server scrapes both.
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: burrow\n    static_configs:\n      - targets: ['{agent_listen}', '{edge_metrics}']\n"
        ),
    )
    .expect("write config");
    // Port 0: Prometheus binds a port the kernel chooses and logs it.
    let mut prometheus = AsyncChildGuard::from(
        tokio::process::Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg("--web.listen-address=127.0.0.1:0")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("prometheus runs (apt-get install prometheus)"),
    );
    let log = Lines::new();
    log.read_async(prometheus.stderr.take().expect("piped stderr"));
    let prom_addr = listening_addr(&log.wait_for_async("msg=\"Listening on\"", WAIT).await);

    let query = |q: &str| {
        let url = format!("http://{prom_addr}/api/v1/query?query={q}");
        async move {
            let c = curl(&[&url]).await;
            serde_json::from_str::<Value>(&c.body).ok().and_then(|v| {
                v["data"]["result"]
                    .as_array()
                    .and_then(|r| r.first().cloned())
                    .and_then(|first| {
                        first["value"][1]
                            .as_str()
                            .and_then(|s| s.parse::<f64>().ok())
                    })
            })
        }
    };
    // The edge keeps connections to the service alive, so the five requests share streams:
    // the agent counts a stream when it ends, and the kept one is still open.
    let expectations: [(&str, f64); 7] = [
        ("burrow_agent_connected", 1.0),
        ("burrow_agent_streams_open", 1.0),
        ("sum(burrow_edge_service_connections_total)", 5.0),
        (
            "sum(burrow_agent_streams_total{outcome=\"not_listening\"})",
            1.0,
        ),
        ("burrow_edge_requests_total{class=\"2xx\"}", 5.0),
        ("burrow_edge_agents_connected", 1.0),
        ("burrow_edge_bytes_total{direction=\"from_client\"}", 50.0),
    ];
    for (q, want) in expectations {
        let encoded = q
            .replace('{', "%7B")
            .replace('}', "%7D")
            .replace('"', "%22")
            .replace('=', "%3D")
            .replace('(', "%28")
            .replace(')', "%29");
        let got = tokio::time::timeout(WAIT, async {
            loop {
                if let Some(v) = query(&encoded).await {
                    if v >= want {
                        return v;
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("Prometheus has {q} >= {want}"));
        assert!(got >= want, "{q} = {got}");
    }
    let rtt = query("burrow_agent_rtt_seconds").await;
    if let Some(rtt) = rtt {
        assert!(rtt < 1.0, "loopback RTT under a second, got {rtt}");
    }
}
