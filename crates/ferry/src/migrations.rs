//! `ferry migrations`: the cluster's migrations through the controller: the list (queued,
//! running with live progress, ended), one migration with its per-pass statistics and
//! events, cancel, and a live follower (also what `ferry cluster migrate` prints while it
//! waits). `ferry cluster migrations` and `ferry cluster migration ID` are the same code.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use ferry_cluster_api::{paths, MigrationDetail, MigrationList};
use ferry_host_api::{MigrationOutcome, MigrationRecord};

use crate::cluster::ServerTarget;

/// The long help of `ferry migrations`.
pub const MIGRATIONS_ABOUT: &str = "\
The cluster's live migrations, from the controller: queued ones with their place, running
ones with their live progress (the source host's figures, which the controller follows every
0.5 s), and the history of those that ended.

STATE is `queued N` (waiting for a slot: at most [limits] per_host migrations leave a host
and per_host arrive at one, per_cluster in the cluster; the rest wait in FIFO order),
`running pass K`, `completed`, `failed`, `refused` (by the checks), `cancelled` or `unknown`
(both hosts stopped answering while it ran: its slot is freed, and the hosts' records settle
it when they answer again; `watch` waits for that). PROGRESS is
the share of the guest's memory not waiting to be sent in the current pass; ETA and
EXP.DOWNTIME are the source VMM's estimates during pre-copy; OUTCOME is the reason code.

`watch ID` follows one migration until it ends (Ctrl-C detaches: the migration goes on;
`cancel ID` cancels it). `cancel ID` takes a queued migration out of the queue, or asks the
source host to cancel a running one before its commit (the VM keeps running on the source,
the destination releases what it reserved); it waits for the end.

The controller is found as for `ferry cluster` (--server, $FERRY_SERVER, cli.toml).

Examples:
  ferry migrations                      # every migration, newest first
  ferry migrations --active             # running ones, with progress and ETA
  ferry migrations --queued             # waiting ones, with their position
  ferry migrations --vm web1 --json
  ferry migrations show m-3f2a9c0d11e4  # per-pass statistics and events
  ferry migrations watch m-3f2a9c0d11e4 # live progress until it ends
  ferry migrations cancel m-3f2a9c0d11e4";

/// `ferry migrations [FILTERS] [--json]`, or one of its subcommands.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct MigrationsArgs {
    /// show, cancel or watch one migration; none: the list.
    #[command(subcommand)]
    pub action: Option<MigrationsAction>,
    #[command(flatten)]
    pub list: ListArgs,
}

/// `ferry migrations show|cancel|watch ID`.
#[derive(Debug, Subcommand)]
pub enum MigrationsAction {
    /// One migration: its record, per-pass statistics and the controller's events.
    Show(IdArgs),
    /// Cancel a migration: a queued one leaves the queue; a running one is cancelled by its
    /// source host before its commit (the VM stays there). Waits for the end.
    Cancel(IdArgs),
    /// Follow a migration with live progress until it ends (Ctrl-C detaches; it goes on).
    Watch(IdArgs),
}

