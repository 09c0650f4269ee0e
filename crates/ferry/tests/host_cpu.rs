//! The CPU check of migration by name, end to end with real VMMs on KVM: host B hides a CPU
//! feature F that host A's KVM offers (`[cpu] hide`), so a VM started on A with F is refused
//! by `--check` and by a real attempt (`cpu_features` naming F, nothing reserved on B, the
//! refusal in A's history and none in B's), while a VM started on A without F (vm.toml
//! `cpu_hide`, the per-VM baseline) migrates to B and runs there. Bad names for hidden
//! features are clear errors. Needs root and /dev/kvm.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::hostd::{two_hosts, wait_console, Hostd};
use common::{require_kvm, require_root, run_to_end};

const T: Duration = Duration::from_secs(20);

/// The `GET /vm` of a VM's VMM on `h`.
fn vmm_info(h: &Hostd, name: &str) -> serde_json::Value {
    let sock = h.dir.path("state").join("run").join(format!("{name}.sock"));
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["info", "--json", "--api-socket"])
        .arg(&sock)
        .output()
        .expect("ferry info");
    assert!(out.status.success(), "ferry info: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("info json")
}

fn names(v: &serde_json::Value) -> Vec<String> {
    v.as_array().into_iter().flatten().filter_map(|s| s.as_str().map(str::to_string)).collect()
}

/// Nothing of a reservation on `h`: no process started with its state directory's sockets
/// (a receiving VMM), no file in its run directory, no console of a migration in `home`.
fn nothing_reserved(h: &Hostd, home: &Path) {
    let run = h.dir.path("state").join("run");
    let run_s = run.to_string_lossy().to_string();
    let mut procs = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if text.contains(" receive ") && text.contains(&run_s) {
            procs.push(text);
        }
    }
    assert!(procs.is_empty(), "receivers left on {}: {procs:?}", h.url);
    let files: Vec<_> = std::fs::read_dir(&run).into_iter().flatten().flatten().map(|e| e.path()).collect();
    assert!(files.is_empty(), "files left in {}: {files:?}", run.display());
    let consoles: Vec<_> = std::fs::read_dir(home)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("console.m-"))
        .map(|e| e.path())
        .collect();
    assert!(consoles.is_empty(), "a receiver's console was made: {consoles:?}");
}

/// A feature this machine's KVM offers (so host A has it), preferring ones real guests use,
/// among those a guest can run without (not lm, nx, x2apic: KVM needs them in the guest's
/// CPUID for EFER.LME, EFER.NXE and x2APIC mode). This machine's KVM offers few: lahf_lm.
fn pick_feature() -> String {
    let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
    let host = kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES).expect("supported CPUID");
    let empty = kvm_bindings::CpuId::new(0).expect("empty table");
    let offered: Vec<String> = ferry_arch::cpuid::missing_features(host.as_slice(), &empty)
        .iter()
        .map(ToString::to_string)
        .collect();
    for f in ["avx2", "sse4.2", "popcnt", "ssse3", "sse3", "lahf_lm", "cx16"] {
        if offered.iter().any(|o| o == f) {
            return f.to_string();
        }
    }
    panic!("this host's KVM offers none of the usual features: {offered:?}");
}

