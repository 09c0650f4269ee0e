//! How a migration ended, as a code: carried on the wire (`Abort`, `RestoreResult`) and in
//! the source's report (`reason_code`) beside the sentence, so that no decision is ever
//! taken by reading a message's text.
//!
//! A code is a stable snake_case string (`docs/migration.md` has the table). A refusal in
//! the destination's pre-migration checks names the check: `refused_by_destination/cpu_features`.
//! Codes this release does not know (from a newer peer) read as [`ReasonCode::Unknown`],
//! never as a malformed message; an older peer sends no code at all, which is `unknown`
//! too, and the reader derives what it can from the frame it came in (an `Abort` answering
//! the `Config` is a refusal, a `RestoreResult` that is not ok is a failed restore).

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a migration ended (or, on the wire, why a peer gave up on it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ReasonCode {
    /// The VM runs on the destination.
    Completed,
    /// An operator cancelled it (or a pause/resume request did, after the state was taken).
    Cancelled,
    /// One side does not know the migration key.
    AuthFailed,
    /// The peers speak different protocol versions.
    VersionMismatch,
    /// The destination's pre-migration checks refused the VM; the check that failed.
    RefusedByDestination(Check),
    /// The destination is busy with another migration.
    Busy,
    /// The destination could not restore the VM.
    RestoreFailed,
    /// The destination's guest memory differs from the source's (`--verify`).
    VerifyMismatch,
    /// Pre-copy did not converge (pass budget spent, or the rest would take too long).
    NoConvergence,
    /// The migration's time limit (`--timeout-s`) was reached.
    Timeout,
    /// The peer made no progress for the stall bound.
    Stalled,
    /// The destination cannot be reached.
    Unreachable,
    /// The connection broke.
    ConnectionLost,
    /// A lock (the VM's or a disk's) is held by someone else.
    LockConflict,
    /// The destination ran the VM and then failed: the VM runs nowhere.
    DestinationDied,
    /// The state is older than the VM's generation: the VM ran on since.
    StaleState,
    /// The VM runs nowhere (the VMM ended before it knew where the VM went).
    Lost,
    /// The process was asked to stop.
    Interrupted,
    /// The VMM could not do its part (pause, save, build, dirty logging, memory access).
    VmmError,
    /// The peer broke the protocol (malformed or out-of-place message).
    ProtocolError,
    /// No code: an older peer, or a code newer than this release.
    #[default]
    Unknown,
}

/// The pre-migration check a destination refused a VM in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Check {
    /// vCPU count, or one CPUID table per vCPU.
    Vcpus,
    /// A CPU feature the guest was given is missing here.
    CpuFeatures,
    /// Memory size or layout, or reserving it.
    Memory,
    /// An MSR the source saves cannot be restored here.
    Msrs,
    /// The guest's XSAVE components (XCR0) are not offered here, or its XSAVE area is
    /// larger than KVM here restores.
    Xsave,
    /// The guest's TSC frequency differs from this host's beyond 250 ppm and KVM here cannot
    /// scale it.
    Tsc,
    /// A device this Ferry does not have, or too many.
    Devices,
    /// A disk image or tap cannot be opened here.
    Disks,
    /// The home here is not the source's VM lock.
    LockIdentity,
    /// The number of streams asked for.
    Streams,
    /// KVM could not create the VM here.
    Host,
    /// Not named (an older peer, or a check newer than this release).
    #[default]
    Unknown,
}

const CHECKS: &[(Check, &str)] = &[
    (Check::Vcpus, "vcpus"),
    (Check::CpuFeatures, "cpu_features"),
    (Check::Memory, "memory"),
    (Check::Msrs, "msrs"),
    (Check::Xsave, "xsave"),
    (Check::Tsc, "tsc"),
    (Check::Devices, "devices"),
    (Check::Disks, "disks"),
    (Check::LockIdentity, "lock_identity"),
    (Check::Streams, "streams"),
    (Check::Host, "host"),
    (Check::Unknown, "unknown"),
];

const REFUSED: &str = "refused_by_destination";

const CODES: &[(ReasonCode, &str)] = &[
    (ReasonCode::Completed, "completed"),
    (ReasonCode::Cancelled, "cancelled"),
    (ReasonCode::AuthFailed, "auth_failed"),
    (ReasonCode::VersionMismatch, "version_mismatch"),
    (ReasonCode::Busy, "busy"),
    (ReasonCode::RestoreFailed, "restore_failed"),
    (ReasonCode::VerifyMismatch, "verify_mismatch"),
    (ReasonCode::NoConvergence, "no_convergence"),
    (ReasonCode::Timeout, "timeout"),
    (ReasonCode::Stalled, "stalled"),
    (ReasonCode::Unreachable, "unreachable"),
    (ReasonCode::ConnectionLost, "connection_lost"),
    (ReasonCode::LockConflict, "lock_conflict"),
    (ReasonCode::DestinationDied, "destination_died"),
    (ReasonCode::StaleState, "stale_state"),
    (ReasonCode::Lost, "lost"),
    (ReasonCode::Interrupted, "interrupted"),
    (ReasonCode::VmmError, "vmm_error"),
    (ReasonCode::ProtocolError, "protocol_error"),
    (ReasonCode::Unknown, "unknown"),
];

