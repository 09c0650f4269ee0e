//! Writing and reading the PEM files of an identity directory.
//!
//! Private keys are created with `O_CREAT | O_EXCL` and mode 0600 in the same `open`, so a
//! key is never readable by another user, not even for a moment, and an existing file is
//! never overwritten.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The CA's certificate in a CA directory and a copy of it in an identity directory.
pub const CA_CERT: &str = "ca.pem";
/// The CA's private key in a CA directory.
pub const CA_KEY: &str = "ca.key";
/// A host's or client's certificate in an identity directory.
pub const CERT: &str = "cert.pem";
/// A host's or client's private key in an identity directory.
pub const KEY: &str = "key.pem";

/// Mode of private key files.
pub const KEY_MODE: u32 = 0o600;
/// Mode of certificate files (public).
pub const CERT_MODE: u32 = 0o644;

/// Errors reading or writing identity files.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file exists and is not overwritten.
    #[error("{0} already exists; refusing to overwrite it")]
    Exists(PathBuf),
    /// The directory cannot be created.
    #[error("cannot create directory {path}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file cannot be written.
    #[error("cannot write {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file cannot be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file holds no valid PEM object of the kind wanted.
    #[error("{path} holds no valid PEM {what}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// "certificate" or "private key".
        what: &'static str,
        /// Why.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// A private key file that group or others may read is refused, as ssh does.
    #[error("{path} is readable by other users (mode {mode:o}); chmod 600 it")]
    KeyExposed {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The file holds no certificate at all.
    #[error("{0} holds no certificate")]
    NoCertificate(PathBuf),
}

/// Creates `dir` (and its parents) if missing, mode 0700 for the directories created.
pub fn create_dir(dir: &Path) -> Result<(), Error> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| Error::CreateDir { path: dir.to_path_buf(), source })
}

/// Writes a new file with `mode` set at creation; fails with [`Error::Exists`] if it exists.
pub fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), Error> {
    let mut file = OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(
        |source| match source.kind() {
            std::io::ErrorKind::AlreadyExists => Error::Exists(path.to_path_buf()),
            _ => Error::Write { path: path.to_path_buf(), source },
        },
    )?;
    let written = file.write_all(contents).and_then(|()| file.sync_all());
    if let Err(source) = written {
        drop(file);
        let _ = std::fs::remove_file(path);
        return Err(Error::Write { path: path.to_path_buf(), source });
    }
    Ok(())
}

/// Refuses if any of `paths` exists (checked before anything is written, so a refused
/// command writes nothing).
pub fn ensure_absent(paths: &[&Path]) -> Result<(), Error> {
    for path in paths {
        if path.symlink_metadata().is_ok() {
            return Err(Error::Exists(path.to_path_buf()));
        }
    }
    Ok(())
}

/// Reads a whole file as text.
pub fn read_text(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|source| Error::Read { path: path.to_path_buf(), source })
}

/// Reads every certificate of a PEM file (at least one).
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let text = read_text(path)?;
    let certs = CertificateDer::pem_slice_iter(text.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| Error::Pem { path: path.to_path_buf(), what: "certificate", source })?;
    if certs.is_empty() {
        return Err(Error::NoCertificate(path.to_path_buf()));
    }
    Ok(certs)
}

/// Reads a private key file as text, refusing one that group or others may read.
pub fn read_private_text(path: &Path) -> Result<String, Error> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|source| Error::Read { path: path.to_path_buf(), source })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(Error::KeyExposed { path: path.to_path_buf(), mode });
    }
    read_text(path)
}

/// Reads the private key of a PEM file (see [`read_private_text`]).
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, Error> {
    let text = read_private_text(path)?;
    PrivateKeyDer::from_pem_slice(text.as_bytes()).map_err(|source| Error::Pem {
        path: path.to_path_buf(),
        what: "private key",
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn tmp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ferry-pki-files-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        create_dir(&dir).expect("create temp dir");
        dir
    }

    #[test]
    fn write_new_sets_mode_and_refuses_overwrite() {
        let dir = tmp("mode");
        let path = dir.join("k");
        write_new(&path, b"secret", KEY_MODE).expect("first write");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(write_new(&path, b"other", KEY_MODE), Err(Error::Exists(_))));
        assert_eq!(std::fs::read(&path).expect("read"), b"secret");
        assert!(matches!(ensure_absent(&[&path]), Err(Error::Exists(_))));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn exposed_keys_are_refused() {
        let dir = tmp("exposed");
        let path = dir.join("key.pem");
        write_new(&path, b"x", KEY_MODE).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        assert!(matches!(read_key(&path), Err(Error::KeyExposed { mode: 0o640, .. })));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert!(matches!(read_key(&path), Err(Error::Pem { .. })));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn garbage_is_not_a_certificate() {
        let dir = tmp("garbage");
        let path = dir.join("c.pem");
        write_new(&path, b"not pem at all\n", KEY_MODE).expect("write");
        assert!(matches!(read_certs(&path), Err(Error::NoCertificate(_))));
        assert!(read_key(&path).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
