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
    /// Wait for a live migration on a TCP address and run the VM it brings.
    #[command(long_about = RECEIVE_ABOUT)]
    Receive(ReceiveArgs),
    /// Live-migrate a running VM to a `ferry receive` on another host (or process).
    #[command(long_about = MIGRATE_ABOUT)]
    Migrate(MigrateArgs),
    /// Cancel a VM's migration in progress; the VM keeps running where it is.
    #[command(long_about = CANCEL_ABOUT)]
    MigrateCancel(SocketArgs),
    /// Show a VM home: which VM it is, its generation, and who holds its lock.
    #[command(long_about = HOME_ABOUT)]
    Home(HomeArgs),
    /// The per-host daemon: `ferry host serve` runs it, `ferry host info` shows a host.
    #[command(subcommand, long_about = HOST_ABOUT)]
    Host(HostCommand),
    /// A host's VMs, through its daemon: create, register, start, stop, kill, suspend,
    /// resume, snapshot, list, show, log.
    #[command(long_about = VM_ABOUT)]
    Vm(VmArgs),
    /// Create the cluster CA; issue host and client certificates (mutual TLS).
    #[command(long_about = crate::ca::CA_ABOUT)]
    Ca(crate::ca::CaArgs),
    /// The cluster controller (`ferry cluster serve`) and the cluster-wide reports: hosts,
    /// VMs, datastores, port groups.
    #[command(subcommand, long_about = crate::cluster::CLUSTER_ABOUT)]
    Cluster(crate::cluster::ClusterCommand),
}

const HOST_ABOUT: &str = "\
The per-host daemon (hostd): one per host, running as root. It keeps the host's VMs (each a
home directory on a datastore), starts each VM's VMM as a process of its own that outlives
the daemon, makes the VMs' taps on the port groups' bridges, records a VMM that ends
unasked as crashed (nothing restarts it), and reports the host's inventory. Its state is a
SQLite file in its state directory, a cache of what the homes say.

Examples:
  ferry host serve --config /etc/ferry/host.toml
  ferry host info --host http://10.0.0.1:7443 --json

The configuration is documented in docs/host.md, with an example in docs/examples/host.toml.";

/// `ferry host ...`.
#[derive(Debug, Subcommand)]
pub enum HostCommand {
    /// Run the daemon (until SIGTERM or SIGINT; the VMs keep running).
    Serve(HostServeArgs),
    /// Show a host's inventory: CPU and what KVM offers, memory, datastores, port groups, VMs.
    Info(HostInfoArgs),
    /// Show a host's migration history (both sides: source and destination), newest first.
    Migrations(HostMigrationsArgs),
    /// Create this host's TLS identity: a key and a certificate signed by the cluster CA
    /// (`ferry ca init`), in the configuration's identity_dir.
    Init(HostInitArgs),
    /// Join a cluster: the daemon records the controller (https://HOST:PORT) and sends it a
    /// heartbeat with its inventory every 2 s (the first must be taken).
    Join(crate::cluster::JoinArgs),
    /// Leave the cluster: the daemon tells the controller (the host becomes disconnected) and
    /// stops its heartbeats.
    Leave(crate::cluster::MembershipArgs),
    /// Show the controller this host joined and whether its heartbeats are taken.
    Cluster(crate::cluster::MembershipArgs),
}