/// Arguments naming one migration.
#[derive(Debug, Args)]
pub struct IdArgs {
    /// The migration's id (`ferry migrations` lists them).
    pub id: String,
    #[command(flatten)]
    pub target: ServerTarget,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// The list's filters.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only those running.
    #[arg(long, conflicts_with_all = ["failed", "queued", "cancelled", "unknown"])]
    pub active: bool,
    /// Only failed ones (refused by the checks included).
    #[arg(long, conflicts_with_all = ["queued", "cancelled"])]
    pub failed: bool,
    /// Only those waiting in the queue.
    #[arg(long, conflicts_with = "cancelled")]
    pub queued: bool,
    /// Only cancelled ones.
    #[arg(long, conflicts_with = "unknown")]
    pub cancelled: bool,
    /// Only those whose hosts both stopped answering while they ran (outcome `unknown`,
    /// reason `host_lost`; settled from the hosts' records when they answer again).
    #[arg(long, conflicts_with_all = ["failed", "queued"])]
    pub unknown: bool,
    /// Only this VM's.
    #[arg(long, value_name = "NAME")]
    pub vm: Option<String>,
    /// Only those from or to this host.
    #[arg(long, value_name = "HOST")]
    pub host: Option<String>,
    #[command(flatten)]
    pub target: ServerTarget,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `ferry migrations ...`.
pub fn run(args: MigrationsArgs) -> anyhow::Result<ExitCode> {
    match args.action {
        None => list(args.list),
        Some(MigrationsAction::Show(a)) => show(a),
        Some(MigrationsAction::Cancel(a)) => cancel(a),
        Some(MigrationsAction::Watch(a)) => {
            let ctl = a.target.connect()?;
            follow(&ctl, &a.id, a.json)
        }
    }
}

/// A migration's state in words: `queued N`, `running pass K`, or how it ended.
pub fn state(r: &MigrationRecord) -> String {
    match r.outcome {
        MigrationOutcome::Queued => match r.queue_position {
            Some(p) => format!("queued {p}"),
            None => "queued".into(),
        },
        MigrationOutcome::Active => match r.progress.as_ref().map(|p| p.pass) {
            Some(k) if k > 0 => format!("running pass {k}"),
            _ => "running".into(),
        },
        other => other.as_str().to_string(),
    }
}

/// The record as JSON with its `state` added.
fn json_row(r: &MigrationRecord) -> anyhow::Result<serde_json::Value> {
    let mut v = serde_json::to_value(r)?;
    if let Some(o) = v.as_object_mut() {
        o.insert("state".into(), serde_json::Value::String(state(r)));
    }
    Ok(v)
}

/// `ferry migrations [FILTERS]` (and `ferry cluster migrations`).
pub fn list(args: ListArgs) -> anyhow::Result<ExitCode> {
    let mut query = Vec::new();
    for (on, word) in [
        (args.active, "active"),
        (args.failed, "failed"),
        (args.queued, "queued"),
        (args.cancelled, "cancelled"),
        (args.unknown, "unknown"),
    ] {
        if on {
            query.push(word.to_string());
        }
    }
    if let Some(v) = &args.vm {
        query.push(format!("vm={v}"));
    }
    if let Some(h) = &args.host {
        query.push(format!("host={h}"));
    }
    let path = if query.is_empty() {
        paths::MIGRATIONS.to_string()
    } else {
        format!("{}?{}", paths::MIGRATIONS, query.join("&"))
    };
    let list: MigrationList = args.target.connect()?.get(&path)?;
    if args.json {
        let rows = list.migrations.iter().map(json_row).collect::<anyhow::Result<Vec<_>>>()?;
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "migrations": rows }))?);
    } else {
        print_list(&list.migrations);
    }
    Ok(ExitCode::SUCCESS)
}

fn ms_text(ms: Option<f64>) -> String {
    match ms {
        Some(m) if m >= 10_000.0 => format!("{:.0}s", m / 1000.0),
        Some(m) if m >= 1000.0 => format!("{:.1}s", m / 1000.0),
        Some(m) => format!("{m:.0}ms"),
        None => "-".into(),
    }
}

fn bytes_text(b: Option<u64>) -> String {
    match b {
        Some(b) if b >= 1 << 30 => format!("{:.1}G", b as f64 / (1u64 << 30) as f64),
        Some(b) if b >= 1 << 20 => format!("{:.1}M", b as f64 / (1u64 << 20) as f64),
        Some(b) if b >= 1 << 10 => format!("{:.0}K", b as f64 / 1024.0),
        Some(b) => format!("{b}"),
        None => "-".into(),
    }
}

