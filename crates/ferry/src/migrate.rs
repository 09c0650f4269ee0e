//! `ferry migrate` and `ferry migrate-cancel`.

use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::bail;
use ferry_api::client::{events, send};
use ferry_api::{EventBody, MigrateRequest, MigrationPhase, MigrationReport, Request, Response, VmLocation};

use crate::cli::{MigrateArgs, SocketArgs};

const QUICK: Duration = Duration::from_secs(30);

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
        policy: args.policy,
        max_downtime_ms: args.max_downtime_ms,
        delta_cache_mib: args.delta_cache_mib,
        compress: args.compress,
        migration_id: None,
    };
    let socket = args.socket.api_socket.clone();
    let Response::MigrationStarted(started) = send(&socket, &Request::Migrate(request), QUICK)? else {
        bail!("the VMM answered a migrate request with something else");
    };
    // The ring may hold earlier migrations' events too: they are skipped by id. A stream
    // silent for longer than the migration's own limit means a VMM that hangs.
    let idle = Duration::from_secs(args.timeout_s.saturating_add(900));
    let report = follow(&socket, &started.migration_id, idle, !args.quiet)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report, args.verify);
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

/// Follows `GET /vm/events` until migration `id` reports, reconnecting (with `since`) when
/// the connection drops; prints a progress line per phase and pass.
fn follow(socket: &Path, id: &str, idle: Duration, show: bool) -> anyhow::Result<MigrationReport> {
    let mut since = 0;
    let tty = std::io::stderr().is_terminal();
    let mut last_phase = MigrationPhase::Setup;
    let mut printed = false;
    let mut failures = 0;
    loop {
        let mut stream = match events(socket, since, Some(idle)) {
            Ok(s) => s,
            Err(e) => {
                failures += 1;
                if failures > RECONNECTS {
                    return Err(went_away(socket, id, last_phase, e));
                }
                std::thread::sleep(RECONNECT_PAUSE);
                continue;
            }
        };
        loop {
            match stream.next_event() {
                Ok(Some(event)) => {
                    failures = 0;
                    since = event.seq;
                    if event.migration_id != id {
                        continue;
                    }
                    match event.body {
                        EventBody::Report { report } => {
                            if show && printed && tty {
                                eprintln!();
                            }
                            return Ok(*report);
                        }
                        EventBody::Phase { phase, .. } => last_phase = phase,
                        _ => {}
                    }
                    if show {
                        if let Some(line) = progress_line(id, &event.body, last_phase) {
                            if tty {
                                eprint!("\r\x1b[2K{line}");
                            } else {
                                eprintln!("{line}");
                            }
                            printed = true;
                        }
                    }
                }
                // The VMM ended the stream (it is exiting) without this migration's report.
                Ok(None) => break,
                Err(ferry_api::client::Error::Io { source, .. })
                    if matches!(
                        source.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    bail!(
                        "migration {id}: the source VMM sent nothing for {} s (its last phase was {}); \
                         it may hang: see `ferry info` and its log",
                        idle.as_secs(),
                        phase_word(last_phase)
                    );
                }
                Err(_) => break,
            }
        }
        // The report may be there already (a stream cut right after it).
        if let Ok(Response::MigrationStatus(m)) = send(socket, &Request::MigrationStatus, QUICK) {
            if m.migration_id == id {
                if let Some(report) = m.report {
                    return Ok(*report);
                }
            }
        }
        failures += 1;
        if failures > RECONNECTS {
            return Err(went_away(
                socket,
                id,
                last_phase,
                ferry_api::client::Error::Closed { path: socket.to_owned() },
            ));
        }
        std::thread::sleep(RECONNECT_PAUSE);
    }
}

/// Connection attempts in a row that may fail before the VMM is taken for gone.
const RECONNECTS: u32 = 10;
const RECONNECT_PAUSE: Duration = Duration::from_millis(300);

fn went_away(socket: &Path, id: &str, phase: MigrationPhase, e: ferry_api::client::Error) -> anyhow::Error {
    anyhow::anyhow!(
        "migration {id}: the source VMM went away (connection to {} closed: {e}); its last phase was {}; \
         if it reported, the outcome is in the VM's home under migrations/{id}.json",
        socket.display(),
        phase_word(phase)
    )
}