/// Arguments of `ferry host init`.
#[derive(Debug, Args)]
pub struct HostInitArgs {
    /// The daemon's configuration file: its name, listen address and identity_dir.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// The cluster CA's directory (ca.pem, ca.key from `ferry ca init`).
    #[arg(long, value_name = "DIR")]
    pub ca: PathBuf,
    /// Another name or address the certificate must cover (repeatable). Always covered: the
    /// host's name, the listen address, localhost, 127.0.0.1, ::1 and the kernel's host name.
    #[arg(long = "address", value_name = "NAME_OR_IP")]
    pub addresses: Vec<String>,
    /// Print what was written as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `ferry host migrations`.
#[derive(Debug, Args)]
pub struct HostMigrationsArgs {
    #[command(flatten)]
    pub target: HostTarget,
    /// Only the migrations in progress.
    #[arg(long, conflicts_with_all = ["failed", "id"])]
    pub active: bool,
    /// Only the ones that did not complete: failed, and refused by the checks (as vMotion's
    /// failed list has both).
    #[arg(long, conflicts_with = "id")]
    pub failed: bool,
    /// One migration.
    #[arg(long, value_name = "ID")]
    pub id: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `ferry host serve`.
#[derive(Debug, Args)]
pub struct HostServeArgs {
    /// The configuration file (TOML; see docs/examples/host.toml).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
}

/// Which daemon to talk to, and as whom.
#[derive(Debug, Args, Clone)]
pub struct HostTarget {
    /// The host daemon's URL (https://HOST:PORT). Default: $FERRY_HOST, else
    /// https://127.0.0.1:7443.
    #[arg(long = "host", value_name = "URL", global = true)]
    pub url: Option<String>,
    /// The CLI's TLS identity: a directory with cert.pem, key.pem and ca.pem, from `ferry
    /// ca issue --kind client`. Default: $FERRY_IDENTITY, else ~/.config/ferry/identity.
    #[arg(long = "identity", value_name = "DIR", global = true)]
    pub identity: Option<PathBuf>,
}

impl HostTarget {
    /// A client of the daemon.
    pub fn client(&self) -> Result<crate::hostctl::HostClient, crate::hostctl::Error> {
        crate::hostctl::HostClient::new(&self.url(), self.identity.clone())
    }

