//! `ferry cluster ...`: the controller (serve, init, openapi) and the reports of the whole
//! cluster through it (hosts, vms, vm, datastores, portgroups); `ferry host join|leave`
//! (through a host daemon).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use ferry_cluster_api::{paths, DatastoreList, HostDetail, HostList, PortGroupList, VmList};
use serde::de::DeserializeOwned;

/// The long help of `ferry cluster`.
pub const CLUSTER_ABOUT: &str = "\
The controller of a cluster of Ferry hosts, and the cluster-wide reports it answers.

A host joins a controller with `ferry host join https://CONTROLLER:PORT` (asked of its
daemon); from then on its daemon sends the controller a heartbeat with its inventory every
2 s over mutual TLS. The controller keeps every host's last report in its store (SQLite in its
state directory, or PostgreSQL) and marks a host whose heartbeats stop not_responding within
about 6 s (its VMs are shown as last reported, with the report's age).

The reports find the controller from --server URL, else $FERRY_SERVER, else `server = \"URL\"`
in $XDG_CONFIG_HOME/ferry/cli.toml (else ~/.config/ferry/cli.toml); they authenticate with the
CLI's identity (--identity, $FERRY_IDENTITY, ~/.config/ferry/identity). With standby
controllers, give them all (--server A,B or servers = [\"A\", \"B\"]): the CLI asks the active one.

Examples:
  ferry cluster init --config /etc/ferry/cluster.toml --ca /etc/ferry/ca
  ferry cluster serve --config /etc/ferry/cluster.toml
  ferry host join https://10.0.0.10:7444 --host https://10.0.0.1:7443
  export FERRY_SERVER=https://10.0.0.10:7444
  ferry cluster hosts
  ferry cluster vms --json
  ferry cluster vm web1
  ferry cluster vm web1 stop                 # forwarded to the host that runs it
  ferry cluster migrate web1 --check         # every other host: compatible, or every reason
  ferry cluster migrate web1 --to-host host-b
  ferry cluster migrate web1 --explain       # placement's ranking of every host
  ferry cluster migrate web1                 # to the host placement picks
  ferry cluster create web2 --datastore shared --memory-mib 256 --guest memstress
  ferry cluster migrations --vm web1         # the same as `ferry migrations --vm web1`
  ferry cluster datastores
  ferry cluster portgroups
  ferry cluster evc                          # the CPU baseline; `evc set --hide F` lowers it
  ferry cluster leader --server https://10.0.0.10:7444,https://10.0.0.11:7444   # which one is active

The configuration is in docs/cluster.md, with an example in docs/examples/cluster.toml.";

const CREATE_ABOUT: &str = "\
Create a VM through the controller: the same arguments as `ferry vm create`, plus --host
HOST to name the host. Without --host, placement picks it: among the hosts that have the
datastore (by name), every port group of the NICs and enough free memory for VMs (less what
the controller holds for migrations and creates in progress), the one with the largest
fraction of its memory free after the VM, then the lowest vCPU load, then by name (see
docs/cluster.md, \"Placement\"). The controller then asks that host's daemon to create it.

Examples:
  ferry cluster create web1 --datastore shared --memory-mib 256 --guest memstress --explain
  ferry cluster create web1 --datastore shared --memory-mib 256 --guest memstress
  ferry cluster create web2 --datastore shared --memory-mib 256 --guest memstress --host host-b
  ferry cluster vm web1 start";

/// The environment variable naming the controller.
pub const SERVER_ENV: &str = "FERRY_SERVER";

/// `ferry cluster ...`.
#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Run the controller (until SIGTERM or SIGINT).
    Serve(ServeArgs),
    /// Create the controller's TLS identity (a certificate of the cluster CA with the
    /// serverAuth usage, named by the configuration's `name`) in its identity_dir.
    Init(InitArgs),
    /// Print the controller API's OpenAPI document (what `GET /openapi.json` serves).
    Openapi,
    /// The cluster's hosts: state (connected, not_responding, disconnected, maintenance),
    /// last heartbeat's age, VMs, CPU, memory.
    Hosts(ReportArgs),
    /// One host: its state and its last inventory.
    Host(NamedArgs),
    /// Remove a host from the cluster: it becomes disconnected (its last report is kept) and
    /// its heartbeats are refused until it joins again (`ferry host join`).
    RemoveHost(NamedArgs),
    /// Every VM of every host, as its host last reported it (with the report's age).
    Vms(ReportArgs),
    /// One VM: which host has it, its state and the report's age; with an ACTION (start,
    /// stop, kill, suspend, resume, snapshot), the controller forwards it to that host.
    Vm(VmArgs),
    /// Datastores by id, with the hosts that see each.
    Datastores(ReportArgs),
    /// Port groups by name, with each host's bridge.
    Portgroups(ReportArgs),
    /// Check or live-migrate a VM by name: the controller asks the host that has it. With
    /// --check and no --to-host, every other host is checked (a table: host, compatible or
    /// all its reasons). Without --to-host, placement picks the destination (--explain shows
    /// its ranking). Without --check, follows the migration until it ends: "queued,
    /// position N" while it waits for a slot (`[limits]`), then live progress (Ctrl-C
    /// detaches; `ferry migrations cancel ID` cancels).
    Migrate(MigrateArgs),
    /// Create a VM (as `ferry vm create`) on the host placement picks, or --host HOST;
    /// --explain shows the ranking.
    #[command(long_about = CREATE_ABOUT)]
    Create(CreateArgs),
    /// Register an existing home on the host placement picks among those that see its
    /// datastore, or --host HOST; --explain shows the ranking.
    Register(RegisterArgs),
    /// The controller's migration history, newest first (the same as `ferry migrations`).
    Migrations(crate::migrations::ListArgs),
    /// One migration: its record, per-pass statistics and the controller's events.
    Migration(NamedArgs),
    /// The cluster's CPU baseline (EVC): its features and generation, each host's extra and
    /// lacking features, each VM's CPUID generation; `evc set` changes it.
    #[command(long_about = crate::evc::EVC_ABOUT)]
    Evc(crate::evc::EvcArgs),
    /// High availability: which controller is active (holds the leader lease), its term, and
    /// every controller with its last renewal. Any controller answers, standby or active.
    #[command(long_about = LEADER_ABOUT)]
    Leader(ReportArgs),
}

/// The long help of `ferry cluster leader`.
pub const LEADER_ABOUT: &str = "\
Which controller is active, its term, and the standbys with their last renewal.

Two or more `ferry cluster serve` on one database (PostgreSQL) form one controller: the one
that holds the leader lease (a row in the database, renewed every second for 5 s, on the
database's clock) is active; the others are standbys that answer every request with
not_active and the active one's URL, and take the lease over when it expires. The term is
raised at every takeover. Any controller answers this report.

Give the CLI every controller's URL (--server A,B, FERRY_SERVER=A,B, or servers = [...] in
cli.toml): it tries them in order and follows a standby's hint to the active one.

Examples:
  ferry cluster leader --server https://10.0.0.10:7444,https://10.0.0.11:7444
  ferry cluster leader --json";

/// Arguments of `ferry cluster migrate`.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// The VM.
    pub name: String,
    /// The destination host's name (as `ferry cluster hosts` lists it).
    #[arg(long, value_name = "HOST")]
    pub to_host: Option<String>,
    /// Only run the checks (nothing is reserved); without --to-host, on every other host.
    #[arg(long)]
    pub check: bool,
    /// Without --to-host: only show placement's ranking (every host's score, or its
    /// reasons); nothing is migrated.
    #[arg(long, conflicts_with_all = ["check", "to_host"])]
    pub explain: bool,
    /// Largest acceptable downtime, ms.
    #[arg(long, value_name = "MS")]
    pub downtime_ms: Option<u64>,
    /// Parallel streams.
    #[arg(long, value_name = "N")]
    pub streams: Option<u32>,
    /// Bandwidth cap of the migration, MiB/s.
    #[arg(long, value_name = "MIB_S")]
    pub bandwidth_mib: Option<u64>,
    #[command(flatten)]
    pub target: ServerTarget,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `ferry cluster create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    #[command(flatten)]
    pub vm: crate::cli::VmCreateArgs,
    /// The host to create it on (its name); without it placement picks one.
    #[arg(long = "host", value_name = "HOST")]
    pub host: Option<String>,
    /// Only show placement's ranking (every host's score, or its reasons); nothing is
    /// created.
    #[arg(long)]
    pub explain: bool,
    #[command(flatten)]
    pub target: ServerTarget,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `ferry cluster register`.
#[derive(Debug, Args)]
pub struct RegisterArgs {
    /// The home directory, as the hosts see it (on one of their datastores).
    #[arg(value_name = "PATH")]
    pub path: PathBuf,
    /// The host to register it on (its name); without it placement picks one among the
    /// hosts that see the home's datastore.
    #[arg(long = "host", value_name = "HOST")]
    pub host: Option<String>,
    /// Only show placement's ranking; nothing is registered.
    #[arg(long)]
    pub explain: bool,
    #[command(flatten)]
    pub target: ServerTarget,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `ferry cluster serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The configuration file (TOML; see docs/examples/cluster.toml).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
}

/// Arguments of `ferry cluster init`.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// The controller's configuration file: its name, listen address and identity_dir.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// The cluster CA's directory (ca.pem, ca.key from `ferry ca init`).
    #[arg(long, value_name = "DIR")]
    pub ca: PathBuf,
    /// Another name or address the certificate must cover (repeatable). Always covered: the
    /// controller's name, the listen address, localhost, 127.0.0.1, ::1 and the kernel's
    /// host name.
    #[arg(long = "address", value_name = "NAME_OR_IP")]
    pub addresses: Vec<String>,
    /// Print what was written as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Which controller, and as whom.
#[derive(Debug, Args, Clone)]
pub struct ServerTarget {
    /// The controller's URL (https://HOST:PORT), or several separated by commas (standby
    /// controllers: tried in order, a standby's hint to the active one followed). Default:
    /// $FERRY_SERVER, else `server` (or `servers = [...]`) in ~/.config/ferry/cli.toml.
    #[arg(long = "server", value_name = "URL[,URL...]")]
    pub server: Option<String>,
    /// The CLI's TLS identity (cert.pem, key.pem, ca.pem from `ferry ca issue --kind
    /// client`). Default: $FERRY_IDENTITY, else ~/.config/ferry/identity.
    #[arg(long = "identity", value_name = "DIR")]
    pub identity: Option<PathBuf>,
}

/// Arguments of the reports.
#[derive(Debug, Args)]
pub struct ReportArgs {
    #[command(flatten)]
    pub target: ServerTarget,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of the reports about one thing.
#[derive(Debug, Args)]
pub struct NamedArgs {
    /// Its name.
    pub name: String,
    #[command(flatten)]
    pub target: ServerTarget,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `ferry cluster vm`.
#[derive(Debug, Args)]
pub struct VmArgs {
    /// The VM.
    pub name: String,
    /// start, stop, kill, suspend, resume or snapshot (forwarded to the VM's host); none:
    /// show the VM.
    pub action: Option<String>,
    #[command(flatten)]
    pub target: ServerTarget,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `server = "..."` (one URL, or several separated by commas) or `servers = [...]` in the
/// CLI's configuration file.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CliConfig {
    server: Option<String>,
    servers: Option<Vec<String>>,
}

/// The CLI's configuration file: $XDG_CONFIG_HOME/ferry/cli.toml, else
/// ~/.config/ferry/cli.toml.
fn cli_config_path() -> Option<PathBuf> {
    let var = |n: &str| std::env::var_os(n).filter(|v| !v.is_empty()).map(PathBuf::from);
    var("XDG_CONFIG_HOME")
        .map(|c| c.join("ferry").join("cli.toml"))
        .or_else(|| var("HOME").map(|h| h.join(".config").join("ferry").join("cli.toml")))
}

fn servers_from_file(path: &Path) -> anyhow::Result<Option<Vec<String>>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let config: CliConfig = toml::from_str(&text).map_err(|e| {
        let line = e.span().map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1).unwrap_or(1);
        anyhow::anyhow!("{}, line {line}: {}", path.display(), e.message().trim())
    })?;
    let mut urls = config.server.as_deref().map(split_servers).unwrap_or_default();
    urls.extend(config.servers.unwrap_or_default().iter().flat_map(|s| split_servers(s)));
    Ok((!urls.is_empty()).then_some(urls))
}

/// `a,b , c` as URLs, without empty ones and trailing slashes.
fn split_servers(list: &str) -> Vec<String> {
    list.split(',').map(|u| u.trim().trim_end_matches('/').to_string()).filter(|u| !u.is_empty()).collect()
}

/// A client of the controller: the controllers to try, in order (the one that answered last
/// first), and the CLI's TLS client.
pub(crate) struct Controller {
    urls: std::cell::RefCell<Vec<String>>,
    client: ferry_pki::BlockingClient,
}

impl ServerTarget {
    /// The controllers' URLs if any is configured: --server, else $FERRY_SERVER (several
    /// separated by commas), else `server`/`servers` in cli.toml (an unreadable or malformed
    /// cli.toml is an error).
    pub(crate) fn configured(&self) -> anyhow::Result<Option<Vec<String>>> {
        match self.server.clone().or_else(|| std::env::var(SERVER_ENV).ok().filter(|s| !s.is_empty())) {
            Some(u) => Ok(Some(split_servers(&u))),
            None => Ok(cli_config_path().as_deref().map(servers_from_file).transpose()?.flatten()),
        }
    }

    pub(crate) fn connect(&self) -> anyhow::Result<Controller> {
        let urls = match self.configured()? {
            Some(u) => u,
            None => anyhow::bail!(
                "no controller: pass --server https://HOST:PORT[,https://HOST2:PORT], set {SERVER_ENV}, or put server = \"https://HOST:PORT\" (or servers = [...]) in {}",
                cli_config_path().map_or("~/.config/ferry/cli.toml".into(), |f| f.display().to_string())
            ),
        };
        if urls.is_empty() {
            anyhow::bail!("no controller URL given: use https://HOST:PORT, several separated by commas");
        }
        for url in &urls {
            if !url.starts_with("https://") {
                anyhow::bail!(
                    "{url}: the controller speaks only HTTPS with mutual TLS; use https://HOST:PORT"
                );
            }
        }
        let dir = self.identity.clone().or_else(ferry_pki::default_identity_dir).context(
            "no TLS identity: pass --identity DIR or set FERRY_IDENTITY (a directory with cert.pem, key.pem and ca.pem from `ferry ca issue --kind client`)",
        )?;
        let client = ferry_pki::BlockingClient::new(&dir)
            .with_context(|| format!("cannot use the TLS identity in {}", dir.display()))?;
        Ok(Controller { urls: std::cell::RefCell::new(urls), client })
    }
}

/// Whether a request that failed with `e` certainly did not reach the controller's handler
/// (so another controller may be asked even for a request that changes something).
fn not_sent(e: &ferry_pki::client::Error) -> bool {
    use ferry_pki::client::Error as E;
    matches!(e, E::Connect { .. } | E::Tls { .. } | E::Url(_))
        || matches!(e, E::Timeout { step, .. } if *step != "request")
}

impl Controller {
    /// Sends a request (`send(url)`) to the controllers in order until the active one
    /// answers: one that cannot be reached is skipped (for a request that changes something,
    /// only if it certainly did not get it), a standby's `not_active` answer is followed to
    /// the active controller it names (once). The answer and the URL that gave it.
    fn exchange(
        &self,
        changes: bool,
        send: impl Fn(&str) -> Result<ferry_pki::Response, ferry_pki::client::Error>,
    ) -> anyhow::Result<ferry_pki::Response> {
        let urls = self.urls.borrow().clone();
        let mut queue: std::collections::VecDeque<String> = urls.iter().cloned().collect();
        let mut tried: Vec<(String, String)> = Vec::new();
        let mut hint_followed = false;
        while let Some(url) = queue.pop_front() {
            if tried.iter().any(|(u, _)| *u == url) {
                continue;
            }
            match send(&url) {
                Err(e) if urls.len() == 1 && tried.is_empty() && queue.is_empty() => {
                    return Err(anyhow::Error::new(e).context(format!(
                        "cannot reach the controller at {url} (is `ferry cluster serve` running there?)"
                    )));
                }
                Err(e) if !changes || not_sent(&e) => tried.push((url, ferry_cluster::error_chain(&e))),
                Err(e) => {
                    return Err(anyhow::Error::new(e).context(format!(
                        "the controller at {url} did not answer (the request may have been done: check before retrying)"
                    )))
                }
                Ok(r) if r.status == 503 => {
                    match serde_json::from_slice::<ferry_cluster_api::NotActive>(&r.body) {
                        Ok(n) if n.code == ferry_cluster_api::ErrorCode::NotActive => {
                            if let Some(active) = n.active_url.clone().filter(|_| !hint_followed) {
                                hint_followed = true;
                                queue.push_front(active.trim_end_matches('/').to_string());
                            }
                            tried.push((url, format!("standby ({})", n.message)));
                        }
                        _ => return Ok(r),
                    }
                }
                Ok(r) => {
                    // Ask this one first from now on.
                    let mut order = self.urls.borrow_mut();
                    order.retain(|u| *u != url);
                    order.insert(0, url);
                    return Ok(r);
                }
            }
        }
        let list: Vec<String> = tried.iter().map(|(u, why)| format!("{u}: {why}")).collect();
        anyhow::bail!("no active controller answered; tried {}", list.join("; "))
    }

    pub(crate) fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let response = self.exchange(false, |url| self.client.get(&format!("{url}{path}")))?;
        self.decode(response)
    }

    pub(crate) fn post<B: serde::Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        let body = serde_json::to_value(body)?;
        let response = self.exchange(true, |url| self.client.post(&format!("{url}{path}"), &body))?;
        self.decode(response)
    }

    fn delete<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let response = self.exchange(true, |url| self.client.delete(&format!("{url}{path}")))?;
        self.decode(response)
    }

    /// The controller the last answer came from.
    fn url(&self) -> String {
        self.urls.borrow().first().cloned().unwrap_or_default()
    }

    fn decode<T: DeserializeOwned>(&self, response: ferry_pki::Response) -> anyhow::Result<T> {
        if !response.is_success() {
            // The controller's error answer, else the raw body.
            match serde_json::from_slice::<ferry_cluster_api::ApiError>(&response.body) {
                Ok(e) => anyhow::bail!("{e}"),
                Err(_) => anyhow::bail!(
                    "the controller at {} answered {}: {}",
                    self.url(),
                    response.status,
                    String::from_utf8_lossy(&response.body).trim()
                ),
            }
        }
        serde_json::from_slice(&response.body)
            .with_context(|| format!("the controller at {} sent a malformed answer", self.url()))
    }
}

