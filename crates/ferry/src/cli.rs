//! Command-line definitions.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use ferry_vmm::config::{parse_size, SerialConfig};

/// Ferry moves running virtual machines between hosts without stopping them.
///
/// Ferry is a KVM virtual machine monitor built for live migration. Each `ferry run`
/// process is one VM.
#[derive(Debug, Parser)]
#[command(name = "ferry", version, propagate_version = true)]
pub struct Cli {
    /// Log level for messages on stderr (error, warn, info, debug, trace); the FERRY_LOG
    /// environment variable, if set, takes precedence and accepts per-module filters.
    #[arg(long, global = true, default_value = "info", value_name = "LEVEL")]
    pub log_level: String,

    #[command(subcommand)]
    pub command: Command,
}

/// Ferry's commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a VM from a PVH kernel or a bundled test guest and run it until it powers off.
    #[command(long_about = RUN_ABOUT)]
    Run(RunArgs),
    /// Start a VM from a checkpoint written by `ferry snapshot`; the guest continues where
    /// it was.
    #[command(long_about = RESTORE_ABOUT)]
    Restore(RestoreArgs),
    /// Show a running VM: state, memory, vCPUs, uptime.
    Info(InfoArgs),
    /// Pause a running VM's vCPUs.
    Pause(SocketArgs),
    /// Resume a paused VM.
    Resume(SocketArgs),
    /// Write a checkpoint of a running VM to a directory; with --stop, suspend it.
    #[command(long_about = SNAPSHOT_ABOUT)]
    Snapshot(SnapshotArgs),
    /// List the bundled test guests and their command-line options.
    Guests(GuestsArgs),
}

const RESTORE_ABOUT: &str = "\
Start a new VMM process from a checkpoint directory written by `ferry snapshot`.

The guest continues exactly where it was: registers, interrupt controllers, timers, the
serial port and memory. Memory is mapped copy-on-write from the checkpoint's memory file, so
restore does not read the file first; pages load when the guest touches them, and the guest's
writes never change the checkpoint. Do not modify the checkpoint's files while the restored
VM runs (deleting them is safe: the mapping keeps the data).

The checkpoint is checked before anything runs: its format version, checksum and size, and
that this host's CPU has every feature the guest was given. A checkpoint from a newer Ferry
or a host with CPU features this one lacks is refused, naming what is missing.

Examples:
  ferry restore --from /var/lib/ferry/snap1 --api-socket /run/ferry/vm1.sock
  ferry restore --from snap1 --serial file:console.log";

const SNAPSHOT_ABOUT: &str = "\
Write a checkpoint of the VM to DIR (created if missing; must be empty if it exists).

The vCPUs pause while the state and memory are written (zero pages are skipped, so the
memory file is sparse), then the VM goes on as before. With --stop the VM is suspended
instead: after the checkpoint is safely on disk its VMM exits, and `ferry restore --from DIR`
resumes it, on this host or another (cold migration). A failed snapshot leaves the VM
running as before and removes what it wrote.

Examples:
  ferry snapshot --api-socket vm.sock --to /var/lib/ferry/snap1
  ferry snapshot --api-socket vm.sock --to /shared/vm1-suspended --stop --json";

const RUN_ABOUT: &str = "\
Boot a VM and run it in this process until the guest powers off or Ferry gets SIGTERM/SIGINT.

The kernel is an ELF image with a PVH entry note (Linux vmlinux built with CONFIG_PVH=y), or
one of the test guests built into Ferry (see `ferry guests`). The guest's serial console
(COM1, a 16550 at port 0x3f8, IRQ 4) is connected to this terminal by default.

The guest powers off by writing 0xfe to port 0x64 (the i8042 reset line; Linux: reboot=k);
Ferry then exits 0. SIGTERM or SIGINT stop the VM and exit 0. A guest failure (a KVM
emulation failure, a triple fault) is reported in one line with the vCPU, RIP and the bytes
at RIP, and Ferry exits 1.

