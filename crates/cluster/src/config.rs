//! The controller's configuration file (TOML; `docs/examples/cluster.toml` shows every
//! field). Every error names the file, the line and the field.

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
        /// The field (`listen`, `database`, ...), or `(file)` for a syntax error.
        field: String,
        /// What is wrong.
        message: String,
    },
}

/// The controller's configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// The file it came from.
    pub file: PathBuf,
    /// The controller's name: its certificate's CN (default `controller`).
    pub name: String,
    /// Where the API listens (`IP:PORT`).
    pub listen: SocketAddr,
    /// The controller's directory: the SQLite store by default.
    pub state_dir: PathBuf,
    /// The controller's TLS identity (`ferry cluster init` makes it): default
    /// `state_dir/identity`.
    pub identity_dir: PathBuf,
    /// The store: `sqlite://PATH` or `postgres://...` (default
    /// `sqlite://STATE_DIR/cluster.db`).
    pub database: String,
    /// The controller's API URL as hosts, the CLI and the other controllers reach it
    /// (`url = "https://IP:PORT"`; default `https://LISTEN`): what it advertises when it is
    /// the active one (docs/cluster.md "High availability").
    pub url: String,
    /// `[limits]`: how many migrations run at once; more wait in the controller's queue.
    pub limits: crate::queue::Limits,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    per_host: Option<Spanned<i64>>,
    per_cluster: Option<Spanned<i64>>,
    host_lost_after_s: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    name: Option<Spanned<String>>,
    listen: Spanned<String>,
    state_dir: Spanned<PathBuf>,
    identity_dir: Option<Spanned<PathBuf>>,
    database: Option<Spanned<String>>,
    url: Option<Spanned<String>>,
    limits: Option<Spanned<RawLimits>>,
}

