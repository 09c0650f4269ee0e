//! Ferry's VMM API: HTTP + JSON on a unix socket, like Firecracker's and Cloud Hypervisor's.
//!
//! One definition of each request ([`Request`]) serves both sides: the CLI builds a
//! `Request` and sends it with [`client::send`]; the VMM's server ([`server`]) parses HTTP
//! into the same `Request` and hands it to the VMM. The endpoints are documented in
//! `docs/api.md`.

pub mod client;
pub mod events;
pub mod server;
pub mod types;

pub use types::*;
