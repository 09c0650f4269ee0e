//! Ferry's cluster PKI: a cluster CA, the host and client certificates it issues, and mutual
//! TLS for every TCP port Ferry listens on.
//!
//! - [`init_ca`], [`issue`], [`issue_host`], [`issue_client`]: the files of `ferry ca init`
//!   and `ferry ca issue` (layout in `docs/security.md`).
//! - [`server_config`], [`client_config`]: rustls configurations from an identity directory;
//!   both sides present their certificate and trust only the cluster CA.
//! - [`serve_tls`]: an axum router over TLS; peers without a certificate from the CA are
//!   refused at the handshake, and each request carries the peer's [`PeerIdentity`].
//! - [`Client`], [`BlockingClient`]: an HTTPS JSON client with the same identity.

pub mod ca;
pub mod client;
pub mod files;
pub mod identity;
pub mod server;
pub mod tls;

pub use ca::{host_sans, init_ca, issue, issue_client, issue_host, CaFiles, IssueRequest, IssuedFiles};
pub use client::{BlockingClient, Client, Response};
pub use identity::{Kind, PeerIdentity};
pub use server::{require_host, serve_tls, serve_tls_with, ServeOptions};
pub use tls::{client_config, server_config};

/// The environment variable naming the CLI's identity directory.
pub const IDENTITY_ENV: &str = "FERRY_IDENTITY";

/// The CLI's identity directory: `$FERRY_IDENTITY` if set, else
/// `$XDG_CONFIG_HOME/ferry/identity`, else `$HOME/.config/ferry/identity` (`None` if none
/// of these is set).
pub fn default_identity_dir() -> Option<std::path::PathBuf> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(std::path::PathBuf::from);
    identity_dir_from(var(IDENTITY_ENV), var("XDG_CONFIG_HOME"), var("HOME"))
}

fn identity_dir_from(
    explicit: Option<std::path::PathBuf>,
    xdg_config: Option<std::path::PathBuf>,
    home: Option<std::path::PathBuf>,
) -> Option<std::path::PathBuf> {
    explicit
        .or_else(|| xdg_config.map(|c| c.join("ferry").join("identity")))
        .or_else(|| home.map(|h| h.join(".config").join("ferry").join("identity")))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    #[test]
    fn identity_dir_precedence() {
        let p = |s: &str| Some(PathBuf::from(s));
        assert_eq!(super::identity_dir_from(p("/id"), p("/x"), p("/h")), p("/id"));
        assert_eq!(super::identity_dir_from(None, p("/x"), p("/h")), p("/x/ferry/identity"));
        assert_eq!(super::identity_dir_from(None, None, p("/h")), p("/h/.config/ferry/identity"));
        assert_eq!(super::identity_dir_from(None, None, None), None);
    }
}
