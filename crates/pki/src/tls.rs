//! rustls configurations from an identity directory (`cert.pem`, `key.pem`, `ca.pem`).
//!
//! Both sides present their own certificate and trust only the cluster CA in `ca.pem`: a
//! server requires a client certificate chaining to it, a client accepts only a server
//! certificate chaining to it (with the serverAuth usage, which only host certificates
//! have). The crypto provider is rustls' ring provider, TLS 1.2 and 1.3.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::files::{self, CA_CERT, CERT, KEY};

/// ALPN protocol spoken on every connection.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// Errors building a TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file of the identity directory is missing or malformed.
    #[error(transparent)]
    Files(#[from] files::Error),
    /// The CA certificate is not usable as a trust anchor.
    #[error("{path} is not a usable CA certificate")]
    TrustAnchor {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rustls::Error,
    },
    /// The client-certificate verifier cannot be built.
    #[error("cannot build the client certificate verifier")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    /// rustls refused the certificate, key or protocol settings.
    #[error("invalid TLS identity in {dir}")]
    Config {
        /// The identity directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: rustls::Error,
    },
}

/// The crypto provider Ferry uses (ring).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A server configuration: presents `dir/cert.pem` (with `dir/key.pem`) and requires a
/// client certificate chaining to `dir/ca.pem`.
pub fn server_config(dir: &Path) -> Result<ServerConfig, Error> {
    let roots = Arc::new(roots(dir)?);
    let verifier =
        WebPkiClientVerifier::builder_with_provider(roots, provider()).build().map_err(Error::Verifier)?;
    let chain = files::read_certs(&dir.join(CERT))?;
    let key = files::read_key(&dir.join(KEY))?;
    let config_error = |source| Error::Config { dir: dir.to_path_buf(), source };
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(config_error)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(config_error)?;
    config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    Ok(config)
}

/// A client configuration: presents `dir/cert.pem` (with `dir/key.pem`) and trusts only
/// `dir/ca.pem`.
pub fn client_config(dir: &Path) -> Result<ClientConfig, Error> {
    let roots = roots(dir)?;
    let chain = files::read_certs(&dir.join(CERT))?;
    let key = files::read_key(&dir.join(KEY))?;
    let config_error = |source| Error::Config { dir: dir.to_path_buf(), source };
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(config_error)?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(config_error)?;
    config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    Ok(config)
}

/// The trust anchors of an identity directory: the certificates of `dir/ca.pem`.
pub fn roots(dir: &Path) -> Result<RootCertStore, Error> {
    let path = dir.join(CA_CERT);
    let mut store = RootCertStore::empty();
    for cert in files::read_certs(&path)? {
        store.add(cert).map_err(|source| Error::TrustAnchor { path: path.clone(), source })?;
    }
    Ok(store)
}
