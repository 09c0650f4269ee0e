//! Tap devices for VM NICs: made persistent with `ip tuntap`, put on the port group's bridge,
//! deleted when the VM's VMM ends. Names come from [`crate::vmdef::tap_name`], so a restarted
//! daemon knows which taps are its own.

use std::process::Command;

/// Errors making a tap.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `ip` could not be run.
    #[error("cannot run `ip {args}`")]
    Spawn {
        /// Its arguments.
        args: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `ip` failed.
    #[error("`ip {args}` failed: {stderr}")]
    Failed {
        /// Its arguments.
        args: String,
        /// What it said.
        stderr: String,
    },
}

fn ip(args: &[&str]) -> Result<(), Error> {
    let joined = args.join(" ");
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|source| Error::Spawn { args: joined.clone(), source })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::Failed { args: joined, stderr: String::from_utf8_lossy(&out.stderr).trim().to_string() })
    }
}

/// Makes tap `name` on `bridge`, up. A leftover tap of the same name is replaced.
pub fn create(name: &str, bridge: &str) -> Result<(), Error> {
    if crate::config::interface_exists(name) {
        delete(name);
    }
    ip(&["tuntap", "add", "dev", name, "mode", "tap"])?;
    let attach = ip(&["link", "set", "dev", name, "master", bridge])
        .and_then(|()| ip(&["link", "set", "dev", name, "up"]));
    if attach.is_err() {
        delete(name);
    }
    attach
}

/// Deletes tap `name` if it exists (failures are logged: nothing else can be done).
pub fn delete(name: &str) {
    if !crate::config::interface_exists(name) {
        return;
    }
    if let Err(e) = ip(&["link", "del", "dev", name]) {
        tracing::warn!("cannot delete tap {name}: {e}");
    }
}
