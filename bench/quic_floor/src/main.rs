//! QUIC's floor: two processes on one quinn connection over loopback, each on one tokio worker
//! (as burrow's edge and agent run on 2 cores), `streams` bidirectional streams kept open, each
//! sending a 120-byte request and reading a 200-byte answer in turn for `seconds` - burrow's
//! kept-alive streams to services, without HTTP, without the TCP legs, without anything but
//! QUIC. What it reaches bounds what any tunnel over quinn can reach on the machine.
//!
//! `burrow-quic-floor serve DIR`: the answering side; writes its certificate and port to DIR.
//! `burrow-quic-floor ask DIR STREAMS SECONDS`: the asking side; prints the round trips.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

const REQUEST: usize = 120;
const ANSWER: usize = 200;
const ALPN: &[u8] = b"floor";

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    match args.get(1..).unwrap_or_default() {
        [cmd, dir] if cmd == "serve" => runtime.block_on(serve(dir)),
        [cmd, dir, streams, seconds] if cmd == "ask" => {
            runtime.block_on(ask(dir, streams.parse()?, seconds.parse()?))
        }
        _ => Err("usage: burrow-quic-floor serve DIR | ask DIR STREAMS SECONDS".into()),
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

const TLS13: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

async fn serve(dir: &str) -> Result<()> {
    let key = rcgen::generate_simple_self_signed(vec!["localhost".into()])?;
    std::fs::write(format!("{dir}/cert.der"), key.cert.der())?;
    let der = PrivateKeyDer::try_from(key.signing_key.serialize_der())?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(TLS13)?
        .with_no_client_auth()
        .with_single_cert(vec![key.cert.der().clone()], der)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls)?));
    let mut transport = quinn::TransportConfig::default();
    transport.max_concurrent_bidi_streams(10_000u32.into());
    config.transport_config(Arc::new(transport));
    let endpoint = quinn::Endpoint::server(config, "127.0.0.1:0".parse()?)?;
    let port = endpoint.local_addr()?.port();
    std::fs::write(format!("{dir}/port"), port.to_string())?;
    while let Some(incoming) = endpoint.accept().await {
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else { return };
            while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                tokio::spawn(async move {
                    let mut request = [0u8; REQUEST];
                    let answer = [b'a'; ANSWER];
                    while recv.read_exact(&mut request).await.is_ok() {
                        if send.write_all(&answer).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
    }
    Ok(())
}

async fn ask(dir: &str, streams: usize, seconds: u64) -> Result<()> {
    let cert = CertificateDer::from(std::fs::read(format!("{dir}/cert.der"))?);
    let port: u16 = std::fs::read_to_string(format!("{dir}/port"))?.parse()?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert)?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(TLS13)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    let client = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls)?));
    endpoint.set_default_client_config(client);
    let conn = endpoint
        .connect(([127, 0, 0, 1], port).into(), "localhost")?
        .await?;
    let done = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..streams {
        let (conn, done) = (conn.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let (mut send, mut recv) = conn.open_bi().await?;
            let request = [b'r'; REQUEST];
            let mut answer = [0u8; ANSWER];
            while Instant::now() < end {
                send.write_all(&request).await?;
                recv.read_exact(&mut answer).await?;
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let took = started.elapsed().as_secs_f64();
    let n = done.load(Ordering::Relaxed);
    println!(
        "{streams} streams: {n} round trips in {took:.2} s, {:.0} a second",
        n as f64 / took
    );
    Ok(())
}
