//! Checkpoints on real KVM: snapshot a running memstress, restore it in a new process,
//! suspend and resume, and every bad input (each with a clear error, nothing started, the
//! checkpoint untouched, a failed snapshot leaving the VM running).
//!
//! Every VM runs under its lease on the shared test datastore (`common::leases`): it is
//! started on host A and restored on host B, as a cold migration between hosts.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::mig::{on_a, on_b};
use common::{
    assert_one_line_error, ferry, pass_number, require_kvm, run_cmd_to_end, run_to_end, TempDir, Vm,
};

const T: Duration = Duration::from_secs(30);

/// Starts memstress with an API socket in `dir`.
fn start_vm(dir: &TempDir, memory: &str, cmdline: &str) -> (Vm, PathBuf) {
    let sock = dir.path("vm.sock");
    let vm = Vm::spawn(on_a(ferry().arg("run").args([
        "--guest",
        "memstress",
        "--memory",
        memory,
        "--cmdline",
        cmdline,
        "--api-socket",
        sock.to_str().expect("utf8"),
    ])));
    // The VMM binds its API once the vCPUs run: the guest may print before it is there
    // (one CI run connected first and found no socket).
    let deadline = std::time::Instant::now() + T;
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the VMM's API socket {} never answered",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (vm, sock)
}

fn ctl(args: &[&str]) -> std::process::Output {
    run_to_end(args, T)
}

fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "command failed: {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn snapshot(sock: &Path, to: &Path, stop: bool) -> serde_json::Value {
    let mut args = vec![
        "snapshot",
        "--api-socket",
        sock.to_str().expect("utf8"),
        "--to",
        to.to_str().expect("utf8"),
        "--json",
    ];
    if stop {
        args.push("--stop");
    }
    serde_json::from_str(&ok(&ctl(&args))).expect("snapshot report is JSON")
}

fn info(sock: &Path) -> serde_json::Value {
    serde_json::from_str(&ok(&ctl(&["info", "--api-socket", sock.to_str().expect("utf8"), "--json"])))
        .expect("JSON")
}

/// Waits for the last pass line so far and returns its number.
fn current_pass(vm: &mut Vm) -> u64 {
    let line = vm.wait_prefix(Duration::from_secs(10), "memstress: pass ");
    vm.drain();
    let last = vm.seen.iter().rev().find_map(|l| pass_number(l));
    last.or_else(|| pass_number(&line)).expect("pass number")
}

/// Restores `dir` and checks memstress continues from after `at_least` (by fewer than
/// `within` passes) and keeps verifying its stamps for several passes.
fn restore_and_check_continues(dir: &Path, at_least: u64, within: u64) -> Vm {
    let mut vm = Vm::spawn(on_b(ferry().args(["restore", "--from", dir.to_str().expect("utf8")])));
    let first = pass_number(&vm.wait_prefix(Duration::from_secs(10), "memstress: pass ")).expect("pass");
    assert!(
        first > at_least,
        "restored guest is at pass {first}, expected more than {at_least}: it restarted?"
    );
    assert!(first < at_least + within, "restored guest jumped to pass {first} from {at_least}");
    // Each further pass checks every page's stamp from the one before.
    let target = first + 4;
    loop {
        let n = pass_number(&vm.wait_prefix(Duration::from_secs(10), "memstress: pass ")).expect("pass");
        if n >= target {
            break;
        }
    }
    vm
}

#[test]
fn snapshot_running_vm_then_restore_continues() {
    require_kvm();
    let dir = TempDir::new("ckpt-run");
    let (mut vm, sock) = start_vm(&dir, "256M", "wss=16M");
    vm.wait_line(Duration::from_secs(10), |l| l == "memstress: ready");
    let before = current_pass(&mut vm);
    let snap = dir.path("snap");
    let report = snapshot(&sock, &snap, false);
    assert_eq!(report["stopped"], false);
    assert!(report["memory_written_bytes"].as_u64().expect("bytes") >= 16 << 20);
    // The VM goes on after the snapshot.
    let after = current_pass(&mut vm);
    assert_eq!(info(&sock)["state"], "running");
    assert!(vm.signal_and_wait(libc::SIGTERM, Duration::from_secs(5)).success());
    let _ = after;

    let mut restored = restore_and_check_continues(&snap, before, 100);
    assert!(restored.signal_and_wait(libc::SIGTERM, Duration::from_secs(5)).success());
}