#[test]
fn cpu_refusal_and_baseline() {
    require_kvm();
    require_root();
    // F: one A's KVM offers (A is this machine as it is).
    let probe = pick_feature();
    let f = probe.as_str();
    let (a, b) = two_hosts("cpu", &format!("[cpu]\nhide = [\"{f}\"]\n"));

    // B's inventory: F hidden, not offered; the CPU model beyond feature bits is there.
    let bi = b.host_info();
    assert!(!names(&bi["cpu"]["kvm"]["features"]).contains(&probe), "{}", bi["cpu"]);
    assert_eq!(names(&bi["cpu"]["kvm"]["hidden"]), vec![probe.clone()], "{}", bi["cpu"]);
    let model = &bi["cpu"]["kvm_model"];
    assert!(
        model["xsave_size"].as_u64().is_some() && !names(&model["kvm_capabilities"]).is_empty(),
        "{model}"
    );
    assert!(model["msrs"].as_array().is_some_and(|m| !m.is_empty()), "{model}");
    let text = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .env(ferry_pki::IDENTITY_ENV, &common::hostd::cluster().client)
        .args(["host", "info", "--host", &b.url])
        .output()
        .expect("ferry host info");
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains(&format!("cpu hidden:  {f} ([cpu] hide)")) && text.contains("cpu model:   XCR0 0x"),
        "{text}"
    );

    // A VM with F: its VMM says so, and the CPU model its state needs.
    a.create_memstress("m1", &[]);
    a.vm_json(&["start", "m1"]);
    let home1 = a.home("m1");
    wait_console(&home1, "memstress: pass ", T);
    let info = vmm_info(&a, "m1");
    assert!(names(&info["cpu_features"]).contains(&probe), "{info}");
    let need = &info["cpu_model"];
    assert!(need["msrs"].as_array().is_some_and(|m| !m.is_empty()), "{info}");
    assert!(names(&need["kvm_capabilities"]).iter().any(|c| c == "KVM_CAP_IRQCHIP"), "{info}");

    // --check: refused, F named, only the CPU reason, nothing reserved or recorded.
    let out = a.vm(&["migrate", "m1", "--to-host", &b.url, "--check", "--json"]);
    assert!(!out.status.success(), "a refused check fails");
    let c: serde_json::Value = serde_json::from_slice(&out.stdout).expect("checks json");
    assert_eq!(c["ok"], false, "{c}");
    let reasons = c["reasons"].as_array().expect("reasons");
    assert_eq!(reasons.len(), 1, "only the CPU differs: {c}");
    assert_eq!(reasons[0]["code"], "cpu_features", "{c}");
    assert!(reasons[0]["message"].as_str().is_some_and(|m| m.contains(f)), "{c}");
    nothing_reserved(&b, &home1);
    assert!(a.host_json(&["migrations"])["migrations"].as_array().is_some_and(Vec::is_empty));

    // A real attempt: refused the same way, recorded on A as refused with every reason, not
    // on B, nothing reserved on B, the VM runs on A as before.
    let out = a.vm(&["migrate", "m1", "--to-host", &b.url, "--json"]);
    assert!(!out.status.success(), "a refused migration fails");
    let c: serde_json::Value = serde_json::from_slice(&out.stdout).expect("checks json");
    assert_eq!(c["reasons"][0]["code"], "cpu_features", "{c}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("refused"), "{stderr}");
    nothing_reserved(&b, &home1);
    let failed = a.host_json(&["migrations", "--failed"]);
    let list = failed["migrations"].as_array().expect("list");
    assert_eq!(list.len(), 1, "{failed}");
    let r = &list[0];
    assert_eq!(
        (r["outcome"].as_str(), r["reason_code"].as_str()),
        (Some("refused"), Some("cpu_features")),
        "{r}"
    );
    assert_eq!(r["role"], "source", "{r}");
    assert_eq!(r["destination"], "test-cpu-b", "{r}");
    assert_eq!(r["reasons"], c["reasons"], "every reason is kept: {r}");
    let total = r["total_ms"].as_f64().expect("total_ms");
    assert!(total > 0.0 && r["ended_unix_ms"].as_u64() >= r["started_unix_ms"].as_u64(), "{r}");
    eprintln!("host_cpu: the refused migration's checks took {total:.1} ms");
    assert!(r["reason"].as_str().is_some_and(|m| m.contains(f)), "{r}");
    let id = r["id"].as_str().expect("id");
    assert!(stderr.contains(id), "the CLI names the record: {stderr}");
    assert!(
        b.host_json(&["migrations"])["migrations"].as_array().is_some_and(Vec::is_empty),
        "B recorded it"
    );
    // The text listing shows it too.
    let text = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .env(ferry_pki::IDENTITY_ENV, &common::hostd::cluster().client)
        .args(["host", "migrations", "--failed", "--host", &a.url])
        .output()
        .expect("ferry host migrations");
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains(id) && text.contains("refused"), "{text}");
    assert_eq!(a.vm_json(&["show", "m1"])["state"], "running");

    // The baseline: a VM started on A without F (vm.toml cpu_hide) migrates to B.
    let def = a.create_memstress("m2", &["--cpu-hide", f]);
    assert_eq!(names(&def["definition"]["cpu_hide"]), vec![probe.clone()], "{def}");
    a.vm_json(&["start", "m2"]);
    let home2 = a.home("m2");
    wait_console(&home2, "memstress: pass ", T);
    assert!(!names(&vmm_info(&a, "m2")["cpu_features"]).contains(&probe), "m2's guest does not see {f}");
    let t = std::time::Instant::now();
    let c = a.vm_json(&["migrate", "m2", "--to-host", &b.url, "--check"]);
    eprintln!(
        "host_cpu: `ferry vm migrate --check` that passes: {:.1} ms (CLI process included)",
        t.elapsed().as_secs_f64() * 1e3
    );
    assert_eq!(c["ok"], true, "{c}");
    let r = a.vm_json(&["migrate", "m2", "--to-host", &b.url]);
    assert_eq!(r["outcome"], "completed", "{r}\nsource log:\n{}", a.daemon_log());
    b.wait_state("m2", "running", T);
    std::fs::write(home2.join("console.log"), "").expect("truncate console");
    wait_console(&home2, "memstress: pass ", T);
    assert!(!names(&vmm_info(&b, "m2")["cpu_features"]).contains(&probe));
}

