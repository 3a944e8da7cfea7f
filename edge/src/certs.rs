//! Certificates and TLS settings: the QUIC listener for agents (TLS 1.3 only, ALPN `burrow/1`)
//! and the public HTTPS listener (ALPN h2 and http/1.1).
//!
//! Without a configured agents certificate, the edge keeps a CA key in `state_dir` (written once,
//! mode 0600), writes the CA certificate to `state_dir/agent-ca.pem` for agents to trust, and
//! issues a fresh leaf for `agents.server_name` at every start.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::QuicServerConfig;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::CertFiles;

/// File names in `state_dir`.
pub const CA_CERT_FILE: &str = "agent-ca.pem";
pub const CA_KEY_FILE: &str = "agent-ca.key";
/// The generated agents' CA's name.
const AGENTS_CA_NAME: &str = "burrow edge agents CA";

/// A certificate problem, naming the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    /// A file could not be read or written.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// Generating a certificate failed.
    #[error("cannot generate a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the certificate or key.
    #[error("TLS setup ({what}): {message}")]
    Tls {
        /// Which listener.
        what: &'static str,
        /// Why.
        message: String,
    },
}

/// A certificate chain with its key.
#[derive(Debug)]
pub struct Identity {
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's key.
    pub key: PrivateKeyDer<'static>,
}

impl Identity {
    /// Loads a chain and key from PEM files.
    pub fn load(files: &CertFiles) -> Result<Identity, CertError> {
        let err = |path: &Path, e: &dyn std::fmt::Display| CertError::File {
            path: path.to_owned(),
            message: e.to_string(),
        };
        let chain = CertificateDer::pem_file_iter(&files.cert)
            .map_err(|e| err(&files.cert, &e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| err(&files.cert, &e))?;
        if chain.is_empty() {
            return Err(err(&files.cert, &"no PEM certificate in it"));
        }
        let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| err(&files.key, &e))?;
        Ok(Identity { chain, key })
    }
}

/// Loads (or creates) the CA in `state_dir` and issues a leaf for `server_name`. Returns the
/// identity and the path of the CA certificate agents should trust.
pub fn generated_agent_identity(
    state_dir: &Path,
    server_name: &str,
) -> Result<(Identity, PathBuf), CertError> {
    let key_path = state_dir.join(CA_KEY_FILE);
    let cert_path = state_dir.join(CA_CERT_FILE);
    let ca_key = if key_path.exists() {
        let pem = std::fs::read_to_string(&key_path).map_err(|e| CertError::File {
            path: key_path.clone(),
            message: e.to_string(),
        })?;
        KeyPair::from_pem(&pem).map_err(|e| CertError::File {
            path: key_path.clone(),
            message: e.to_string(),
        })?
    } else {
        let key = KeyPair::generate()?;
        write_private(&key_path, key.serialize_pem().as_bytes())?;
        key
    };
    // The CA certificate is derived from fixed parameters and the persisted key, so it is the
    // same trust anchor at every start.
    let ca_params = ca_params(AGENTS_CA_NAME);
    let ca_cert = ca_params.self_signed(&ca_key)?;
    std::fs::write(&cert_path, ca_cert.pem()).map_err(|e| CertError::File {
        path: cert_path.clone(),
        message: e.to_string(),
    })?;
    let issuer = Issuer::new(ca_params, ca_key);

    let leaf_key = KeyPair::generate()?;
    let mut leaf = CertificateParams::new(vec![server_name.to_owned()])?;
    leaf.distinguished_name = DistinguishedName::new();
    leaf.distinguished_name
        .push(DnType::CommonName, server_name);
    let now = time_now();
    leaf.not_before = now - Duration::from_secs(3600);
    leaf.not_after = now + Duration::from_secs(397 * 86400);
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer)?;
    let identity = Identity {
        chain: vec![leaf_cert.der().clone()],
        key: PrivateKeyDer::try_from(leaf_key.serialize_der()).map_err(|e| CertError::Tls {
            what: "agents",
            message: e.to_string(),
        })?,
    };
    Ok((identity, cert_path))
}

/// A CA over fixed parameters (so the same key always makes the same trust anchor), named
/// `common_name`.
pub(crate) fn ca_params(common_name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2124, 1, 1);
    params
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

