//! QEMU side by side: live-migrates the same guest ELF (memstress with the same initrd, or
//! dirtier) between two `qemu-system-x86_64` processes (microvm, KVM) over loopback, driven
//! through QMP, plain or with XBZRLE and auto-converge, so the migration benchmark can print
//! QEMU's figures next to Ferry's from the same invocation.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::guestline::{self, Felt};

/// The QEMU binary the benchmark runs.
pub const BINARY: &str = "qemu-system-x86_64";

/// How long any single wait (QMP socket, guest console, migration) may take.
const TIMEOUT: Duration = Duration::from_secs(120);

/// `max-bandwidth` given to QEMU: 100 GiB/s, i.e. no cap (QEMU's default is 32 MiB/s).
const NO_BANDWIDTH_CAP: u64 = 100 << 30;

/// `qemu-system-x86_64` on PATH, if there is one.
pub fn find() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(BINARY)).find(|p| {
        std::fs::metadata(p).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
    })
}

/// The first line of `qemu --version`, e.g. "QEMU emulator version 7.2.19 (Debian ...)".
pub fn version(qemu: &Path) -> anyhow::Result<String> {
    let out = Command::new(qemu)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", qemu.display()))?;
    anyhow::ensure!(out.status.success(), "{} --version exited with {}", qemu.display(), out.status);
    Ok(String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or("").trim().to_string())
}

/// What the guest and migration look like; the same values as the Ferry runs.
#[derive(Debug)]
pub struct Setup<'a> {
    /// The guest ELF (PVH), booted with `-kernel`.
    pub elf: &'a Path,
    /// The initrd file, if any.
    pub initrd: Option<&'a Path>,
    /// Guest memory in bytes.
    pub memory: u64,
    /// The guest's command line, e.g. "wss=64M".
    pub append: &'a str,
    /// Console text that says the guest's workload runs (migration starts after it).
    pub ready: &'a str,
    /// The guest's TSC frequency, Hz: given to QEMU so that it publishes it in CPUID
    /// 0x40000010 as Ferry does (dirtier needs it).
    pub tsc_hz: Option<u64>,
    /// Migration capabilities turned on on both sides (`xbzrle`, `auto-converge`,
    /// `multifd`, `compress`, ...); none for plain pre-copy. With `xbzrle` its cache is
    /// [`XBZRLE_CACHE`].
    pub caps: &'a [String],
    /// Bandwidth cap, MiB/s (0: none).
    pub bandwidth_mib: u64,
    /// The guest is dirtier: read what it felt from its progress lines.
    pub dirtier: bool,
    /// `downtime-limit`, ms.
    pub downtime_ms: u64,
}

/// XBZRLE's page cache, bytes (QEMU's default is 64 MiB): room for dirtier's default
/// working set.
const XBZRLE_CACHE: u64 = 256 << 20;

/// One migration's figures, from the source's `query-migrate`.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    /// `total-time`, ms.
    pub total_ms: f64,
    /// `downtime`, ms.
    pub downtime_ms: f64,
    /// `setup-time`, ms.
    pub setup_ms: f64,
    /// `ram.transferred`, bytes.
    pub bytes: f64,
    /// `ram.dirty-sync-count`: dirty-bitmap syncs, one per pass over memory.
    pub passes: f64,
    /// `cpu-throttle-percentage` when the migration completed (auto-converge), %.
    pub throttle_pct: f64,
    /// What dirtier felt (with `Setup::dirtier`).
    pub guest: Option<Felt>,
    /// The guest's progress during the migration, memstress passes per second on the source
    /// (memstress only).
    pub guest_passes_per_s: f64,
}

/// A QEMU process, killed (and reaped) when dropped, so every error path cleans up.
#[derive(Debug)]
struct Vm {
    child: Child,
    name: &'static str,
    log: PathBuf,
}