/// `ferry cluster ...`.
pub fn run(cmd: ClusterCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ClusterCommand::Serve(args) => {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
            rt.block_on(ferry_cluster::run(&args.config))?;
        }
        ClusterCommand::Init(args) => init(args)?,
        ClusterCommand::Openapi => println!("{}", ferry_cluster::server::openapi()),
        ClusterCommand::Hosts(args) => {
            let list: HostList = args.target.connect()?.get(paths::HOSTS)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print_hosts(&list);
            }
        }
        ClusterCommand::Host(args) => {
            let host: HostDetail = args.target.connect()?.get(&paths::host(&args.name))?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&host)?);
            } else {
                print_hosts(&HostList { hosts: vec![host.summary.clone()] });
                println!();
                crate::hostcmd::print_host(&host.info);
            }
        }
        ClusterCommand::RemoveHost(args) => {
            let h: ferry_cluster_api::HostSummary =
                args.target.connect()?.delete(&paths::host(&args.name))?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&h)?);
            } else {
                println!("host {} removed: {}", h.name, h.state);
            }
        }
        ClusterCommand::Vms(args) => vms(&args.target.connect()?, None, args.json)?,
        ClusterCommand::Vm(args) if args.action.is_some() => {
            let action = args.action.as_deref().unwrap_or_default();
            vm_action(&args.target.connect()?, &args.name, action, args.json)?;
        }
        ClusterCommand::Vm(args) => vms(&args.target.connect()?, Some(&args.name), args.json)?,
        ClusterCommand::Datastores(args) => {
            let list: DatastoreList = args.target.connect()?.get(paths::DATASTORES)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!("{:<38} {:<16} {:<12} {:>10} PATH", "ID", "HOST", "NAME", "FREE MiB");
                for d in &list.datastores {
                    for s in &d.hosts {
                        println!(
                            "{:<38} {:<16} {:<12} {:>10} {}",
                            d.id,
                            s.host,
                            s.name,
                            s.free_bytes >> 20,
                            s.path
                        );
                    }
                }
            }
        }
        ClusterCommand::Portgroups(args) => {
            let list: PortGroupList = args.target.connect()?.get(paths::PORTGROUPS)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!("{:<16} {:<16} {:<16} PRESENT", "PORTGROUP", "HOST", "BRIDGE");
                for p in &list.portgroups {
                    for s in &p.hosts {
                        println!(
                            "{:<16} {:<16} {:<16} {}",
                            p.name,
                            s.host,
                            s.bridge,
                            if s.present { "yes" } else { "NO" }
                        );
                    }
                }
            }
        }
        ClusterCommand::Migrate(args) => return migrate(args),
        ClusterCommand::Create(args) => {
            let ctl = args.target.connect()?;
            let req = ferry_cluster_api::CreateVmRequest {
                datastore: args.vm.datastore.clone(),
                definition: crate::hostcmd::definition(args.vm),
                host: args.host,
                explain: args.explain,
            };
            return create(&ctl, &req, args.json);
        }
        ClusterCommand::Register(args) => {
            let ctl = args.target.connect()?;
            let req = ferry_cluster_api::RegisterVmRequest {
                path: std::path::absolute(&args.path)?,
                host: args.host,
                explain: args.explain,
            };
            return register(&ctl, &req, args.json);
        }
        ClusterCommand::Evc(args) => crate::evc::run(args)?,
        ClusterCommand::Leader(args) => {
            let report: ferry_cluster_api::LeaderReport = args.target.connect()?.get(paths::LEADER)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print_leader(&report);
            }
        }
        ClusterCommand::Migrations(args) => return crate::migrations::list(args),
        ClusterCommand::Migration(args) => {
            return crate::migrations::show(crate::migrations::IdArgs {
                id: args.name,
                target: args.target,
                json: args.json,
            })
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_checks(table: &ferry_cluster_api::CheckTable) {
    println!("VM {} is on host {}", table.vm, table.source);
    println!("{:<20} {:<11} REASONS", "HOST", "COMPATIBLE");
    for c in &table.checks {
        let reasons: Vec<String> = c.reasons.iter().map(|r| format!("{}: {}", r.code, r.message)).collect();
        println!("{:<20} {:<11} {}", c.host, if c.ok { "yes" } else { "no" }, reasons.join("; "));
    }
}

/// A VM action through the controller (forwarded to the VM's host), printed.
pub(crate) fn vm_action(ctl: &Controller, name: &str, action: &str, json: bool) -> anyhow::Result<()> {
    if ferry_host_api::Action::parse(action).is_none() {
        anyhow::bail!("no action {action:?}: use start, stop, kill, suspend, resume or snapshot");
    }
    let done: ferry_cluster_api::VmActionDone =
        ctl.post(&paths::action(name, action), &serde_json::Value::Null)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&done)?);
    } else {
        println!("{name}: {action} on host {} (now {})", done.host, done.vm.state);
    }
    Ok(())
}