/// The `len` secret bytes kept in `path`, made from the OS RNG and written (mode 0600) when the
/// file is missing; a file of the wrong length is replaced, with a warning, since whatever it
/// protected (cookies, stateless resets) cannot be checked with it anyway.
pub fn load_or_create_secret(path: &Path, len: usize) -> Result<Vec<u8>, CertError> {
    match std::fs::read(path) {
        Ok(secret) if secret.len() == len => return Ok(secret),
        Ok(secret) => tracing::warn!(
            path = %path.display(),
            found = secret.len(),
            expected = len,
            "a secret file has the wrong length; replacing it with a new secret"
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(CertError::File {
                path: path.to_owned(),
                message: e.to_string(),
            });
        }
    }
    let mut secret = vec![0u8; len];
    getrandom::fill(&mut secret).map_err(|e| CertError::File {
        path: path.to_owned(),
        message: format!("no randomness for a new secret: {e}"),
    })?;
    write_private(path, &secret)?;
    Ok(secret)
}

/// Writes `contents` to `path`, readable by the owner only.
pub fn write_private(path: &Path, contents: &[u8]) -> Result<(), CertError> {
    let err = |e: std::io::Error| CertError::File {
        path: path.to_owned(),
        message: e.to_string(),
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).map_err(err)?;
    file.write_all(contents).map_err(err)?;
    file.sync_all().map_err(err)
}

pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The QUIC server configuration for agents.
pub fn agents_server_config(identity: Identity) -> Result<quinn::ServerConfig, CertError> {
    let tls_err = |e: &dyn std::fmt::Display| CertError::Tls {
        what: "agents",
        message: e.to_string(),
    };
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls_err(&e))?
        .with_no_client_auth()
        .with_single_cert(identity.chain, identity.key)
        .map_err(|e| tls_err(&e))?;
    tls.alpn_protocols = vec![burrow_protocol::ALPN.to_vec()];
    let quic = QuicServerConfig::try_from(tls).map_err(|e| tls_err(&e))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    let mut transport = quinn::TransportConfig::default();
    // Agents open only the control stream; data streams are opened by the edge.
    transport.max_concurrent_bidi_streams(1u32.into());
    transport.max_concurrent_uni_streams(0u32.into());
    // Until its hello is accepted a connection may make the edge buffer this much and no more
    // (one stream, this window); an accepted one is raised to quinn's default, unlimited
    // (`agents::session`), and each data stream keeps its own stream window.
    transport.receive_window(PRE_HELLO_WINDOW.into());
    // Agents nudge with one-byte datagrams, which only the transport acknowledges; nothing
    // reads them, so a few bytes of buffer (the oldest dropped first) is all they get.
    transport.datagram_receive_buffer_size(Some(64));
    if let Ok(idle) = Duration::from_secs(30).try_into() {
        transport.max_idle_timeout(Some(idle));
    }
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// The connection receive window of an agent connection whose hello is not accepted yet: a
/// hello is well under 1 KiB.
pub const PRE_HELLO_WINDOW: u32 = 16 * 1024;

/// The public certificate, swappable while the listener runs (SIGHUP reloads it).
#[derive(Debug)]
pub struct PublicCert {
    current: std::sync::RwLock<Arc<rustls::sign::CertifiedKey>>,
}

impl PublicCert {
    /// A certificate from an identity.
    pub fn new(identity: Identity) -> Result<PublicCert, CertError> {
        Ok(PublicCert {
            current: std::sync::RwLock::new(certified(identity)?),
        })
    }

    /// Replaces the certificate; connections from now on get the new one.
    pub fn replace(&self, identity: Identity) -> Result<(), CertError> {
        let next = certified(identity)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = next;
        Ok(())
    }
}

impl rustls::server::ResolvesServerCert for PublicCert {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }
}

fn certified(identity: Identity) -> Result<Arc<rustls::sign::CertifiedKey>, CertError> {
    let key = provider()
        .key_provider
        .load_private_key(identity.key)
        .map_err(|e| CertError::Tls {
            what: "public",
            message: e.to_string(),
        })?;
    let certified = rustls::sign::CertifiedKey::new(identity.chain, key);
    certified.keys_match().map_err(|e| CertError::Tls {
        what: "public",
        message: format!("the key does not match the certificate: {e}"),
    })?;
    Ok(Arc::new(certified))
}

/// The rustls configuration for the public HTTPS listener, serving `cert`.
pub fn public_tls_config(cert: Arc<PublicCert>) -> Result<rustls::ServerConfig, CertError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| CertError::Tls {
            what: "public",
            message: e.to_string(),
        })?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tls)
}
