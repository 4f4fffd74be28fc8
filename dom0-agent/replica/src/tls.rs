//! Mutual TLS between a primary and its standby, with **pinned keys**: each side presents
//! its own certificate (self-signed is fine) and accepts exactly one peer, named by the
//! SHA-256 of its certificate's DER SubjectPublicKeyInfo (`spki:<hex>`, the form the client
//! API uses for client identities). No CA, no names, no expiry games: the pin is the
//! authorisation. The handshake signature is still checked against the pinned certificate
//! (rustls with the `ring` provider, TLS 1.3 and 1.2).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, Error, ServerConfig,
    SignatureScheme,
};

/// Why the TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file is unreadable or holds nothing usable.
    #[error("{what} {path}: {reason}")]
    Pem {
        /// Which file.
        what: &'static str,
        /// Path.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The pin is not `spki:` followed by 64 hex digits.
    #[error("peer pin {0:?} is not spki:<64 hex digits>")]
    BadPin(String),
    /// rustls refused the combination.
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
}

/// This node's certificate and key, and the pin of the one peer it accepts.
#[derive(Debug, Clone)]
pub struct PinnedTls {
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    peer: [u8; 32],
}

/// The pin of a certificate: SHA-256 of its DER SubjectPublicKeyInfo, as `spki:<hex>`.
pub fn pin_of(cert: &CertificateDer<'_>) -> Option<String> {
    spki_hash(cert).map(|h| format!("spki:{}", mayfly_ledger::codec::hex(&h)))
}

fn spki_hash(cert: &CertificateDer<'_>) -> Option<[u8; 32]> {
    let parsed = webpki::EndEntityCert::try_from(cert).ok()?;
    Some(mayfly_ledger::checkpoint::sha256(
        parsed.subject_public_key_info().as_ref(),
    ))
}

fn parse_pin(pin: &str) -> Result<[u8; 32], TlsError> {
    pin.strip_prefix("spki:")
        .and_then(mayfly_ledger::codec::unhex)
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or_else(|| TlsError::BadPin(pin.to_string()))
}

fn pem_err(what: &'static str, path: &Path, reason: impl ToString) -> TlsError {
    TlsError::Pem {
        what,
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

impl PinnedTls {
    /// Loads this node's certificate chain and key (PEM) and parses the peer's pin.
    pub fn load(cert: &Path, key: &Path, peer_pin: &str) -> Result<Self, TlsError> {
        let chain = CertificateDer::pem_file_iter(cert)
            .map_err(|e| pem_err("certificate", cert, e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem_err("certificate", cert, e))?;
        if chain.is_empty() {
            return Err(pem_err("certificate", cert, "no CERTIFICATE block"));
        }
        let key = PrivateKeyDer::from_pem_file(key).map_err(|e| pem_err("key", key, e))?;
        Self::from_parts(chain, key, peer_pin)
    }

    /// From certificates and a key already in memory (tests).
    pub fn from_parts(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        peer_pin: &str,
    ) -> Result<Self, TlsError> {
        Ok(Self {
            chain,
            key: Arc::new(key),
            peer: parse_pin(peer_pin)?,
        })
    }

    fn provider() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    /// The primary's side: a server that demands the pinned client certificate.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let provider = Self::provider();
        let verifier = Arc::new(Pinned {
            pin: self.peer,
            provider: provider.clone(),
        });
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        Ok(Arc::new(config))
    }

    /// The standby's side: a client that accepts only the pinned server certificate and
    /// presents its own.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        let provider = Self::provider();
        let verifier = Arc::new(Pinned {
            pin: self.peer,
            provider: provider.clone(),
        });
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        Ok(Arc::new(config))
    }
}

/// Accepts exactly the certificate whose SPKI hashes to `pin`, and checks the handshake
/// signatures against it.
#[derive(Debug)]
struct Pinned {
    pin: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl Pinned {
    fn check(&self, cert: &CertificateDer<'_>) -> Result<(), Error> {
        match spki_hash(cert) {
            Some(h) if h == self.pin => Ok(()),
            Some(_) => Err(Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            )),
            None => Err(Error::InvalidCertificate(CertificateError::BadEncoding)),
        }
    }
}

impl Pinned {
    fn tls12(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        self.check(end_entity)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

impl ClientCertVerifier for Pinned {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.check(end_entity)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}
