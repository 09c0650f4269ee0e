//! The daemon's configuration file (TOML; `docs/examples/host.toml` shows every field).
//!
//! Every error names the file, the line and the field: parse errors from the `toml` crate's
//! spans, checks made after parsing (a datastore path that does not exist, a port group whose
//! bridge is missing) from the span of the field they concern.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

/// Errors reading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file cannot be read.
    #[error("cannot read the configuration file {path}", path = .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A field is malformed, missing or wrong.
    #[error("{path}, line {line}: {field}: {message}", path = .path.display())]
    Field {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// The field (`datastores.local`, `listen`, ...), or `(file)` for a syntax error.
        field: String,
        /// What is wrong.
        message: String,
    },
}

/// A datastore's lease settings: VMs on it run with `ferry run --lease`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseSettings {
    /// The sanlock lockspace of the datastore.
    pub lockspace: String,
    /// This host's id in it (unique per host).
    pub host_id: u64,
    /// The lockspace's ids file on the datastore.
    pub ids: PathBuf,
    /// sanlock's io_timeout, seconds.
    pub io_timeout: Option<u64>,
}

impl LeaseSettings {
    /// The value of `ferry run --lease`.
    pub fn to_arg(&self) -> String {
        let mut s = format!("{}:{}:{}", self.lockspace, self.host_id, self.ids.display());
        if let Some(t) = self.io_timeout {
            s.push_str(&format!(",io_timeout={t}"));
        }
        s
    }
}

/// A datastore: a named directory holding VM homes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Datastore {
    /// Its name on this host.
    pub name: String,
    /// Its directory (absolute).
    pub path: PathBuf,
    /// Lease settings, if VMs on it run with a lease.
    pub lease: Option<LeaseSettings>,
}

/// The daemon's configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// The file it came from.
    pub file: PathBuf,
    /// This host's name (default: the kernel's host name).
    pub name: String,
    /// Where the API listens (`IP:PORT`).
    pub listen: SocketAddr,
    /// The daemon's directory: `host.db`, and VMM sockets under `run/`.
    pub state_dir: PathBuf,
    /// The host's TLS identity (`cert.pem`, `key.pem`, `ca.pem`; `ferry host init` makes it):
    /// default `state_dir/identity`.
    pub identity_dir: PathBuf,
    /// The `ferry` binary that runs VMMs.
    pub ferry_binary: PathBuf,
    /// Datastores, by name.
    pub datastores: BTreeMap<String, Datastore>,
    /// Port groups: name to bridge.
    pub portgroups: BTreeMap<String, String>,
    /// The address incoming migrations' receivers listen on (default: `listen`'s IP).
    pub migration_address: std::net::IpAddr,
    /// In maintenance: incoming migrations are refused.
    pub maintenance: bool,
    /// Memory this host gives VMs, MiB (default: all it has).
    pub vm_memory_mib: Option<u64>,
    /// How long an incoming migration's reservation waits to be used.
    pub reservation_ttl: std::time::Duration,
    /// `[cpu] hide`: CPU features this host treats as absent (names as `ferry_arch::cpuid`
    /// knows them). Its inventory's KVM offer lacks them, and every VMM it starts gets them
    /// as `--cpu-hide`: VMs started here do not see them, VMs that need them are refused.
    pub cpu_hide: Vec<String>,
}

impl Config {
    /// The SQLite file.
    pub fn db_path(&self) -> PathBuf {
        self.state_dir.join("host.db")
    }

    /// Where VMM API sockets go.
    pub fn run_dir(&self) -> PathBuf {
        self.state_dir.join("run")
    }