fn print_list(list: &[MigrationRecord]) {
    println!(
        "{:<16} {:<12} {:<14} {:<14} {:<15} {:>8} {:>7} {:>9} {:<22} {:>9} {:>8} {:>7} {:>6}",
        "ID",
        "VM",
        "SOURCE",
        "DESTINATION",
        "STATE",
        "PROGRESS",
        "ETA",
        "EXP.DOWN",
        "OUTCOME",
        "DOWNTIME",
        "TOTAL",
        "BYTES",
        "PASSES"
    );
    for r in list {
        let p = r.progress.as_ref().filter(|_| r.outcome == MigrationOutcome::Active);
        let passes = r.passes.as_ref().and_then(|p| p.as_array()).map(Vec::len);
        let outcome = match r.outcome {
            MigrationOutcome::Active | MigrationOutcome::Queued => "-".to_string(),
            _ => r.reason_code.clone(),
        };
        println!(
            "{:<16} {:<12} {:<14} {:<14} {:<15} {:>8} {:>7} {:>9} {:<22} {:>9} {:>8} {:>7} {:>6}",
            r.id,
            r.vm,
            r.source,
            r.destination,
            state(r),
            p.and_then(|p| p.percent).map_or("-".into(), |x| format!("{x:.0}%")),
            ms_text(p.and_then(|p| p.eta_ms)),
            ms_text(p.map(|p| p.expected_downtime_ms).filter(|d| *d > 0.0)),
            outcome,
            ms_text(r.downtime_ms),
            ms_text(r.total_ms),
            bytes_text(r.bytes.or(p.map(|p| p.bytes_transferred))),
            passes.map_or("-".into(), |n| n.to_string())
        );
    }
}

/// `ferry migrations show ID` (and `ferry cluster migration ID`).
pub fn show(args: IdArgs) -> anyhow::Result<ExitCode> {
    let m: MigrationDetail = args.target.connect()?.get(&paths::migration(&args.id))?;
    print_detail(&m, args.json)?;
    Ok(ExitCode::SUCCESS)
}

