//! Helpers for Ferry's end-to-end tests: they start the real `ferry` binary on real KVM.
//! A test that needs KVM fails (never skips) when `/dev/kvm` is unusable.

#![allow(dead_code)]

pub mod controller;
pub mod faultproxy;
pub mod hostd;
pub mod leases;
pub mod mig;
pub mod overlap;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The `ferry` binary under test.
pub fn ferry() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ferry"));
    c.env_remove("FERRY_LOG");
    // Default VM homes go under a scratch state root, not /var/lib/ferry.
    c.env("FERRY_STATE_DIR", std::env::temp_dir().join("ferry-test-state"));
    c
}

/// Fails the test unless `/dev/kvm` can be opened read-write.
pub fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        panic!("this test needs read-write /dev/kvm and cannot run without it: {e}");
    }
}

/// Fails the test unless it runs as root.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!("this test needs root");
    }
}

/// A scratch directory removed at drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("ferry-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `ferry` with `args` to completion (at most `timeout`), returning its output.
pub fn run_to_end(args: &[&str], timeout: Duration) -> Output {
    run_cmd_to_end(ferry().args(args), timeout)
}

/// Runs `cmd` to completion (at most `timeout`), returning its output.
pub fn run_cmd_to_end(cmd: &mut Command, timeout: Duration) -> Output {
    let mut child =
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn ferry");
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let status = wait_timeout(&mut child, timeout).unwrap_or_else(|| {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{cmd:?} did not finish within {timeout:?}");
    });
    Output { status, stdout: t_out.join().expect("stdout"), stderr: t_err.join().expect("stderr") }
}

/// Waits for `child` at most `timeout`.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Asserts a run failed with exactly one line on stderr that contains `needle`, besides
/// INFO log lines (a leased VMM logs taking and giving back the lease of a VM it then
/// could not start).
pub fn assert_one_line_error(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, got {:?}; stderr: {stderr}", out.status);
    assert_ne!(out.status.code(), None, "killed by a signal: {stderr}");
    let info = |l: &str| l.starts_with(|c: char| c.is_ascii_digit()) && l.contains("Z  INFO ");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty() && !info(l)).collect();
    assert_eq!(lines.len(), 1, "expected one line on stderr, got:\n{stderr}");
    assert!(lines[0].contains(needle), "expected {needle:?} in: {}", lines[0]);
    assert!(!stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"), "{stderr}");
}

/// A `ferry` process whose serial console is piped to the test line by line.
pub struct Vm {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    pub seen: Vec<String>,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
    /// Names this VMM in panic messages (e.g. a fault-matrix cell and its side).
    pub ctx: String,
}

impl Vm {
    /// Starts `ferry run` with `args` (console on stdout).
    pub fn start(args: &[&str]) -> Self {
        Self::spawn(ferry().arg("run").args(args))
    }

    /// Starts any `ferry` command whose stdout carries a guest console.
    pub fn spawn(cmd: &mut Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ferry");
        let out = child.stdout.take().expect("stdout");
        let err = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let s = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                let mut s = s.lock().expect("stderr lock");
                s.push_str(&line);
                s.push('\n');
            }
        });
        Vm { child, lines: rx, seen: Vec::new(), stderr, ctx: String::new() }
    }

    /// Waits until the VMM's stderr contains `needle`; returns all of stderr.
    pub fn wait_stderr(&self, timeout: Duration, needle: &str) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.stderr();
            if s.contains(needle) {
                return s;
            }
            if Instant::now() >= deadline {
                panic!("{}no {needle:?} on the VMM's stderr within {timeout:?}; stderr:\n{s}", self.ctx);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What the VMM wrote on stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().expect("stderr lock").clone()
    }

    /// Waits for a console line satisfying `pred`; panics with the console so far on
    /// timeout or if the guest reports CORRUPTION.
    pub fn wait_line(&mut self, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left.min(Duration::from_millis(200))) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    assert!(!line.contains("CORRUPTION"), "{}guest reported: {line}", self.ctx);
                    if pred(&line) {
                        return line;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    panic!(
                        "{}console closed before the expected line; console:\n{}\nstderr:\n{}",
                        self.ctx,
                        self.seen.join("\n"),
                        self.stderr()
                    );
                }
            }
            if Instant::now() >= deadline {
                panic!(
                    "{}no expected console line within {timeout:?}; console:\n{}\nstderr:\n{}",
                    self.ctx,
                    self.seen.join("\n"),
                    self.stderr()
                );
            }
        }
    }

    /// Waits for a line starting with `prefix`.
    pub fn wait_prefix(&mut self, timeout: Duration, prefix: &str) -> String {
        self.wait_line(timeout, |l| l.starts_with(prefix))
    }

    /// Sends `signal` and waits for the exit status.
    pub fn signal_and_wait(&mut self, signal: i32, timeout: Duration) -> ExitStatus {
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(self.child.id() as i32, signal) };
        self.wait(timeout)
    }

    /// Waits for the process to end.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        match wait_timeout(&mut self.child, timeout) {
            Some(s) => s,
            None => {
                let _ = self.child.kill();
                panic!("{}ferry did not exit within {timeout:?}; stderr:\n{}", self.ctx, self.stderr());
            }
        }
    }

    /// Drains the console lines that arrived so far.
    pub fn drain(&mut self) {
        while let Ok(line) = self.lines.try_recv() {
            assert!(!line.contains("CORRUPTION"), "{}guest reported: {line}", self.ctx);
            self.seen.push(line);
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The pass number in a `memstress: pass N` line (also `memstress: pass N: page ...`).
pub fn pass_number(line: &str) -> Option<u64> {
    let rest = line.strip_prefix("memstress: pass ")?;
    rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

/// Writes `size` bytes of deterministic pseudo-random data to `path`.
pub fn write_random_file(path: &Path, size: u64, seed: u64) {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).expect("create"));
    let mut x = seed | 1;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        for chunk in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let b = x.to_le_bytes();
            chunk.copy_from_slice(&b[..chunk.len()]);
        }
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n]).expect("write");
        left -= n as u64;
    }
    f.flush().expect("flush");
}

/// memstress's initrd checksum: the wrapping sum of the u64 at the start of each page.
pub fn initrd_sum(path: &Path) -> u64 {
    let data = std::fs::read(path).expect("read initrd");
    let mut sum = 0u64;
    let mut k = 0usize;
    while k * 4096 + 8 <= data.len() {
        let mut w = [0u8; 8];
        w.copy_from_slice(&data[k * 4096..k * 4096 + 8]);
        sum = sum.wrapping_add(u64::from_le_bytes(w));
        k += 1;
    }
    sum
}

/// A process's peak resident memory (`VmHWM` in `/proc/PID/status`), in bytes.
pub fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status");
    kib << 10
}