    /// The URL to use.
    pub fn url(&self) -> String {
        self.url
            .clone()
            .or_else(|| std::env::var("FERRY_HOST").ok().filter(|s| !s.is_empty()))
            .unwrap_or_else(|| crate::hostctl::DEFAULT_URL.to_string())
    }
}

/// Arguments of `ferry host info`.
#[derive(Debug, Args)]
pub struct HostInfoArgs {
    #[command(flatten)]
    pub target: HostTarget,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

const VM_ABOUT: &str = "\
Manage a host's VMs through its daemon (`ferry host serve`); --host URL or $FERRY_HOST
picks the daemon (default https://127.0.0.1:7443).

Without --host and $FERRY_HOST, when a controller is configured (--server URL,
$FERRY_SERVER, or `server` in ~/.config/ferry/cli.toml), list, show, start, stop, kill,
suspend, resume, snapshot, migrate, create and register go through the controller: the whole
cluster's VMs (with their host), actions forwarded to the VM's host, `create` and `migrate`
without --to-host on the host placement picks (see `ferry cluster create --help`). log and
unregister need --host.

A VM is a home directory DATASTORE/NAME holding its definition (vm.toml), its disks, its
lock, its logs (vm.log: the VMM's output; console.log: the guest's serial console). Its
states: defined, starting, running, paused, stopping, suspended, crashed, elsewhere (its
lock is held by another process or host). Every command prints a report; --json prints it
as JSON.

Examples:
  ferry vm create web1 --datastore local --memory-mib 256 --vcpus 1 --guest memstress \\
      --cmdline \"wss=16M\" --disk data.img:64M --nic portgroup=prod
  ferry vm start web1
  ferry vm list
  ferry vm show web1 --json
  ferry vm log web1 --lines 20
  ferry vm suspend web1; ferry vm resume web1
  ferry vm stop web1            # graceful: the VMM stops the vCPUs and exits
  ferry vm kill web1            # SIGKILL
  ferry vm register /srv/ferry/ds1/web2   # adopt an existing home
  ferry vm unregister web2                # forget it (the home stays)
  ferry vm migrate web1 --to-host https://10.0.0.2:7443 --check   # only the checks
  ferry vm migrate web1 --to-host https://10.0.0.2:7443           # live, by name

Through the controller (FERRY_SERVER set, no --host):
  ferry vm list                          # every host's VMs, with the host
  ferry vm migrate web1 --explain        # placement's ranking
  ferry vm migrate web1                  # to the host placement picks
  ferry vm migrate web1 --to-host host-b
  ferry vm create web2 --datastore shared --memory-mib 256 --guest memstress";

/// `ferry vm ...`.
#[derive(Debug, Args)]
pub struct VmArgs {
    #[command(flatten)]
    pub target: HostTarget,
    /// The controller (https://HOST:PORT): without --host (and $FERRY_HOST), list, show,
    /// start, stop, kill, suspend, resume, snapshot, migrate, create and register go through
    /// it. Default: $FERRY_SERVER, else `server` in ~/.config/ferry/cli.toml.
    #[arg(long = "server", value_name = "URL", global = true)]
    pub server: Option<String>,
    /// Print the report as JSON.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: VmCommand,
}

/// The VM commands.
#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Create a VM: write its home DATASTORE/NAME (vm.toml and disks) and register it.
    Create(VmCreateArgs),
    /// Register an existing home (a directory with a vm.toml on one of the host's datastores).
    Register {
        /// The home directory.
        #[arg(value_name = "PATH")]
        path: PathBuf,
    },
    /// Forget a VM that does not run here; its home stays (register it again, here or on
    /// another host).
    Unregister(VmName),
    /// Boot a VM (defined or crashed).
    Start(VmName),
    /// Stop a VM gracefully (SIGTERM to its VMM: the vCPUs stop, the lock is released).
    Stop(VmName),
    /// Kill a VM's VMM (SIGKILL).
    Kill(VmName),
    /// Checkpoint a VM into HOME/suspend and stop it; `resume` restores it.
    Suspend(VmName),
    /// Resume a suspended VM (restore from HOME/suspend) or a paused one.
    Resume(VmName),
    /// Checkpoint a running VM into HOME/snapshots/TIME; it goes on running.
    Snapshot(VmName),
    /// List the host's VMs.
    List,
    /// Show a VM: definition, state, pid, taps, lock holder, how its last VMM ended.
    Show(VmName),
    /// Migrate a running VM to another host's daemon, by name: checks, reservation there,
    /// live migration, hand-over. Progress lines, then the report.
    Migrate(VmMigrateArgs),
    /// Show the end of a VM's log (HOME/vm.log).
    Log {
        /// The VM.
        #[arg(value_name = "NAME")]
        name: String,
        /// How many lines.
        #[arg(long, short = 'n', value_name = "N", default_value_t = 50)]
        lines: usize,
    },
}

/// Arguments of `ferry vm migrate`.
#[derive(Debug, Args)]
pub struct VmMigrateArgs {
    /// The VM.
    #[arg(value_name = "NAME")]
    pub name: String,
    /// The destination: a host daemon's URL (https://HOST:PORT) with --host, a host's name
    /// through the controller. Through the controller it may be left out: placement picks
    /// the host.
    #[arg(long, value_name = "URL_OR_HOST")]
    pub to_host: Option<String>,
    /// Through the controller, without --to-host: only show placement's ranking (every
    /// host's score, or its reasons); nothing is migrated.
    #[arg(long, conflicts_with_all = ["check", "to_host"])]
    pub explain: bool,
    /// Largest acceptable downtime, ms.
    #[arg(long, value_name = "MS")]
    pub downtime_ms: Option<u64>,
    /// Parallel streams.
    #[arg(long, value_name = "N")]
    pub streams: Option<u32>,
    /// Only run the checks (every reason listed; nothing is reserved).
    #[arg(long)]
    pub check: bool,
}

/// A VM's name.
#[derive(Debug, Args)]
pub struct VmName {
    /// The VM.
    #[arg(value_name = "NAME")]
    pub name: String,
}

/// Arguments of `ferry vm create`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("boot").required(true).args(["kernel", "guest"])))]
pub struct VmCreateArgs {
    /// The VM's name (letters, digits, '-', '_', '.'; unique on the host).
    #[arg(value_name = "NAME")]
    pub name: String,
    /// The datastore (a name from the daemon's configuration) to make the home on.
    #[arg(long, value_name = "DS")]
    pub datastore: String,
    /// Guest memory, MiB (at least 16).
    #[arg(long, value_name = "MIB")]
    pub memory_mib: u64,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub vcpus: u32,
    /// A bundled test guest (see `ferry guests`).
    #[arg(long, value_name = "NAME")]
    pub guest: Option<String>,
    /// A PVH kernel file instead (absolute, or relative to the home).
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Kernel command line, or the bundled guest's options.
    #[arg(long, value_name = "STRING", default_value = "")]
    pub cmdline: String,
    /// A disk: an image FILE in the home, made sparse of SIZE (e.g. data.img:64M); repeatable.
    #[arg(long = "disk", value_name = "FILE:SIZE", value_parser = parse_disk_arg)]
    pub disks: Vec<(String, u64)>,
    /// A NIC on a port group, with a MAC (default: made from the VM's name); repeatable.
    #[arg(long = "nic", value_name = "portgroup=PG[,mac=MAC]", value_parser = parse_nic_arg)]
    pub nics: Vec<(String, String)>,
    /// The CPU model (free text, recorded in vm.toml).
    #[arg(long, value_name = "MODEL")]
    pub cpu_model: Option<String>,
    /// CPU features the VM never sees (vm.toml `cpu_hide`; comma-separated or repeated, e.g.
    /// `--cpu-hide avx2`): its VMM runs with `--cpu-hide`, so the VM can migrate to hosts
    /// whose CPUs lack them (a per-VM CPU baseline).
    #[arg(long, value_name = "FEATURE[,FEATURE...]", value_delimiter = ',', value_parser = parse_cpu_feature)]
    pub cpu_hide: Vec<String>,
}

fn parse_disk_arg(s: &str) -> Result<(String, u64), String> {
    let (file, size) =
        s.rsplit_once(':').ok_or_else(|| format!("{s:?}: expected FILE:SIZE (e.g. data.img:64M)"))?;
    let size = parse_size(size).map_err(|e| e.to_string())?;
    Ok((file.to_string(), size))
}

fn parse_nic_arg(s: &str) -> Result<(String, String), String> {
    let mut pg = None;
    let mut mac = String::new();
    for part in s.split(',') {
        match part.split_once('=') {
            Some(("portgroup", v)) => pg = Some(v.to_string()),
            Some(("mac", v)) => mac = v.to_string(),
            _ => return Err(format!("{part:?}: expected portgroup=PG or mac=MAC")),
        }
    }
    Ok((pg.ok_or_else(|| format!("{s:?}: portgroup=PG is required"))?, mac))
}

const HOME_ABOUT: &str = "\
Show a VM home: which VM it is, its generation, and who holds its lock (host, process,
since when, the migration that brought the VM there), without taking the lock.

A VM's home directory is the arbiter of where it runs: only the process holding the lock
on its vm.lock file may run the VM, and only from its newest state. Whoever starts or
resumes the VM raises its generation (vm.generation) first; a checkpoint or a migration's
state may run only while its generation is still the current one. runs.log records every
start and stop of the VM's vCPUs, from every process that ran it.

Example:
  ferry home /var/lib/ferry/vms/web1
  ferry home /var/lib/ferry/vms/web1 --json";

/// Arguments of `ferry home`.
#[derive(Debug, Args)]
pub struct HomeArgs {
    /// The VM's home directory.
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

const RECEIVE_ABOUT: &str = "\
Wait for one incoming live migration and run the VM it brings, in this process.

The source (`ferry migrate`) must prove it knows the key in --auth-key-file, and this side
proves the same to it, before anything else is accepted. Then this VMM checks it can run the
VM (memory, vCPUs, CPU features, MSRs, devices) and refuses it with the reason if not;
reserves memory and vCPUs; receives memory pass after pass (over as many TCP streams as the
source asks for with --streams, each opened to this same address and proving the key again)
and finally the CPU and device state; restores it and answers RESTORE_OK. The vCPUs start only after the source has stopped
for good and this VMM holds the VM's lock (the lock file in the VM's home directory, on
storage both hosts share), so the VM never runs on both sides.

A migration that fails (wrong key, refused checks, a malformed message, the source rolling
back) leaves nothing running here; the error is logged and the wait goes on. SIGTERM or
SIGINT stop waiting (exit 0), aborting a migration in progress before its commit. Once the
VM runs, this process behaves like `ferry run`: SIGTERM stops the VM, --api-socket serves
the API (and the VM can migrate on from here).

With --api-socket the API is served from the start: GET /vm shows state `receiving` and
the phase (waiting, authenticating, checking, receiving_memory with pages and bytes so far,
restoring, activating), PUT /vm/migrate/cancel cancels the incoming migration before its
commit (the source keeps the VM; this side waits for another), and once the VM runs the
same socket serves its API. A program can start `ferry receive --api-socket S` alone and
then say where to listen and the key with PUT /vm/receive (see docs/api.md), or hand over
a listening socket (--listen-fd) and the key through a pipe (--auth-key-fd).

Examples:
  ferry receive --listen tcp:0.0.0.0:7000 --auth-key-file /etc/ferry/migration.key
  ferry receive --listen tcp:127.0.0.1:7001 --auth-key-file key --api-socket vm-b.sock \\
      --serial file:console-b.log
  ferry receive --api-socket vm-b.sock     # then: PUT /vm/receive
  ferry receive --listen-fd 3 --auth-key-fd 4 --api-socket vm-b.sock";

const MIGRATE_ABOUT: &str = "\
Live-migrate the VM behind --api-socket to a `ferry receive` listening at --to, while the guest
keeps running.

Phases: connect and authenticate both ways with the shared key; pre-migration checks on the
destination; iterative pre-copy (pass 1 sends every page, zero pages as markers only; each
later pass sends what the guest dirtied meanwhile); after each pass the expected downtime is
estimated from the measured bandwidth and dirty rate, and the migration goes to
stop-and-copy once it is within --downtime-ms and another pass would not shrink it much;
stop-and-copy (pause, last pages, CPU and device state); the destination restores and
answers; the source commits (stops for good, releases the VM's lock); the destination takes
the lock and starts the vCPUs.

Until the commit, any failure (destination refused or died, connection lost, restore
failed, verification mismatch, cancel, timeout, no convergence, a destination that stalls
for --stall-timeout-s) resumes the VM here. `ferry migrate-cancel` ends the migration within
a second in any phase before the commit, even while the destination does not answer. Progress
goes to stderr; the report goes to stdout (--json: the documented JSON, see docs/migration.md).
Exit status: 0 only if the VM now runs on the destination.

Examples:
  ferry migrate --api-socket vm.sock --to tcp:10.0.0.2:7000 --auth-key-file /etc/ferry/migration.key
  ferry migrate --api-socket vm.sock --to tcp:127.0.0.1:7001 --auth-key-file key \\
      --downtime-ms 50 --bandwidth-mib 500 --verify --json
  ferry migrate --api-socket vm.sock --to tcp:10.0.0.2:7000 --auth-key-file key --streams 4
  ferry migrate --api-socket vm.sock --to tcp:10.0.0.2:7000 --auth-key-file key --stall-timeout-s 3";

const CANCEL_ABOUT: &str = "\
Cancel the migration in progress of the VM behind --api-socket. The source shuts its
connections to the destination down at once (whatever it was waiting for: connecting, a
write the destination does not take, an answer), the destination sees them close and drops
what it received, and the VM keeps running on the source (it resumes if it was paused for
the stop-and-copy); `ferry migrate` ends within a second with status `cancelled`. A
migration that has committed (the source has already stopped for good and handed the VM's
lock over) can no longer be cancelled; the command then fails and says so.";

/// Arguments of `ferry receive`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("listen_src").args(["listen", "listen_fd"]).multiple(false)))]
#[command(group(clap::ArgGroup::new("key_src").args(["auth_key_file", "auth_key_fd"]).multiple(false)))]
pub struct ReceiveArgs {
    /// Where to listen: tcp:HOST:PORT (e.g. tcp:0.0.0.0:7000). Without --listen or
    /// --listen-fd, --api-socket is required and `PUT /vm/receive` says where.
    #[arg(long, value_name = "tcp:HOST:PORT", requires = "key_src",
          required_unless_present_any = ["listen_fd", "api_socket"])]
    pub listen: Option<String>,