/// Prints a migration (with --json: the API's detail with the record's `state` added).
pub fn print_detail(m: &MigrationDetail, json: bool) -> anyhow::Result<()> {
    if json {
        let mut v = serde_json::to_value(m)?;
        v["record"] = json_row(&m.record)?;
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let r = &m.record;
    println!("migration:  {}", r.id);
    println!("vm:         {} from {} to {}", r.vm, r.source, r.destination);
    println!("state:      {}", state(r));
    if r.outcome != MigrationOutcome::Active && r.outcome != MigrationOutcome::Queued {
        println!(
            "outcome:    {} ({}){}",
            r.outcome.as_str(),
            r.reason_code,
            if r.reason.is_empty() { String::new() } else { format!(": {}", r.reason) }
        );
    } else if !r.reason.is_empty() {
        println!("waits for:  {}", r.reason);
    }
    if let Some(p) = r.progress.as_ref().filter(|_| r.outcome == MigrationOutcome::Active) {
        println!("progress:   {}", progress_line(p));
    }
    for r in &r.reasons {
        println!("reason:     {}: {}", r.code.as_str(), r.message);
    }
    if let Some(d) = r.downtime_ms {
        println!("downtime:   {d:.1} ms");
    }
    if let Some(t) = r.total_ms {
        println!("total:      {t:.1} ms");
    }
    if let Some(b) = r.bytes {
        println!("bytes:      {b}");
    }
    if let Some(passes) = r.passes.as_ref().and_then(|p| p.as_array()) {
        println!("passes:");
        println!(
            "  {:>4} {:>9} {:>8} {:>10} {:>9} {:>9} {:>8}",
            "PASS", "PAGES", "ZERO", "BYTES", "MS", "DIRTIED", "THROTTLE"
        );
        for (i, p) in passes.iter().enumerate() {
            let n =
                |k: &str| p.get(k).and_then(serde_json::Value::as_u64).map_or("-".into(), |v| v.to_string());
            let f = |k: &str| {
                p.get(k).and_then(serde_json::Value::as_f64).map_or("-".into(), |v| format!("{v:.1}"))
            };
            println!(
                "  {:>4} {:>9} {:>8} {:>10} {:>9} {:>9} {:>7}%{}",
                p.get("pass").and_then(serde_json::Value::as_u64).unwrap_or(i as u64 + 1),
                n("pages"),
                n("zero_pages"),
                n("bytes"),
                f("ms"),
                n("dirtied"),
                n("throttle_percent"),
                if p.get("stop_and_copy").and_then(serde_json::Value::as_bool) == Some(true) {
                    "  stop-and-copy"
                } else {
                    ""
                }
            );
        }
    }
    println!("events:");
    for e in &m.events {
        println!("  {:>3} {} {}: {}", e.seq, e.at_unix_ms, e.kind, e.message);
    }
    Ok(())
}

fn progress_line(p: &ferry_host_api::MigrationProgress) -> String {
    let mut parts = vec![format!("pass {}", p.pass)];
    if !p.phase.is_empty() {
        parts.push(p.phase.clone());
    }
    if let Some(x) = p.percent {
        parts.push(format!("{x:.0}%"));
    }
    parts.push(format!("{} pages left", p.pages_left));
    if p.rate_mib_s > 0.0 {
        parts.push(format!("{:.1} MiB/s", p.rate_mib_s));
    }
    if let Some(e) = p.eta_ms {
        parts.push(format!("ETA {}", ms_text(Some(e))));
    }
    if p.expected_downtime_ms > 0.0 {
        parts.push(format!("expected downtime {}", ms_text(Some(p.expected_downtime_ms))));
    }
    parts.push(format!("{} sent", bytes_text(Some(p.bytes_transferred))));
    parts.join(", ")
}

/// `ferry migrations cancel ID`.
pub fn cancel(args: IdArgs) -> anyhow::Result<ExitCode> {
    let ctl = args.target.connect()?;
    let m: MigrationDetail = ctl.post(&paths::cancel_migration(&args.id), &serde_json::Value::Null)?;
    print_detail(&m, args.json)?;
    Ok(if m.record.outcome == MigrationOutcome::Cancelled { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// Follows migration `id` every 0.5 s until it ends: progress lines on stderr (`queued,
/// position N`, then the passes with percent, rate, ETA and expected downtime), then the
/// report on stdout. Success if it completed.
pub fn follow(ctl: &crate::cluster::Controller, id: &str, json: bool) -> anyhow::Result<ExitCode> {
    eprintln!("migration {id}: following it (Ctrl-C detaches, the migration goes on; `ferry migrations cancel {id}` cancels it)");
    let deadline = Instant::now() + Duration::from_secs(3600);
    let mut last = String::new();
    let mut failures = 0u32;
    let detail = loop {
        match ctl.get::<MigrationDetail>(&paths::migration(id)) {
            Ok(d) => {
                failures = 0;
                let r = &d.record;
                let line = match r.outcome {
                    MigrationOutcome::Queued => format!(
                        "queued, position {}{}",
                        r.queue_position.map_or("?".into(), |p| p.to_string()),
                        if r.reason.is_empty() { String::new() } else { format!(" ({})", r.reason) }
                    ),
                    MigrationOutcome::Active => match &r.progress {
                        Some(p) => format!("running: {}", progress_line(p)),
                        None => "running".into(),
                    },
                    // Not an end: the hosts decide once they answer again.
                    MigrationOutcome::Unknown => format!(
                        "unknown: neither host answers ({}); waiting for them to say how it ended",
                        r.reason_code
                    ),
                    _ => break d,
                };
                if line != last {
                    eprintln!("migration {id}: {line}");
                    last = line;
                }
            }
            // A mistyped id fails at once; later, a few failed reads in a row are waited out.
            Err(e) if last.is_empty() || failures >= 10 => return Err(e),
            Err(e) => {
                failures += 1;
                eprintln!("migration {id}: cannot ask the controller ({e:#}); trying again");
            }
        }
        if Instant::now() >= deadline {
            anyhow::bail!("migration {id} did not end within an hour (it may still be running)");
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    print_detail(&detail, json)?;
    Ok(if detail.record.outcome == MigrationOutcome::Completed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
