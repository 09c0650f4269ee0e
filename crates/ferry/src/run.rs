//! `ferry run` and `ferry guests`.

use std::process::ExitCode;

use anyhow::{bail, Context};
use ferry_vmm::migration::{AuthKey, Error as MigrationError, Faults, Listen, ReceiveConfig};
use ferry_vmm::{KernelSource, RestoreConfig, RunOutcome, StopSource, VmConfig, Vmm};

use crate::cli::{GuestsArgs, ReceiveArgs, RestoreArgs, RunArgs};

pub fn run(args: RunArgs, started_ns: u64) -> anyhow::Result<ExitCode> {
    let stop = block_stop_signals()?;
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
        lease: args.lease.clone(),
        disks: args.disks,
        nets: args.nets,
        cpu_hide: args.cpu_hide,
    };
    let vmm = Vmm::build(config, stop).context("cannot start the VM")?;
    crate::logfile::open(vmm.home(), vmm.leased());
    finish(vmm.run()?)
}

pub fn restore(args: RestoreArgs, started_ns: u64) -> anyhow::Result<ExitCode> {
    let stop = block_stop_signals()?;
    let config = RestoreConfig {
        from: args.from.clone(),
        serial: args.serial,
        api_socket: args.api_socket,
        home: args.home,
        state_dir: state_dir(),
        lease: args.lease.clone(),
        started_ns,
        tap_map: args.tap_map,
        revert: args.revert,
        cpu_hide: args.cpu_hide,
    };
    let vmm =
        Vmm::restore(config, stop).with_context(|| format!("cannot restore from {}", args.from.display()))?;
    crate::logfile::open(vmm.home(), vmm.leased());
    finish(vmm.run()?)
}

pub fn receive(args: ReceiveArgs, started_ns: u64) -> anyhow::Result<ExitCode> {
    let stop = block_stop_signals()?;
    let listen = match (&args.listen, args.listen_fd) {
        (Some(a), _) => Listen::Address(a.clone()),
        (None, Some(fd)) => Listen::Fd(fd),
        (None, None) => Listen::Api,
    };
    let auth_key = match (args.auth_key_file, args.auth_key_fd) {
        (Some(f), _) => AuthKey::File(f),
        (None, Some(fd)) => AuthKey::Fd(fd),
        (None, None) => AuthKey::Api,
    };
    let place = match &listen {
        Listen::Address(a) => a.clone(),
        Listen::Fd(fd) => format!("descriptor {fd}"),
        Listen::Api => "the address PUT /vm/receive names".into(),
    };
    let config = ReceiveConfig {
        listen,
        auth_key,
        serial: args.serial,
        api_socket: args.api_socket,
        home: args.home,
        started_ns,
        tap_map: args.tap_map,
        deadline: (args.deadline_s > 0).then(|| std::time::Duration::from_secs(args.deadline_s)),
        faults: faults_from_env(),
        lease: args.lease.clone(),
        cpu_hide: args.cpu_hide,
    };
    let vmm = match Vmm::receive(config, stop) {
        Ok(v) => v,
        // Stopped while waiting: nothing was received, nothing runs; not an error.
        Err(ferry_vmm::Error::Migration(e)) if matches!(*e, MigrationError::Interrupted(_)) => {
            return Ok(ExitCode::SUCCESS)
        }
        Err(e) => return Err(anyhow::Error::new(e).context(format!("cannot receive on {place}"))),
    };
    crate::logfile::open(vmm.home(), vmm.leased());
    finish(vmm.run()?)
}

/// Blocks SIGTERM and SIGINT in this thread, and so in every thread it starts after (call
/// it before any exists), and returns a signalfd for them: the VMM reads them there and
/// stops the VM in order instead of the process dying half-way through a vCPU exit.
fn block_stop_signals() -> anyhow::Result<StopSource> {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t owned by this frame.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        // The lease killpath's signal: with --lease, the VMM fences itself on it.
        libc::sigaddset(&mut set, ferry_vmm::lease::FENCE_SIGNAL);
    }
    // SAFETY: `set` is initialised; a null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc)).context("cannot block SIGTERM and SIGINT");
    }
    // SAFETY: `set` is initialised; -1 asks for a new descriptor.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("cannot create a signalfd");
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    Ok(StopSource::signalfd(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) }))
}

/// The faults a test asks a destination to inject: `FERRY_FAULT_INJECT` (see
/// docs/migration.md). The library reads no environment; this binary does.
fn faults_from_env() -> Faults {
    let Some(list) = std::env::var_os("FERRY_FAULT_INJECT") else {
        return Faults::default();
    };
    let (faults, unknown) = Faults::parse(&list.to_string_lossy());
    for item in unknown {
        tracing::warn!("FERRY_FAULT_INJECT: unknown fault {item:?} ignored");
    }
    faults
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
