//! The state file: a fixed header, then a JSON payload.
//!
//! ```text
//! offset size
//!      0    8  magic "FERRYCKP"
//!      8    4  format version (little endian)
//!     12    4  header length (32)
//!     16    8  payload length
//!     24    4  CRC-32 (IEEE) of the payload
//!     28    4  reserved, zero
//!     32    -  payload: the state, JSON
//! ```

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The magic number at the start of a state file.
pub const MAGIC: &[u8; 8] = b"FERRYCKP";
/// The format version this Ferry writes, and the newest it reads.
pub const FORMAT_VERSION: u32 = 1;
/// Name of the state file in a checkpoint directory.
pub const STATE_FILE: &str = "state.ferry";
const HEADER_LEN: usize = 32;
/// A state payload larger than this is refused rather than read (a real one is ~100 KiB).
pub const MAX_PAYLOAD: u64 = 64 << 20;

/// Errors reading or writing a state file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// I/O on the file.
    #[error("cannot {what} {path}")]
    Io {
        /// Doing what.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Not a state file.
    #[error("{path} is not a Ferry checkpoint state file (wrong magic)")]
    BadMagic {
        /// The file.
        path: PathBuf,
    },
    /// Shorter than its header says.
    #[error("{path} is truncated: {actual} bytes, the header promises {expected}")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Bytes the header promises.
        expected: u64,
        /// Bytes present.
        actual: u64,
    },
    /// Longer than its header says.
    #[error("{path} has {extra} bytes after the state the header describes")]
    TrailingData {
        /// The file.
        path: PathBuf,
        /// Extra bytes.
        extra: u64,
    },
    /// Written by a newer Ferry.
    #[error("{path} has format version {found}; this Ferry reads versions up to {FORMAT_VERSION} (upgrade Ferry to restore it)")]
    NewerVersion {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: u32,
    },
    /// Version 0 or a header length this Ferry does not know.
    #[error("{path} has an unknown format version {found} or header layout")]
    UnknownVersion {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: u32,
    },
    /// Payload larger than the limit.
    #[error("{path} claims a {len}-byte state, larger than the {MAX_PAYLOAD}-byte limit")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Claimed length.
        len: u64,
    },
    /// The checksum does not match.
    #[error("{path} is corrupt: checksum {found:#010x}, expected {expected:#010x}")]
    BadChecksum {
        /// The file.
        path: PathBuf,
        /// Stored checksum.
        expected: u32,
        /// Computed checksum.
        found: u32,
    },
    /// The payload does not parse as the state.
    #[error("{path} holds a state this Ferry cannot parse")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// Serialising failed.
    #[error("cannot serialise the state")]
    Serialise(#[source] serde_json::Error),
}

/// Encodes `state` as a complete state file image (header + payload).
pub fn encode<T: Serialize>(state: &T) -> Result<Vec<u8>, Error> {
    let payload = serde_json::to_vec(state).map_err(Error::Serialise)?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(HEADER_LEN as u32).to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Decodes a state file image; `path` only names it in errors.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], path: &Path) -> Result<T, Error> {
    let p = || path.to_owned();
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return Err(Error::BadMagic { path: p() });
    }
    if bytes.len() < HEADER_LEN {
        return Err(Error::Truncated { path: p(), expected: HEADER_LEN as u64, actual: bytes.len() as u64 });
    }
    let u32_at = |o: usize| u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
    let version = u32_at(8);
    let header_len = u32_at(12);
    if version > FORMAT_VERSION {
        return Err(Error::NewerVersion { path: p(), found: version });
    }
    if version == 0 || header_len as usize != HEADER_LEN {
        return Err(Error::UnknownVersion { path: p(), found: version });
    }
    let mut len8 = [0u8; 8];
    len8.copy_from_slice(&bytes[16..24]);
    let len = u64::from_le_bytes(len8);
    if len > MAX_PAYLOAD {
        return Err(Error::TooLarge { path: p(), len });
    }
    let have = (bytes.len() - HEADER_LEN) as u64;
    if have < len {
        return Err(Error::Truncated {
            path: p(),
            expected: HEADER_LEN as u64 + len,
            actual: bytes.len() as u64,
        });
    }
    if have > len {
        return Err(Error::TrailingData { path: p(), extra: have - len });
    }
    let payload = &bytes[HEADER_LEN..];
    let expected = u32_at(24);
    let found = crc32fast::hash(payload);
    if found != expected {
        return Err(Error::BadChecksum { path: p(), expected, found });
    }
    serde_json::from_slice(payload).map_err(|source| Error::Parse { path: p(), source })
}