impl Vm {
    /// Fails if the process has exited, with the end of its stderr.
    fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(5).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!("QEMU ({}) exited with {status}: {}", self.name, tail.join(" | "));
        }
        Ok(())
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A QMP connection.
#[derive(Debug)]
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects to `sock` once QEMU has created it, reads the greeting and leaves
    /// capabilities negotiation mode.
    fn connect(sock: &Path, vm: &mut Vm) -> anyhow::Result<Qmp> {
        let deadline = Instant::now() + TIMEOUT;
        let stream = loop {
            vm.check_alive()?;
            match UnixStream::connect(sock) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(e).with_context(|| {
                        format!("QMP socket {} did not come up within {TIMEOUT:?}", sock.display())
                    })
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        stream.set_write_timeout(Some(Duration::from_secs(30)))?;
        let mut qmp = Qmp { reader: BufReader::new(stream.try_clone()?), writer: stream };
        // An incoming migration's events can come before the greeting: skip them.
        let greeting = loop {
            let m = qmp.read_message().context("no QMP greeting")?;
            if m.get("event").is_none() {
                break m;
            }
        };
        anyhow::ensure!(greeting.get("QMP").is_some(), "unexpected QMP greeting: {greeting}");
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    /// Reads one JSON message.
    fn read_message(&mut self) -> anyhow::Result<Value> {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).context("reading from QMP")?;
        anyhow::ensure!(n > 0, "QMP connection closed");
        serde_json::from_str(&line).with_context(|| format!("bad QMP message: {}", line.trim()))
    }

    /// Runs a command and returns its `return` value; asynchronous events are skipped.
    fn execute(&mut self, command: &str, arguments: Option<Value>) -> anyhow::Result<Value> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut text = msg.to_string();
        text.push('\n');
        self.writer.write_all(text.as_bytes()).with_context(|| format!("sending QMP {command}"))?;
        loop {
            let mut reply = self.read_message().with_context(|| format!("QMP {command}"))?;
            if reply.get("event").is_some() {
                continue;
            }
            if let Some(err) = reply.get("error") {
                bail!("QMP {command} failed: {}", err["desc"].as_str().unwrap_or("(no description)"));
            }
            return reply
                .get_mut("return")
                .map(Value::take)
                .with_context(|| format!("QMP {command}: unexpected reply {reply}"));
        }
    }
}

