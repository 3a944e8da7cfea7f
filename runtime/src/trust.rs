//! Whom a client trusts: the certificates of a CA file (`ca`, `--ca`) or the system's roots.
//! The agent (QUIC to the edge) and `burrow connect` (HTTPS to the edge) both start here.

use std::path::Path;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// Why a client configuration could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The CA file could not be read or holds no certificate.
    #[error("`ca`: cannot use {path} as trust roots: {message}")]
    Ca {
        /// The CA file.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// The system has no usable root certificates.
    #[error("no system root certificates found; set `ca` to the edge's CA file")]
    NoSystemRoots,
    /// rustls or quinn refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// Reads every certificate in a PEM file.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let ca_err = |message: String| TlsError::Ca {
        path: path.display().to_string(),
        message,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| ca_err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ca_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(ca_err("no PEM certificate in it".into()));
    }
    Ok(certs)
}

/// The trust roots: the certificates in the PEM file `ca`, or the system's.
pub fn roots(ca: Option<&Path>) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            for cert in read_certs(path)? {
                roots.add(cert).map_err(|e| TlsError::Ca {
                    path: path.display().to_string(),
                    message: e.to_string(),
                })?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _ignored) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(TlsError::NoSystemRoots);
            }
        }
    }
    Ok(roots)
}
