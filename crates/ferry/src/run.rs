//! `ferry run` and `ferry guests`.

use std::process::ExitCode;

use anyhow::{bail, Context};
use ferry_vmm::migration::{Error as MigrationError, ReceiveConfig};
use ferry_vmm::{KernelSource, RestoreConfig, RunOutcome, VmConfig, Vmm};

use crate::cli::{GuestsArgs, ReceiveArgs, RestoreArgs, RunArgs};

pub fn run(args: RunArgs, started_ns: u64) -> anyhow::Result<ExitCode> {
    let kernel = match (&args.kernel, &args.guest) {
        (Some(path), None) => KernelSource::File(path.clone()),
        (None, Some(name)) => match ferry_guests::find(name) {
            Some(g) => KernelSource::Embedded { name: g.name.to_string(), elf: g.elf },
            None => {
                let names: Vec<&str> = ferry_guests::all().iter().map(|g| g.name).collect();
                bail!("unknown guest {name:?}; the bundled guests are: {}", names.join(", "));
            }
        },
        _ => bail!("give exactly one of --kernel or --guest"),
    };
    if let Some(path) = &args.kernel {
        if !path.exists() {
            bail!("kernel {} does not exist", path.display());
        }
        if path.is_dir() {
            bail!("kernel {} is a directory, not an ELF file", path.display());
        }
    }
    if let Some(path) = &args.initrd {
        if !path.exists() {
            bail!("initrd {} does not exist", path.display());
        }
        if path.is_dir() {
            bail!("initrd {} is a directory, not a file", path.display());
        }
    }
    let config = VmConfig {
        memory: args.memory,
        vcpus: args.cpus,
        kernel,
        cmdline: args.cmdline,
        initrd: args.initrd,
        serial: args.serial,
        started_ns,
        api_socket: args.api_socket,
        home: args.home,
        state_dir: state_dir(),
        disks: args.disks,
        nets: args.nets,
    };
    let vmm = Vmm::build(config).context("cannot start the VM")?;
    crate::logfile::open(vmm.home());
    finish(vmm.run()?)
}

pub fn restore(args: RestoreArgs, started_ns: u64) -> anyhow::Result<ExitCode> {
    let config = RestoreConfig {
        from: args.from.clone(),
        serial: args.serial,
        api_socket: args.api_socket,
        home: args.home,
        state_dir: state_dir(),
        started_ns,
        tap_map: args.tap_map,
        revert: args.revert,
    };
    let vmm = Vmm::restore(config).with_context(|| format!("cannot restore from {}", args.from.display()))?;
    crate::logfile::open(vmm.home());
    finish(vmm.run()?)
}

pub fn receive(args: ReceiveArgs, started_ns: u64) -> anyhow::Result<ExitCode> {
    let config = ReceiveConfig {
        listen: args.listen.clone(),
        auth_key_file: args.auth_key_file,
        serial: args.serial,
        api_socket: args.api_socket,
        home: args.home,
        started_ns,
        tap_map: args.tap_map,
        deadline: (args.deadline_s > 0).then(|| std::time::Duration::from_secs(args.deadline_s)),
    };
    let vmm = match Vmm::receive(config) {
        Ok(v) => v,
        // Stopped while waiting: nothing was received, nothing runs; not an error.
        Err(ferry_vmm::Error::Migration(e)) if matches!(*e, MigrationError::Interrupted(_)) => {
            return Ok(ExitCode::SUCCESS)
        }
        Err(e) => return Err(anyhow::Error::new(e).context(format!("cannot receive on {}", args.listen))),
    };
    crate::logfile::open(vmm.home());
    finish(vmm.run()?)
}

/// Where default VM homes go: `$FERRY_STATE_DIR`, or /var/lib/ferry.
fn state_dir() -> std::path::PathBuf {
    std::env::var_os("FERRY_STATE_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| ferry_vmm::home::DEFAULT_STATE_DIR.into())
}

fn finish(outcome: RunOutcome) -> anyhow::Result<ExitCode> {
    match outcome {
        RunOutcome::PowerOff | RunOutcome::Signalled(_) | RunOutcome::Suspended | RunOutcome::Migrated => {
            Ok(ExitCode::SUCCESS)
        }
    }
}

pub fn guests(args: GuestsArgs) -> anyhow::Result<ExitCode> {
    let guests = ferry_guests::all();
    if args.json {
        let list: Vec<serde_json::Value> = guests
            .iter()
            .map(|g| {
                serde_json::json!({
                    "name": g.name,
                    "summary": g.summary,
                    "cmdline": g.cmdline_help,
                    "elf_bytes": g.elf.len(),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else {
        for g in guests {
            println!("{}\n    {}\n    options: {}", g.name, g.summary, g.cmdline_help);
        }
    }
    Ok(ExitCode::SUCCESS)
}
