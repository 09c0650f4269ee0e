//! Convergence policies end to end: a guest that dirties its working set faster than a
//! capped link copies it stalls pre-copy; `give-up` stops at the third pass, `auto-converge`
//! throttles the vCPUs in steps until the dirty set shrinks (and the guest moves),
//! `raise-downtime` raises the limit until the stop-and-copy fits. However it ends, the guest
//! runs at full speed again.
//!
//! The guest: memstress rewriting a 1 MiB working set (256 pages) many times a second; the
//! link: 1 MiB/s, so each pass takes about a second and a stop-and-copy of the whole set
//! about a second, far above the limits asked for. Delta encoding and compression are off:
//! memstress changes a few bytes per page, which deltas (or LZ4) send in a few KiB per pass
//! (`delta.rs`); with them off every page costs 4 KiB, as a guest that rewrites whole pages
//! with random data does.

mod common;

use common::mig::{free_port, info, migrate, migrate_args, receiver, s, source, still_runs, write_key, T};
use common::{require_kvm, run_to_end, TempDir};
use serde_json::Value;

const GUEST: &[&str] = &["--memory", "64M", "--cmdline", "wss=1M"];

fn steps(report: &Value) -> Vec<(u64, u64, u64)> {
    report["policy_steps"]
        .as_array()
        .expect("policy_steps")
        .iter()
        .map(|s| {
            (
                s["after_pass"].as_u64().expect("after_pass"),
                s["throttle_percent"].as_u64().expect("throttle"),
                s["downtime_limit_ms"].as_u64().expect("limit"),
            )
        })
        .collect()
}

#[test]
fn give_up_stops_at_the_third_stalled_pass_and_the_vm_stays() {
    require_kvm();
    let dir = TempDir::new("conv-giveup");
    let key = write_key(&dir, "key", 41);
    let (mut src, sock) = source(&dir, GUEST);
    let port = free_port();
    let _dst = receiver(port, &key, None, &[]);
    let (out, r) = migrate(
        &sock,
        port,
        &key,
        &[
            "--delta-cache-mib",
            "0",
            "--compress",
            "off",
            "--bandwidth-mib",
            "1",
            "--downtime-ms",
            "50",
            "--policy",
            "give-up",
        ],
    );
    assert!(!out.status.success(), "{r}");
    assert_eq!(r["reason_code"], "no_convergence", "{r}");
    assert!(r["reason"].as_str().is_some_and(|s| s.contains("stalled")), "{r}");
    assert_eq!(r["policy"], "give-up");
    assert_eq!(r["passes"].as_array().map(Vec::len), Some(3), "a stall is found in three passes: {r}");
    assert!(steps(&r).is_empty(), "{r}");
    assert_eq!(r["vm_running_on"], "source");
    still_runs(&mut src, &sock);
}

#[test]
fn auto_converge_throttles_in_steps_until_the_guest_moves_or_gives_up_at_99() {
    require_kvm();
    let dir = TempDir::new("conv-auto");
    let key = write_key(&dir, "key", 42);
    let (mut src, sock) = source(&dir, GUEST);
    let port = free_port();
    let dst_sock = dir.path("dst.sock");
    let mut dst = receiver(port, &key, Some(&dst_sock), &[]);
    // The whole set costs ~1 s to copy; at the 99% step the guest usually leaves about half
    // of it. How much it leaves depends on how its few 10 ms slices fall in a pass, so both
    // endings are right: it moves, or the policy gives up at 99% and it stays, unthrottled.
    let (out, r) = migrate(
        &sock,
        port,
        &key,
        &["--delta-cache-mib", "0", "--compress", "off", "--bandwidth-mib", "1", "--downtime-ms", "900"],
    );
    assert_eq!(r["policy"], "auto-converge");
    let steps = steps(&r);
    assert!(!steps.is_empty(), "the policy never stepped in: {r}");
    assert_eq!(steps[0], (3, 20, 900), "20% after the third pass: {r}");
    let throttles: Vec<u64> = steps.iter().map(|s| s.1).collect();
    assert!(throttles.windows(2).all(|w| w[1] > w[0] && w[1] <= 99), "steps only go up: {throttles:?}");
    // Each pre-copy pass reports the throttle it ran under; the stop-and-copy none.
    let passes = r["passes"].as_array().expect("passes");
    assert!(passes.iter().any(|p| p["throttle_percent"].as_u64() > Some(0)), "{r}");
    if r["status"] == "completed" {
        assert!(out.status.success(), "{r}");
        assert_eq!(passes.last().map(|p| &p["throttle_percent"]), Some(&Value::from(0)));
        // The guest runs on, unthrottled, on the destination and finds all its memory intact.
        assert_eq!(info(&dst_sock)["state"], "running");
        still_runs(&mut dst, &dst_sock);
    } else {
        assert_eq!(r["reason_code"], "no_convergence", "{r}");
        assert!(r["reason"].as_str().is_some_and(|s| s.contains("throttled by 99%")), "{r}");
        assert_eq!(throttles.last(), Some(&99), "{r}");
        assert_eq!(info(&sock)["migration"]["throttle_percent"], 0);
        still_runs(&mut src, &sock);
    }
}

