//! `ferry host ...` and `ferry vm ...`: the daemon, and the commands that talk to it.

use std::process::ExitCode;

use anyhow::Context;

use ferry_host_api::{
    paths, Action, CheckReport, CreateVm, DiskDef, HostInfo, MigrateStarted, MigrateVm, MigrationList,
    MigrationOutcome, MigrationRole, NicDef, RegisterVm, VmDefinition, VmDetail, VmList, VmLog,
};

use crate::cli::{HostCommand, HostInitArgs, VmArgs, VmCommand, VmCreateArgs, VmMigrateArgs};
use crate::hostctl::HostClient;

/// `ferry host ...`.
pub fn host(cmd: HostCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        HostCommand::Serve(args) => {
            // Test-only faults, read once here (the library reads no environment): an
            // unknown step is an error before anything starts.
            let faults = match std::env::var(ferry_host::daemon::fault::ENV) {
                Ok(list) => ferry_host::daemon::fault::HostFaults::parse(&list)?,
                Err(_) => ferry_host::daemon::fault::HostFaults::default(),
            };
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
            rt.block_on(ferry_host::run(&args.config, faults))?;
            Ok(ExitCode::SUCCESS)
        }
        HostCommand::Init(args) => init(args),
        HostCommand::Join(args) => crate::cluster::join(args),
        HostCommand::Leave(args) => crate::cluster::leave(args),
        HostCommand::Cluster(args) => crate::cluster::membership(args),
        HostCommand::Migrations(args) => {
            let client = args.target.client()?;
            let path = match (&args.id, args.active, args.failed) {
                (Some(id), _, _) => format!("{}?id={id}", paths::MIGRATIONS),
                (None, true, _) => format!("{}?active", paths::MIGRATIONS),
                (None, _, true) => format!("{}?failed", paths::MIGRATIONS),
                _ => paths::MIGRATIONS.to_string(),
            };
            let list: MigrationList = client.get(&path)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print_migrations(&list);
            }
            Ok(ExitCode::SUCCESS)
        }
        HostCommand::Info(args) => {
            let client = args.target.client()?;
            let info: HostInfo = client.get(paths::HOST)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&info)?);
                return Ok(ExitCode::SUCCESS);
            }
            print_host(&info);
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `ferry host init`: the host's key and certificate from the cluster CA, in the
/// configuration's identity directory (refused if one is there already).
fn init(args: HostInitArgs) -> anyhow::Result<ExitCode> {
    let config = ferry_host::config::load(&args.config)?;
    let mut addresses = args.addresses.clone();
    let listen_ip = config.listen.ip();
    if !listen_ip.is_unspecified() {
        addresses.push(listen_ip.to_string());
    }
    let issued = ferry_pki::issue_host(&args.ca, &config.name, &addresses, &config.identity_dir)
        .with_context(|| format!("cannot make the host identity in {}", config.identity_dir.display()))?;
    print_identity("host", &config.name, &config.identity_dir, &issued, true, args.json)?;
    Ok(ExitCode::SUCCESS)
}

/// Prints an identity `ferry host init` or `ferry cluster init` just issued (`kind`: host or
/// controller; `names`: also list the certificate's names in the text).
pub fn print_identity(
    kind: &str,
    name: &str,
    identity_dir: &std::path::Path,
    issued: &ferry_pki::IssuedFiles,
    names: bool,
    json: bool,
) -> anyhow::Result<()> {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                kind: name,
                "identity_dir": identity_dir,
                "cert": issued.cert,
                "key": issued.key,
                "ca": issued.ca,
                "names": issued.sans,
            }))?
        );
    } else {
        println!("{kind} identity for {name} in {}", identity_dir.display());
        println!("  certificate: {}", issued.cert.display());
        println!("  key:         {} (mode 0600)", issued.key.display());
        println!("  cluster CA:  {}", issued.ca.display());
        if names {
            println!("  names:       {}", issued.sans.join(", "));
        }
    }
    Ok(())
}