fn phase_word(p: MigrationPhase) -> String {
    match p {
        MigrationPhase::Setup => "setup".into(),
        MigrationPhase::PreCopy => "pre-copy".into(),
        MigrationPhase::StopAndCopy => "stop-and-copy".into(),
        MigrationPhase::Restoring => "destination restoring".into(),
        MigrationPhase::Committed => "committed, waiting for activation".into(),
        other => format!("{other:?}").to_lowercase(),
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

/// One progress line for an event, or none.
fn progress_line(id: &str, body: &EventBody, phase: MigrationPhase) -> Option<String> {
    match body {
        EventBody::Phase { phase, reason: None } => Some(format!("migration {id}: {}", phase_word(*phase))),
        EventBody::Phase { .. } => None,
        EventBody::Pass { stop_and_copy: true, pages, bytes, ms, .. } => Some(format!(
            "migration {id}: stop-and-copy: {pages} pages, {:.1} MiB in {ms:.1} ms",
            *bytes as f64 / MIB
        )),
        EventBody::Pass {
            pass,
            pages,
            dirtied,
            rate_mib_s,
            expected_downtime_ms,
            bytes_transferred,
            ms,
            throttle_percent,
            ..
        } => {
            let downtime = match expected_downtime_ms {
                Some(d) => format!("{d:.1} ms"),
                None => "\u{2014}".into(),
            };
            let throttle = match throttle_percent {
                0 => String::new(),
                t => format!(", vCPUs throttled {t}% from the next pass"),
            };
            Some(format!(
                "migration {id}: {} pass {pass}: {pages} pages in {ms:.1} ms, {dirtied} dirty, {rate_mib_s:.0} MiB/s, \
                 expected downtime {downtime}, {:.1} MiB sent{throttle}",
                phase_word(phase),
                *bytes_transferred as f64 / MIB
            ))
        }
        EventBody::Gap { missed_from, missed_to } => {
            Some(format!("migration {id}: (events {missed_from} to {missed_to} missed)"))
        }
        EventBody::Report { .. } => None,
        EventBody::Fenced { reason } => Some(format!("migration {id}: the VMM fenced itself: {reason}")),
    }
}

const MIB: f64 = (1u64 << 20) as f64;

fn print_report(r: &MigrationReport, verify: bool) {
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
        "time:        {:.1} ms total, setup {:.1} ms, downtime {:.2} ms{}",
        r.total_ms,
        r.setup_ms,
        r.downtime_ms,
        if verify && r.downtime_ms > 0.0 {
            " (includes --verify's memory hashing on both sides)"
        } else {
            ""
        }
    );
    println!(
        "sent:        {:.1} MiB, {} pages with data, {} zero pages as markers, first pass at {:.0} MiB/s",
        r.bytes_transferred as f64 / MIB,
        r.pages_sent,
        r.zero_pages,
        r.throughput_mb_s * 1e6 / MIB
    );
    if r.verified {
        println!("verified:    guest memory hashes agree on both sides");
    }
    if r.compressed {
        println!(
            "compressed:  {} pages in {:.1} MiB (LZ4)",
            r.compressed_pages,
            r.compressed_bytes as f64 / MIB
        );
    }
    if r.delta_cache_mib > 0 {
        println!(
            "delta:       {} pages sent as deltas ({:.1} KiB instead of {:.1} MiB; {} MiB cache)",
            r.delta_pages,
            r.delta_bytes as f64 / 1024.0,
            (r.delta_pages * 4096) as f64 / MIB,
            r.delta_cache_mib
        );
    }
    if let Some(policy) = r.policy {
        match (r.policy_steps.first(), r.policy_steps.last()) {
            (Some(first), Some(last)) => println!(
                "policy:      {policy}: stepped in {} time{} from pass {} (last: vCPUs throttled {}%, downtime limit {} ms)",
                r.policy_steps.len(),
                if r.policy_steps.len() == 1 { "" } else { "s" },
                first.after_pass,
                last.throttle_percent,
                last.downtime_limit_ms
            ),
            _ => println!("policy:      {policy} (pre-copy never stalled)"),
        }
    }
    for p in &r.passes {
        println!(
            "  pass {:>2}{}: {:>7} pages ({:>6} zero) {:>9.1} MiB in {:>8.1} ms; {} dirtied meanwhile{}",
            p.pass,
            if p.stop_and_copy { " (stop-and-copy)" } else { "" },
            p.pages,
            p.zero_pages,
            p.bytes as f64 / (1 << 20) as f64,
            p.ms,
            p.dirtied,
            if p.throttle_percent > 0 {
                format!("; vCPUs throttled {}%", p.throttle_percent)
            } else {
                String::new()
            }
        );
    }
}
