//! The rustls client configuration of a TLS collector (RFC 5425): the collector's
//! certificate chain must lead to the configured CA and carry the server name; a client
//! certificate is presented when one is configured. Crypto provider: `ring`; TLS 1.2 and 1.3.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

use crate::config::CollectorConfig;

/// Why a TLS client configuration cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    /// A PEM file is unreadable or holds nothing usable.
    #[error("{what} {path}: {reason}")]
    Pem {
        /// Which file ("CA", "client certificate", "client key").
        what: &'static str,
        /// Path.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// rustls refused the combination (no usable CA, key not matching, ...).
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
}

fn pem_err(what: &'static str, path: &Path, reason: impl ToString) -> TlsConfigError {
    TlsConfigError::Pem {
        what,
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_err(what, path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(what, path, e))?;
    if certs.is_empty() {
        return Err(pem_err(what, path, "no CERTIFICATE block"));
    }
    Ok(certs)
}

/// Builds the client configuration of `c` (a collector with transport "tls").
pub fn client_config(c: &CollectorConfig) -> Result<Arc<ClientConfig>, TlsConfigError> {
    let mut roots = RootCertStore::empty();
    let ca =
        c.ca.as_deref()
            .ok_or_else(|| pem_err("CA", Path::new("-"), "no `ca` configured"))?;
    for cert in certs("CA", ca)? {
        roots.add(cert)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let config = match (&c.client_cert, &c.client_key) {
        (Some(cert), Some(key)) => {
            let chain = certs("client certificate", cert)?;
            let key =
                PrivateKeyDer::from_pem_file(key).map_err(|e| pem_err("client key", key, e))?;
            builder.with_client_auth_cert(chain, key)?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}