    /// Listen on this inherited descriptor: a bound, listening TCP socket (a daemon binds it
    /// and hands it over; it is checked with SO_ACCEPTCONN before use).
    #[arg(long, value_name = "FD", requires = "key_src")]
    pub listen_fd: Option<i32>,

    /// File holding the key shared with the source (16 to 4096 bytes; make one with
    /// `head -c 32 /dev/urandom > FILE`).
    #[arg(long, value_name = "FILE", requires = "listen_src")]
    pub auth_key_file: Option<PathBuf>,

    /// Read the key shared with the source from this inherited descriptor (a pipe) to its
    /// end; nothing is written to disk.
    #[arg(long, value_name = "FD", requires = "listen_src")]
    pub auth_key_fd: Option<i32>,

    /// Where the VM's serial console goes once it runs here: stdio, file:PATH or null.
    #[arg(long, value_name = "DEST", default_value = "stdio", value_parser = parse_serial)]
    pub serial: SerialConfig,

    /// Serve the API on this unix socket from the start: `GET /vm` shows `receiving` and
    /// its phase, `PUT /vm/migrate/cancel` cancels the incoming migration before its
    /// commit, and once the VM runs the same socket serves the VM's API.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,

    /// The VM's home directory on this host. Default: the one the source names (its lock
    /// must be the same file on both hosts: put homes on shared storage).
    #[arg(long, value_name = "DIR")]
    pub home: Option<PathBuf>,
    /// Hold the VM's lease on shared storage (sanlock): LOCKSPACE:HOSTID:IDS_PATH with an
    /// optional ,io_timeout=SECONDS (default 10). LOCKSPACE is the datastore's lockspace,
    /// HOSTID this host's id in it (unique per host), IDS_PATH its file on the datastore;
    /// the lease itself is the file vm.lease in the VM's home, made on first use. The local
    /// sanlock daemon must run. While it runs the VM, the VMM stops its vCPUs and gives the
    /// lease up if the lease cannot be renewed for 7 x io_timeout (see docs/migration.md).
    #[arg(long, value_name = "LOCKSPACE:HOSTID:IDS_PATH[,io_timeout=N]")]
    pub lease: Option<ferry_vmm::lease::LeaseConfig>,
    /// Use tap NEW on this host for the NIC that used tap OLD on the source (repeatable).
    /// Taps belong to hosts; the NIC's MAC moves with the VM. Default: a tap of the same
    /// name, which must exist here (ip tuntap add NAME mode tap).
    #[arg(long = "tap", value_name = "OLD=NEW", value_parser = parse_tap_map)]
    pub tap_map: Vec<(String, String)>,