/// The VMs through the controller (`name`: one VM's reports), printed.
pub(crate) fn vms(ctl: &Controller, name: Option<&str>, json: bool) -> anyhow::Result<()> {
    let list: VmList = ctl.get(&name.map_or_else(|| paths::VMS.to_string(), paths::vm))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else {
        print_vms(&list);
    }
    Ok(())
}

fn mib(bytes: u64) -> u64 {
    bytes >> 20
}

/// Placement's ranking: ranked hosts best first with their score, then the excluded ones
/// with every reason.
pub(crate) fn print_placement(p: &ferry_cluster_api::Placement) {
    match &p.source {
        Some(s) => println!("placement of VM {} ({} MiB) from host {s}", p.vm, p.memory_mib),
        None => println!("placement of VM {} ({} MiB)", p.vm, p.memory_mib),
    }
    println!(
        "{:<5} {:<16} {:>10} {:>10} {:>10} {:>10} {:>8} {:>6}  REASONS",
        "RANK", "HOST", "FREE MiB", "HELD MiB", "AFTER MiB", "OF MiB", "AFTER %", "LOAD"
    );
    for h in &p.hosts {
        match &h.score {
            Some(s) => println!(
                "{:<5} {:<16} {:>10} {:>10} {:>10} {:>10} {:>7.1}% {:>6.2}",
                h.rank.map(|r| r.to_string()).unwrap_or_else(|| "-".into()),
                h.host,
                mib(s.free_bytes),
                mib(s.reserved_bytes),
                mib(s.free_after_bytes),
                mib(s.total_bytes),
                s.free_after_fraction * 100.0,
                s.load
            ),
            None => {
                let reasons: Vec<String> =
                    h.reasons.iter().map(|r| format!("{}: {}", r.code, r.message)).collect();
                println!(
                    "{:<5} {:<16} {:>10} {:>10} {:>10} {:>10} {:>8} {:>6}  {}",
                    "-",
                    h.host,
                    "",
                    "",
                    "",
                    "",
                    "",
                    "",
                    reasons.join("; ")
                );
            }
        }
    }
    match p.hosts.iter().find(|h| h.rank == Some(1)) {
        Some(h) => println!("best: {}", h.host),
        None => println!("no host can take it"),
    }
}