#[test]
fn suspend_then_resume() {
    require_kvm();
    let dir = TempDir::new("ckpt-stop");
    let (mut vm, sock) = start_vm(&dir, "128M", "wss=8M");
    vm.wait_line(Duration::from_secs(10), |l| l == "memstress: ready");
    current_pass(&mut vm);
    let snap = dir.path("suspended");
    let report = snapshot(&sock, &snap, true);
    assert_eq!(report["stopped"], true);
    // The VMM exits by itself, cleanly, and prints nothing more.
    let status = vm.wait(Duration::from_secs(10));
    assert!(status.success(), "{status:?}: {}", vm.stderr());
    vm.drain();
    let last = vm.seen.iter().rev().find_map(|l| pass_number(l)).expect("passes before suspend");
    assert!(!sock.exists(), "the API socket is removed when the VM ends");

    // Restore in a new process (the cold migration case), with an API socket of its own.
    let sock2 = dir.path("vm2.sock");
    let mut restored = Vm::spawn(on_b(ferry().args([
        "restore",
        "--from",
        snap.to_str().expect("utf8"),
        "--api-socket",
        sock2.to_str().expect("utf8"),
    ])));
    let first =
        pass_number(&restored.wait_prefix(Duration::from_secs(10), "memstress: pass ")).expect("pass");
    assert!(first > last && first < last + 100, "suspended at pass {last}, resumed at {first}");
    for _ in 0..4 {
        restored.wait_prefix(Duration::from_secs(10), "memstress: pass ");
    }
    let i = info(&sock2);
    assert_eq!(i["state"], "running");
    assert_eq!(i["restored_from"], snap.to_str().expect("utf8"));
    assert!(restored.signal_and_wait(libc::SIGTERM, Duration::from_secs(5)).success());
}

#[test]
fn pause_resume_and_info() {
    require_kvm();
    let dir = TempDir::new("ckpt-pause");
    let (mut vm, sock) = start_vm(&dir, "64M", "wss=4M");
    vm.wait_line(Duration::from_secs(10), |l| l == "memstress: ready");
    let s = sock.to_str().expect("utf8");
    let i = info(&sock);
    assert_eq!(
        (i["state"].as_str(), i["memory_bytes"].as_u64(), i["vcpus"].as_u64()),
        (Some("running"), Some(64 << 20), Some(1))
    );
    let text = ok(&ctl(&["info", "--api-socket", s]));
    assert!(text.contains("state:    running") && text.contains("64 MiB"), "{text}");

    ok(&ctl(&["pause", "--api-socket", s]));
    assert_eq!(info(&sock)["state"], "paused");
    // A paused guest prints nothing.
    vm.drain();
    std::thread::sleep(Duration::from_millis(1500));
    let seen = vm.seen.len();
    vm.drain();
    assert_eq!(vm.seen.len(), seen, "the guest ran while paused: {:?}", &vm.seen[seen..]);
    // Pausing again is refused; so is resuming a running VM.
    assert_one_line_error(&ctl(&["pause", "--api-socket", s]), "the VM is already paused");
    ok(&ctl(&["resume", "--api-socket", s]));
    vm.wait_prefix(Duration::from_secs(10), "memstress: pass ");
    assert_one_line_error(&ctl(&["resume", "--api-socket", s]), "the VM is not paused");
    assert!(vm.signal_and_wait(libc::SIGTERM, Duration::from_secs(5)).success());
}