    /// Give up (exit non-zero) if no migration has started within this many seconds of
    /// listening, or of the last failed one; 0 waits for ever. A migration in progress is
    /// bounded by its stall bound instead.
    #[arg(long, value_name = "SECONDS", default_value_t = 600)]
    pub deadline_s: u64,

    /// Treat these CPU features as absent from this host (comma-separated or repeated): a VM
    /// whose CPUID has one is refused as on a host without it (reason `cpu_features`). The
    /// host daemon passes its `[cpu] hide` here, so one machine can stand for a host with an
    /// older CPU. An unknown name is an error that lists the names Ferry knows.
    #[arg(long, value_name = "FEATURE[,FEATURE...]", value_delimiter = ',', value_parser = parse_cpu_feature)]
    pub cpu_hide: Vec<String>,
}

/// Arguments of `ferry migrate`.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    pub socket: SocketArgs,

    /// The destination: tcp:HOST:PORT of a `ferry receive`.
    #[arg(long, value_name = "tcp:HOST:PORT")]
    pub to: String,

    /// File holding the key shared with the destination.
    #[arg(long, value_name = "FILE")]
    pub auth_key_file: PathBuf,

    /// Largest acceptable downtime (vCPUs paused), in ms.
    #[arg(long, value_name = "MS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    pub downtime_ms: u64,