/// `POST /vms` on the controller: the ranking with `explain`, else the VM created.
pub(crate) fn create(
    ctl: &Controller,
    req: &ferry_cluster_api::CreateVmRequest,
    json: bool,
) -> anyhow::Result<ExitCode> {
    place(ctl, paths::CREATE, req, req.explain, json)
}

/// `POST /vms/register` on the controller: the ranking with `explain`, else the VM
/// registered.
pub(crate) fn register(
    ctl: &Controller,
    req: &ferry_cluster_api::RegisterVmRequest,
    json: bool,
) -> anyhow::Result<ExitCode> {
    place(ctl, paths::REGISTER, req, req.explain, json)
}

/// A request placed by the controller (`path`): the ranking when `explain`, else the VM
/// with the host that took it.
fn place<R: serde::Serialize>(
    ctl: &Controller,
    path: &str,
    req: &R,
    explain: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    if explain {
        let p: ferry_cluster_api::Placement = ctl.post(path, req)?;
        if json {
            println!("{}", serde_json::to_string_pretty(&p)?);
        } else {
            print_placement(&p);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let done: ferry_cluster_api::VmActionDone = ctl.post(path, req)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&done)?);
    } else {
        println!("host:       {}", done.host);
        crate::hostcmd::print_detail(&done.vm);
    }
    Ok(ExitCode::SUCCESS)
}