#[test]
fn raise_downtime_raises_the_limit_until_the_stop_and_copy_fits() {
    require_kvm();
    let dir = TempDir::new("conv-raise");
    let key = write_key(&dir, "key", 43);
    let (_src, sock) = source(&dir, GUEST);
    let port = free_port();
    let _dst = receiver(port, &key, None, &[]);
    // 256 pages at 1 MiB/s: about 1 s of stop-and-copy; reachable under a 2.5 s maximum.
    let (out, r) = migrate(
        &sock,
        port,
        &key,
        &[
            "--delta-cache-mib",
            "0",
            "--compress",
            "off",
            "--bandwidth-mib",
            "1",
            "--downtime-ms",
            "100",
            "--policy",
            "raise-downtime",
            "--max-downtime-ms",
            "2500",
        ],
    );
    assert!(out.status.success(), "{r}\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(r["status"], "completed", "{r}");
    let steps = steps(&r);
    assert!(!steps.is_empty(), "{r}");
    assert_eq!(steps[0], (3, 0, 700), "the first step is a quarter of the way to 2500 ms: {r}");
    assert!(steps.iter().all(|s| s.1 == 0), "raise-downtime never throttles: {r}");
    let limit = steps.last().map(|s| s.2).unwrap_or(0);
    assert!(r["downtime_ms"].as_f64().unwrap_or(f64::MAX) < limit as f64 + 500.0, "{r}");
}

#[test]
fn a_throttled_guest_that_gives_up_runs_at_full_speed_again() {
    require_kvm();
    let dir = TempDir::new("conv-reset");
    let key = write_key(&dir, "key", 44);
    let (mut src, sock) = source(&dir, GUEST);
    let port = free_port();
    let _dst = receiver(port, &key, None, &[]);
    // The pass budget runs out while auto-converge is still stepping up.
    let (out, r) = migrate(
        &sock,
        port,
        &key,
        &[
            "--delta-cache-mib",
            "0",
            "--compress",
            "off",
            "--bandwidth-mib",
            "1",
            "--downtime-ms",
            "50",
            "--max-iterations",
            "5",
        ],
    );
    assert!(!out.status.success(), "{r}");
    assert_eq!(r["reason_code"], "no_convergence", "{r}");
    assert!(!steps(&r).is_empty(), "{r}");
    let i = info(&sock);
    assert_eq!(i["migration"]["throttle_percent"], 0, "{i}");
    still_runs(&mut src, &sock);
}

/// A throttle never reaches a paused VM: a paused VM is not migrated at all (it could not
/// stall, and no policy may resume it), and a VM in pre-copy cannot be paused
/// (`cancel.rs`, `pause_before_the_state_is_taken_is_refused`). The refusal leaves the VM
/// paused where it is, unthrottled, with no migration begun and the destination unused.
#[test]
fn a_paused_vm_is_refused_before_any_policy_could_throttle_it() {
    require_kvm();
    let dir = TempDir::new("conv-paused");
    let key = write_key(&dir, "key", 45);
    let (mut src, sock) = source(&dir, GUEST);
    let port = free_port();
    let _dst = receiver(port, &key, None, &[]);
    let ok = |args: &[&str]| {
        let out = run_to_end(args, T);
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    ok(&["pause", "--api-socket", s(&sock)]);
    let to = format!("tcp:127.0.0.1:{port}");
    let extra = ["--bandwidth-mib", "1", "--downtime-ms", "50", "--policy", "auto-converge"];
    let out = run_to_end(&migrate_args(&sock, &to, &key, &extra), T);
    common::assert_one_line_error(&out, "the VM is paused; resume it before migrating");
    let i = info(&sock);
    assert_eq!(i["state"], "paused", "{i}");
    assert!(i["migration"].is_null(), "no migration may have begun: {i}");
    ok(&["resume", "--api-socket", s(&sock)]);
    still_runs(&mut src, &sock);
    // The destination was never used: it still takes a migration.
    let (out, r) = migrate(&sock, port, &key, &[]);
    assert!(out.status.success(), "{r}");
    assert_eq!(r["status"], "completed", "{r}");
}
