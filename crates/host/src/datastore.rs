//! Datastores: their stable id and free space.
//!
//! A datastore's id lives in `DATASTORE/.ferry-datastore` (one line, a UUID), the file the
//! VMM's home code already reads to name a home's datastore. The first host to see the
//! directory creates it atomically (a temporary file hard-linked into place, which fails if
//! another host won the race; then that host's id is read), so every host that sees the same
//! directory reports the same id.

use std::path::{Path, PathBuf};

use ferry_vmm::home::DATASTORE_FILE;

/// Errors with a datastore.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The id file cannot be read or made.
    #[error("cannot read or create the datastore id {path}", path = .path.display())]
    Id {
        /// The id file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The id file is empty or not one line.
    #[error("the datastore id file {path} is damaged (expected one line holding an id)", path = .path.display())]
    Damaged {
        /// The id file.
        path: PathBuf,
    },
    /// statvfs failed.
    #[error("cannot read the free space of {path}", path = .path.display())]
    Statvfs {
        /// The datastore.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn read_id(file: &Path) -> Result<Option<String>, Error> {
    match std::fs::read_to_string(file) {
        Ok(text) => {
            let id = text.trim();
            if id.is_empty() || id.contains('\n') {
                return Err(Error::Damaged { path: file.to_owned() });
            }
            Ok(Some(id.to_string()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::Id { path: file.to_owned(), source }),
    }
}

/// The id of the datastore at `dir`, created if absent.
pub fn ensure_id(dir: &Path) -> Result<String, Error> {
    let file = dir.join(DATASTORE_FILE);
    if let Some(id) = read_id(&file)? {
        return Ok(id);
    }
    let id = uuid::Uuid::new_v4().to_string();
    let tmp = dir.join(format!("{DATASTORE_FILE}.{}.{}.tmp", std::process::id(), &id[..8]));
    let err = |source| Error::Id { path: file.clone(), source };
    let made = (|| -> std::io::Result<bool> {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(format!("{id}\n").as_bytes())?;
        f.sync_all()?;
        match std::fs::hard_link(&tmp, &file) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(e),
        }
    })();
    let _ = std::fs::remove_file(&tmp);
    if made.map_err(err)? {
        Ok(id)
    } else {
        // Another host (or daemon) made it first: theirs is the id.
        read_id(&file)?.ok_or(Error::Damaged { path: file })
    }
}

/// Free (for unprivileged users) and total bytes of the file system holding `dir`.
pub fn space(dir: &Path) -> Result<(u64, u64), Error> {
    use std::os::unix::ffi::OsStrExt;
    let err = |source| Error::Statvfs { path: dir.to_owned(), source };
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| err(std::io::Error::from(std::io::ErrorKind::InvalidInput)))?;
    // SAFETY: statvfs is plain data; zeroed is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a valid statvfs pointer.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    let frsize = st.f_frsize as u64;
    Ok((st.f_bavail as u64 * frsize, st.f_blocks as u64 * frsize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_is_made_once_and_kept() {
        let dir = std::env::temp_dir().join(format!("ferry-ds-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let a = ensure_id(&dir).expect("id");
        let b = ensure_id(&dir).expect("id");
        assert_eq!(a, b);
        assert_eq!(std::fs::read_dir(&dir).expect("list").count(), 1, "no temporary left");
        let (free, total) = space(&dir).expect("space");
        assert!(total >= free && total > 0);
        std::fs::remove_dir_all(&dir).expect("clean");
    }
}