    /// The datastore whose directory holds `home`, if any.
    pub fn datastore_of(&self, home: &Path) -> Option<&Datastore> {
        self.datastores.values().find(|d| home.parent() == Some(d.path.as_path()))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    name: Option<Spanned<String>>,
    listen: Spanned<String>,
    state_dir: Spanned<PathBuf>,
    identity_dir: Option<Spanned<PathBuf>>,
    ferry_binary: Option<Spanned<PathBuf>>,
    #[serde(default)]
    datastores: BTreeMap<Spanned<String>, Spanned<RawDatastore>>,
    #[serde(default)]
    portgroups: BTreeMap<Spanned<String>, Spanned<String>>,
    migration_address: Option<Spanned<String>>,
    #[serde(default)]
    maintenance: bool,
    vm_memory_mib: Option<u64>,
    reservation_ttl_s: Option<Spanned<u64>>,
    cpu: Option<RawCpu>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCpu {
    #[serde(default)]
    hide: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawDatastore {
    Path(PathBuf),
    Table(RawDatastoreTable),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDatastoreTable {
    path: PathBuf,
    lockspace: Option<String>,
    host_id: Option<u64>,
    ids: Option<PathBuf>,
    io_timeout: Option<u64>,
}

/// 1-based line of byte offset `at` in `text`.
pub fn line_of(text: &str, at: usize) -> usize {
    text.as_bytes()[..at.min(text.len())].iter().filter(|&&b| b == b'\n').count() + 1
}

/// Whether a network interface named `name` exists on this host.
pub fn interface_exists(name: &str) -> bool {
    !name.is_empty() && !name.contains('/') && Path::new("/sys/class/net").join(name).exists()
}

/// Reads and checks the configuration in `path`.
pub fn load(path: &Path) -> Result<Config, Error> {
    let text =
        std::fs::read_to_string(path).map_err(|source| Error::Read { path: path.to_owned(), source })?;
    parse(path, &text)
}

/// Parses and checks `text`, the content of `path`.
pub fn parse(path: &Path, text: &str) -> Result<Config, Error> {
    let field = |line: usize, field: &str, message: String| Error::Field {
        path: path.to_owned(),
        line,
        field: field.to_owned(),
        message,
    };
    let raw: Raw = toml::from_str(text).map_err(|e| {
        let line = e.span().map(|s| line_of(text, s.start)).unwrap_or(1);
        // The field is in the message where serde names it ("missing field `listen`").
        field(line, "(file)", e.message().trim().to_string())
    })?;
    let at = |span: std::ops::Range<usize>| line_of(text, span.start);

    let name = match raw.name {
        Some(n) if n.get_ref().trim().is_empty() => {
            return Err(field(at(n.span()), "name", "is empty".into()))
        }
        Some(n) => n.into_inner(),
        None => ferry_vmm::home::hostname(),
    };
    let listen = raw.listen.get_ref().parse::<SocketAddr>().map_err(|e| {
        field(at(raw.listen.span()), "listen", format!("{:?} is not IP:PORT ({e})", raw.listen.get_ref()))
    })?;
    let state_dir = raw.state_dir.get_ref().clone();
    if !state_dir.is_absolute() {
        return Err(field(at(raw.state_dir.span()), "state_dir", "must be an absolute path".into()));
    }
    let identity_dir = match raw.identity_dir {
        Some(d) if !d.get_ref().is_absolute() => {
            return Err(field(at(d.span()), "identity_dir", "must be an absolute path".into()))
        }
        Some(d) => d.into_inner(),
        None => state_dir.join("identity"),
    };
    let ferry_binary = match raw.ferry_binary {
        Some(b) => {
            if !b.get_ref().is_file() {
                return Err(field(
                    at(b.span()),
                    "ferry_binary",
                    format!("{} is not a file", b.get_ref().display()),
                ));
            }
            b.into_inner()
        }
        None => std::env::current_exe().map_err(|e| {
            field(1, "ferry_binary", format!("not given, and the running executable is unknown: {e}"))
        })?,
    };

    let mut datastores = BTreeMap::new();
    for (key, value) in raw.datastores {
        let ds_name = key.get_ref().clone();
        let fname = format!("datastores.{ds_name}");
        let line = at(value.span());
        check_name(&ds_name).map_err(|m| field(at(key.span()), &fname, m))?;
        let (dir, lease) = match value.into_inner() {
            RawDatastore::Path(p) => (p, None),
            RawDatastore::Table(t) => {
                let lease = match (t.lockspace, t.host_id, t.ids) {
                    (None, None, None) => None,
                    (Some(lockspace), Some(host_id), Some(ids)) => {
                        if !(1..=2000).contains(&host_id) {
                            return Err(field(line, &format!("{fname}.host_id"), "must be 1 to 2000".into()));
                        }
                        Some(LeaseSettings { lockspace, host_id, ids, io_timeout: t.io_timeout })
                    }
                    _ => {
                        return Err(field(
                            line,
                            &fname,
                            "a lease needs all of lockspace, host_id and ids".into(),
                        ))
                    }
                };
                (t.path, lease)
            }
        };
        if !dir.is_absolute() {
            return Err(field(line, &fname, format!("{} is not an absolute path", dir.display())));
        }
        if !dir.is_dir() {
            return Err(field(
                line,
                &fname,
                format!("{} does not exist or is not a directory", dir.display()),
            ));
        }
        datastores.insert(ds_name.clone(), Datastore { name: ds_name, path: dir, lease });
    }

    let mut portgroups = BTreeMap::new();
    for (key, bridge) in raw.portgroups {
        let pg = key.get_ref().clone();
        let fname = format!("portgroups.{pg}");
        check_name(&pg).map_err(|m| field(at(key.span()), &fname, m))?;
        if !interface_exists(bridge.get_ref()) {
            return Err(field(
                at(bridge.span()),
                &fname,
                format!("bridge {:?} does not exist on this host", bridge.get_ref()),
            ));
        }
        portgroups.insert(pg, bridge.into_inner());
    }

    let reservation_ttl = match raw.reservation_ttl_s {
        Some(t) if !(1..=3600).contains(t.get_ref()) => {
            return Err(field(at(t.span()), "reservation_ttl_s", "must be 1 to 3600 seconds".into()))
        }
        Some(t) => std::time::Duration::from_secs(*t.get_ref()),
        None => crate::daemon::migrate::RESERVATION_TTL,
    };
    let migration_address = match raw.migration_address {
        Some(a) => a.get_ref().parse::<std::net::IpAddr>().map_err(|e| {
            field(at(a.span()), "migration_address", format!("{:?} is not an IP address ({e})", a.get_ref()))
        })?,
        None => listen.ip(),
    };
    let mut cpu_hide = Vec::new();
    for f in raw.cpu.map(|c| c.hide).unwrap_or_default() {
        let name = ferry_arch::cpuid::parse_feature_name(f.get_ref())
            .map_err(|e| field(at(f.span()), "cpu.hide", e.to_string()))?;
        if !cpu_hide.contains(&name) {
            cpu_hide.push(name);
        }
    }
    Ok(Config {
        file: path.to_owned(),
        name,
        listen,
        state_dir,
        identity_dir,
        ferry_binary,
        datastores,
        portgroups,
        migration_address,
        maintenance: raw.maintenance,
        vm_memory_mib: raw.vm_memory_mib,
        reservation_ttl,
        cpu_hide,
    })
}

/// Names of datastores, port groups and VMs: 1 to 64 of letters, digits, `-`, `_`, `.`, not
/// starting with `.`.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a valid name (1 to 64 letters, digits, '-', '_', '.'; not starting with '.')"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        parse(Path::new("/etc/ferry/host.toml"), text).expect_err("should fail").to_string()
    }

    #[test]
    fn good_config() {
        let text = "name = \"a\"\nlisten = \"127.0.0.1:7443\"\nstate_dir = \"/tmp/x\"\nferry_binary = \"/bin/sh\"\n\
                    [datastores]\nlocal = \"/tmp\"\nshared = { path = \"/\", lockspace = \"ls\", host_id = 1, ids = \"/ids\" }\n";
        let c = parse(Path::new("h.toml"), text).expect("parses");
        assert_eq!(c.name, "a");
        assert_eq!(c.datastores["local"].path, Path::new("/tmp"));
        let lease = c.datastores["shared"].lease.as_ref().expect("lease");
        assert_eq!(lease.to_arg(), "ls:1:/ids");
        assert_eq!(c.db_path(), Path::new("/tmp/x/host.db"));
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let base = "listen = \"127.0.0.1:7443\"\nstate_dir = \"/tmp/x\"\nferry_binary = \"/bin/sh\"\n";
        let e = err(&format!("{base}[datastores]\nlocal = \"/does/not/exist\"\n"));
        assert!(e.contains("/etc/ferry/host.toml, line 5: datastores.local:"), "{e}");
        assert!(e.contains("does not exist"), "{e}");
        let e = err(&format!("{base}[portgroups]\nprod = \"nosuchbr0\"\n"));
        assert!(e.contains("line 5: portgroups.prod: bridge \"nosuchbr0\" does not exist"), "{e}");
        let e = err("listen = \"nope\"\nstate_dir = \"/tmp/x\"\n");
        assert!(e.contains("line 1: listen:"), "{e}");
        let e = err("listen = \"127.0.0.1:1\"\nstate_dir = \"/tmp/x\"\nbogus = 1\n");
        assert!(e.contains("line 3") && e.contains("bogus"), "{e}");
        let e = err("state_dir = \"/tmp/x\"\n");
        assert!(e.contains("listen"), "{e}");
    }

    #[test]
    fn cpu_hide_names_are_checked() {
        let base = "listen = \"127.0.0.1:7443\"\nstate_dir = \"/tmp/x\"\nferry_binary = \"/bin/sh\"\n";
        let c =
            parse(Path::new("h.toml"), &format!("{base}[cpu]\nhide = [\"avx2\", \"avx2\", \"sse4.2\"]\n"))
                .expect("parses");
        assert_eq!(c.cpu_hide, vec!["avx2".to_string(), "sse4.2".to_string()]);
        let e = err(&format!("{base}[cpu]\nhide = [\"avx2\", \"bogus\"]\n"));
        assert!(e.contains("line 5: cpu.hide: unknown CPU feature \"bogus\""), "{e}");
        assert!(e.contains("avx2"), "the valid names are listed: {e}");
        assert!(parse(Path::new("h.toml"), base).expect("parses").cpu_hide.is_empty());
    }
}
