//! The peers' configurations: nginx's file, rathole's server and client files and Noise keys,
//! and their versions for the report.

use std::path::Path;

use crate::procs;

/// nginx as a one-hop reverse proxy to the origin on `listen` (HTTP/1.1) and on `h2` (h2c with
/// prior knowledge, as h2load speaks it; `http2_on`: this nginx takes `http2 on;`). Both
/// proxy to the origin over kept-alive HTTP/1.1, as burrow's edge does.
pub fn nginx_conf(dir: &Path, listen: u16, h2: u16, origin: u16, http2_on: bool) -> String {
    let d = dir.display();
    let user = if procs::is_root() { "user root;\n" } else { "" };
    let (listen_http2, http2) = if http2_on {
        ("", "    http2 on;\n")
    } else {
        (" http2", "")
    };
    let location = "    location / {\n\
               proxy_pass http://origin;\n      proxy_http_version 1.1;\n\
               proxy_set_header Host $host;\n\
               proxy_set_header Upgrade $http_upgrade;\n\
               proxy_set_header Connection $connection_upgrade;\n\
               proxy_buffering off;\n      proxy_request_buffering off;\n\
               proxy_buffer_size 64k;\n      proxy_buffers 4 64k;\n\
               client_body_buffer_size 64k;\n\
               client_max_body_size 0;\n\
               proxy_read_timeout 1h;\n      proxy_send_timeout 1h;\n    }\n";
    format!(
        "daemon off;\nmaster_process on;\nworker_processes 2;\nworker_rlimit_nofile 20000;\n\
         pid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n{user}\
         events {{ worker_connections 20000; }}\n\
         http {{\n  access_log off;\n  tcp_nodelay on;\n\
           keepalive_requests 1000000;\n  keepalive_timeout 75s;\n\
           client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
           fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
           map $http_upgrade $connection_upgrade {{ default upgrade; '' ''; }}\n\
           upstream origin {{ server 127.0.0.1:{origin}; keepalive 256; keepalive_requests 1000000; }}\n\
           server {{\n    listen 127.0.0.1:{listen} backlog=4096;\n{location}  }}\n\
           server {{\n    listen 127.0.0.1:{h2} backlog=4096{listen_http2};\n{http2}{location}  }}\n}}\n"
    )
}

/// `true` if this nginx takes `http2 on;` (1.25.1 and later); older ones take `listen ...
/// http2`.
pub fn http2_directive(nginx: &Path) -> bool {
    let Some(version) = version_of(nginx, "-v") else {
        return false;
    };
    // `nginx version: nginx/1.22.1`
    let numbers: Vec<u32> = version
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect();
    numbers
        .get(..3)
        .is_some_and(|v| (v[0], v[1], v[2]) >= (1, 25, 1))
}

/// rathole's server and client files: TCP transport, or Noise with `noise` = (private, public).
pub fn rathole_confs(
    control: u16,
    public: u16,
    origin: u16,
    noise: Option<&(String, String)>,
) -> (String, String) {
    let (kind, server_noise, client_noise) = match noise {
        Some((private, public)) => (
            "noise",
            format!("[server.transport.noise]\nlocal_private_key = \"{private}\"\n"),
            format!("[client.transport.noise]\nremote_public_key = \"{public}\"\n"),
        ),
        None => ("tcp", String::new(), String::new()),
    };
    (
        format!(
            "[server]\nbind_addr = \"127.0.0.1:{control}\"\n\
             [server.transport]\ntype = \"{kind}\"\n{server_noise}\
             [server.services.origin]\ntoken = \"bench\"\nbind_addr = \"127.0.0.1:{public}\"\n"
        ),
        format!(
            "[client]\nremote_addr = \"127.0.0.1:{control}\"\n\
             [client.transport]\ntype = \"{kind}\"\n{client_noise}\
             [client.services.origin]\ntoken = \"bench\"\nlocal_addr = \"127.0.0.1:{origin}\"\n"
        ),
    )
}

/// `rathole --genkey`: (private, public), or `None` if this rathole has no Noise.
pub fn noise_keypair(rathole: &Path) -> Option<(String, String)> {
    let out = std::process::Command::new(rathole)
        .arg("--genkey")
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let mut private = None;
    let mut public = None;
    while let Some(line) = lines.next() {
        match line {
            "Private Key:" => private = lines.next().map(str::to_owned),
            "Public Key:" => public = lines.next().map(str::to_owned),
            _ => {}
        }
    }
    Some((private?, public?))
}

/// The first line of `bin arg` (rathole: with its build version).
pub fn version_of(bin: &Path, arg: &str) -> Option<String> {
    let out = std::process::Command::new(bin).arg(arg).output().ok()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // rathole prints its name on one line and `Build Version: 0.5.0` further down.
    let name = text.lines().next()?.trim().to_owned();
    Some(
        match text
            .lines()
            .find_map(|l| l.trim().strip_prefix("Build Version:"))
        {
            Some(v) => format!("{name} {}", v.trim()),
            None => name,
        },
    )
}