    /// Give up (VM stays on the source) after this many pre-copy passes without reaching
    /// the downtime limit.
    #[arg(long, value_name = "N", default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_iterations: u32,

    /// Give up (VM stays on the source) if pre-copy has not converged after this many seconds.
    #[arg(long, value_name = "S", default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout_s: u64,

    /// Cap the bandwidth used, in MiB/s (0: no cap).
    #[arg(long, value_name = "MIB", default_value_t = 0)]
    pub bandwidth_mib: u64,

    /// Hash all guest memory on both sides at the switchover; a mismatch fails the migration
    /// and the VM resumes on the source. Costs time (off by default).
    #[arg(long)]
    pub verify: bool,

    /// Carry pre-copy pages over N TCP streams, each with its own thread on both hosts
    /// (1 to 8). One stream is bound by one core on each side; more streams fill a faster
    /// link, when both hosts have idle cores. On a host without idle cores the streams'
    /// threads take CPU time from the guest's vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=8))]
    pub streams: u32,

    /// Fail the migration (the VM stays on, or resumes on, the source) when the destination
    /// makes no progress for S seconds (1 to 600) in any wait: a write it does not take (no
    /// byte acknowledged), an answer it does not send (Challenge, Accept, PassAck,
    /// RestoreResult, Activated). The destination uses the same bound for its own waits
    /// once the source has authenticated. RestoreResult gets 1 s more per GiB of guest memory
    /// with --verify (the destination hashes it all first).
    #[arg(long, value_name = "S", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub stall_timeout_s: u64,