fn mib(bytes: u64) -> String {
    format!("{} MiB", bytes >> 20)
}

pub fn print_host(h: &HostInfo) {
    println!("host:        {} (ferry {}, API {})", h.name, h.ferry_version, h.api_version);
    println!(
        "migration:   protocol {}",
        h.migration_protocols.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
    );
    println!("cpu:         {} ({}), {} CPUs", h.cpu.model, h.cpu.vendor, h.cpu.cpus);
    match &h.cpu.kvm {
        Some(k) => println!(
            "kvm cpuid:   {} entries, digest {}, {} features",
            k.entries,
            &k.digest[..16.min(k.digest.len())],
            k.features.len()
        ),
        None => println!("kvm cpuid:   unavailable (/dev/kvm cannot be opened)"),
    }
    if let Some(k) = h.cpu.kvm.as_ref().filter(|k| !k.hidden.is_empty()) {
        println!("cpu hidden:  {} ([cpu] hide)", k.hidden.join(", "));
    }
    if let Some(m) = &h.cpu.kvm_model {
        println!(
            "cpu model:   XCR0 {:#x}, XSAVE {} bytes, TSC {} kHz{}, {} MSRs, {}",
            m.xcr0,
            m.xsave_size,
            m.tsc_khz.map(|k| k.to_string()).unwrap_or_else(|| "?".into()),
            if m.tsc_scaling { " (scalable)" } else { "" },
            m.msrs.len(),
            m.kvm_capabilities.join(" ")
        );
    }
    println!(
        "memory:      {} total, {} available, {} reserved by VMs",
        mib(h.memory.total_bytes),
        mib(h.memory.available_bytes),
        mib(h.memory.reserved_bytes)
    );
    for d in &h.datastores {
        println!(
            "datastore:   {} {} id {} ({} free of {}){}",
            d.name,
            d.path.display(),
            d.id,
            mib(d.free_bytes),
            mib(d.total_bytes),
            d.lockspace.as_ref().map(|l| format!(", lease lockspace {l}")).unwrap_or_default()
        );
    }
    for p in &h.portgroups {
        println!(
            "port group:  {} -> bridge {}{}",
            p.name,
            p.bridge,
            if p.present { "" } else { " (MISSING)" }
        );
    }
    println!("vms:         {}", h.vms.len());
    for v in &h.vms {
        println!("  {:<20} {}", v.name, v.state);
    }
}

fn print_list(list: &VmList) {
    println!("{:<24} {:<10} {:>8} {:>5} {:<12} PID", "NAME", "STATE", "MEMORY", "VCPUS", "DATASTORE");
    for v in &list.vms {
        println!(
            "{:<24} {:<10} {:>8} {:>5} {:<12} {}",
            v.name,
            v.state.as_str(),
            format!("{}M", v.memory_mib),
            v.vcpus,
            v.datastore,
            v.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into())
        );
    }
}

pub(crate) fn print_detail(d: &VmDetail) {
    println!("name:       {}", d.name);
    println!("state:      {}", d.state);
    println!("home:       {} (datastore {})", d.home.display(), d.datastore);
    let def = &d.definition;
    let boot = match (&def.guest, &def.kernel) {
        (Some(g), _) => format!("guest {g}"),
        (None, Some(k)) => format!("kernel {}", k.display()),
        _ => "?".into(),
    };
    println!("boot:       {boot} {:?}", def.cmdline);
    println!("memory:     {} MiB, {} vCPUs", def.memory_mib, def.vcpus);
    for disk in &def.disks {
        println!("disk:       {}{}", disk.file, if disk.readonly { " (read-only)" } else { "" });
    }
    for (i, n) in def.nics.iter().enumerate() {
        let tap = d.taps.get(i).map(|t| format!(", tap {t}")).unwrap_or_default();
        println!("nic:        {} on port group {}{tap}", n.mac, n.portgroup);
    }
    if let Some(pid) = d.pid {
        println!("pid:        {pid}");
    }
    if let Some(s) = &d.api_socket {
        println!("api socket: {}", s.display());
    }
    if let Some(g) = d.generation {
        println!("generation: {g}");
    }
    if let Some(l) = &d.lock_holder {
        println!("lock:       held by {l}");
    }
    if let Some(e) = &d.last_exit {
        println!("last exit:  {}{}", e.description, if e.requested { " (asked by the daemon)" } else { "" });
    }
    for e in &d.events {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let ago = now.saturating_sub(e.at_unix_ms) as f64 / 1e3;
        println!("event:      {ago:.1} s ago, {}: {}", e.kind, e.message);
    }
    if !d.last_log.is_empty() && d.state == ferry_host_api::VmState::Crashed {
        println!("last log lines:");
        for l in &d.last_log {
            println!("  {l}");
        }
    }
}