/// `ferry cluster migrate`.
fn migrate(args: MigrateArgs) -> anyhow::Result<ExitCode> {
    let ctl = args.target.connect()?;
    let req = ferry_cluster_api::MigrateRequest {
        to_host: args.to_host.clone(),
        check: args.check,
        downtime_ms: args.downtime_ms,
        streams: args.streams,
        explain: args.explain,
        bandwidth_mib: args.bandwidth_mib,
    };
    migrate_through(&ctl, &args.name, &req, args.json)
}

/// A migration (or its checks, or placement's ranking) through the controller, followed
/// until it ends.
pub(crate) fn migrate_through(
    ctl: &Controller,
    name: &str,
    req: &ferry_cluster_api::MigrateRequest,
    json: bool,
) -> anyhow::Result<ExitCode> {
    if req.explain {
        let p: ferry_cluster_api::Placement = ctl.post(&paths::migrate(name), req)?;
        if json {
            println!("{}", serde_json::to_string_pretty(&p)?);
        } else {
            print_placement(&p);
        }
        return Ok(ExitCode::SUCCESS);
    }
    if req.check {
        let table: ferry_cluster_api::CheckTable = ctl.post(&paths::migrate(name), req)?;
        if json {
            println!("{}", serde_json::to_string_pretty(&table)?);
        } else {
            print_checks(&table);
        }
        let all_ok = table.checks.iter().all(|c| c.ok);
        return Ok(if all_ok || req.to_host.is_none() { ExitCode::SUCCESS } else { ExitCode::FAILURE });
    }
    let started: ferry_cluster_api::MigrationStarted = ctl.post(&paths::migrate(name), req)?;
    let Some(id) = started.migration_id.clone() else {
        if json {
            println!("{}", serde_json::to_string_pretty(&started)?);
        } else {
            print_checks(&ferry_cluster_api::CheckTable {
                vm: started.vm.clone(),
                source: started.source.clone(),
                checks: vec![started.checks.clone()],
            });
        }
        anyhow::bail!("the migration of {} to {} was refused by its checks", started.vm, started.destination);
    };
    let how = if req.to_host.is_none() { " (picked by placement)" } else { "" };
    eprintln!("migration {id}: {} from {} to {}{how}", started.vm, started.source, started.destination);
    if let Some(p) = started.queue_position {
        eprintln!(
            "migration {id}: queued, position {p}{}",
            started.queue_reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default()
        );
    }
    // Follow it in the controller's history until it ends, with live progress.
    crate::migrations::follow(ctl, &id, json)
}

