//! The mesh's TLS. Every edge of a cluster issues itself, at start, a leaf of the cluster's
//! mesh CA (whose key is a cluster secret) and uses it at both ends of a mesh connection: an
//! edge accepts a connection only from another edge of its cluster, and dials only such edges.

use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair,
};
use rustls::RootCertStore;
use rustls::pki_types::PrivateKeyDer;
use rustls::server::WebPkiClientVerifier;

use crate::certs::{CertError, ca_params, provider};

/// The name every edge's mesh certificate carries and every edge verifies.
pub const MESH_NAME: &str = "mesh.burrow.invalid";
/// The mesh CA's name: the same parameters over the cluster's key, so every edge derives the
/// same CA.
const MESH_CA_NAME: &str = "burrow cluster mesh CA";
/// The mesh's ALPN protocol.
pub const MESH_ALPN: &[u8] = b"burrow-mesh/1";

/// Both ends of the mesh's QUIC.
#[derive(Debug)]
pub struct MeshTls {
    /// For connections other edges make to this one.
    pub server: quinn::ServerConfig,
    /// For connections this edge makes.
    pub client: quinn::ClientConfig,
}

/// The mesh's TLS from the cluster's mesh CA key (PEM).
pub fn mesh_tls(ca_key_pem: &str) -> Result<MeshTls, CertError> {
    mesh_tls_with(ca_key_pem, ca_key_pem)
}

/// Mesh TLS that trusts the CA of `trusted_key` and presents a leaf of the CA of `issuer_key`:
/// the same key for a real edge; two keys make the stranger a test needs.
pub fn mesh_tls_with(trusted_key: &str, issuer_key: &str) -> Result<MeshTls, CertError> {
    let tls_err = |e: &dyn std::fmt::Display| CertError::Tls {
        what: "mesh",
        message: e.to_string(),
    };
    let ca_cert = ca_params(MESH_CA_NAME).self_signed(&KeyPair::from_pem(trusted_key)?)?;
    let issuer = Issuer::new(ca_params(MESH_CA_NAME), KeyPair::from_pem(issuer_key)?);
    let leaf_key = KeyPair::generate()?;
    let mut leaf = CertificateParams::new(vec![MESH_NAME.to_owned()])?;
    leaf.distinguished_name = DistinguishedName::new();
    leaf.distinguished_name.push(DnType::CommonName, MESH_NAME);
    leaf.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let now = time::OffsetDateTime::now_utc();
    leaf.not_before = now - Duration::from_secs(3600);
    leaf.not_after = now + Duration::from_secs(397 * 86400);
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer)?;
    let chain = vec![leaf_cert.der().clone()];
    let key = PrivateKeyDer::try_from(leaf_key.serialize_der()).map_err(|e| tls_err(&e))?;
    let mut roots = RootCertStore::empty();
    roots.add(ca_cert.der().clone()).map_err(|e| tls_err(&e))?;
    let roots = Arc::new(roots);

    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
        .build()
        .map_err(|e| tls_err(&e))?;
    let mut server = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls_err(&e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(|e| tls_err(&e))?;
    server.alpn_protocols = vec![MESH_ALPN.to_vec()];
    let mut client = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls_err(&e))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| tls_err(&e))?;
    client.alpn_protocols = vec![MESH_ALPN.to_vec()];

    let server = QuicServerConfig::try_from(server).map_err(|e| tls_err(&e))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(server));
    server.transport_config(Arc::new(transport()));
    let client = QuicClientConfig::try_from(client).map_err(|e| tls_err(&e))?;
    let mut client = quinn::ClientConfig::new(Arc::new(client));
    client.transport_config(Arc::new(transport()));
    Ok(MeshTls { server, client })
}

/// One stream per forwarded request, many at once. Edges of a cluster sit on one network, so
/// the connection is probed often and given up quickly: a keep-alive every 300 ms, and 1.5 s
/// of silence (about five probes lost in a row) closes it. A dead or frozen edge stops getting
/// forwarded requests that soon ([`super::Mesh`] marks it down), and requests in flight through
/// it go again where HTTP allows. Idle, that is one small packet each way per 300 ms per pair of
/// edges.
fn transport() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(16_384u32.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.keep_alive_interval(Some(Duration::from_millis(300)));
    if let Ok(idle) = Duration::from_millis(1500).try_into() {
        t.max_idle_timeout(Some(idle));
    }
    t
}
