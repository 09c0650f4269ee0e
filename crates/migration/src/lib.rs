//! Ferry's live migration: the parts that need no VM.
//!
//! [`protocol`] is the wire format: small fixed frame headers, per-kind payload bounds,
//! nothing taken on trust from the peer. [`auth`] proves both ends share a key;
//! [`handshake`] is the receiver's side of the proof, before the peer is trusted.
//! [`outcome`] is how a migration ended, as a code on the wire and in reports.
//! [`schema`] is what the JSON messages carry: the `Config` payload and the VM state schema
//! (also a checkpoint's state file), under the protocol's compatibility rule.
//! [`delta`] encodes re-sent pages as differences from the copy the destination holds.
//! [`convergence`] decides after each pre-copy pass whether to go on, stop and copy, or give
//! up. The sender and receiver state machines, which drive a VM, live in `ferry-vmm`
//! (`ferry_vmm::migration`); `docs/migration.md` describes the whole protocol.

pub mod auth;
pub mod convergence;
pub mod delta;
pub mod handshake;
pub mod outcome;
pub mod protocol;
pub mod schema;
