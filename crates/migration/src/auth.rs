//! Mutual authentication of the two ends of a migration with a shared secret.
//!
//! Both commands read the same key file. Each side sends a fresh random nonce; the other
//! proves it knows the key by answering with `HMAC-SHA256(key, role || migration id ||
//! nonce)`. The receiver checks the sender's proof before it accepts any state; the sender
//! checks the receiver's before it sends any memory. The roles are part of the MAC so one
//! side's proof can never be replayed as the other's. Nothing is encrypted yet.

use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Shortest key accepted, in bytes.
pub const MIN_KEY_LEN: usize = 16;
/// Longest key file read, in bytes.
pub const MAX_KEY_LEN: usize = 4096;
/// Nonce length, in bytes.
pub const NONCE_LEN: usize = 32;

/// Which end proves itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The source VMM.
    Sender,
    /// The destination VMM.
    Receiver,
}

impl Role {
    fn label(self) -> &'static [u8] {
        match self {
            Role::Sender => b"ferry-migration-v1 sender\0",
            Role::Receiver => b"ferry-migration-v1 receiver\0",
        }
    }
}

/// Errors loading a key.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The key file cannot be read.
    #[error("cannot read the auth key file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Too short or too long.
    #[error(
        "the auth key file {path} holds {len} bytes; a key must have {MIN_KEY_LEN} to {MAX_KEY_LEN} \
         (make one with: head -c 32 /dev/urandom > FILE)"
    )]
    BadLength {
        /// The file.
        path: PathBuf,
        /// Its length.
        len: usize,
    },
    /// No randomness.
    #[error("cannot read random bytes for a nonce")]
    Random(#[source] std::io::Error),
}

/// A shared migration key. Its bytes never appear in `Debug` output.
#[derive(Clone)]
pub struct Key(Vec<u8>);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Key({} bytes)", self.0.len())
    }
}

impl Key {
    /// Reads a key file: its bytes as they are, except one trailing newline.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let read = |source| Error::Read { path: path.to_owned(), source };
        let meta = std::fs::metadata(path).map_err(read)?;
        if meta.is_dir() {
            return Err(read(std::io::Error::new(std::io::ErrorKind::InvalidInput, "it is a directory")));
        }
        if meta.len() > MAX_KEY_LEN as u64 + 1 {
            return Err(Error::BadLength { path: path.to_owned(), len: meta.len() as usize });
        }
        let mut bytes = std::fs::read(path).map_err(read)?;
        if bytes.last() == Some(&b'\n') {
            bytes.pop();
        }
        Self::from_bytes(bytes).map_err(|len| Error::BadLength { path: path.to_owned(), len })
    }

    /// A key from bytes; the error is the length when it is out of bounds.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, usize> {
        if (MIN_KEY_LEN..=MAX_KEY_LEN).contains(&bytes.len()) {
            Ok(Self(bytes))
        } else {
            Err(bytes.len())
        }
    }

    fn mac(&self, role: Role, migration_id: &str, nonce: &[u8]) -> Hmac<Sha256> {
        // HMAC takes keys of any length; the error case cannot happen.
        let mut mac = match Hmac::<Sha256>::new_from_slice(&self.0) {
            Ok(m) => m,
            Err(_) => unreachable!("HMAC accepts any key length"),
        };
        mac.update(role.label());
        mac.update(&(migration_id.len() as u64).to_le_bytes());
        mac.update(migration_id.as_bytes());
        mac.update(nonce);
        mac
    }

    /// The proof that `role` knows the key, answering `nonce`, as lowercase hex.
    pub fn prove(&self, role: Role, migration_id: &str, nonce: &[u8]) -> String {
        hex(&self.mac(role, migration_id, nonce).finalize().into_bytes())
    }

    /// Checks a proof in constant time.
    pub fn check(&self, role: Role, migration_id: &str, nonce: &[u8], proof: &str) -> bool {
        match unhex(proof) {
            Some(tag) => self.mac(role, migration_id, nonce).verify_slice(&tag).is_ok(),
            None => false,
        }
    }
}

/// A fresh random nonce.
pub fn nonce() -> Result<[u8; NONCE_LEN], Error> {
    let mut n = [0u8; NONCE_LEN];
    let mut f = std::fs::File::open("/dev/urandom").map_err(Error::Random)?;
    std::io::Read::read_exact(&mut f, &mut n).map_err(Error::Random)?;
    Ok(n)
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses lowercase or uppercase hex; `None` if it is not hex.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 || s.len() > 2 * MAX_KEY_LEN {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| s.get(i..i + 2).and_then(|p| u8::from_str_radix(p, 16).ok())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> Key {
        Key::from_bytes(vec![b; 32]).expect("key")
    }

    #[test]
    fn proofs_check_with_the_same_key_only() {
        let n = nonce().expect("nonce");
        let p = key(1).prove(Role::Sender, "m-1", &n);
        assert!(key(1).check(Role::Sender, "m-1", &n, &p));
        assert!(!key(2).check(Role::Sender, "m-1", &n, &p), "another key");
        assert!(!key(1).check(Role::Receiver, "m-1", &n, &p), "the other role");
        assert!(!key(1).check(Role::Sender, "m-2", &n, &p), "another migration");
        let other = nonce().expect("nonce");
        assert!(!key(1).check(Role::Sender, "m-1", &other, &p), "another nonce");
        assert!(!key(1).check(Role::Sender, "m-1", &n, "zz"), "not hex");
        assert!(!key(1).check(Role::Sender, "m-1", &n, ""), "empty");
    }

    #[test]
    fn key_files() {
        let dir = std::env::temp_dir().join(format!("ferry-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let f = dir.join("k");
        std::fs::write(&f, b"short\n").expect("write");
        assert!(matches!(Key::load(&f), Err(Error::BadLength { len: 5, .. })));
        std::fs::write(&f, b"0123456789abcdef\n").expect("write");
        let k = Key::load(&f).expect("16 bytes and a newline");
        assert_eq!(format!("{k:?}"), "Key(16 bytes)");
        assert!(matches!(Key::load(&dir.join("missing")), Err(Error::Read { .. })));
        assert!(matches!(Key::load(&dir), Err(Error::Read { .. })));
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn hex_round_trip() {
        assert_eq!(unhex(&hex(&[0, 1, 0xab, 0xff])), Some(vec![0, 1, 0xab, 0xff]));
        assert_eq!(unhex("abc"), None);
        assert_eq!(unhex("g0"), None);
    }
}