fn print_leader(r: &ferry_cluster_api::LeaderReport) {
    let l = &r.lease;
    if l.holder.is_empty() {
        println!("active: none (the lease was never taken)");
    } else if l.expired {
        println!(
            "active: none (the lease of {} at {}, term {}, expired {} ago; a standby takes it at its next try)",
            l.holder,
            l.holder_url,
            l.term,
            age(r.now_unix_ms.saturating_sub(l.expires_unix_ms))
        );
    } else {
        println!(
            "active: {} at {}, term {}, renewed {} ago, expires in {}",
            l.holder,
            l.holder_url,
            l.term,
            age(r.now_unix_ms.saturating_sub(l.renewed_unix_ms)),
            age(l.expires_unix_ms.saturating_sub(r.now_unix_ms))
        );
    }
    println!("answered by {} ({})", r.answered_by, r.role);
    println!("{:<20} {:<8} {:<32} LAST RENEWAL", "CONTROLLER", "ROLE", "URL");
    for c in &r.controllers {
        let role = if c.active { "active" } else { "standby" };
        println!("{:<20} {:<8} {:<32} {} ago", c.name, role, c.url, age(c.age_ms));
    }
}

/// Milliseconds as a short age.
fn age(ms: u64) -> String {
    if ms < 10_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else if ms < 3_600_000 {
        format!("{}s", ms / 1000)
    } else {
        format!("{}h", ms / 3_600_000)
    }
}