#[test]
fn snapshot_of_a_paused_vm_stays_paused() {
    require_kvm();
    let dir = TempDir::new("ckpt-paused");
    let (mut vm, sock) = start_vm(&dir, "64M", "wss=4M");
    vm.wait_line(Duration::from_secs(10), |l| l == "memstress: ready");
    let s = sock.to_str().expect("utf8");
    ok(&ctl(&["pause", "--api-socket", s]));
    let report = snapshot(&sock, &dir.path("snap"), false);
    assert_eq!(report["paused_ms"], 0.0);
    assert_eq!(info(&sock)["state"], "paused");
    assert!(vm.signal_and_wait(libc::SIGTERM, Duration::from_secs(5)).success());
}

/// Hashes every file of a checkpoint, to prove a failed restore left it untouched.
fn digest(dir: &Path) -> Vec<(String, u64, u32)> {
    let mut out = Vec::new();
    let mut entries: Vec<_> =
        std::fs::read_dir(dir).expect("read dir").map(|e| e.expect("entry").path()).collect();
    entries.sort();
    for p in entries {
        let data = std::fs::read(&p).expect("read");
        let mut h: u32 = 0x811c9dc5;
        for b in &data {
            h = (h ^ u32::from(*b)).wrapping_mul(0x0100_0193);
        }
        out.push((p.file_name().expect("name").to_string_lossy().into_owned(), data.len() as u64, h));
    }
    out
}

/// Makes a small checkpoint to damage.
fn small_checkpoint(dir: &TempDir) -> PathBuf {
    let (mut vm, sock) = start_vm(dir, "32M", "wss=1M");
    vm.wait_line(Duration::from_secs(10), |l| l == "memstress: ready");
    let snap = dir.path("good");
    snapshot(&sock, &snap, true);
    assert!(vm.wait(Duration::from_secs(10)).success());
    snap
}

/// The named CPU features vCPU 0 of a checkpoint was given.
fn info_features_of(dir: &Path) -> Vec<String> {
    let bytes = std::fs::read(dir.join("state.ferry")).expect("state");
    let state: serde_json::Value = serde_json::from_slice(&bytes[32..]).expect("state JSON");
    let table: Vec<ferry_arch::state::CpuidEntry> =
        serde_json::from_value(state["vcpus"][0]["cpuid"].clone()).expect("cpuid entries");
    let entries: Vec<kvm_bindings::kvm_cpuid_entry2> = table.iter().map(Into::into).collect();
    let empty = kvm_bindings::CpuId::new(0).expect("empty table");
    ferry_arch::cpuid::missing_features(&entries, &empty).iter().map(ToString::to_string).collect()
}

fn copy_checkpoint(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for f in ["state.ferry", "memory.bin"] {
        std::fs::copy(from.join(f), to.join(f)).expect("copy");
    }
}

fn restore_fails(dir: &Path, needle: &str) {
    let before = if dir.is_dir() { digest(dir) } else { Vec::new() };
    let out = run_cmd_to_end(
        on_b(ferry().args(["restore", "--from", dir.to_str().expect("utf8"), "--serial", "null"])),
        T,
    );
    assert_one_line_error(&out, needle);
    if dir.is_dir() {
        assert_eq!(digest(dir), before, "a failed restore changed the checkpoint");
    }
}

