//! `ferry-bench`: Ferry's benchmarks. Each runs the real `ferry` binary several times and
//! prints the median and spread; `--json` prints the same figures as JSON.

mod boot;
mod checkpoint;
mod cluster;
mod devices;
mod guestline;
mod hostmig;
mod leases;
mod migrate;
mod qemu;
mod stats;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Ferry's benchmarks.
#[derive(Debug, Parser)]
#[command(name = "ferry-bench")]
struct Cli {
    /// The ferry binary to measure (default: `ferry` next to this program).
    #[arg(long, global = true, value_name = "PATH")]
    ferry: Option<PathBuf>,

    /// Print the results as JSON.
    #[arg(long, global = true)]
    json: bool,

    #[command(subcommand)]
    bench: Bench,
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// Time from process start to the guest's first instruction, for 256 MiB and 2 GiB
    /// guests (memstress; its first instruction writes the POST port 0x80, which Ferry
    /// timestamps).
    Boot(boot::BootArgs),
    /// Snapshot time and size, and restore time to running vCPUs, for a 1 GiB guest holding
    /// 512 MiB of initrd content.
    Checkpoint(checkpoint::CheckpointArgs),
    /// Live migration of memstress (1 GiB, 512 MiB random initrd, wss=64M) between two
    /// ferry processes over loopback; total, downtime, bytes, passes, pass-1 throughput
    /// against one plain TCP stream measured in the same run; and, when
    /// qemu-system-x86_64 is installed, the same guest migrated by QEMU after each Ferry
    /// run, with the Ferry/QEMU ratios. `--guest dirtier`: the fast-dirtying scenario
    /// (dirtier rewrites its working set from ring 3 at native speed; QEMU also with XBZRLE
    /// and auto-converge), with the guest's own rate and longest pause during the migration.
    Migrate(migrate::MigrateArgs),
    /// Devices: blkstress disk throughput as the guest and the host see it, and the
    /// network outage a client (pinging every 1 ms) sees while the VM migrates between
    /// two hosts (network namespaces behind one bridge). Needs root.
    Devices(devices::DevicesArgs),
    /// Leases (sanlock, `--lease`): the renewal cost on one host with no, one and `--vms`
    /// leased VMMs (the daemon's CPU and I/O, the VMMs' lease threads, the renewal interval),
    /// and the hand-over of one VM's lease between two hosts' daemons (release, acquire) on
    /// tmpfs and on the temporary directory's file system; `--ideas` times ways to a faster
    /// acquire. Needs root and the sanlock package.
    Leases(leases::LeasesArgs),
    /// Migration by name between two hosts' daemons on loopback (a 32 MiB memstress VM with
    /// a NIC, A -> B -> A ...): per migration and as median/p90, the VMM's own migration and
    /// the time outside it step by step (checks, reservation, start, following, completion,
    /// the source's clean-up), and the daemon's VmRSS with 0 and with `--vms` registered VMs.
    /// Needs root and /dev/kvm.
    Hostmig(hostmig::HostmigArgs),
    /// The controller at vCenter's scale (2,500 hosts, 40,000 VMs; SQLite and PostgreSQL):
    /// its real store and router fed by simulated hosts' heartbeats in process (heartbeat
    /// cost, listing every VM, the check of one VM against every host, placement), then a
    /// real `ferry cluster serve` with `--agents` host agents over mutual TLS (heartbeat
    /// latency, the controller's CPU and memory). PostgreSQL from --database or
    /// $FERRY_TEST_POSTGRES_URL (`scripts/bench.sh cluster` starts one).
    Cluster(cluster::ClusterArgs),
    /// One host's side of the leases benchmark's hand-over (commands on stdin).
    #[command(hide = true)]
    LeaseHost,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Bench::LeaseHost = cli.bench {
        return match leases::lease_host() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ferry-bench lease-host: error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let ferry = match cli.ferry.clone().map(Ok).unwrap_or_else(default_ferry) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("ferry-bench: error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.bench {
        Bench::Boot(args) => boot::run(&ferry, &args, cli.json),
        Bench::Checkpoint(args) => checkpoint::run(&ferry, &args, cli.json),
        Bench::Migrate(args) => migrate::run(&ferry, &args, cli.json),
        Bench::Devices(args) => devices::run(&ferry, &args, cli.json),
        Bench::Leases(args) => leases::run(&ferry, &args, cli.json),
        Bench::Hostmig(args) => hostmig::run(&ferry, &args, cli.json),
        Bench::Cluster(args) => cluster::run(&ferry, &args, cli.json),
        Bench::LeaseHost => Ok(()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn default_ferry() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe()?;
    let p = me.with_file_name("ferry");
    anyhow::ensure!(p.exists(), "no ferry binary at {} (build it, or pass --ferry PATH)", p.display());
    Ok(p)
}