fn print_hosts(list: &HostList) {
    println!(
        "{:<16} {:<15} {:>8} {:>4} {:>5} {:>10}  API",
        "HOST", "STATE", "SEEN", "VMS", "CPUS", "MEM MiB"
    );
    for h in &list.hosts {
        println!(
            "{:<16} {:<15} {:>8} {:>4} {:>5} {:>10}  {}",
            h.name,
            h.state.as_str(),
            age(h.age_ms),
            h.vms,
            h.cpus,
            h.memory_total_bytes >> 20,
            h.api_url
        );
    }
}

fn print_vms(list: &VmList) {
    println!(
        "{:<20} {:<16} {:<15} {:<10} {:>7} {:>5} {:>8}",
        "VM", "HOST", "HOST STATE", "STATE", "MEM MiB", "VCPUS", "AGE"
    );
    for v in &list.vms {
        println!(
            "{:<20} {:<16} {:<15} {:<10} {:>7} {:>5} {:>8}",
            v.name,
            v.host,
            v.host_state.as_str(),
            v.state,
            v.memory_mib,
            v.vcpus,
            age(v.age_ms)
        );
    }
}

/// `ferry cluster init`.
fn init(args: InitArgs) -> anyhow::Result<()> {
    let config = ferry_cluster::config::load(&args.config)?;
    let mut addresses = args.addresses.clone();
    if !config.listen.ip().is_unspecified() {
        addresses.push(config.listen.ip().to_string());
    }
    // A host-kind certificate: the controller serves (serverAuth) and calls host daemons
    // (clientAuth). See docs/security.md.
    let issued = ferry_pki::issue_host(&args.ca, &config.name, &addresses, &config.identity_dir)
        .with_context(|| {
            format!("cannot make the controller identity in {}", config.identity_dir.display())
        })?;
    crate::hostcmd::print_identity(
        "controller",
        &config.name,
        &config.identity_dir,
        &issued,
        false,
        args.json,
    )
}