/// Writes `state` to `dir/state.ferry` and syncs it.
pub fn write_state_file<T: Serialize>(dir: &Path, state: &T) -> Result<PathBuf, Error> {
    let path = dir.join(STATE_FILE);
    let io = |what| {
        let path = path.clone();
        move |source| Error::Io { what, path, source }
    };
    let bytes = encode(state)?;
    let mut f = File::create(&path).map_err(io("create"))?;
    f.write_all(&bytes).map_err(io("write"))?;
    f.sync_all().map_err(io("sync"))?;
    Ok(path)
}

/// Reads and checks `dir/state.ferry`.
pub fn read_state_file<T: DeserializeOwned>(dir: &Path) -> Result<T, Error> {
    let path = dir.join(STATE_FILE);
    let io = |what| {
        let path = path.clone();
        move |source| Error::Io { what, path, source }
    };
    let f = File::open(&path).map_err(io("open"))?;
    let len = f.metadata().map_err(io("inspect"))?.len();
    if len > MAX_PAYLOAD + HEADER_LEN as u64 {
        return Err(Error::TooLarge { path, len });
    }
    let mut bytes = Vec::with_capacity(len as usize);
    f.take(MAX_PAYLOAD + HEADER_LEN as u64).read_to_end(&mut bytes).map_err(io("read"))?;
    decode(&bytes, &path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Serialize, serde::Deserialize, PartialEq)]
    struct V1 {
        a: u32,
    }

    #[derive(Debug, serde::Serialize, serde::Deserialize, PartialEq)]
    struct V1Plus {
        a: u32,
        #[serde(default)]
        b: Option<String>,
    }

    fn p() -> &'static Path {
        Path::new("state.ferry")
    }

    #[test]
    fn round_trip_and_added_fields() {
        let bytes = encode(&V1 { a: 7 }).expect("encode");
        assert_eq!(decode::<V1>(&bytes, p()).expect("decode"), V1 { a: 7 });
        // A later Ferry with an extra defaulted field reads the older state.
        assert_eq!(decode::<V1Plus>(&bytes, p()).expect("decode"), V1Plus { a: 7, b: None });
        // An older Ferry ignores fields it does not know.
        let newer = encode(&V1Plus { a: 1, b: Some("x".into()) }).expect("encode");
        assert_eq!(decode::<V1>(&newer, p()).expect("decode"), V1 { a: 1 });
    }

    #[test]
    fn rejects_damage() {
        let good = encode(&V1 { a: 7 }).expect("encode");
        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(matches!(decode::<V1>(&bad, p()), Err(Error::BadMagic { .. })));
        let mut bad = good.clone();
        bad[8] = 2;
        assert!(matches!(decode::<V1>(&bad, p()), Err(Error::NewerVersion { found: 2, .. })));
        let mut bad = good.clone();
        bad[8] = 0;
        assert!(matches!(decode::<V1>(&bad, p()), Err(Error::UnknownVersion { .. })));
        let mut bad = good.clone();
        let last = bad.len() - 2;
        bad[last] ^= 1;
        assert!(matches!(decode::<V1>(&bad, p()), Err(Error::BadChecksum { .. })));
        assert!(matches!(decode::<V1>(&good[..good.len() - 1], p()), Err(Error::Truncated { .. })));
        assert!(matches!(decode::<V1>(&good[..20], p()), Err(Error::Truncated { .. })));
        let mut long = good.clone();
        long.push(b' ');
        assert!(matches!(decode::<V1>(&long, p()), Err(Error::TrailingData { .. })));
        let mut huge = good.clone();
        huge[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(matches!(decode::<V1>(&huge, p()), Err(Error::TooLarge { .. })));
        assert!(matches!(decode::<V1>(b"", p()), Err(Error::BadMagic { .. })));
    }
}