impl Check {
    /// The check's stable name.
    pub fn as_str(self) -> &'static str {
        CHECKS.iter().find(|(c, _)| *c == self).map_or("unknown", |(_, s)| s)
    }

    /// The check named `s`; [`Check::Unknown`] for a name this release does not know.
    pub fn parse(s: &str) -> Self {
        CHECKS.iter().find(|(_, n)| *n == s).map_or(Check::Unknown, |(c, _)| *c)
    }
}

impl ReasonCode {
    /// The code without its check: `refused_by_destination` for every refusal.
    pub fn kind(self) -> &'static str {
        match self {
            ReasonCode::RefusedByDestination(_) => REFUSED,
            other => CODES.iter().find(|(c, _)| *c == other).map_or("unknown", |(_, s)| s),
        }
    }

    /// The code as it goes on the wire and in reports.
    pub fn code(self) -> String {
        match self {
            ReasonCode::RefusedByDestination(c) => format!("{REFUSED}/{}", c.as_str()),
            other => other.kind().to_string(),
        }
    }

    /// The code `s` names; [`ReasonCode::Unknown`] for one this release does not know.
    pub fn parse(s: &str) -> Self {
        if let Some((kind, check)) = s.split_once('/') {
            return if kind == REFUSED {
                ReasonCode::RefusedByDestination(Check::parse(check))
            } else {
                Self::Unknown
            };
        }
        if s == REFUSED {
            return ReasonCode::RefusedByDestination(Check::Unknown);
        }
        CODES.iter().find(|(_, n)| *n == s).map_or(ReasonCode::Unknown, |(c, _)| *c)
    }

    /// Whether there is no code (for `skip_serializing_if`).
    pub fn is_unknown(&self) -> bool {
        *self == ReasonCode::Unknown
    }

    /// `self`, or `derived` when `self` is [`ReasonCode::Unknown`] (an older peer sent no
    /// code: what the frame it came in says instead).
    pub fn or(self, derived: ReasonCode) -> ReasonCode {
        if self.is_unknown() {
            derived
        } else {
            self
        }
    }
}

impl fmt::Display for ReasonCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.code())
    }
}

impl Serialize for ReasonCode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.code())
    }
}

impl<'de> Deserialize<'de> for ReasonCode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(ReasonCode::parse(&s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_reads_back_as_itself() {
        let mut all: Vec<ReasonCode> = CODES.iter().map(|(c, _)| *c).collect();
        all.extend(CHECKS.iter().map(|(c, _)| ReasonCode::RefusedByDestination(*c)));
        for code in all {
            let json = serde_json::to_string(&code).expect("serialise");
            assert_eq!(json, format!("\"{}\"", code.code()));
            let back: ReasonCode = serde_json::from_str(&json).expect("parse");
            assert_eq!(back, code, "{json}");
        }
    }

    #[test]
    fn codes_are_stable_snake_case() {
        assert_eq!(ReasonCode::AuthFailed.code(), "auth_failed");
        assert_eq!(
            ReasonCode::RefusedByDestination(Check::CpuFeatures).code(),
            "refused_by_destination/cpu_features"
        );
        assert_eq!(ReasonCode::RefusedByDestination(Check::LockIdentity).kind(), "refused_by_destination");
        assert_eq!(ReasonCode::Stalled.to_string(), "stalled");
    }

    #[test]
    fn a_code_from_a_newer_peer_is_unknown_not_an_error() {
        let c: ReasonCode = serde_json::from_str("\"quantum_decoherence\"").expect("parse");
        assert_eq!(c, ReasonCode::Unknown);
        let c: ReasonCode = serde_json::from_str("\"refused_by_destination/gpu\"").expect("parse");
        assert_eq!(c, ReasonCode::RefusedByDestination(Check::Unknown));
        let c: ReasonCode = serde_json::from_str("\"refused_by_destination\"").expect("parse");
        assert_eq!(c, ReasonCode::RefusedByDestination(Check::Unknown));
        assert_eq!(ReasonCode::parse("busy/x"), ReasonCode::Unknown);
    }

    #[test]
    fn a_missing_code_is_derived_from_the_frame_not_the_text() {
        assert_eq!(ReasonCode::Unknown.or(ReasonCode::RestoreFailed), ReasonCode::RestoreFailed);
        assert_eq!(ReasonCode::VerifyMismatch.or(ReasonCode::RestoreFailed), ReasonCode::VerifyMismatch);
    }
}
