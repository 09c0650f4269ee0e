//! `ferry cluster evc`: the cluster's CPU baseline (EVC) through the controller: show it, and
//! `ferry cluster evc set` to lower or raise it.

use clap::{Args, Subcommand};
use ferry_cluster_api::{paths, EvcChanged, EvcReport, EvcSet, EvcVm};

use crate::cluster::ServerTarget;

/// The long help of `ferry cluster evc`.
pub const EVC_ABOUT: &str = "\
The cluster's CPU baseline (EVC): the CPU features every VM powered on in the cluster sees.

The first host that joins sets it (the features its KVM offers, after its [cpu] hide); every
change makes a new generation. Hosts hide from every VM they power on the features they offer
beyond the baseline. A VM keeps its CPUID until it is powered off (a resume and a migration
keep it), so after a change the report lists the VMs still on an older generation and the
features they keep above the baseline: hosts without those features cannot take them.

A host lacking a feature of the baseline is refused at join; lower the baseline first
(`set --hide F` or `set --baseline-of HOST`, the host refused at join included). The baseline
cannot be raised (`set --add F`) above what a host of the cluster offers.

Examples:
  ferry cluster evc
  ferry cluster evc --json
  ferry cluster evc set --hide lahf_lm
  ferry cluster evc set --baseline-of host-c
  ferry cluster evc set --add lahf_lm";

/// Arguments of `ferry cluster evc`.
#[derive(Debug, Args)]
pub struct EvcArgs {
    /// Change the baseline (without: show it).
    #[command(subcommand)]
    pub command: Option<EvcCommand>,
    #[command(flatten)]
    pub target: ServerTarget,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `ferry cluster evc ...`.
#[derive(Debug, Subcommand)]
pub enum EvcCommand {
    /// Lower (--hide, --baseline-of) or raise (--add) the baseline: a new generation for the
    /// VMs powered on from then on; answers it and the powered-on VMs that keep features
    /// above it until they are powered off.
    Set(EvcSetArgs),
}

/// Arguments of `ferry cluster evc set`.
#[derive(Debug, Args)]
pub struct EvcSetArgs {
    /// Features to remove from the baseline (names as `ferry run --cpu-hide` takes them).
    #[arg(long, value_name = "F[,F...]", value_delimiter = ',')]
    pub hide: Vec<String>,
    /// Features to add (refused if a host of the cluster lacks one).
    #[arg(long, value_name = "F[,F...]", value_delimiter = ',')]
    pub add: Vec<String>,
    /// Keep only the features this host offers (a joined host, or one refused at join).
    #[arg(long, value_name = "HOST")]
    pub baseline_of: Option<String>,
    #[command(flatten)]
    pub target: ServerTarget,
    /// Print the answer as JSON.
    #[arg(long)]
    pub json: bool,
}

fn list(v: &[String]) -> String {
    if v.is_empty() {
        "-".into()
    } else {
        v.join(",")
    }
}

fn print_vms(vms: &[EvcVm]) {
    println!("{:<20} {:<16} {:<10} {:>4} {:<8} ABOVE BASELINE", "VM", "HOST", "STATE", "GEN", "CURRENT");
    for v in vms {
        println!(
            "{:<20} {:<16} {:<10} {:>4} {:<8} {}",
            v.name,
            v.host,
            v.state,
            v.generation.map_or("?".into(), |g| g.to_string()),
            if v.current { "yes" } else { "no" },
            list(&v.above_baseline)
        );
    }
}

/// `ferry cluster evc [set ...]`.
pub fn run(args: EvcArgs) -> anyhow::Result<()> {
    match args.command {
        None => {
            let report: EvcReport = args.target.connect()?.get(paths::EVC)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
                return Ok(());
            }
            match &report.baseline {
                None => println!("no baseline yet: the first host that joins sets it"),
                Some(b) => {
                    println!(
                        "baseline generation {} ({}), {} features:",
                        b.generation,
                        b.set_by,
                        b.features.len()
                    );
                    println!("  {}", b.features.join(" "));
                }
            }
            println!();
            println!("{:<16} {:<15} {:<24} LACKING", "HOST", "STATE", "EXTRA (hidden from VMs)");
            for h in &report.hosts {
                if h.cpuid_known {
                    println!(
                        "{:<16} {:<15} {:<24} {}",
                        h.name,
                        h.state.as_str(),
                        list(&h.extra),
                        list(&h.lacking)
                    );
                } else {
                    println!("{:<16} {:<15} (no KVM CPUID reported)", h.name, h.state.as_str());
                }
            }
            for r in &report.refused {
                println!("{:<16} {:<15} {:<24} {}", r.name, "refused", "-", list(&r.lacking));
            }
            println!();
            print_vms(&report.vms);
        }
        Some(EvcCommand::Set(set)) => {
            let body = EvcSet { hide: set.hide, add: set.add, baseline_of: set.baseline_of };
            let changed: EvcChanged = set.target.connect()?.post(paths::EVC, &body)?;
            if set.json {
                println!("{}", serde_json::to_string_pretty(&changed)?);
                return Ok(());
            }
            if changed.removed.is_empty() && changed.added.is_empty() {
                println!("baseline unchanged: generation {}", changed.baseline.generation);
            } else {
                println!(
                    "baseline generation {}: removed {}, added {}",
                    changed.baseline.generation,
                    list(&changed.removed),
                    list(&changed.added)
                );
            }
            if changed.vms_keeping.is_empty() {
                println!("no powered-on VM keeps features above it");
            } else {
                println!("powered-on VMs that keep features above it until they are powered off:");
                print_vms(&changed.vms_keeping);
            }
        }
    }
    Ok(())
}
