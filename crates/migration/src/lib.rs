//! Ferry's live migration.
//!
//! [`protocol`] is the wire format: small fixed frame headers, per-kind payload bounds,
//! nothing taken on trust from the peer. The sender and receiver state machines that use
//! it come with the live-migration stage (see `docs/status.md`).

pub mod protocol;
