//! `ferry migrate` and `ferry migrate-cancel`.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use ferry_api::client::send;
use ferry_api::{
    MigrateRequest, MigrationInfo, MigrationPhase, MigrationReport, Request, Response, VmLocation,
};

use crate::cli::{MigrateArgs, SocketArgs};

const QUICK: Duration = Duration::from_secs(30);
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

pub fn migrate(args: MigrateArgs) -> anyhow::Result<ExitCode> {
    // The VMM reads the key file: give it a path that does not depend on our directory.
    let key = std::path::absolute(&args.auth_key_file)?;
    let request = MigrateRequest {
        to: args.to.clone(),
        auth_key_file: key,
        downtime_ms: args.downtime_ms,
        max_iterations: args.max_iterations,
        timeout_s: args.timeout_s,
        bandwidth_mib: args.bandwidth_mib,
        verify: args.verify,
        streams: args.streams,
        stall_timeout_s: args.stall_timeout_s,
    };
    let socket = args.socket.api_socket.clone();
    let done = Arc::new(AtomicBool::new(false));
    let progress = (!args.quiet).then(|| {
        let (socket, done) = (socket.clone(), done.clone());
        std::thread::spawn(move || show_progress(&socket, &done))
    });
    let wait = Duration::from_secs(args.timeout_s.saturating_add(900));
    let answer = send(&socket, &Request::Migrate(request), wait);
    done.store(true, Ordering::SeqCst);
    if let Some(p) = progress {
        // Woken at once: the report must not wait for the next progress tick.
        p.thread().unpark();
        let _ = p.join();
    }
    let Response::Migration(report) = answer? else {
        bail!("the VMM answered a migrate request with something else");
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    if report.vm_running_on == VmLocation::Destination {
        Ok(ExitCode::SUCCESS)
    } else {
        if !args.json {
            eprintln!(
                "ferry: error: migration {} {} ({}): {}",
                report.migration_id,
                status_word(&report),
                report.reason_code,
                report.reason
            );
        }
        Ok(ExitCode::FAILURE)
    }
}

pub fn cancel(args: SocketArgs) -> anyhow::Result<ExitCode> {
    send(&args.api_socket, &Request::MigrateCancel, QUICK)?;
    eprintln!("ferry: cancel requested; `ferry migrate` reports the outcome");
    Ok(ExitCode::SUCCESS)
}

fn status_word(r: &MigrationReport) -> &'static str {
    match r.status {
        MigrationPhase::Completed => "completed",
        MigrationPhase::Cancelled => "was cancelled",
        MigrationPhase::Lost => "LOST THE VM",
        _ => "failed",
    }
}

/// Polls `info` and prints a line whenever the migration moves on.
fn show_progress(socket: &std::path::Path, done: &AtomicBool) {
    let tty = std::io::stderr().is_terminal();
    let mut last = String::new();
    while !done.load(Ordering::SeqCst) {
        std::thread::park_timeout(PROGRESS_EVERY);
        if done.load(Ordering::SeqCst) {
            break;
        }
        let Ok(Response::Info(info)) = send(socket, &Request::Info, Duration::from_secs(2)) else {
            continue;
        };
        let Some(m) = info.migration else { continue };
        let line = progress_line(&m);
        if line != last {
            if tty {
                eprint!("\r\x1b[2K{line}");
            } else {
                eprintln!("{line}");
            }
            last = line;
        }
    }
    if tty && !last.is_empty() {
        eprintln!();
    }
}

fn progress_line(m: &MigrationInfo) -> String {
    let phase = match m.phase {
        MigrationPhase::Setup => "setting up".to_string(),
        MigrationPhase::PreCopy => format!("pre-copy pass {}", m.pass),
        MigrationPhase::StopAndCopy => "stop-and-copy".to_string(),
        MigrationPhase::Restoring => "destination restoring".to_string(),
        MigrationPhase::Committed => "committed, waiting for activation".to_string(),
        other => format!("{other:?}").to_lowercase(),
    };
    format!(
        "migration {}: {phase}: {} pages left, {} dirty, {:.0} MB/s, expected downtime {:.1} ms, {} MiB sent",
        m.migration_id,
        m.pages_left,
        m.pages_dirty,
        m.rate_mb_s,
        m.expected_downtime_ms,
        m.bytes_transferred >> 20
    )
}

fn print_report(r: &MigrationReport) {
    println!("migration:   {}", r.migration_id);
    println!("status:      {} (the VM runs on the {:?})", status_word(r), r.vm_running_on);
    println!("reason:      {} [{}]", r.reason, r.reason_code);
    println!(
        "destination: {} ({} stream{})",
        r.destination,
        r.streams,
        if r.streams == 1 { "" } else { "s" }
    );
    println!(
        "time:        {:.1} ms total, setup {:.1} ms, downtime {:.2} ms",
        r.total_ms, r.setup_ms, r.downtime_ms
    );
    println!(
        "sent:        {:.1} MiB, {} pages with data, {} zero pages as markers, first pass at {:.0} MB/s",
        r.bytes_transferred as f64 / (1 << 20) as f64,
        r.pages_sent,
        r.zero_pages,
        r.throughput_mb_s
    );
    if r.verified {
        println!("verified:    guest memory hashes agree on both sides");
    }
    for p in &r.passes {
        println!(
            "  pass {:>2}{}: {:>7} pages ({:>6} zero) {:>9.1} MiB in {:>8.1} ms; {} dirtied meanwhile",
            p.pass,
            if p.stop_and_copy { " (stop-and-copy)" } else { "" },
            p.pages,
            p.zero_pages,
            p.bytes as f64 / (1 << 20) as f64,
            p.ms,
            p.dirtied
        );
    }
}