fn line_of(text: &str, at: usize) -> usize {
    text.as_bytes()[..at.min(text.len())].iter().filter(|&&b| b == b'\n').count() + 1
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
        field(line, "(file)", e.message().trim().to_string())
    })?;
    let at = |span: std::ops::Range<usize>| line_of(text, span.start);
    let name = match raw.name {
        Some(n) => {
            let valid = !n.get_ref().is_empty()
                && n.get_ref().len() <= 64
                && n.get_ref().chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
            if !valid {
                return Err(field(
                    at(n.span()),
                    "name",
                    "use 1 to 64 letters, digits, '.', '-' or '_'".into(),
                ));
            }
            n.into_inner()
        }
        None => "controller".to_string(),
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
    let database = match raw.database {
        Some(d) => {
            let url = d.get_ref();
            let known = ["sqlite://", "postgres://", "postgresql://"].iter().any(|p| url.starts_with(p));
            if !known {
                return Err(field(
                    at(d.span()),
                    "database",
                    "use sqlite://PATH or postgres://USER@HOST:PORT/DB".into(),
                ));
            }
            d.into_inner()
        }
        None => format!("sqlite://{}", state_dir.join("cluster.db").display()),
    };
    let url = match raw.url {
        Some(u) => {
            let valid = u.get_ref().strip_prefix("https://").is_some_and(|rest| {
                let rest = rest.trim_end_matches('/');
                !rest.is_empty() && !rest.contains('/') && rest.contains(':')
            });
            if !valid {
                return Err(field(at(u.span()), "url", "use https://HOST:PORT".into()));
            }
            u.get_ref().trim_end_matches('/').to_string()
        }
        None => format!("https://{listen}"),
    };
    let mut limits = crate::queue::Limits::default();
    if let Some(l) = raw.limits {
        let l = l.into_inner();
        if let Some(v) = l.host_lost_after_s {
            let n = *v.get_ref();
            let min = crate::queue::HOST_LOST_AFTER_MIN_S as i64;
            if !(min..=3600).contains(&n) {
                return Err(field(
                    at(v.span()),
                    "limits.host_lost_after_s",
                    format!(
                        "{n} is not {min} to 3600 (seconds; longer than a host takes to be not_responding)"
                    ),
                ));
            }
            limits.host_lost_after = std::time::Duration::from_secs(n as u64);
        }
        for (key, value, slot) in [
            ("limits.per_host", l.per_host, &mut limits.per_host),
            ("limits.per_cluster", l.per_cluster, &mut limits.per_cluster),
        ] {
            if let Some(v) = value {
                let n = *v.get_ref();
                if !(1..=1000).contains(&n) {
                    return Err(field(at(v.span()), key, format!("{n} is not 1 to 1000")));
                }
                *slot = n as u32;
            }
        }
    }
    Ok(Config { file: path.to_owned(), name, listen, state_dir, identity_dir, database, url, limits })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::{parse, Error};

    #[test]
    fn defaults() {
        let c = parse(
            Path::new("c.toml"),
            "listen = \"127.0.0.1:7444\"\nstate_dir = \"/var/lib/ferry-cluster\"\n",
        )
        .expect("parse");
        assert_eq!(c.name, "controller");
        assert_eq!(c.database, "sqlite:///var/lib/ferry-cluster/cluster.db");
        assert_eq!(c.identity_dir, Path::new("/var/lib/ferry-cluster/identity"));
        assert_eq!(c.url, "https://127.0.0.1:7444");
        assert_eq!((c.limits.per_host, c.limits.per_cluster), (2, 8));
    }

    #[test]
    fn the_documented_example_parses_with_its_values() {
        let text = include_str!("../../../docs/examples/cluster.toml");
        let c = parse(Path::new("docs/examples/cluster.toml"), text).expect("the example parses");
        assert_eq!((c.limits.per_host, c.limits.per_cluster), (2, 8));
        assert_eq!(c.limits.host_lost_after, crate::queue::HOST_LOST_AFTER);
    }

    #[test]
    fn limits() {
        let c = parse(
            Path::new("c.toml"),
            "listen = \"127.0.0.1:7444\"\nstate_dir = \"/s\"\n[limits]\nper_host = 3\nper_cluster = 5\n",
        )
        .expect("parse");
        assert_eq!((c.limits.per_host, c.limits.per_cluster), (3, 5));
        assert_eq!(c.limits.host_lost_after, crate::queue::HOST_LOST_AFTER);
        let c = parse(
            Path::new("/c.toml"),
            "listen = \"127.0.0.1:7444\"\nstate_dir = \"/s\"\n[limits]\nhost_lost_after_s = 120\n",
        )
        .expect("valid");
        assert_eq!(c.limits.host_lost_after, std::time::Duration::from_secs(120));
        assert_eq!((c.limits.per_host, c.limits.per_cluster), (2, 8));
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let cases = [
            ("listen = \"127.0.0.1:7444\"\nstate_dir = \"/s\"\ndatabase = \"mysql://x\"\n", 3, "database"),
            ("state_dir = \"/s\"\nlisten = \"nowhere\"\n", 2, "listen"),
            ("listen = \"127.0.0.1:1\"\nstate_dir = \"relative\"\n", 2, "state_dir"),
            ("listen = \"127.0.0.1:1\"\nstate_dir = \"/s\"\nbogus = 1\n", 3, "(file)"),
            ("listen = \"127.0.0.1:1\"\n", 1, "(file)"),
            ("listen = \"127.0.0.1:1\"\nstate_dir = \"/s\"\nname = \"a b\"\n", 3, "name"),
            ("listen = \"127.0.0.1:1\"\nstate_dir = \"/s\"\nurl = \"http://x:1\"\n", 3, "url"),
            ("listen = \"127.0.0.1:1\"\nstate_dir = \"/s\"\n[limits]\nper_host = 0\n", 4, "limits.per_host"),
            (
                "listen = \"127.0.0.1:1\"\nstate_dir = \"/s\"\n[limits]\nper_cluster = -1\n",
                4,
                "limits.per_cluster",
            ),
            ("listen = \"127.0.0.1:1\"\nstate_dir = \"/s\"\n[limits]\nper_vm = 1\n", 4, "(file)"),
            (
                "listen = \"127.0.0.1:1\"\nstate_dir = \"/s\"\n[limits]\nhost_lost_after_s = 6\n",
                4,
                "limits.host_lost_after_s",
            ),
            (
                "listen = \"127.0.0.1:1\"\nstate_dir = \"/s\"\n[limits]\nhost_lost_after_s = 3601\n",
                4,
                "limits.host_lost_after_s",
            ),
        ];
        for (text, line, name) in cases {
            match parse(Path::new("/etc/c.toml"), text) {
                Err(e @ Error::Field { .. }) => {
                    let Error::Field { line: l, field: f, .. } = &e else { unreachable!() };
                    assert_eq!((*l, f.as_str()), (line, name), "{e}");
                    assert!(e.to_string().starts_with("/etc/c.toml, line "), "{e}");
                }
                other => panic!("{text:?}: {other:?}"),
            }
        }
    }
}
