//! Boot time: from spawning `ferry run` to the guest's first instruction.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;

use crate::stats::Summary;

/// Arguments of the boot benchmark.
#[derive(Debug, clap::Args)]
pub struct BootArgs {
    /// Runs per memory size.
    #[arg(long, default_value_t = 11)]
    runs: usize,
    /// Memory sizes to measure.
    #[arg(long, value_delimiter = ',', default_value = "256M,2G")]
    memory: Vec<String>,
}

#[derive(Debug, Serialize)]
struct Row {
    memory: String,
    /// From spawn to the guest's first instruction, in ms.
    spawn_to_first_instruction_ms: Summary,
    /// From ferry's main() to the guest's first instruction, in ms.
    main_to_first_instruction_ms: Summary,
}

/// One run: spawn, wait for the boot timer's log line, stop the VM.
fn one(ferry: &Path, memory: &str) -> anyhow::Result<(f64, f64)> {
    let t0 = ferry_vmm::monotonic_ns();
    let mut child = Command::new(ferry)
        .args(["run", "--guest", "memstress", "--memory", memory, "--serial", "null", "--cmdline", "wss=1M"])
        .env("FERRY_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start ferry")?;
    let stderr = child.stderr.take().context("no stderr")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut found = None;
    for line in BufReader::new(stderr).lines() {
        let line = line?;
        if !line.contains("boot timer") {
            continue;
        }
        if let Some(rest) = line.split("monotonic_ns=").nth(1) {
            let at: u64 = rest.split(|c: char| !c.is_ascii_digit()).next().unwrap_or("").parse()?;
            let after_main: f64 = line
                .split("ran ")
                .nth(1)
                .and_then(|s| s.split(" ms").next())
                .and_then(|s| s.parse().ok())
                .context("boot timer line without the time after start")?;
            found = Some(((at.saturating_sub(t0)) as f64 / 1e6, after_main));
            break;
        }
        if Instant::now() > deadline {
            break;
        }
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait()?;
    match found {
        Some(f) if status.success() => Ok(f),
        Some(_) => bail!("ferry exited with {status} after boot"),
        None => bail!("ferry never reported the guest's first instruction (exit {status})"),
    }
}

/// Runs the benchmark and prints the table (or JSON).
pub fn run(ferry: &Path, args: &BootArgs, json: bool) -> anyhow::Result<()> {
    anyhow::ensure!(args.runs > 0, "--runs must be at least 1");
    let mut rows = Vec::new();
    for memory in &args.memory {
        // One warm-up run so the binary and guest image are in the page cache.
        one(ferry, memory)?;
        let mut spawn = Vec::new();
        let mut main = Vec::new();
        for _ in 0..args.runs {
            let (s, m) = one(ferry, memory)?;
            spawn.push(s);
            main.push(m);
        }
        rows.push(Row {
            memory: memory.clone(),
            spawn_to_first_instruction_ms: Summary::of(&spawn),
            main_to_first_instruction_ms: Summary::of(&main),
        });
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!(
            "boot: time to the guest's first instruction (memstress, {} runs each; target < 20 ms)",
            args.runs
        );
        println!("{:>8}  {:>26}  {:>26}", "memory", "spawn->first insn (ms)", "main()->first insn (ms)");
        for r in &rows {
            let f = |s: &Summary| format!("{:.2} [{:.2}..{:.2}]", s.median, s.min, s.max);
            println!(
                "{:>8}  {:>26}  {:>26}",
                r.memory,
                f(&r.spawn_to_first_instruction_ms),
                f(&r.main_to_first_instruction_ms)
            );
        }
        println!("(median [min..max])");
    }
    Ok(())
}
