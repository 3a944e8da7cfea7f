//! `burrow-edge dev`, run as the README says: its printed curl line answers through a real
//! local service, the URL template reaches any other port, and Ctrl-C stops it cleanly.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

#[test]
fn dev_prints_a_curl_line_that_works_and_stops_on_ctrl_c() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_burrow-edge"))
        .args(["dev", "--http", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("burrow-edge dev starts");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut template = None;
    let mut curl_line = None;
    while curl_line.is_none() {
        let line = rx
            .recv_timeout(WAIT)
            .expect("dev prints its curl line in time");
        if let Some(t) = line.trim().strip_prefix("URL template:") {
            template = Some(t.trim().to_owned());
        }
        if line.trim().starts_with("curl ") && curl_line.is_none() {
            curl_line = Some(line.trim().to_owned());
        }
    }
    let curl_line = curl_line.expect("curl line");
    let out = Command::new("sh")
        .args(["-c", &format!("{curl_line} -sS --fail")])
        .output()
        .expect("sh runs curl");
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "`{curl_line}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(body.contains("Hello from burrow"), "{body}");

    // Any port through the template: a local service of our own.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        if let Ok((mut tcp, _)) = listener.accept() {
            let mut buf = [0u8; 4096];
            let _ = tcp.read(&mut buf);
            let _ = tcp.write_all(
                b"HTTP/1.1 200 OK\r\ncontent-length: 12\r\nconnection: close\r\n\r\nmy own page\n",
            );
        }
    });
    let url = template
        .expect("template printed")
        .replace("{port}", &port.to_string());
    let out = Command::new("curl")
        .args(["-sS", "--fail", &url])
        .output()
        .expect("curl");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "my own page\n",
        "{url}"
    );

    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let (done_tx, done_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(child.wait());
    });
    let exit = done_rx
        .recv_timeout(WAIT)
        .expect("dev stops after Ctrl-C")
        .expect("wait");
    assert!(exit.success(), "dev exits 0 on Ctrl-C, got {exit}");
}