/// Starts one QEMU; `incoming` makes it a migration destination on that port.
fn spawn(
    qemu: &Path,
    setup: &Setup<'_>,
    dir: &Path,
    name: &'static str,
    incoming: Option<u16>,
) -> anyhow::Result<(Vm, PathBuf, PathBuf)> {
    let console = dir.join(format!("qemu-{name}.console"));
    let sock = dir.join(format!("qemu-{name}.qmp"));
    let log = dir.join(format!("qemu-{name}.log"));
    for p in [&console, &sock] {
        let _ = std::fs::remove_file(p);
    }
    let mut cmd = Command::new(qemu);
    let cpu = match setup.tsc_hz {
        Some(hz) => format!("host,-arch-capabilities,tsc-frequency={hz}"),
        None => "host,-arch-capabilities".to_string(),
    };
    cmd.args(["-M", "microvm", "-enable-kvm", "-cpu", &cpu])
        .args(["-m", &format!("{}M", setup.memory >> 20)])
        .arg("-kernel")
        .arg(setup.elf);
    if let Some(initrd) = setup.initrd {
        cmd.arg("-initrd").arg(initrd);
    }
    cmd.args(["-append", setup.append])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-serial", &format!("file:{}", console.display())])
        .args(["-qmp", &format!("unix:{},server=on,wait=off", sock.display())]);
    if let Some(port) = incoming {
        cmd.args(["-incoming", &format!("tcp:127.0.0.1:{port}")]);
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .with_context(|| format!("cannot start {}", qemu.display()))?;
    Ok((Vm { child, name, log }, console, sock))
}

/// Waits until `path` contains `needle`, failing early if `vm` exits.
fn wait_console(path: &Path, needle: &str, vm: &mut Vm) -> anyhow::Result<()> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if std::fs::read_to_string(path).map(|s| s.contains(needle)).unwrap_or(false) {
            return Ok(());
        }
        vm.check_alive()?;
        if Instant::now() >= deadline {
            bail!("{needle:?} did not appear in {} within {TIMEOUT:?}", path.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A number from a `query-migrate` reply.
fn field(info: &Value, pointer: &str) -> anyhow::Result<f64> {
    info.pointer(pointer)
        .and_then(Value::as_f64)
        .with_context(|| format!("query-migrate has no {pointer}: {info}"))
}

/// One migration: starts source and destination, waits until the guest's workload runs on
/// the source, migrates, and checks the destination runs. Both QEMUs are killed on return.
pub fn one_run(qemu: &Path, dir: &Path, setup: &Setup<'_>) -> anyhow::Result<Run> {
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let (mut src, src_console, src_sock) = spawn(qemu, setup, dir, "src", None)?;
    let (mut dst, dst_console, dst_sock) = spawn(qemu, setup, dir, "dst", Some(port))?;
    let result = (|| {
        let mut src_qmp = Qmp::connect(&src_sock, &mut src).context("source QMP")?;
        let mut dst_qmp = Qmp::connect(&dst_sock, &mut dst).context("destination QMP")?;
        let status = dst_qmp.execute("query-status", None)?;
        anyhow::ensure!(
            status["status"] == "inmigrate",
            "destination is not waiting for a migration: {status}"
        );
        wait_console(&src_console, setup.ready, &mut src).context("source guest")?;
        if setup.dirtier {
            guestline::wait_warm(&src_console, TIMEOUT)?;
        }
        let bandwidth = if setup.bandwidth_mib == 0 { NO_BANDWIDTH_CAP } else { setup.bandwidth_mib << 20 };
        src_qmp.execute(
            "migrate-set-parameters",
            Some(json!({ "downtime-limit": setup.downtime_ms, "max-bandwidth": bandwidth })),
        )?;
        let caps: Vec<Value> = setup
            .caps
            .iter()
            .filter(|c| !c.is_empty())
            .map(|c| json!({ "capability": c, "state": true }))
            .collect();
        if !caps.is_empty() {
            let caps = json!({ "capabilities": caps });
            src_qmp.execute("migrate-set-capabilities", Some(caps.clone()))?;
            dst_qmp.execute("migrate-set-capabilities", Some(caps))?;
        }
        if setup.caps.iter().any(|c| c == "xbzrle") {
            src_qmp.execute("migrate-set-parameters", Some(json!({ "xbzrle-cache-size": XBZRLE_CACHE })))?;
        }
        let passes_before = crate::migrate::guest_passes(&src_console);
        let started = Instant::now();
        let before = guestline::lines(&src_console);
        src_qmp.execute("migrate", Some(json!({ "uri": format!("tcp:127.0.0.1:{port}") })))?;
        let deadline = Instant::now() + TIMEOUT;
        let info = loop {
            let info = src_qmp.execute("query-migrate", None)?;
            match info["status"].as_str().unwrap_or("") {
                "completed" => break info,
                "failed" | "cancelled" => bail!(
                    "QEMU migration {}: {}",
                    info["status"].as_str().unwrap_or(""),
                    info["error-desc"].as_str().unwrap_or("(no error description)")
                ),
                _ => {}
            }
            src.check_alive()?;
            dst.check_alive()?;
            if Instant::now() >= deadline {
                bail!("QEMU migration did not complete within {TIMEOUT:?}: {info}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // The destination resumes the guest by itself once the migration is in.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let status = dst_qmp.execute("query-status", None)?;
            if status["status"] == "running" {
                break;
            }
            if Instant::now() >= deadline {
                bail!("destination did not resume the guest after the migration: {status}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let took = started.elapsed().as_secs_f64();
        let passes = crate::migrate::guest_passes(&src_console) - passes_before;
        let guest_passes_per_s = if took > 0.0 { passes / took } else { 0.0 };
        let guest = if setup.dirtier {
            let during = guestline::lines(&src_console).get(before.len()..).unwrap_or_default().to_vec();
            let first = guestline::wait_line(&dst_console, 0, Duration::from_secs(10));
            Some(guestline::felt(&before, &during, first))
        } else {
            None
        };
        let dst_out = std::fs::read_to_string(&dst_console).unwrap_or_default();
        if let Some(line) = dst_out.lines().find(|l| l.contains("CORRUPTION")) {
            bail!("the guest on the QEMU destination: {line}");
        }
        Ok(Run {
            throttle_pct: info.pointer("/cpu-throttle-percentage").and_then(Value::as_f64).unwrap_or(0.0),
            guest,
            guest_passes_per_s,
            total_ms: field(&info, "/total-time")?,
            downtime_ms: field(&info, "/downtime")?,
            setup_ms: field(&info, "/setup-time")?,
            bytes: field(&info, "/ram/transferred")?,
            passes: field(&info, "/ram/dirty-sync-count")?,
        })
    })();
    drop(src);
    drop(dst);
    for p in [&src_sock, &dst_sock] {
        let _ = std::fs::remove_file(p);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qmp_skips_events_and_reports_errors() {
        let (a, b) = UnixStream::pair().expect("pair");
        let server = std::thread::spawn(move || {
            let mut r = BufReader::new(b.try_clone().expect("clone"));
            let mut w = b;
            let mut line = String::new();
            r.read_line(&mut line).expect("read");
            assert!(line.contains("query-status"));
            w.write_all(b"{\"event\":\"STOP\"}\n{\"return\":{\"status\":\"running\"}}\n").expect("write");
            line.clear();
            r.read_line(&mut line).expect("read");
            w.write_all(b"{\"error\":{\"class\":\"GenericError\",\"desc\":\"nope\"}}\n").expect("write");
        });
        let mut qmp = Qmp { reader: BufReader::new(a.try_clone().expect("clone")), writer: a };
        assert_eq!(qmp.execute("query-status", None).expect("status")["status"], "running");
        let err = qmp.execute("migrate", Some(json!({"uri": "tcp:x"}))).expect_err("error");
        assert!(err.to_string().contains("nope"), "{err}");
        server.join().expect("server");
    }
}