fn ms(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.1}")).unwrap_or_else(|| "-".into())
}

pub fn print_migrations(list: &MigrationList) {
    println!(
        "{:<16} {:<12} {:<12} {:<12} {:<11} {:<10} {:<28} {:>9} {:>9} {:>9} {:>10}",
        "ID",
        "VM",
        "SOURCE",
        "DESTINATION",
        "ROLE",
        "OUTCOME",
        "REASON",
        "DOWN_MS",
        "TOTAL_MS",
        "ORCH_MS",
        "BYTES"
    );
    for m in &list.migrations {
        println!(
            "{:<16} {:<12} {:<12} {:<12} {:<11} {:<10} {:<28} {:>9} {:>9} {:>9} {:>10}",
            m.id,
            m.vm,
            m.source,
            m.destination,
            match m.role {
                MigrationRole::Source => "source",
                MigrationRole::Destination => "destination",
            },
            m.outcome.as_str(),
            m.reason_code,
            ms(m.downtime_ms),
            ms(m.total_ms),
            ms(m.orchestration_ms),
            m.bytes.map(|b| b.to_string()).unwrap_or_else(|| "-".into())
        );
    }
}

fn print_checks(c: &CheckReport) {
    if c.ok {
        println!("checks: VM {} may migrate to {}", c.vm, c.destination);
    } else {
        println!("checks: VM {} may not migrate to {}:", c.vm, c.destination);
        for r in &c.reasons {
            println!("  {}: {}", r.code.as_str(), r.message);
        }
    }
}