Examples:
  ferry run --guest memstress --memory 256M --cmdline \"wss=16M\"
  ferry run --guest memstress --memory 2G --initrd big.img --serial file:console.log
  ferry run --kernel vmlinux --memory 512M --cmdline \"console=ttyS0 reboot=k\"";

/// Arguments of `ferry run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// ELF kernel with a PVH entry note to boot.
    #[arg(long, value_name = "PATH", conflicts_with = "guest", required_unless_present = "guest")]
    pub kernel: Option<PathBuf>,

    /// Bundled test guest to boot instead of a kernel file (see `ferry guests`).
    #[arg(long, value_name = "NAME")]
    pub guest: Option<String>,

    /// Kernel command line; for a bundled guest, its options (e.g. "wss=16M seed=7").
    #[arg(long, value_name = "STRING", default_value = "")]
    pub cmdline: String,

    /// Initial ramdisk, loaded into guest memory by Ferry and passed as PVH module 0.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,

    /// Guest memory: a number with an optional K, M, G or T suffix (binary multiples).
    /// At least 16M, at most this host's RAM. Mapped lazily: pages cost host RAM only
    /// once touched.
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = parse_memory)]
    pub memory: u64,

    /// Number of vCPUs. vCPU 0 boots the guest; the others wait for INIT/SIPI as on real
    /// hardware.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub cpus: u32,

    /// Where the serial console goes: stdio (this terminal; input is forwarded too),
    /// file:PATH (created or truncated), or null.
    #[arg(long, value_name = "DEST", default_value = "stdio", value_parser = parse_serial)]
    pub serial: SerialConfig,

    /// Serve the VM's API (HTTP + JSON) on this unix socket, for `ferry info`, `pause`,
    /// `resume` and `snapshot`. See docs/api.md.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,

    /// The VM's home directory: it holds the VM's lock file, an exclusive lock that only one
    /// VMM holds, so the same VM never runs twice (put it on storage every host shares).
    /// Default: a new directory under $FERRY_STATE_DIR/vms (/var/lib/ferry/vms), removed
    /// when the VM ends unless it was suspended.
    #[arg(long, value_name = "DIR")]
    pub home: Option<PathBuf>,
}

/// Arguments of `ferry restore`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The checkpoint directory.
    #[arg(long, value_name = "DIR")]
    pub from: PathBuf,

    /// Where the serial console goes: stdio, file:PATH or null.
    #[arg(long, value_name = "DEST", default_value = "stdio", value_parser = parse_serial)]
    pub serial: SerialConfig,

    /// Serve the VM's API on this unix socket.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,

    /// The VM's home directory (see `ferry run --help`). Default: the home the checkpoint
    /// names (so a suspended VM resumes under its own lock), or a new one.
    #[arg(long, value_name = "DIR")]
    pub home: Option<PathBuf>,
}

/// The API socket of the VM to act on.
#[derive(Debug, Args)]
pub struct SocketArgs {
    /// The VM's API socket (its `--api-socket`).
    #[arg(long, value_name = "PATH")]
    pub api_socket: PathBuf,
}

/// Arguments of `ferry info`.
#[derive(Debug, Args)]
pub struct InfoArgs {
    #[command(flatten)]
    pub socket: SocketArgs,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `ferry snapshot`.
#[derive(Debug, Args)]
pub struct SnapshotArgs {
    #[command(flatten)]
    pub socket: SocketArgs,
    /// The checkpoint directory to write (created if missing; must be empty).
    #[arg(long, value_name = "DIR")]
    pub to: PathBuf,
    /// Suspend: stop the VM for good once the checkpoint is written.
    #[arg(long)]
    pub stop: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

fn parse_memory(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

fn parse_serial(s: &str) -> Result<SerialConfig, String> {
    s.parse().map_err(|e: ferry_vmm::config::Error| e.to_string())
}

/// Arguments of `ferry guests`.
#[derive(Debug, Args)]
pub struct GuestsArgs {
    /// Print the list as JSON.
    #[arg(long)]
    pub json: bool,
}
