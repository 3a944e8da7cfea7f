//! SIGHUP reloads the edge's certificates without a restart: new connections get the new
//! certificate, and a broken one is refused with the old kept.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
};

const WAIT: Duration = Duration::from_secs(30);

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// Writes a CA (ca.pem) and a `*.tunnel.localhost` certificate signed by it (cert.pem,
/// key.pem) into `dir`, named after `name`.
fn issue(dir: &Path, name: &str) {
    let ca_key = KeyPair::generate().expect("key");
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name = DistinguishedName::new();
    ca.distinguished_name
        .push(DnType::CommonName, format!("test CA {name}"));
    let ca_cert = ca.self_signed(&ca_key).expect("ca");
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().expect("key");
    let mut leaf = CertificateParams::new(vec!["*.tunnel.localhost".into()]).expect("params");
    leaf.distinguished_name = DistinguishedName::new();
    leaf.distinguished_name
        .push(DnType::CommonName, "*.tunnel.localhost");
    let cert = leaf.signed_by(&key, &issuer).expect("leaf");
    std::fs::write(dir.join(format!("{name}-ca.pem")), ca_cert.pem()).expect("write");
    std::fs::write(dir.join("cert.pem"), cert.pem()).expect("write");
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).expect("write");
}

/// curl over HTTPS trusting `ca`; the HTTP code, or 0 when TLS fails.
fn curl(port: u16, ca: &Path) -> u16 {
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
        .arg(ca)
        .arg(format!("https://80-nokey.tunnel.localhost:{port}/"))
        .output()
        .expect("curl");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !check() {
        assert!(Instant::now() < deadline, "{what} within {WAIT:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn sighup_reloads_certificates_and_refuses_a_broken_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    issue(dir.path(), "first");
    let https = free_port();
    let config = dir.path().join("edge.toml");
    std::fs::write(
        &config,
        format!(
            "domain = \"tunnel.localhost\"\nstate_dir = \"{}\"\n[public]\nhttps = \"127.0.0.1:{https}\"\n\
             cert = \"cert.pem\"\nkey = \"key.pem\"\n[agents]\nlisten = \"127.0.0.1:0\"\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n",
            dir.path().join("state").display()
        ),
    )
    .expect("config");
    let mut edge = Command::new(env!("CARGO_BIN_EXE_burrow-edge"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .spawn()
        .expect("edge starts");
    let (tx, logs) = mpsc::channel();
    let stderr = edge.stderr.take().expect("stderr");
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let first = dir.path().join("first-ca.pem");
    wait_for("the edge serves HTTPS", || curl(https, &first) == 404);

    let hup = |pid: u32| {
        Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .expect("kill");
    };
    let wait_log = |needle: &str| {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = logs
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("log line `{needle}`"));
            if line.contains(needle) {
                return;
            }
        }
    };

    // A new certificate from another CA: after SIGHUP new connections present it.
    issue(dir.path(), "second");
    hup(edge.id());
    wait_log("certificates reloaded");
    let second = dir.path().join("second-ca.pem");
    assert_eq!(
        curl(https, &second),
        404,
        "new connections get the new certificate"
    );
    assert_eq!(curl(https, &first), 0, "the old certificate is gone");

    // A broken key: the reload is refused and the current certificate kept.
    std::fs::write(dir.path().join("key.pem"), "not a key").expect("write");
    hup(edge.id());
    wait_log("reload refused");
    assert_eq!(
        curl(https, &second),
        404,
        "still serving the last good certificate"
    );

    Command::new("kill")
        .args(["-TERM", &edge.id().to_string()])
        .status()
        .expect("kill");
    let status = edge.wait().expect("wait");
    assert!(status.success(), "{status}");
}