#[test]
fn bad_hidden_feature_names() {
    require_kvm();
    require_root();
    // The VMM.
    for cmd in [
        vec!["run", "--guest", "memstress", "--cpu-hide", "avx2,bogus"],
        vec!["receive", "--listen", "tcp:127.0.0.1:1", "--auth-key-file", "/dev/null", "--cpu-hide", "bogus"],
        vec!["restore", "--from", "/nonexistent", "--cpu-hide", "bogus"],
    ] {
        let out = run_to_end(&cmd, T);
        assert!(!out.status.success(), "{cmd:?}");
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(e.contains("unknown CPU feature \"bogus\"") && e.contains("avx2, "), "{cmd:?}: {e}");
        assert!(!e.contains("panicked"), "{e}");
    }
    // The daemon's configuration: the line and the field named, nothing started.
    let h = Hostd::config("cpu-bad", "[cpu]\nhide = [\"bogus\"]\n");
    let out = h.serve_to_end();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("cpu.hide") && e.contains("unknown CPU feature \"bogus\""), "{e}");
    // A VM's definition.
    let mut h = Hostd::config("cpu-badvm", "");
    h.start();
    let e =
        h.vm_fails(&["create", "x", "--datastore", "local", "--guest", "memstress", "--cpu-hide", "bogus"]);
    assert!(e.contains("unknown CPU feature \"bogus\""), "{e}");
    assert!(!h.home("x").exists(), "nothing half-created");
}

/// The XSAVE check end to end: B hides a feature whose XSAVE state A's KVM offers (AVX-512's,
/// else AVX's), so B's KVM offers fewer XCR0 components. A VM on A that may enable them is
/// refused with `xsave` (and `cpu_features` where A's KVM offers the feature bit itself);
/// a VM started on A with that feature hidden has neither and migrates.
#[test]
fn xsave_refusal_and_baseline() {
    require_kvm();
    require_root();
    let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
    let host = kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES).expect("supported CPUID");
    let d = ferry_arch::cpuid::find(&host, 0xd, 0).expect("KVM offers leaf 0xD");
    let f = if d.eax & 0xe0 != 0 {
        "avx512f"
    } else if d.eax & 0x4 != 0 {
        "avx"
    } else {
        panic!("this host's KVM offers no AVX state (XCR0 {:#x}): no XSAVE component to hide", d.eax)
    };
    let (a, b) = two_hosts("xsave", &format!("[cpu]\nhide = [\"{f}\"]\n"));
    let bx = b.host_info()["cpu"]["kvm_model"]["xcr0"].as_u64().expect("B's xcr0");

    a.create_memstress("x1", &[]);
    a.vm_json(&["start", "x1"]);
    let home1 = a.home("x1");
    wait_console(&home1, "memstress: pass ", T);
    let vx = vmm_info(&a, "x1")["cpu_model"]["xcr0"].as_u64().expect("the VM's xcr0");
    assert_ne!(vx & !bx, 0, "the VM's XCR0 {vx:#x} has components B's ({bx:#x}) lacks");
    let out = a.vm(&["migrate", "x1", "--to-host", &b.url, "--check", "--json"]);
    assert!(!out.status.success());
    let c: serde_json::Value = serde_json::from_slice(&out.stdout).expect("checks json");
    let codes: Vec<&str> =
        c["reasons"].as_array().expect("reasons").iter().filter_map(|r| r["code"].as_str()).collect();
    assert!(codes.contains(&"xsave"), "{c}");
    assert!(codes.iter().all(|c| *c == "xsave" || *c == "cpu_features"), "only the CPU differs: {c}");
    let msg = c["reasons"].as_array().into_iter().flatten().find(|r| r["code"] == "xsave").expect("xsave");
    assert!(
        msg["message"].as_str().is_some_and(|m| m.contains("XCR0") && m.contains("test-xsave-b")),
        "{msg}"
    );
    nothing_reserved(&b, &home1);

    a.create_memstress("x2", &["--cpu-hide", f]);
    a.vm_json(&["start", "x2"]);
    let home2 = a.home("x2");
    wait_console(&home2, "memstress: pass ", T);
    let vx2 = vmm_info(&a, "x2")["cpu_model"]["xcr0"].as_u64().expect("xcr0");
    assert_eq!(vx2 & !bx, 0, "hidden with {f}: XCR0 {vx2:#x}");
    let r = a.vm_json(&["migrate", "x2", "--to-host", &b.url]);
    assert_eq!(r["outcome"], "completed", "{r}\nsource log:\n{}", a.daemon_log());
    b.wait_state("x2", "running", T);
    std::fs::write(home2.join("console.log"), "").expect("truncate console");
    wait_console(&home2, "memstress: pass ", T);
}
