//! Commands that act on a running VM through its API socket.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::bail;
use ferry_api::client::send;
use ferry_api::{Request, Response, SnapshotRequest};

use crate::cli::{HomeArgs, InfoArgs, SnapshotArgs, SocketArgs};

const QUICK: Duration = Duration::from_secs(30);
/// A snapshot writes all of guest memory.
const SLOW: Duration = Duration::from_secs(900);

pub fn info(args: InfoArgs) -> anyhow::Result<ExitCode> {
    let Response::Info(info) = send(&args.socket.api_socket, &Request::Info, QUICK)? else {
        bail!("the VMM answered an info request with something else");
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        let state = serde_json::to_value(info.state)?;
        println!("state:    {}", state.as_str().unwrap_or("?"));
        if let Some(r) = &info.receiving {
            let phase = serde_json::to_value(r.phase)?;
            println!("phase:    {}", phase.as_str().unwrap_or("?"));
            if let Some(l) = &r.listen {
                println!("listen:   {l}");
            }
            if let Some(id) = &r.migration_id {
                println!("incoming: {id}, {} pages, {:.1} MiB", r.pages, r.bytes as f64 / (1 << 20) as f64);
            }
            return Ok(ExitCode::SUCCESS);
        }
        println!("kernel:   {}", info.kernel);
        println!("memory:   {} MiB", info.memory_bytes >> 20);
        println!("vcpus:    {}", info.vcpus);
        println!("uptime:   {:.1} s", info.uptime_ms as f64 / 1000.0);
        println!("pid:      {}", info.pid);
        if let Some(home) = &info.home {
            println!("home:     {}", home.display());
        }
        if let Some(from) = info.restored_from {
            println!("restored: from {}", from.display());
        }
        for d in &info.devices {
            let mut line = format!("device:   {} irq {} on {}", d.name, d.gsi, d.backend);
            if d.readonly == Some(true) {
                line.push_str(", read-only");
            }
            if let Some(locked) = d.locked {
                line.push_str(if locked { ", locked" } else { ", NOT locked" });
            }
            if let Some(mac) = &d.mac {
                line.push_str(&format!(", mac {mac}"));
            }
            if let Some(s) = &d.stats {
                line.push_str(&format!(
                    ", rx {} frames ({} dropped), tx {} frames ({} dropped)",
                    s.rx_frames, s.rx_dropped, s.tx_frames, s.tx_dropped
                ));
            }
            println!("{line}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn pause(args: SocketArgs) -> anyhow::Result<ExitCode> {
    send(&args.api_socket, &Request::Pause, QUICK)?;
    Ok(ExitCode::SUCCESS)
}

pub fn resume(args: SocketArgs) -> anyhow::Result<ExitCode> {
    send(&args.api_socket, &Request::Resume, QUICK)?;
    Ok(ExitCode::SUCCESS)
}

pub fn snapshot(args: SnapshotArgs) -> anyhow::Result<ExitCode> {
    // Relative paths mean the caller's directory, not the VMM's.
    let to = std::path::absolute(&args.to)?;
    if !args.json && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        eprintln!("ferry: writing a checkpoint to {}...", to.display());
    }
    let request = Request::Snapshot(SnapshotRequest { to, stop: args.stop });
    let Response::Snapshot(report) = send(&args.socket.api_socket, &request, SLOW)? else {
        bail!("the VMM answered a snapshot request with something else");
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("checkpoint: {}", report.path.display());
        println!(
            "memory:     {} MiB guest, {} MiB written, {} zero pages skipped",
            report.memory_bytes >> 20,
            report.memory_written_bytes >> 20,
            report.zero_pages
        );
        println!(
            "on disk:    {:.1} MiB (state file {} KiB)",
            report.disk_bytes as f64 / (1 << 20) as f64,
            report.state_bytes >> 10
        );
        println!("time:       {:.1} ms total, vCPUs paused {:.1} ms", report.total_ms, report.paused_ms);
        println!(
            "VM:         {}",
            if report.stopped { "suspended (its VMM has exited)" } else { "running as before" }
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `ferry home DIR`: the home's identity, generation and lock holder.
pub fn home(args: HomeArgs) -> anyhow::Result<ExitCode> {
    let status = ferry_vmm::home::status(&args.dir)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("home:       {}", status.home.display());
    match &status.generation {
        Some(g) => {
            println!("vm:         {}", g.vm_uuid);
            println!("generation: {}", g.generation);
        }
        None => println!("vm:         none (not a VM home yet)"),
    }
    let since = |ms: u64| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        format!("{:.1} s ago", now.saturating_sub(ms) as f64 / 1e3)
    };
    match (&status.lock, status.locked) {
        (Some(l), true) => println!("lock:       held by {l}, since {}", since(l.since_unix_ms)),
        (Some(l), false) if l.held => {
            println!("lock:       free; the last holder ({l}) ended without releasing it (it died)")
        }
        (Some(l), false) => println!("lock:       free; released by its last holder ({l})"),
        (None, true) => println!("lock:       held (holder unknown)"),
        (None, false) => println!("lock:       free"),
    }
    if let Some(l) = &status.lease {
        match l.owner_host_id {
            Some(id) => {
                // The name is the lock record's, when it names the same host id.
                let name = status
                    .lock
                    .as_ref()
                    .filter(|r| r.lease.as_ref().map(|x| x.host_id) == Some(id))
                    .map(|r| format!(" ({})", r.host))
                    .unwrap_or_default();
                println!(
                    "lease:      held by host id {id}{name}, host generation {}, lockspace {}, lease version {}",
                    l.owner_generation.unwrap_or(0),
                    l.lockspace,
                    l.lver
                );
                if let Some(t) = l.renewed_monotonic_s {
                    println!(
                        "            last renewal at {t} s of the owner's monotonic clock (this host's: {} s)",
                        ferry_lease::monotonic_secs()
                    );
                }
            }
            None => println!("lease:      free (lockspace {}, lease version {})", l.lockspace, l.lver),
        }
    }
    if let Some(e) = &status.lease_error {
        println!("lease:      cannot be read here: {e}");
    }
    Ok(ExitCode::SUCCESS)
}
