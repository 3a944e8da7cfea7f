//! `burrow-edge dev`, run as the README says: its printed curl line answers through a real
//! local service, the URL template reaches any other port, and Ctrl-C stops it cleanly.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use burrow_testkit::{ChildGuard, Lines, Signal, ports};

const WAIT: Duration = Duration::from_secs(60);

#[test]
fn dev_prints_a_curl_line_that_works_and_stops_on_ctrl_c() {
    let mut child = ChildGuard::spawn(
        Command::new(env!("CARGO_BIN_EXE_burrow-edge"))
            .args(["dev", "--http", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit()),
    );
    let stdout = Lines::new();
    stdout.read(child.stdout.take().expect("stdout"));
    let curl_line = stdout.wait_for("curl ", WAIT).trim().to_owned();
    let template = stdout.find("URL template:", 0).and_then(|l| {
        l.split_once("URL template:")
            .map(|(_, t)| t.trim().to_owned())
    });
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
    let listener = ports::tcp_listener();
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

    child.signal(Signal::SIGINT);
    let exit = child.wait_within(WAIT);
    assert!(exit.success(), "dev exits 0 on Ctrl-C, got {exit}");
}