/// Rewrites a checkpoint's state through JSON (with a valid header and checksum).
fn edit_state(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("state.ferry");
    let bytes = std::fs::read(&path).expect("read");
    let mut v: serde_json::Value = serde_json::from_slice(&bytes[32..]).expect("payload");
    edit(&mut v);
    let payload = serde_json::to_vec(&v).expect("json");
    let mut out = bytes[..32].to_vec();
    out[16..24].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    out[24..28].copy_from_slice(&crc32(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    std::fs::write(&path, out).expect("write");
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

#[test]
fn bad_checkpoints_are_refused_and_left_untouched() {
    require_kvm();
    let dir = TempDir::new("ckpt-bad");
    let good = small_checkpoint(&dir);

    restore_fails(&dir.path("missing"), "does not exist");
    let file = dir.path("a-file");
    std::fs::write(&file, b"x").expect("write");
    restore_fails(&file, "is not a directory");

    let case = |name: &str| {
        let d = dir.path(name);
        copy_checkpoint(&good, &d);
        d
    };
    let d = case("magic");
    let mut b = std::fs::read(d.join("state.ferry")).expect("read");
    b[0] = b'X';
    std::fs::write(d.join("state.ferry"), &b).expect("write");
    restore_fails(&d, "not a Ferry checkpoint state file (wrong magic)");

    let d = case("version");
    let mut b = std::fs::read(d.join("state.ferry")).expect("read");
    b[8..12].copy_from_slice(&99u32.to_le_bytes());
    std::fs::write(d.join("state.ferry"), &b).expect("write");
    restore_fails(&d, "has format version 99; this Ferry reads versions up to 1");

    let d = case("checksum");
    let mut b = std::fs::read(d.join("state.ferry")).expect("read");
    let mid = b.len() / 2;
    b[mid] ^= 0x01;
    std::fs::write(d.join("state.ferry"), &b).expect("write");
    restore_fails(&d, "is corrupt: checksum");

    let d = case("truncated");
    let b = std::fs::read(d.join("state.ferry")).expect("read");
    std::fs::write(d.join("state.ferry"), &b[..b.len() - 100]).expect("write");
    restore_fails(&d, "is truncated");

    let d = case("nostate");
    std::fs::remove_file(d.join("state.ferry")).expect("rm");
    restore_fails(&d, "cannot open");

    let d = case("shortmem");
    let f = std::fs::OpenOptions::new().write(true).open(d.join("memory.bin")).expect("open");
    f.set_len(8 << 20).expect("truncate");
    drop(f);
    restore_fails(&d, "holds 8388608 bytes but the checkpoint's memory is 33554432 bytes");

    let d = case("cpu");
    edit_state(&d, |v| {
        for vcpu in v["vcpus"].as_array_mut().expect("vcpus") {
            for e in vcpu["cpuid"].as_array_mut().expect("cpuid") {
                if e["leaf"] == 7 && e["subleaf"] == 0 {
                    e["edx"] = (e["edx"].as_u64().expect("edx") | (1 << 24)).into();
                }
            }
        }
    });
    restore_fails(&d, "this host's CPU lacks features the checkpointed guest was given: amx-tile");

    let d = case("inconsistent");
    edit_state(&d, |v| v["description"]["vcpus"] = 3.into());
    restore_fails(&d, "inconsistent");

    // A host that hides a feature the guest was given (`--cpu-hide`, a host daemon's
    // `[cpu] hide`) refuses it as a host without it would.
    let given = info_features_of(&good);
    let hidden = ["lahf_lm", "cx16", "sse3"].into_iter().find(|f| given.iter().any(|g| g == f));
    let hidden = hidden.unwrap_or_else(|| panic!("the guest has none of the features to hide: {given:?}"));
    let before = digest(&good);
    let out = run_cmd_to_end(
        on_b(ferry().args([
            "restore",
            "--from",
            good.to_str().expect("utf8"),
            "--serial",
            "null",
            "--cpu-hide",
            hidden,
        ])),
        T,
    );
    assert_one_line_error(&out, &format!("lacks features the checkpointed guest was given: {hidden}"));
    assert_eq!(digest(&good), before, "a failed restore changed the checkpoint");

    // A TSC rate KVM cannot give the vCPU (half this host's, without TSC scaling): the
    // restore fails cleanly instead of running the guest's clock at the wrong rate.
    let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
    if kvm.check_extension(kvm_ioctls::Cap::TscControl) {
        eprintln!("this host scales TSCs: the failing TSC restore is not provoked");
    } else {
        let d = case("tsc");
        edit_state(&d, |v| {
            for vcpu in v["vcpus"].as_array_mut().expect("vcpus") {
                let khz = vcpu["tsc_khz"].as_u64().expect("tsc_khz saved");
                vcpu["tsc_khz"] = (khz / 2).into();
            }
        });
        restore_fails(&d, "KVM cannot set the vCPU's TSC frequency to the VM's");
    }

    // The good one still restores after all that.
    let mut vm = restore_and_check_continues(&good, 0, u64::MAX / 2);
    assert!(vm.signal_and_wait(libc::SIGTERM, Duration::from_secs(5)).success());
}

#[test]
fn bad_snapshot_targets_leave_the_vm_running() {
    require_kvm();
    let dir = TempDir::new("ckpt-target");
    let (mut vm, sock) = start_vm(&dir, "64M", "wss=4M");
    vm.wait_line(Duration::from_secs(10), |l| l == "memstress: ready");
    let s = sock.to_str().expect("utf8");

    let full = dir.path("full");
    std::fs::create_dir_all(&full).expect("mkdir");
    std::fs::write(full.join("keep.txt"), b"mine").expect("write");
    assert_one_line_error(
        &ctl(&["snapshot", "--api-socket", s, "--to", full.to_str().expect("utf8")]),
        "exists and is not empty",
    );
    assert_eq!(std::fs::read(full.join("keep.txt")).expect("kept"), b"mine");

    let file = dir.path("file");
    std::fs::write(&file, b"x").expect("write");
    assert_one_line_error(
        &ctl(&["snapshot", "--api-socket", s, "--to", file.to_str().expect("utf8")]),
        "is not a directory",
    );
    assert_one_line_error(
        &ctl(&["snapshot", "--api-socket", s, "--to", "/proc/ferry-cannot-write-here"]),
        "cannot be written",
    );

    // Still running, still correct.
    assert_eq!(info(&sock)["state"], "running");
    let n = current_pass(&mut vm);
    let m = pass_number(&vm.wait_prefix(Duration::from_secs(10), "memstress: pass ")).expect("pass");
    assert!(m > n);
    assert!(vm.signal_and_wait(libc::SIGTERM, Duration::from_secs(5)).success());
}

#[test]
fn commands_against_no_vm_fail_clearly() {
    let dir = TempDir::new("ckpt-novm");
    let sock = dir.path("nothing.sock");
    let s = sock.to_str().expect("utf8");
    for cmd in [
        vec!["pause", "--api-socket", s],
        vec!["info", "--api-socket", s],
        vec!["snapshot", "--api-socket", s, "--to", "/tmp/x"],
    ] {
        assert_one_line_error(&ctl(&cmd), "cannot connect to the VMM's API socket");
    }
}

/// Sends raw HTTP to the API socket and returns (status, body).
fn raw_http(sock: &Path, request: &str) -> (u16, String) {
    let mut s = std::os::unix::net::UnixStream::connect(sock).expect("connect");
    s.set_read_timeout(Some(T)).expect("timeout");
    s.write_all(request.as_bytes()).expect("send");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    let status = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).expect("status");
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

#[test]
fn wrong_api_requests_get_4xx_and_the_vm_survives() {
    require_kvm();
    let dir = TempDir::new("ckpt-api");
    let (mut vm, sock) = start_vm(&dir, "64M", "wss=4M");
    vm.wait_line(Duration::from_secs(10), |l| l == "memstress: ready");
    let cases = [
        ("GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 404),
        ("POST /vm HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n", 405),
        (
            "PUT /vm/snapshot HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: 9\r\n\r\n{\"to\": 1}",
            400,
        ),
        (
            "PUT /vm/snapshot HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: 5\r\n\r\n{oops",
            400,
        ),
        (
            "PUT /vm/snapshot HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: 27\r\n\r\n{\"to\":\"/tmp/a\",\"bogus\":true}",
            400,
        ),
        (
            "PUT /vm/snapshot HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: 17\r\n\r\n{\"to\":\"relative\"}",
            400,
        ),
        (
            "PUT /vm/pause HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 7\r\n\r\ngarbage",
            400,
        ),
        ("DELETE /vm/pause HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 405),
        ("this is not http\r\n\r\n", 400),
    ];
    for (req, want) in cases {
        let (status, body) = raw_http(&sock, req);
        assert_eq!(status, want, "for {req:?}: {body}");
        if !req.starts_with("this") {
            let v: serde_json::Value =
                serde_json::from_str(&body).unwrap_or_else(|_| panic!("JSON error body for {req:?}: {body}"));
            assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{body}");
        }
    }
    // None of them paused the VM or wrote anything.
    assert_eq!(info(&sock)["state"], "running");
    assert!(!Path::new("relative").exists());
    assert!(vm.signal_and_wait(libc::SIGTERM, Duration::from_secs(5)).success());
}

#[test]
fn committed_fixture_from_format_version_1_restores() {
    require_kvm();
    // Written by Ferry's format version 1 (scripts/make-fixture.sh) and committed: later
    // versions must keep restoring it.
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/checkpoint-v1");
    let dir = TempDir::new("fixture");
    // Work on copies: git checkouts are not sparse and the fixture must stay pristine.
    let (as_is, fitted) = (dir.path("as-is"), dir.path("fitted"));
    copy_checkpoint(&fixture, &as_is);
    copy_checkpoint(&fixture, &fitted);
    let state = std::fs::read(as_is.join("state.ferry")).expect("fixture state");
    assert_eq!(&state[..8], b"FERRYCKP");
    assert_eq!(u32::from_le_bytes([state[8], state[9], state[10], state[11]]), 1);
    // The fixture was made on one machine; this one may have another CPU (another vendor,
    // another generation, another TSC frequency). Where it lacks features the guest was
    // given, the checkpoint as it is must be refused, naming them; a copy with its CPUID
    // masked to this host (what a CPU baseline does) and its TSC frequency this host's (a
    // host without TSC scaling cannot run a guest whose TSC ran more than 250 ppm apart:
    // the fixture's 2,596,122 kHz against, say, 2,600,000) must restore. The file stays
    // format version 1.
    let cleared = fit_cpuid_to_host(&fitted.join("state.ferry"));
    if !cleared.is_empty() {
        restore_fails(&as_is, "this host's CPU lacks features the checkpointed guest was given");
    }
    // The fixture was suspended after its console showed pass 3 (scripts/make-fixture.sh).
    let mut vm = restore_and_check_continues(&fitted, 3, 100_000);
    assert!(vm.signal_and_wait(libc::SIGTERM, Duration::from_secs(5)).success());
}

/// Masks every vCPU's CPUID in a format-version-1 state file to this host's features, sets
/// its TSC frequency to this host's (KVM's default for a new vCPU; none if KVM cannot say)
/// and rewrites it (same format version, new checksum). Returns the features cleared.
fn fit_cpuid_to_host(state_file: &Path) -> Vec<String> {
    let bytes = std::fs::read(state_file).expect("state");
    let mut state: serde_json::Value = serde_json::from_slice(&bytes[32..]).expect("state JSON");
    let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
    let host = kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES).expect("supported CPUID");
    let host_tsc_khz =
        kvm.create_vm().ok().and_then(|vm| vm.create_vcpu(0).ok()).and_then(|v| v.get_tsc_khz().ok());
    let mut cleared = Vec::new();
    for vcpu in state["vcpus"].as_array_mut().expect("vcpus") {
        vcpu["tsc_khz"] = serde_json::json!(host_tsc_khz);
        let table: Vec<ferry_arch::state::CpuidEntry> =
            serde_json::from_value(vcpu["cpuid"].take()).expect("cpuid entries");
        let mut entries: Vec<kvm_bindings::kvm_cpuid_entry2> = table.iter().map(Into::into).collect();
        cleared.extend(ferry_arch::cpuid::mask_to_host(&mut entries, &host).iter().map(|f| f.to_string()));
        let table: Vec<ferry_arch::state::CpuidEntry> = entries.iter().map(Into::into).collect();
        vcpu["cpuid"] = serde_json::to_value(table).expect("cpuid JSON");
    }
    let payload = serde_json::to_vec(&state).expect("JSON");
    let mut out = bytes[..32].to_vec();
    out[16..24].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    out[24..28].copy_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    std::fs::write(state_file, out).expect("write state");
    cleared
}