    /// What to do when pre-copy stalls (three passes, or one after a step, without the dirty
    /// set shrinking while the expected downtime stays above the limit): `auto-converge`
    /// throttles the vCPUs by 20%, then 10% more per stalled pass up to 99%, for the rest
    /// of the migration only; `raise-downtime` raises --downtime-ms in four steps up to
    /// --max-downtime-ms; `give-up` stops at once (the VM stays on the source). Each gives
    /// up when it has no step left.
    #[arg(long, value_name = "POLICY", default_value = "auto-converge")]
    pub policy: ferry_api::Policy,

    /// Cache of sent pages on the source for delta encoding, in MiB (0 to 4096; 0 turns it
    /// off). From the second pass on, a page the cache holds goes as the difference from the
    /// copy the destination has when that is under half a page. Used only when the
    /// destination supports it.
    #[arg(long, value_name = "MIB", default_value_t = 64, value_parser = clap::value_parser!(u64).range(0..=4096))]
    pub delta_cache_mib: u64,

    /// Compress pages that compress (LZ4): `auto` turns it on when --bandwidth-mib is 1 to
    /// 256 (a link slow enough that packing a page costs less than sending it), `on`, `off`.
    /// With it, pass 1 is copied out of guest memory instead of sent zero-copy. Used only
    /// when the destination supports it.
    #[arg(long, value_name = "WHEN", default_value = "auto")]
    pub compress: ferry_api::Compress,

    /// The most `--policy raise-downtime` may raise the downtime limit to, in ms.
    #[arg(long, value_name = "MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_downtime_ms: u64,

    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,

