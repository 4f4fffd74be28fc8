//! TLS on the client API: rustls 0.23 with the `ring` provider, optional mutual TLS.
//!
//! With a client CA configured, every client must present a certificate that chains to it
//! (checked at the handshake, including its validity period); the client's identity is then
//! `spki:` followed by the SHA-256 of the certificate's DER SubjectPublicKeyInfo, in hex.
//! The SPKI, not the subject: the subject is a name the CA chose and may reuse for another
//! key (a reissued or a second certificate), whereas the key is what the client proves
//! possession of in the handshake. A certificate renewed for the same key keeps its
//! identity; a new key is a new client.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Paths of the certificate material; read at start and again at every reload.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// PEM certificate chain of the server, leaf first.
    pub cert: PathBuf,
    /// PEM private key of the server (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA certificate(s) client certificates must chain to; `None`: no client
    /// certificates (clients are named by their address).
    pub client_ca: Option<PathBuf>,
}

/// Why the TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("{what} {path}: {reason}")]
    File {
        /// Which file (server certificate, server key, client CA).
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// rustls refused the material (key does not match the certificate, bad CA, ...).
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn file_err(what: &'static str, path: &Path, reason: impl ToString) -> TlsError {
    TlsError::File {
        what,
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// Largest PEM file read (a chain of a few certificates fits many times over).
const MAX_PEM: u64 = 1 << 20;

fn read_pem(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| file_err(what, path, e))?;
    let mut bytes = Vec::new();
    file.take(MAX_PEM + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| file_err(what, path, e))?;
    if bytes.len() as u64 > MAX_PEM {
        return Err(file_err(what, path, "larger than 1 MiB"));
    }
    Ok(bytes)
}

fn certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_pem(what, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(what, path, e))?;
    if certs.is_empty() {
        return Err(file_err(what, path, "no CERTIFICATE in the file"));
    }
    Ok(certs)
}

/// Builds the server configuration from the files (nothing is kept from a previous one).
pub fn load(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = certs("server certificate", &files.cert)?;
    let key_pem = read_pem("server key", &files.key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| file_err("server key", &files.key, e))?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match &files.client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in certs("client CA", ca)? {
                roots.add(cert).map_err(|e| file_err("client CA", ca, e))?;
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .map_err(|e| TlsError::Config(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The configuration in force, swapped whole on reload, with its generation: 0 at start,
/// one more at every reload that succeeded. A connection remembers the generation it was
/// authenticated under; once that is not the current one, the connection is stale (its
/// client was checked against certificates or CAs no longer in force) and is closed.
pub(crate) struct Current {
    files: TlsFiles,
    config: RwLock<(Arc<rustls::ServerConfig>, u64)>,
    generation: AtomicU64,
}

impl Current {
    pub(crate) fn new(files: TlsFiles) -> Result<Self, TlsError> {
        let config = load(&files)?;
        Ok(Self {
            files,
            config: RwLock::new((config, 0)),
            generation: AtomicU64::new(0),
        })
    }

    /// The configuration for a new connection, and its generation.
    pub(crate) fn get(&self) -> (Arc<rustls::ServerConfig>, u64) {
        match self.config.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The generation in force.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Reads the files again; on any error the configuration in force stays (and so does
    /// its generation).
    pub(crate) fn reload(&self) -> Result<(), TlsError> {
        let config = load(&self.files)?;
        let mut slot = match self.config.write() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        let generation = slot.1.wrapping_add(1);
        *slot = (config, generation);
        self.generation.store(generation, Ordering::Release);
        Ok(())
    }

    pub(crate) fn mutual(&self) -> bool {
        self.files.client_ca.is_some()
    }
}

/// The identity of a client certificate: `spki:<hex SHA-256 of its SubjectPublicKeyInfo>`;
/// `None` if the certificate cannot be parsed (the verifier has accepted it, so only a
/// certificate webpki parses differently here would do that).
pub fn identity(cert: &CertificateDer<'_>) -> Option<String> {
    let parsed = webpki::EndEntityCert::try_from(cert).ok()?;
    let spki = parsed.subject_public_key_info();
    Some(format!(
        "spki:{}",
        mayfly_ledger::codec::hex(&mayfly_ledger::checkpoint::sha256(spki.as_ref()))
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreadable_or_empty_files_are_named_in_the_error() {
        let dir = std::env::temp_dir().join(format!("mayfly-api-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = TlsFiles {
            cert: dir.join("nope.crt"),
            key: dir.join("nope.key"),
            client_ca: None,
        };
        let e = load(&missing).unwrap_err().to_string();
        assert!(
            e.contains("server certificate") && e.contains("nope.crt"),
            "{e}"
        );
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "no pem here\n").unwrap();
        let files = TlsFiles {
            cert: empty.clone(),
            key: empty.clone(),
            client_ca: None,
        };
        let e = load(&files).unwrap_err().to_string();
        assert!(e.contains("no CERTIFICATE"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
