//! `ferry ca init` and `ferry ca issue` through the binary: files, modes, `--json`, errors.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let path = std::env::temp_dir().join(format!("ferry-ca-cli-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("mkdir");
        Dir(path)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn ferry(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferry")).args(args).stdin(Stdio::null()).output().expect("run ferry")
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn json(out: &Output) -> serde_json::Value {
    assert!(out.status.success(), "ferry failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("JSON on stdout")
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).expect("stat").permissions().mode() & 0o777
}

/// One line on stderr, starting "ferry: error:", mentioning `needle`; exit status 1.
fn assert_error(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(stderr.starts_with("ferry: error:") && stderr.trim_end().lines().count() == 1, "{stderr}");
    assert!(stderr.contains(needle), "{needle:?} not in {stderr}");
    assert!(out.stdout.is_empty(), "stdout: {}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn init_then_issue_host_and_client() {
    let d = Dir::new("ok");
    let ca = d.0.join("ca");
    let init = json(&ferry(&["ca", "init", "--dir", s(&ca), "--json"]));
    assert_eq!(init["cert"], s(&ca.join("ca.pem")));
    assert_eq!(init["key"], s(&ca.join("ca.key")));
    assert!(init["common_name"].as_str().expect("cn").starts_with("Ferry cluster CA "));
    assert_eq!(mode(&ca.join("ca.key")), 0o600);

    let host = d.0.join("host");
    let issued = json(&ferry(&[
        "ca",
        "issue",
        "--ca",
        s(&ca),
        "--name",
        "host-a",
        "--kind",
        "host",
        "--san",
        "10.9.8.7",
        "--san",
        "host-a.example",
        "--out",
        s(&host),
        "--json",
    ]));
    assert_eq!(issued["kind"], "host");
    assert_eq!(issued["name"], "host-a");
    let sans: Vec<&str> =
        issued["sans"].as_array().expect("sans").iter().filter_map(|v| v.as_str()).collect();
    for want in ["host-a", "127.0.0.1", "::1", "10.9.8.7", "host-a.example"] {
        assert!(sans.contains(&want), "{want} not in {sans:?}");
    }
    assert_eq!(mode(&host.join("key.pem")), 0o600);
    assert_eq!(
        std::fs::read(host.join("ca.pem")).expect("copy"),
        std::fs::read(ca.join("ca.pem")).expect("ca")
    );

    // Text output too.
    let out = ferry(&[
        "ca",
        "issue",
        "--ca",
        s(&ca),
        "--name",
        "alice",
        "--kind",
        "client",
        "--out",
        s(&d.0.join("alice")),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("client certificate for alice"), "{text}");
    assert_eq!(mode(&d.0.join("alice").join("key.pem")), 0o600);
}

#[test]
fn errors() {
    let d = Dir::new("errors");
    let ca = d.0.join("ca");
    assert!(ferry(&["ca", "init", "--dir", s(&ca)]).status.success());
    let key = std::fs::read(ca.join("ca.key")).expect("key");

    // init refuses to overwrite.
    assert_error(&ferry(&["ca", "init", "--dir", s(&ca)]), "already exists");
    assert_eq!(std::fs::read(ca.join("ca.key")).expect("key"), key);

    // A CA directory that cannot be created (its parent is a file).
    std::fs::write(d.0.join("file"), "x").expect("write");
    assert_error(
        &ferry(&["ca", "init", "--dir", s(&d.0.join("file").join("ca"))]),
        "cannot create directory",
    );

    // issue: no CA there, bad name, bad SAN, unknown kind, existing identity.
    let out = d.0.join("out");
    assert_error(
        &ferry(&[
            "ca",
            "issue",
            "--ca",
            s(&d.0.join("none")),
            "--name",
            "a",
            "--kind",
            "client",
            "--out",
            s(&out),
        ]),
        "cannot read",
    );
    assert_error(
        &ferry(&["ca", "issue", "--ca", s(&ca), "--name", "a b", "--kind", "host", "--out", s(&out)]),
        "invalid name",
    );
    assert_error(
        &ferry(&[
            "ca",
            "issue",
            "--ca",
            s(&ca),
            "--name",
            "a",
            "--kind",
            "host",
            "--san",
            "x y",
            "--out",
            s(&out),
        ]),
        "invalid subject alternative name",
    );
    assert!(!out.exists(), "a refused issue wrote {out:?}");
    let bad_kind =
        ferry(&["ca", "issue", "--ca", s(&ca), "--name", "a", "--kind", "server", "--out", s(&out)]);
    assert_eq!(bad_kind.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad_kind.stderr).contains("server"));
    assert!(ferry(&["ca", "issue", "--ca", s(&ca), "--name", "a", "--kind", "client", "--out", s(&out)])
        .status
        .success());
    assert_error(
        &ferry(&["ca", "issue", "--ca", s(&ca), "--name", "a", "--kind", "client", "--out", s(&out)]),
        "already exists",
    );
}
