//! TLS with rustls (ring provider): listeners (ALPN `h2` / `http/1.1`) and HTTPS origins
//! (system roots or a configured CA bundle, optional client certificate).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use std::sync::LazyLock;

use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

/// Why a listener's certificate or key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate file is unreadable or holds no PEM certificate.
    #[error(
        "cannot load TLS certificate chain from {path}: {reason}; expected PEM `CERTIFICATE` blocks, leaf first"
    )]
    Cert {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The key file is unreadable or holds no supported private key.
    #[error(
        "cannot load TLS private key from {path}: {reason}; expected a PEM PKCS#8, PKCS#1 or SEC1 key"
    )]
    Key {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// rustls refused the pair (key does not match the certificate, unsupported algorithm …).
    #[error("TLS certificate {cert} and key {key} cannot be used together: {reason}")]
    Config {
        /// Certificate file.
        cert: PathBuf,
        /// Key file.
        key: PathBuf,
        /// rustls's reason.
        reason: String,
    },
}

/// Builds an acceptor from PEM files (relative paths resolve against `base_dir`).
pub fn acceptor(
    tls: &outpost_config::Tls,
    base_dir: &Path,
    http2: bool,
) -> Result<TlsAcceptor, TlsError> {
    let cert_path = base_dir.join(&tls.cert);
    let key_path = base_dir.join(&tls.key);
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Cert {
            path: cert_path.clone(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Cert {
            path: cert_path,
            reason: "no certificate found".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| TlsError::Key {
        path: key_path.clone(),
        reason: e.to_string(),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key))
        .map_err(|e| TlsError::Config {
            cert: cert_path.clone(),
            key: key_path.clone(),
            reason: e.to_string(),
        })?;
    config.alpn_protocols = if http2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The system's trust anchors, read once (reading /etc/ssl takes milliseconds).
static SYSTEM_ROOTS: LazyLock<Arc<RootCertStore>> = LazyLock::new(|| {
    let mut roots = RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    for e in &found.errors {
        tracing::warn!(error = %e, "Could not read some system CA certificates.");
    }
    let (added, ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        tracing::warn!(
            ignored,
            "No system CA certificates found: HTTPS origins need [origins.NAME.tls] ca_file."
        );
    }
    Arc::new(roots)
});

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Cert {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Cert {
            path: path.to_path_buf(),
            reason: "no certificate found".into(),
        });
    }
    Ok(certs)
}

/// A client config for HTTPS origins offering `alpn`.
pub fn client_config(
    tls: Option<&outpost_config::OriginTls>,
    base_dir: &Path,
    alpn: &[&[u8]],
) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = match tls.and_then(|t| t.ca_file.as_ref()) {
        Some(ca) => {
            let path = base_dir.join(ca);
            let mut roots = RootCertStore::empty();
            for cert in load_certs(&path)? {
                roots.add(cert).map_err(|e| TlsError::Cert {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            }
            Arc::new(roots)
        }
        None => SYSTEM_ROOTS.clone(),
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config {
            cert: PathBuf::new(),
            key: PathBuf::new(),
            reason: e.to_string(),
        })?
        .with_root_certificates(roots);
    let mut config = match tls.and_then(|t| t.client_cert.as_ref().zip(t.client_key.as_ref())) {
        Some((cert, key)) => {
            let cert_path = base_dir.join(cert);
            let key_path = base_dir.join(key);
            let chain = load_certs(&cert_path)?;
            let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| TlsError::Key {
                path: key_path.clone(),
                reason: e.to_string(),
            })?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| TlsError::Config {
                    cert: cert_path,
                    key: key_path,
                    reason: e.to_string(),
                })?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}
