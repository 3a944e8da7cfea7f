//! Several edges serving one domain on one PostgreSQL store (`[cluster] store`).
//!
//! What the edges share lives in the store: devboxes and tunnels (the store's engine), and the
//! secrets a single edge generates into `state_dir` on its first start. For a cluster they are
//! generated once, by whichever edge asks first, and every edge writes the cluster's values
//! into its own `state_dir` at start, where the single-edge code reads them as always: an
//! agent token, admin token, cookie or stateless reset issued by one edge is good at every
//! other, and agents trust the same CA whichever edge they reach.

use std::path::Path;

use crate::certs::{self, CA_KEY_FILE};
use crate::config::Config;
use crate::secret::Secret;
use crate::server::{ADMIN_TOKEN_FILE, COOKIE_KEY_FILE, RESET_KEY_FILE, StartError};
use crate::store::Postgres;

/// Writes the cluster's secrets into `state_dir`, generating any the cluster lacks: the agents'
/// CA key (unless `agents.cert` is configured), the admin token (unless `admin.token_file`
/// is), the cookie key and the stateless-reset key.
pub fn share_secrets(store: &Postgres, config: &Config) -> Result<(), StartError> {
    let dir = &config.state_dir;
    if config.agents_tls.is_none() {
        let fresh = rcgen::KeyPair::generate()
            .map_err(certs::CertError::from)?
            .serialize_pem();
        let key = store.cluster_secret(CA_KEY_FILE, fresh.into_bytes())?;
        write(dir, CA_KEY_FILE, &key)?;
    }
    if config.admin_token_file.is_none() {
        let fresh = format!("{}\n", Secret::generate()?.expose());
        let token = store.cluster_secret(ADMIN_TOKEN_FILE, fresh.into_bytes())?;
        write(dir, ADMIN_TOKEN_FILE, &token)?;
    }
    for (name, len) in [(COOKIE_KEY_FILE, 32), (RESET_KEY_FILE, 64)] {
        let mut fresh = vec![0u8; len];
        getrandom::fill(&mut fresh)?;
        let secret = store.cluster_secret(name, fresh)?;
        write(dir, name, &secret)?;
    }
    Ok(())
}

/// Writes one secret file (mode 0600) unless it already holds the cluster's value.
fn write(dir: &Path, name: &str, value: &[u8]) -> Result<(), StartError> {
    let path = dir.join(name);
    if std::fs::read(&path).is_ok_and(|held| held == value) {
        return Ok(());
    }
    if path.exists() {
        tracing::info!(path = %path.display(), "replacing a secret with the cluster's");
    }
    certs::write_private(&path, value)?;
    Ok(())
}
