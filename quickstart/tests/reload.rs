//! SIGHUP reloads the edge's certificates without a restart: new connections get the new
//! certificate, and a broken one is refused with the old kept.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use burrow_testkit::{ChildGuard, Lines, Signal};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
};

const WAIT: Duration = Duration::from_secs(30);

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

/// The HTTPS port from the edge's `edge listening` log line (`https=Some(127.0.0.1:PORT)`).
fn https_port(line: &str) -> u16 {
    line.split("https=Some(")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .and_then(|addr| addr.parse::<std::net::SocketAddr>().ok())
        .unwrap_or_else(|| panic!("no HTTPS address in `{line}`"))
        .port()
}

#[test]
fn sighup_reloads_certificates_and_refuses_a_broken_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    issue(dir.path(), "first");
    let config = dir.path().join("edge.toml");
    std::fs::write(
        &config,
        format!(
            "domain = \"tunnel.localhost\"\nstate_dir = \"{}\"\n[public]\nhttps = \"127.0.0.1:0\"\n\
             cert = \"cert.pem\"\nkey = \"key.pem\"\n[agents]\nlisten = \"127.0.0.1:0\"\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n",
            dir.path().join("state").display()
        ),
    )
    .expect("config");
    let mut edge = ChildGuard::spawn(
        Command::new(env!("CARGO_BIN_EXE_burrow-edge"))
            .args(["serve", "--config"])
            .arg(&config)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped()),
    );
    let log = Lines::new();
    log.read(edge.stderr.take().expect("stderr"));
    // The edge binds `:0` and logs the addresses it got.
    let https = https_port(&log.wait_for("edge listening", WAIT));
    let first = dir.path().join("first-ca.pem");
    assert_eq!(curl(https, &first), 404, "the edge serves HTTPS");

    // A new certificate from another CA: after SIGHUP new connections present it.
    issue(dir.path(), "second");
    edge.signal(Signal::SIGHUP);
    log.wait_for("certificates reloaded", WAIT);
    let second = dir.path().join("second-ca.pem");
    assert_eq!(
        curl(https, &second),
        404,
        "new connections get the new certificate"
    );
    assert_eq!(curl(https, &first), 0, "the old certificate is gone");

    // A broken key: the reload is refused and the current certificate kept.
    std::fs::write(dir.path().join("key.pem"), "not a key").expect("write");
    edge.signal(Signal::SIGHUP);
    log.wait_for("reload refused", WAIT);
    assert_eq!(
        curl(https, &second),
        404,
        "still serving the last good certificate"
    );

    edge.signal(Signal::SIGTERM);
    let status = edge.wait_within(WAIT);
    assert!(status.success(), "{status}");
}