/// `ferry vm migrate`: starts the migration on the source's daemon, prints its progress
/// from `GET /migrations?id=ID`, then the report.
fn migrate(client: &HostClient, args: VmMigrateArgs, json: bool) -> anyhow::Result<ExitCode> {
    let Some(to_host) = args.to_host else {
        anyhow::bail!(
            "give --to-host URL (the destination daemon): a host daemon does not choose a destination; \
             through the controller (--server, $FERRY_SERVER, without --host) placement picks one"
        );
    };
    if args.explain {
        anyhow::bail!(
            "--explain shows the controller's placement: use it without --host, with a controller configured"
        );
    }
    let req = MigrateVm { to_host, downtime_ms: args.downtime_ms, streams: args.streams, check: args.check };
    let started: MigrateStarted = client.post(&paths::migrate(&args.name), &req)?;
    let Some(id) = started.migration_id else {
        if json {
            println!("{}", serde_json::to_string_pretty(&started.checks)?);
        } else {
            print_checks(&started.checks);
        }
        if let Some(r) = &started.refused_id {
            // On stderr: with --json, stdout is the checks' report alone.
            eprintln!(
                "migration {r}: refused; recorded in the source's history (ferry host migrations --failed)"
            );
        }
        return Ok(if started.checks.ok { ExitCode::SUCCESS } else { ExitCode::FAILURE });
    };
    if !json {
        eprintln!("migration {id}: VM {} to {}", args.name, started.checks.destination);
    }
    let mut last = String::new();
    let record = loop {
        let list: MigrationList = client.get(&format!("{}?id={id}", paths::MIGRATIONS))?;
        let Some(m) = list.migrations.into_iter().next() else {
            anyhow::bail!("the daemon does not know migration {id}");
        };
        if m.outcome != MigrationOutcome::Active {
            break m;
        }
        if let (Some(p), false) = (&m.progress, json) {
            let line = format!(
                "  {:<14} pass {:>2}  {:>8} pages left  {:>8.1} MiB/s  expected downtime {:>7.1} ms  ETA {}",
                p.phase,
                p.pass,
                p.pages_left,
                p.rate_mib_s,
                p.expected_downtime_ms,
                p.eta_ms.map(|e| format!("{:.1} s", e / 1e3)).unwrap_or_else(|| "-".into())
            );
            if line != last && !p.phase.is_empty() {
                eprintln!("{line}");
                last = line;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&record)?);
    } else {
        println!("migration:  {} ({})", record.id, record.outcome.as_str());
        println!("vm:         {} from {} to {}", record.vm, record.source, record.destination);
        println!("reason:     {} {}", record.reason_code, record.reason);
        println!("downtime:   {} ms", ms(record.downtime_ms));
        println!(
            "total:      {} ms ({} ms outside the VMM's migration)",
            ms(record.total_ms),
            ms(record.orchestration_ms)
        );
        if let Some(o) = &record.orchestration {
            println!(
                "outside:    checks {:.1}, reservation {:.1}, start {:.1}, following {:.1}, completion {:.1} ms; then the source's clean-up {:.1} ms",
                o.checks_ms, o.reservation_ms, o.start_ms, o.follow_ms, o.completion_ms, o.source_cleanup_ms
            );
        }
        println!("bytes:      {}", record.bytes.map(|b| b.to_string()).unwrap_or_else(|| "-".into()));
    }
    Ok(if record.outcome == MigrationOutcome::Completed { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// A VM's definition from `ferry vm create`'s arguments.
pub(crate) fn definition(c: VmCreateArgs) -> VmDefinition {
    VmDefinition {
        name: c.name,
        memory_mib: c.memory_mib,
        vcpus: c.vcpus,
        guest: c.guest,
        kernel: c.kernel,
        cmdline: c.cmdline,
        disks: c
            .disks
            .into_iter()
            .map(|(file, size)| DiskDef { file, size_bytes: Some(size), readonly: false })
            .collect(),
        nics: c.nics.into_iter().map(|(portgroup, mac)| NicDef { mac, portgroup }).collect(),
        cpu_model: c.cpu_model,
        cpu_hide: c.cpu_hide,
    }
}

/// The controller `ferry vm` talks to: one is configured and no daemon is named (--host or
/// $FERRY_HOST).
fn through_controller(args: &VmArgs) -> anyhow::Result<Option<crate::cluster::ServerTarget>> {
    let host_named = args.target.url.is_some() || std::env::var("FERRY_HOST").is_ok_and(|h| !h.is_empty());
    if host_named {
        return Ok(None);
    }
    let target =
        crate::cluster::ServerTarget { server: args.server.clone(), identity: args.target.identity.clone() };
    Ok(target.configured()?.map(|_| target))
}

/// `ferry vm ...` through the controller.
fn vm_through(target: crate::cluster::ServerTarget, args: VmArgs) -> anyhow::Result<ExitCode> {
    let ctl = target.connect()?;
    let json = args.json;
    let act = |name: &str, action: Action| -> anyhow::Result<ExitCode> {
        crate::cluster::vm_action(&ctl, name, action.as_str(), json)?;
        Ok(ExitCode::SUCCESS)
    };
    match args.command {
        VmCommand::List => crate::cluster::vms(&ctl, None, json).map(|_| ExitCode::SUCCESS),
        VmCommand::Show(n) => crate::cluster::vms(&ctl, Some(&n.name), json).map(|_| ExitCode::SUCCESS),
        VmCommand::Start(n) => act(&n.name, Action::Start),
        VmCommand::Stop(n) => act(&n.name, Action::Stop),
        VmCommand::Kill(n) => act(&n.name, Action::Kill),
        VmCommand::Suspend(n) => act(&n.name, Action::Suspend),
        VmCommand::Resume(n) => act(&n.name, Action::Resume),
        VmCommand::Snapshot(n) => act(&n.name, Action::Snapshot),
        VmCommand::Migrate(m) => {
            let req = ferry_cluster_api::MigrateRequest {
                to_host: m.to_host,
                check: m.check,
                downtime_ms: m.downtime_ms,
                streams: m.streams,
                explain: m.explain,
            };
            crate::cluster::migrate_through(&ctl, &m.name, &req, json)
        }
        VmCommand::Create(c) => {
            let req = ferry_cluster_api::CreateVmRequest {
                datastore: c.datastore.clone(),
                definition: definition(c),
                host: None,
                explain: false,
            };
            crate::cluster::create(&ctl, &req, json)
        }
        VmCommand::Register { path } => {
            let req = ferry_cluster_api::RegisterVmRequest {
                path: std::path::absolute(&path)?,
                host: None,
                explain: false,
            };
            crate::cluster::register(&ctl, &req, json)
        }
        VmCommand::Unregister(_) | VmCommand::Log { .. } => anyhow::bail!(
            "`ferry vm unregister` and `ferry vm log` talk to a host daemon: pass --host URL \
             (a controller is configured, and it does not forward them)"
        ),
    }
}

/// `ferry vm ...`: through the controller when one is configured and no daemon is named,
/// else to the daemon.
pub fn vm(args: VmArgs) -> anyhow::Result<ExitCode> {
    if let Some(target) = through_controller(&args)? {
        return vm_through(target, args);
    }
    let client = args.target.client()?;
    let json = args.json;
    let detail = |d: VmDetail| -> anyhow::Result<ExitCode> {
        if json {
            println!("{}", serde_json::to_string_pretty(&d)?);
        } else {
            print_detail(&d);
        }
        Ok(ExitCode::SUCCESS)
    };
    let act = |name: &str, action: Action| -> anyhow::Result<VmDetail> {
        Ok(client.post(&paths::action(name, action), &serde_json::json!({}))?)
    };
    match args.command {
        VmCommand::Create(c) => {
            let datastore = c.datastore.clone();
            let d: VmDetail = client.post(paths::VMS, &CreateVm { datastore, definition: definition(c) })?;
            detail(d)
        }
        VmCommand::Register { path } => {
            let path = std::path::absolute(&path)?;
            let d: VmDetail = client.post(paths::REGISTER, &RegisterVm { path })?;
            detail(d)
        }
        VmCommand::Unregister(n) => detail(client.delete(&paths::vm(&n.name))?),
        VmCommand::Start(n) => detail(act(&n.name, Action::Start)?),
        VmCommand::Stop(n) => detail(act(&n.name, Action::Stop)?),
        VmCommand::Kill(n) => detail(act(&n.name, Action::Kill)?),
        VmCommand::Suspend(n) => detail(act(&n.name, Action::Suspend)?),
        VmCommand::Resume(n) => detail(act(&n.name, Action::Resume)?),
        VmCommand::Snapshot(n) => detail(act(&n.name, Action::Snapshot)?),
        VmCommand::Show(n) => detail(client.get(&paths::vm(&n.name))?),
        VmCommand::Migrate(m) => migrate(&client, m, json),
        VmCommand::List => {
            let list: VmList = client.get(paths::VMS)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print_list(&list);
            }
            Ok(ExitCode::SUCCESS)
        }
        VmCommand::Log { name, lines } => {
            let log: VmLog = client.get(&paths::log(&name, lines))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&log)?);
            } else {
                for l in &log.lines {
                    println!("{l}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
