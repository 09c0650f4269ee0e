//! Requests, responses and reports.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Whether the guest's vCPUs run.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    /// vCPUs run.
    Running,
    /// vCPUs are stopped; the VM can be resumed.
    Paused,
}

/// `GET /vm`: what the VM is.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct VmInfo {
    /// Running or paused.
    pub state: RunState,
    /// Guest memory in bytes.
    pub memory_bytes: u64,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Milliseconds since this VMM process started the VM.
    pub uptime_ms: u64,
    /// The kernel or bundled guest it booted.
    pub kernel: String,
    /// The VMM's process id.
    pub pid: u32,
    /// The checkpoint it was restored from, if any.
    #[serde(default)]
    pub restored_from: Option<PathBuf>,
    /// The VM's home directory (whose lock this VMM holds).
    #[serde(default)]
    pub home: Option<PathBuf>,
}

/// `PUT /vm/snapshot`: write a checkpoint.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// The checkpoint directory; created if missing, must be empty if present.
    pub to: PathBuf,
    /// Stop the VM for good after the checkpoint (suspend): the VMM exits.
    #[serde(default)]
    pub stop: bool,
}

/// What a snapshot did.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SnapshotReport {
    /// The checkpoint directory.
    pub path: PathBuf,
    /// Whether the VM stopped (suspend) instead of resuming.
    pub stopped: bool,
    /// Wall time of the whole snapshot, ms.
    pub total_ms: f64,
    /// How long the vCPUs were paused for it, ms (0 if they were paused already).
    pub paused_ms: f64,
    /// Guest memory size, bytes.
    pub memory_bytes: u64,
    /// Bytes of memory written (non-zero pages).
    pub memory_written_bytes: u64,
    /// Pages left out as zero.
    pub zero_pages: u64,
    /// Size of the state file, bytes.
    pub state_bytes: u64,
    /// Disk space the checkpoint takes (allocated blocks), bytes.
    pub disk_bytes: u64,
}

/// A request to the VMM. The CLI and the server share this definition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// `GET /vm`.
    Info,
    /// `PUT /vm/pause`.
    Pause,
    /// `PUT /vm/resume`.
    Resume,
    /// `PUT /vm/snapshot`.
    Snapshot(SnapshotRequest),
}

impl Request {
    /// HTTP method.
    pub fn method(&self) -> &'static str {
        match self {
            Request::Info => "GET",
            _ => "PUT",
        }
    }

    /// HTTP path.
    pub fn path(&self) -> &'static str {
        match self {
            Request::Info => "/vm",
            Request::Pause => "/vm/pause",
            Request::Resume => "/vm/resume",
            Request::Snapshot(_) => "/vm/snapshot",
        }
    }

    /// JSON body, if the request has one.
    pub fn body(&self) -> Option<Vec<u8>> {
        match self {
            Request::Snapshot(s) => serde_json::to_vec(s).ok(),
            _ => None,
        }
    }
}

/// A successful answer.
#[derive(Clone, Debug, PartialEq)]
pub enum Response {
    /// The VM's description.
    Info(VmInfo),
    /// Done; nothing to report.
    Done,
    /// A snapshot's report.
    Snapshot(SnapshotReport),
}

/// A refused or failed request: HTTP status and a sentence saying why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// HTTP status: 400 malformed, 404 no such endpoint, 405 wrong method, 409 the VM is not
    /// in a state that allows it, 500 the VMM failed doing it.
    #[serde(skip)]
    pub status: u16,
    /// Why.
    #[serde(rename = "error")]
    pub message: String,
}

impl ApiError {
    /// 400.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self { status: 400, message: message.into() }
    }
    /// 409.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self { status: 409, message: message.into() }
    }
    /// 500.
    pub fn internal(message: impl Into<String>) -> Self {
        Self { status: 500, message: message.into() }
    }
}