    /// No progress lines on stderr.
    #[arg(long)]
    pub quiet: bool,
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
#[command(group(clap::ArgGroup::new("boot").required(true).args(["kernel", "guest"])))]
pub struct RunArgs {
    /// ELF kernel with a PVH entry note to boot.
    #[arg(long, value_name = "PATH", conflicts_with = "guest")]
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
    /// Hold the VM's lease on shared storage (sanlock): LOCKSPACE:HOSTID:IDS_PATH with an
    /// optional ,io_timeout=SECONDS (default 10). LOCKSPACE is the datastore's lockspace,
    /// HOSTID this host's id in it (unique per host), IDS_PATH its file on the datastore;
    /// the lease itself is the file vm.lease in the VM's home, made on first use. The local
    /// sanlock daemon must run. While it runs the VM, the VMM stops its vCPUs and gives the
    /// lease up if the lease cannot be renewed for 7 x io_timeout (see docs/migration.md).
    #[arg(long, value_name = "LOCKSPACE:HOSTID:IDS_PATH[,io_timeout=N]")]
    pub lease: Option<ferry_vmm::lease::LeaseConfig>,
    /// A disk: a raw image given to the guest as a virtio-blk device (repeatable; the first
    /// is at 0xd0000000, IRQ 5, the next 4 KiB and one IRQ higher, and so on; the kernel
    /// command line gets a virtio_mmio.device= entry for each). Ferry holds an exclusive
    /// lock on a writable image (a shared one with readonly=on) while the VM runs, so a
    /// second VM on the same image is refused; the lock moves with the VM in a migration.
    #[arg(long = "disk", value_name = "path=FILE[,readonly=on]")]
    pub disks: Vec<ferry_vmm::disk::DiskConfig>,
    /// A NIC: a virtio-net device on an existing tap device, with the given MAC
    /// (repeatable; after the disks' windows and IRQs). Ferry does not create taps: make
    /// one with `ip tuntap add NAME mode tap` and put it on a bridge. After a live
    /// migration the destination announces each MAC (RARP) so switches learn the move.
    #[arg(long = "net", value_name = "tap=NAME,mac=MAC")]
    pub nets: Vec<ferry_net::NetConfig>,
    /// Hide these CPU features from the guest (comma-separated or repeated; e.g.
    /// `--cpu-hide avx2,avx512f`): its CPUID lacks them as if this host did, so it can later
    /// migrate to hosts whose CPUs lack them too (a CPU baseline). An unknown name is an error
    /// that lists the names Ferry knows. `GET /vm` shows the features the guest got.
    #[arg(long, value_name = "FEATURE[,FEATURE...]", value_delimiter = ',', value_parser = parse_cpu_feature)]
    pub cpu_hide: Vec<String>,
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
    /// Hold the VM's lease on shared storage (sanlock): LOCKSPACE:HOSTID:IDS_PATH with an
    /// optional ,io_timeout=SECONDS (default 10). LOCKSPACE is the datastore's lockspace,
    /// HOSTID this host's id in it (unique per host), IDS_PATH its file on the datastore;
    /// the lease itself is the file vm.lease in the VM's home, made on first use. The local
    /// sanlock daemon must run. While it runs the VM, the VMM stops its vCPUs and gives the
    /// lease up if the lease cannot be renewed for 7 x io_timeout (see docs/migration.md).
    #[arg(long, value_name = "LOCKSPACE:HOSTID:IDS_PATH[,io_timeout=N]")]
    pub lease: Option<ferry_vmm::lease::LeaseConfig>,
    /// Use tap NEW for the NIC that used tap OLD when the checkpoint was taken (repeatable;
    /// a restore on another host). Default: the same tap name.
    #[arg(long = "tap", value_name = "OLD=NEW", value_parser = parse_tap_map)]
    pub tap_map: Vec<(String, String)>,

    /// Restore even though the VM ran on after this checkpoint was taken (its home's
    /// generation is newer). This turns the VM back to the checkpoint: use it only when the
    /// VM's disks match the checkpoint too (restored from the same moment), or the guest
    /// will see older memory against newer disks. Without it such a restore is refused.
    #[arg(long)]
    pub revert: bool,

    /// Treat these CPU features as absent from this host (comma-separated or repeated): a VM
    /// whose CPUID has one is refused as on a host without it (reason `cpu_features`). The
    /// host daemon passes its `[cpu] hide` here, so one machine can stand for a host with an
    /// older CPU. An unknown name is an error that lists the names Ferry knows.
    #[arg(long, value_name = "FEATURE[,FEATURE...]", value_delimiter = ',', value_parser = parse_cpu_feature)]
    pub cpu_hide: Vec<String>,
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

/// One name of `--cpu-hide`, checked against the features Ferry knows.
fn parse_cpu_feature(s: &str) -> Result<String, String> {
    ferry_arch::cpuid::parse_feature_name(s).map_err(|e| e.to_string())
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

fn parse_tap_map(s: &str) -> Result<(String, String), String> {
    let (old, new) = s.split_once('=').ok_or_else(|| format!("{s:?}: expected OLD=NEW (tap names)"))?;
    for name in [old, new] {
        ferry_net::tap::check_name(name).map_err(|e| e.to_string())?;
    }
    Ok((old.to_owned(), new.to_owned()))
}
