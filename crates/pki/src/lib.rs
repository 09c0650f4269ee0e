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