/// Arguments of `ferry host join`.
#[derive(Debug, Args)]
pub struct JoinArgs {
    /// The controller (https://HOST:PORT of `ferry cluster serve`).
    pub controller_url: String,
    #[command(flatten)]
    pub target: crate::cli::HostTarget,
    /// Print the membership as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `ferry host leave` and `ferry host cluster`.
#[derive(Debug, Args)]
pub struct MembershipArgs {
    #[command(flatten)]
    pub target: crate::cli::HostTarget,
    /// Print the membership as JSON.
    #[arg(long)]
    pub json: bool,
}

fn print_membership(m: &ferry_host::join::Membership, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(m)?);
        return Ok(());
    }
    match (&m.controller_url, &m.controller) {
        (Some(url), Some(name)) => println!("controller: {name} at {url}"),
        (Some(url), None) => println!("controller: {url}"),
        (None, _) => println!("controller: none (this host joined no cluster)"),
    }
    if let Some(g) = m.evc_generation {
        println!("CPU baseline: generation {g} (see `ferry cluster evc`)");
    }
    if m.controllers.len() > 1 {
        println!("controllers (the host turns to these when its controller fails or stands by):");
        for url in &m.controllers {
            let mark =
                if m.controller_url.as_deref() == Some(url.as_str()) { " (talking to it)" } else { "" };
            println!("  {url}{mark}");
        }
    }
    if let Some(e) = &m.last_error {
        println!("last error: {e}");
    }
    Ok(())
}

/// `ferry host join URL`: asks the host daemon to join the controller.
pub fn join(args: JoinArgs) -> anyhow::Result<ExitCode> {
    let client = args.target.client()?;
    let m: ferry_host::join::Membership = client.post(
        ferry_host::join::routes::JOIN,
        &ferry_host::join::JoinCluster { controller_url: args.controller_url.clone() },
    )?;
    print_membership(&m, args.json)?;
    Ok(ExitCode::SUCCESS)
}

/// `ferry host leave`.
pub fn leave(args: MembershipArgs) -> anyhow::Result<ExitCode> {
    let client = args.target.client()?;
    let m: ferry_host::join::Membership =
        client.post(ferry_host::join::routes::LEAVE, &serde_json::Value::Null)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&m)?);
    } else {
        println!("left the cluster of {}", m.controller_url.as_deref().unwrap_or("(unknown)"));
        if let Some(e) = &m.last_error {
            println!("warning: {e}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `ferry host cluster`: the controller this host joined.
pub fn membership(args: MembershipArgs) -> anyhow::Result<ExitCode> {
    let client = args.target.client()?;
    let m: ferry_host::join::Membership = client.get(ferry_host::join::routes::CLUSTER)?;
    print_membership(&m, args.json)?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    #[test]
    fn several_controllers_are_named_by_commas_or_a_list() {
        assert_eq!(
            super::split_servers(" https://a:1/, https://b:2 ,,"),
            ["https://a:1".to_string(), "https://b:2".to_string()]
        );
        let dir = std::env::temp_dir().join(format!("ferry-cli-toml-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("cli.toml");
        std::fs::write(&file, "servers = [\"https://a:1\", \"https://b:2,https://c:3\"]\n").expect("write");
        let urls = super::servers_from_file(&file).expect("read").expect("some");
        assert_eq!(urls, ["https://a:1", "https://b:2", "https://c:3"]);
        std::fs::write(&file, "server = \"https://a:1,https://b:2\"\n").expect("write");
        assert_eq!(
            super::servers_from_file(&file).expect("read").expect("some"),
            ["https://a:1", "https://b:2"]
        );
        std::fs::write(&file, "servers = \"https://a:1\"\n").expect("write");
        let err = super::servers_from_file(&file).expect_err("a string is not a list").to_string();
        assert!(err.contains("cli.toml, line 1"), "{err}");
        std::fs::write(&file, "").expect("write");
        assert_eq!(super::servers_from_file(&file).expect("read"), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
