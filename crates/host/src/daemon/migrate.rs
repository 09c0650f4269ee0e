//! Migration by name between hosts' daemons.
//!
//! Source (`POST /vms/NAME/migrate`): the checks (the destination's `GET /host` and its
//! `POST /migrations/incoming/check`), the reservation (`POST /migrations/incoming`: a
//! receiving VMM with an inherited listening socket and a one-time key), `PUT /vm/migrate` on
//! the source VMM with the same migration id, following `GET /vm/migration`, then
//! `POST /migrations/ID/complete` (the VM is the destination's; this host forgets it) or
//! `POST /migrations/ID/abort` (the destination releases everything; the VM runs on here).
//!
//! Destination: a reservation holds the VM's memory, its taps and the receiving VMM for at
//! most `reservation_ttl_s` (default [`RESERVATION_TTL`]); unused or aborted, all of it goes. Every log line of a
//! migration starts `migration ID:` on both hosts.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_host_api::{
    paths, CheckCode, CheckReason, CheckReport, IncomingMigration, MigrateStarted, MigrateVm,
    MigrationOutcome, MigrationProgress, MigrationRecord, MigrationRole, OrchestrationSteps, Reservation,
    VmState,
};

use super::fault::Step;
use super::*;
use crate::db::unix_ms;
use crate::peer::Peer;

/// How long a reservation waits for its migration, by default.
pub const RESERVATION_TTL: Duration = Duration::from_secs(60);
/// Deadline of a check request to a peer.
const PEER_QUICK: Duration = Duration::from_secs(5);
/// Deadline of a reservation or completion request to a peer.
const PEER_SLOW: Duration = Duration::from_secs(30);
/// How often the source VMM's progress is asked for during pre-copy.
const PROGRESS_EVERY: Duration = Duration::from_millis(200);
/// Deadline of one progress request to the source VMM.
const STATUS_TIMEOUT: Duration = Duration::from_secs(1);

/// An incoming migration's reservation on the destination.
#[derive(Debug)]
pub(super) struct Reserved {
    def: VmDefinition,
    datastore: String,
    home: PathBuf,
    taps: Vec<String>,
    socket: PathBuf,
    console: PathBuf,
    child: std::process::Child,
    record: MigrationRecord,
}

fn reason(code: CheckCode, message: String) -> CheckReason {
    CheckReason { code, message }
}

/// The reason code of a migration an operator cancelled (the VMM's own code for it).
const CANCELLED: &str = "cancelled";
/// How long `POST /migrations/ID/cancel` waits for the migration to end.
const CANCEL_WAIT: Duration = Duration::from_secs(15);

/// Asks the VMM at `sock` to cancel its migration (`PUT /vm/migrate/cancel`).
async fn vmm_cancel(sock: PathBuf) -> Result<(), String> {
    match tokio::task::spawn_blocking(move || {
        ferry_api::client::send(&sock, &ferry_api::Request::MigrateCancel, STATUS_TIMEOUT)
    })
    .await
    {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

fn new_id() -> String {
    let n = ferry_migration::auth::nonce().map(|n| ferry_migration::auth::hex(&n[..6])).unwrap_or_default();
    format!("m-{n}")
}

impl Daemon {
    /// The memory held by incoming migrations' reservations, bytes.
    pub(super) async fn reserved_for_incoming(&self) -> u64 {
        self.reservations.lock().await.values().map(|r| r.def.memory_mib << 20).sum()
    }

    /// The memory free for another VM: available, within `vm_memory_mib`, minus what running
    /// VMs and reservations hold.
    pub(super) async fn free_for_vms(&self) -> u64 {
        let (total, available) =
            tokio::task::spawn_blocking(crate::inventory::memory).await.unwrap_or((0, 0));
        let running: u64 = self
            .vms
            .lock()
            .await
            .values()
            .filter(|v| v.row.state.has_process())
            .map(|v| v.def.memory_mib << 20)
            .sum();
        let reserved = self.reserved_for_incoming().await;
        let limit = self.config.vm_memory_mib.map_or(total, |m| m << 20);
        available.saturating_sub(reserved).min(limit.saturating_sub(running + reserved))
    }

    /// The destination's checks of an incoming VM: every reason it cannot come, and where its
    /// home is here (datastore name, path) when the datastore is visible.
    pub async fn check_incoming(
        &self,
        req: &IncomingMigration,
    ) -> (Vec<CheckReason>, Option<(String, PathBuf)>) {
        let def = &req.definition;
        let mut reasons = Vec::new();
        if self.config.maintenance {
            reasons
                .push(reason(CheckCode::Maintenance, format!("host {} is in maintenance", self.config.name)));
        }
        let ours = ferry_migration::protocol::PROTOCOL_VERSION;
        if !req.migration_protocols.is_empty() && !req.migration_protocols.contains(&ours) {
            reasons.push(reason(
                CheckCode::Protocol,
                format!(
                    "host {} speaks migration protocol {ours}, the source {:?}",
                    self.config.name, req.migration_protocols
                ),
            ));
        }
        let home = match self.datastore_ids.iter().find(|(_, id)| **id == req.datastore_id) {
            Some((name, _)) => {
                self.config.datastores.get(name).map(|d| (d.name.clone(), d.path.join(&def.name)))
            }
            None => {
                reasons.push(reason(
                    CheckCode::DatastoreNotVisible,
                    format!(
                        "the VM's datastore (id {}) is not one host {} sees (it has: {})",
                        req.datastore_id,
                        self.config.name,
                        self.datastore_ids.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                ));
                None
            }
        };
        for (i, nic) in def.nics.iter().enumerate() {
            match self.config.portgroups.get(&nic.portgroup) {
                None => reasons.push(reason(
                    CheckCode::PortGroupMissing,
                    format!("NIC {i}: host {} has no port group {:?}", self.config.name, nic.portgroup),
                )),
                Some(b) if !crate::config::interface_exists(b) => reasons.push(reason(
                    CheckCode::PortGroupMissing,
                    format!(
                        "NIC {i}: port group {:?} maps to bridge {b}, which does not exist",
                        nic.portgroup
                    ),
                )),
                Some(_) => {}
            }
        }
        let need = def.memory_mib << 20;
        let free = self.free_for_vms().await;
        if free < need {
            reasons.push(reason(
                CheckCode::NotEnoughMemory,
                format!(
                    "the VM needs {} MiB, host {} has {} MiB free for VMs",
                    def.memory_mib,
                    self.config.name,
                    free >> 20
                ),
            ));
        }
        let missing: Vec<&String> =
            req.cpu_features.iter().filter(|f| !self.kvm_features.contains(f)).collect();
        if !missing.is_empty() {
            reasons.push(reason(
                CheckCode::CpuFeatures,
                format!(
                    "KVM on host {} does not offer CPU features the VM may use: {}",
                    self.config.name,
                    missing.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
                ),
            ));
        }
        if let (Some(vm), Some(host)) = (&req.cpu_model, &self.cpu_model) {
            use ferry_arch::model::MismatchKind;
            for m in ferry_arch::model::compare(vm, host) {
                let code = match m.kind {
                    MismatchKind::Xsave => CheckCode::Xsave,
                    MismatchKind::Tsc => CheckCode::Tsc,
                    MismatchKind::Msrs => CheckCode::Msrs,
                    MismatchKind::KvmCapabilities => CheckCode::KvmCapabilities,
                };
                reasons.push(reason(code, format!("host {}: {}", self.config.name, m.message)));
            }
        }
        {
            let vms = self.vms.lock().await;
            if let Some(vm) = vms.get(&def.name) {
                if vm.row.state.has_process() || home.as_ref().is_some_and(|(_, h)| *h != vm.row.home) {
                    reasons.push(reason(
                        CheckCode::NameTaken,
                        format!(
                            "a VM named {} is registered on host {} ({})",
                            def.name, self.config.name, vm.row.state
                        ),
                    ));
                }
            }
            for vm in vms.values().filter(|v| v.row.name != def.name) {
                for mac in vmdef::macs(&vm.def) {
                    if vmdef::macs(def).contains(&mac) {
                        reasons.push(reason(
                            CheckCode::NameTaken,
                            format!("MAC {mac} is used by VM {} on host {}", vm.row.name, self.config.name),
                        ));
                    }
                }
            }
        }
        if self.reservations.lock().await.values().any(|r| r.def.name == def.name) {
            reasons.push(reason(
                CheckCode::AlreadyMigrating,
                format!("VM {} is already being received on host {}", def.name, self.config.name),
            ));
        }
        (reasons, home)
    }

    /// `POST /migrations/incoming`: re-checks, then reserves: taps, a listening socket, a
    /// one-time key, a receiving VMM. Nothing is left on error.
    pub async fn reserve(self: &Arc<Self>, req: IncomingMigration) -> Result<Reservation, Error> {
        let id = req.migration_id.clone();
        if !ferry_migration::handshake::valid_id(&id) {
            return Err(Error::BadRequest(format!("migration id {id:?} is not valid")));
        }
        vmdef::check(&req.definition).map_err(|(field, message)| vmdef::Error::Invalid { field, message })?;
        let (reasons, home) = self.check_incoming(&req).await;
        let Some((datastore, home)) = home.filter(|_| reasons.is_empty()) else {
            let text =
                reasons.iter().map(|r| format!("{}: {}", r.code.as_str(), r.message)).collect::<Vec<_>>();
            tracing::info!("migration {id}: refused: {}", text.join("; "));
            return Err(Error::Conflict(format!("migration {id} refused: {}", text.join("; "))));
        };
        let def = req.definition.clone();
        // Held until the reservation is in: two reservations of one VM (same taps, same
        // socket) cannot interleave.
        let mut reservations = self.reservations.lock().await;
        if reservations.contains_key(&id) || reservations.values().any(|r| r.def.name == def.name) {
            return Err(Error::Conflict(format!(
                "migration {id}: VM {} already has a reservation here",
                def.name
            )));
        }
        tracing::info!(
            "migration {id}: reserving for VM {} from {} (home {})",
            def.name,
            req.source,
            home.display()
        );
        let lease = self.config.datastores.get(&datastore).and_then(|d| d.lease.clone());
        let undo_taps = |taps: &[String]| {
            for t in taps {
                crate::taps::delete(t);
            }
        };
        let taps = self.make_taps(&def).await?;
        let spawned = self.spawn_receiver(&id, &def, &home, lease.as_ref());
        let (child, listen, key) = match spawned {
            Ok(x) => x,
            Err(e) => {
                undo_taps(&taps);
                return Err(e);
            }
        };
        let now = unix_ms();
        let record = MigrationRecord::begin(
            &id,
            &def.name,
            (&req.source, &self.config.name),
            MigrationRole::Destination,
            MigrationOutcome::Active,
            now,
        );
        if let Err(e) = self.db.put_migration(&record).await {
            tracing::warn!("migration {id}: cannot record it: {e}");
        }
        let pid = child.id();
        reservations.insert(
            id.clone(),
            Reserved {
                def: def.clone(),
                datastore,
                home: home.clone(),
                taps,
                socket: self.socket_of(&def.name),
                console: home.join(format!("console.{id}.log")),
                child,
                record,
            },
        );
        drop(reservations);
        tracing::info!("migration {id}: receiver pid {pid} listens on {listen}");
        let daemon = Arc::clone(self);
        let expiring = id.clone();
        let ttl = self.config.reservation_ttl;
        tokio::spawn(async move {
            tokio::time::sleep(ttl).await;
            daemon.expire(&expiring).await;
        });
        self.faults.at(Step::Reserve, &id);
        Ok(Reservation {
            migration_id: id,
            listen,
            auth_key_hex: ferry_migration::auth::hex(&key),
            home,
            expires_unix_ms: now + ttl.as_millis() as u64,
        })
    }

    /// Binds the listening socket, makes the key and starts `ferry receive` with both
    /// inherited (the key through a pipe, never a file).
    fn spawn_receiver(
        &self,
        id: &str,
        def: &VmDefinition,
        home: &std::path::Path,
        lease: Option<&crate::config::LeaseSettings>,
    ) -> Result<(std::process::Child, String, Vec<u8>), Error> {
        let listener = std::net::TcpListener::bind((self.config.migration_address, 0))
            .map_err(io("listen on the migration address of", &self.config.state_dir))?;
        let addr = listener.local_addr().map_err(io("read the address of", &self.config.state_dir))?;
        let key = ferry_migration::auth::nonce()
            .map_err(|e| Error::BadRequest(format!("cannot make the migration key: {e}")))?
            .to_vec();
        let mut fds = [0i32; 2];
        // SAFETY: pipe2 writes two descriptors into the array it is given.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io("make a pipe for", home)(std::io::Error::last_os_error()));
        }
        // SAFETY: both descriptors were just made by pipe2 and are owned here only.
        let (read_end, write_end) = unsafe {
            use std::os::fd::FromRawFd;
            (std::os::fd::OwnedFd::from_raw_fd(fds[0]), std::fs::File::from_raw_fd(fds[1]))
        };
        {
            use std::io::Write;
            // 32 bytes fit in any pipe's buffer: this does not block.
            let mut w = write_end;
            w.write_all(&key).map_err(io("write the key into a pipe for", home))?;
        }
        let (lfd, kfd) = (listener.as_raw_fd(), read_end.as_raw_fd());
        let sock = self.socket_of(&def.name);
        let _ = std::fs::remove_file(&sock);
        let mut cmd = std::process::Command::new(&self.config.ferry_binary);
        cmd.arg("receive")
            .arg("--listen-fd")
            .arg(lfd.to_string())
            .arg("--auth-key-fd")
            .arg(kfd.to_string())
            .arg("--api-socket")
            .arg(&sock)
            .arg("--home")
            .arg(home)
            .arg("--serial")
            .arg(format!("file:{}", home.join(format!("console.{id}.log")).display()));
        if let Some(l) = lease {
            cmd.arg("--lease").arg(l.to_arg());
        }
        if !self.config.cpu_hide.is_empty() {
            cmd.arg("--cpu-hide").arg(self.config.cpu_hide.join(","));
        }
        let log_path = home.join(VM_LOG);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io("open", &log_path))?;
        let log2 = log.try_clone().map_err(io("open", &log_path))?;
        {
            use std::io::Write;
            let mut l = &log;
            let _ = writeln!(l, "{START_MARK}{}: receive, migration {id}: {:?}", self.config.name, cmd);
        }
        cmd.stdin(std::process::Stdio::null()).stdout(log).stderr(log2);
        {
            use std::os::unix::process::CommandExt;
            // SAFETY: setsid and fcntl are async-signal-safe and touch no memory of the
            // parent; the two descriptors are open in the child (copies of the parent's).
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setsid() < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    for fd in [lfd, kfd] {
                        if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        }
        let child = cmd
            .spawn()
            .map_err(|source| Error::Spawn { binary: self.config.ferry_binary.clone(), source })?;
        drop(listener);
        drop(read_end);
        Ok((child, format!("tcp:{addr}"), key))
    }

    /// Releases a reservation: the receiver killed, taps, socket and its console file gone;
    /// the record says why.
    async fn release(
        &self,
        id: &str,
        outcome: MigrationOutcome,
        code: &str,
        why: &str,
    ) -> Option<MigrationRecord> {
        let mut r = self.reservations.lock().await.remove(id)?;
        tracing::info!("migration {id}: releasing the reservation ({code}: {why})");
        send_signal(r.child.id(), libc::SIGKILL);
        let mut child = r.child;
        let _ = tokio::task::spawn_blocking(move || child.wait()).await;
        for t in &r.taps {
            crate::taps::delete(t);
        }
        let _ = std::fs::remove_file(&r.socket);
        let _ = std::fs::remove_file(&r.console);
        r.record.outcome = outcome;
        r.record.reason_code = code.to_string();
        r.record.reason = why.to_string();
        r.record.ended_unix_ms = Some(unix_ms());
        if let Err(e) = self.db.put_migration(&r.record).await {
            tracing::warn!("migration {id}: cannot record it: {e}");
        }
        Some(r.record)
    }

    /// `POST /migrations/ID/abort`.
    pub async fn abort_incoming(&self, id: &str, why: &MigrationRecord) -> Result<MigrationRecord, Error> {
        let outcome = if why.outcome == MigrationOutcome::Cancelled {
            MigrationOutcome::Cancelled
        } else {
            MigrationOutcome::Failed
        };
        match self.release(id, outcome, &why.reason_code, &why.reason).await {
            Some(r) => Ok(r),
            None => self.known_migration(id).await,
        }
    }

    async fn known_migration(&self, id: &str) -> Result<MigrationRecord, Error> {
        self.db
            .migrations(None, Some(id))
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| Error::NoMigration(id.to_string()))
    }

    /// A reservation's time is up: released, unless its receiver runs the VM (the source
    /// committed but could not tell this host), in which case it is completed here. A
    /// receiver in the middle of a migration is left to end it (killing it after its
    /// RESTORE_OK could leave the VM nowhere; before, it would fail a migration that goes
    /// well): looked at again until it runs the VM or is idle again.
    async fn expire(self: &Arc<Self>, id: &str) {
        let mut told = false;
        loop {
            let (sock, pid) = match self.reservations.lock().await.get(id) {
                Some(r) => (r.socket.clone(), r.child.id()),
                None => return,
            };
            match receiver_state(sock, pid).await {
                ReceiverState::Runs => {
                    tracing::info!(
                        "migration {id}: the reservation's time is up and its VMM runs the VM: completing"
                    );
                    let _ = self.complete_incoming(id, None).await;
                    return;
                }
                ReceiverState::Migrating => {
                    if !told {
                        tracing::info!(
                            "migration {id}: the reservation's time is up while its receiver migrates: left to finish"
                        );
                        told = true;
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                ReceiverState::Idle => {
                    self.release(
                        id,
                        MigrationOutcome::Failed,
                        "reservation_expired",
                        "the reservation was not used in time",
                    )
                    .await;
                    return;
                }
            }
        }
    }

    /// `POST /migrations/ID/complete`: the VM runs here now; it is registered with its VMM.
    pub async fn complete_incoming(
        self: &Arc<Self>,
        id: &str,
        source: Option<&MigrationRecord>,
    ) -> Result<MigrationRecord, Error> {
        if source.is_some() {
            self.faults.at(Step::Complete, id);
        }
        let Some(r) = self.reservations.lock().await.remove(id) else {
            return self.known_migration(id).await;
        };
        let pid = r.child.id();
        // The guest's console is the VM's `console.log` again (the receiving VMM writes on
        // through its open file; the source's console of before is replaced).
        if let Err(e) = std::fs::rename(&r.console, r.home.join(CONSOLE_LOG)) {
            tracing::warn!("migration {id}: cannot rename {}: {e}", r.console.display());
        }
        let row = VmRow {
            name: r.def.name.clone(),
            home: r.home.clone(),
            datastore: r.datastore.clone(),
            // The source's VMM reported the VM running here (RESTORE_OK, commit); `show`
            // re-reads it from the VMM.
            state: VmState::Running,
            pid: Some(pid),
            api_socket: Some(r.socket.clone()),
            taps: r.taps.clone(),
            last_exit: None,
            last_log: Vec::new(),
        };
        self.db.put(&row).await?;
        // It keeps the CPUID it was powered on with elsewhere: no generation from this host.
        self.evc.record(&self.db, &row.name, None).await?;
        self.vms.lock().await.insert(
            row.name.clone(),
            Vm { row, def: r.def.clone(), stop_requested: false, suspending: false },
        );
        self.watch_child(r.def.name.clone(), r.child);
        let mut record = r.record;
        if let Some(s) = source {
            record.downtime_ms = s.downtime_ms;
            record.total_ms = s.total_ms;
            record.bytes = s.bytes;
            record.passes = s.passes.clone();
            record.orchestration_ms = s.orchestration_ms;
        }
        record.outcome = MigrationOutcome::Completed;
        record.reason_code = "completed".into();
        record.ended_unix_ms = Some(unix_ms());
        self.db.put_migration(&record).await?;
        self.event(
            &record.vm,
            "migrated-in",
            &format!("migration {id} from {}: VMM pid {pid}", record.source),
        )
        .await;
        tracing::info!("migration {id}: completed: VM {} runs here (VMM pid {pid})", record.vm);
        Ok(record)
    }

    /// The checks of migrating `name` to the daemon at `to_host`, all reasons at once.
    async fn checks(
        &self,
        name: &str,
        to_host: &str,
    ) -> Result<(CheckReport, Option<(Peer, String, IncomingMigration)>), Error> {
        let (def, state, datastore, sock) = {
            let vms = self.vms.lock().await;
            let vm = vms.get(name).ok_or_else(|| Error::NoVm(name.into()))?;
            (vm.def.clone(), vm.row.state, vm.row.datastore.clone(), vm.row.api_socket.clone())
        };
        // The CPU features the VM's CPUID gives the guest and the CPU model its state needs,
        // from its VMM; a VMM that does not say (an older one) stands for this host's KVM
        // offer, and its model is not compared.
        let info = match sock.filter(|_| state == VmState::Running) {
            Some(sock) => tokio::task::spawn_blocking(move || {
                ferry_api::client::send(&sock, &ferry_api::Request::Info, STATUS_TIMEOUT)
            })
            .await
            .ok()
            .and_then(Result::ok)
            .and_then(|r| match r {
                ferry_api::Response::Info(i) => Some(i),
                _ => None,
            }),
            None => None,
        };
        let vm_cpu_model = info.as_ref().and_then(|i| i.cpu_model.clone());
        let vm_features = info.map(|i| i.cpu_features).filter(|f| !f.is_empty());
        let mut report = CheckReport {
            vm: name.into(),
            destination: to_host.into(),
            ok: false,
            reasons: Vec::new(),
            destination_home: None,
            api_version: ferry_host_api::API_VERSION,
        };
        if state != VmState::Running {
            report
                .reasons
                .push(reason(CheckCode::VmNotRunning, format!("VM {name} is {state}, not running")));
        }
        if let Some(r) = self.outgoing.lock().await.get(name) {
            report.reasons.push(reason(
                CheckCode::AlreadyMigrating,
                format!("VM {name} is migrating (migration {})", r.id),
            ));
        }
        let peer =
            Peer::new(to_host, self.peer_client.as_ref()).map_err(|e| Error::BadRequest(e.to_string()))?;
        let incoming = IncomingMigration {
            migration_id: String::new(),
            source: self.config.name.clone(),
            definition: def,
            datastore_id: self.datastore_ids.get(&datastore).cloned().unwrap_or_default(),
            cpu_features: vm_features.unwrap_or_else(|| self.kvm_features.clone()),
            cpu_model: vm_cpu_model,
            migration_protocols: vec![ferry_migration::protocol::PROTOCOL_VERSION],
        };
        // One request: the destination's own checks (the same code its reservation runs).
        let theirs = match peer.post::<_, CheckReport>(paths::INCOMING_CHECK, &incoming, PEER_QUICK).await {
            Ok(t) => t,
            Err(e) => {
                report.reasons.push(reason(CheckCode::Unreachable, e.to_string()));
                return Ok((report, None));
            }
        };
        report.destination = theirs.destination.clone();
        if theirs.destination == self.config.name {
            report.reasons.push(reason(
                CheckCode::SameHost,
                format!("{to_host} is this host ({})", theirs.destination),
            ));
        }
        if theirs.api_version != ferry_host_api::API_VERSION {
            report.reasons.push(reason(
                CheckCode::Protocol,
                format!(
                    "host {} speaks host API {}, this one {}",
                    theirs.destination,
                    theirs.api_version,
                    ferry_host_api::API_VERSION
                ),
            ));
        }
        report.reasons.extend(theirs.reasons);
        report.destination_home = theirs.destination_home;
        report.ok = report.reasons.is_empty();
        let destination = theirs.destination;
        Ok((report, Some((peer, destination, incoming))))
    }

    /// `POST /migrations/incoming/check`.
    pub async fn incoming_check(&self, req: IncomingMigration) -> CheckReport {
        let (reasons, home) = self.check_incoming(&req).await;
        CheckReport {
            vm: req.definition.name.clone(),
            destination: self.config.name.clone(),
            ok: reasons.is_empty(),
            reasons,
            destination_home: home.map(|h| h.1),
            api_version: ferry_host_api::API_VERSION,
        }
    }

    /// `POST /vms/NAME/migrate`: the checks; unless only checking (or refused), the migration
    /// starts and its id is answered at once (follow it with `GET /migrations?id=ID`).
    pub async fn migrate(self: &Arc<Self>, name: &str, req: MigrateVm) -> Result<MigrateStarted, Error> {
        let started = Instant::now();
        let started_unix_ms = unix_ms();
        let (checks, ctx) = self.checks(name, &req.to_host).await?;
        let checks_ms = started.elapsed().as_secs_f64() * 1e3;
        if req.check {
            return Ok(MigrateStarted { checks, migration_id: None, refused_id: None });
        }
        let given = match &req.migration_id {
            Some(id) => {
                if !ferry_migration::handshake::valid_id(id) {
                    return Err(Error::BadRequest(format!(
                        "migration id {id:?} is not valid (1 to 64 letters, digits, '-', '_')"
                    )));
                }
                if !self.db.migrations(None, Some(id)).await?.is_empty() {
                    return Err(Error::Conflict(format!("migration {id} is already in this host's history")));
                }
                Some(id.clone())
            }
            None => None,
        };
        let Some((peer, destination, mut incoming)) = ctx.filter(|_| checks.ok) else {
            let id = self.record_refused(name, &checks, started_unix_ms, started, given).await;
            return Ok(MigrateStarted { checks, migration_id: None, refused_id: Some(id) });
        };
        let id = given.unwrap_or_else(new_id);
        incoming.migration_id = id.clone();
        let record = MigrationRecord {
            progress: Some(MigrationProgress {
                memory_pages: incoming.definition.memory_mib << 8,
                percent: Some(0.0),
                ..MigrationProgress::default()
            }),
            ..MigrationRecord::begin(
                &id,
                name,
                (&self.config.name, &destination),
                MigrationRole::Source,
                MigrationOutcome::Active,
                unix_ms(),
            )
        };
        {
            let mut out = self.outgoing.lock().await;
            if out.contains_key(name) {
                return Err(Error::Conflict(format!("VM {name} is already migrating")));
            }
            out.insert(name.into(), record.clone());
        }
        self.db.put_migration(&record).await?;
        tracing::info!(
            "migration {id}: VM {name} to host {} ({}): checks passed (+{:.1} ms)",
            destination,
            peer.url(),
            started.elapsed().as_secs_f64() * 1e3
        );
        let daemon = Arc::clone(self);
        let vm = name.to_string();
        tokio::spawn(async move {
            daemon.run_outgoing(&vm, peer, incoming, req, started, checks_ms).await;
        });
        Ok(MigrateStarted { checks, migration_id: Some(id), refused_id: None })
    }

    /// Records a migration the checks refused in this host's history (outcome `refused`,
    /// reason code the first reason's, every reason kept) and returns its id. Nothing was
    /// asked of the destination beyond its checks, so it records nothing.
    async fn record_refused(
        &self,
        name: &str,
        checks: &CheckReport,
        started_unix_ms: u64,
        started: Instant,
        given: Option<String>,
    ) -> String {
        let id = given.unwrap_or_else(new_id);
        let record = MigrationRecord {
            id: id.clone(),
            vm: name.into(),
            source: self.config.name.clone(),
            destination: checks.destination.clone(),
            role: MigrationRole::Source,
            started_unix_ms,
            ended_unix_ms: Some(unix_ms()),
            outcome: MigrationOutcome::Refused,
            reason_code: checks.reasons.first().map(|r| r.code.as_str().to_string()).unwrap_or_default(),
            reason: checks
                .reasons
                .iter()
                .map(|r| format!("{}: {}", r.code.as_str(), r.message))
                .collect::<Vec<_>>()
                .join("; "),
            downtime_ms: None,
            // The checks' time: all of it was spent outside any VMM's migration.
            total_ms: Some(started.elapsed().as_secs_f64() * 1e3),
            orchestration_ms: Some(started.elapsed().as_secs_f64() * 1e3),
            bytes: None,
            passes: None,
            progress: None,
            reasons: checks.reasons.clone(),
            orchestration: None,
            queue_position: None,
        };
        tracing::info!(
            "migration {id}: VM {name} to {}: refused by the checks: {}",
            record.destination,
            record.reason
        );
        if let Err(e) = self.db.put_migration(&record).await {
            tracing::warn!("migration {id}: cannot record it: {e}");
        }
        self.event(
            name,
            "migration-refused",
            &format!("migration {id} to {}: {}", record.destination, record.reason_code),
        )
        .await;
        id
    }

    /// `POST /migrations/ID/cancel`: cancels this host's outgoing migration `id` (before its
    /// commit; the source VMM decides that against the commit): the VM stays here and the
    /// destination releases its reservation. Waits up to `CANCEL_WAIT` for the end and
    /// answers the record (outcome `cancelled`, or still `active` if it has not ended by
    /// then). A migration that already ended otherwise, or that the VMM can no longer
    /// cancel, is a conflict; one that ended cancelled is answered as it is.
    pub async fn cancel_outgoing(&self, id: &str) -> Result<MigrationRecord, Error> {
        let vm = self.outgoing.lock().await.values().find(|r| r.id == id).map(|r| r.vm.clone());
        let Some(vm) = vm else {
            let known = self.known_migration(id).await?;
            return match known.outcome {
                MigrationOutcome::Cancelled => Ok(known),
                MigrationOutcome::Active => Err(Error::Conflict(format!(
                    "migration {id} is not this host's outgoing migration (this host is its {})",
                    if known.role == MigrationRole::Source {
                        "source, from a previous run"
                    } else {
                        "destination"
                    }
                ))),
                other => {
                    Err(Error::Conflict(format!("migration {id} has already ended: {}", other.as_str())))
                }
            };
        };
        self.cancels.lock().await.insert(id.to_string());
        tracing::info!("migration {id}: cancel asked for (VM {vm})");
        let sock = self.vms.lock().await.get(&vm).and_then(|v| v.row.api_socket.clone());
        if let Some(sock) = sock {
            // A VMM that has not been asked to migrate yet refuses: the daemon's own check
            // before and after asking it catches the cancel then.
            if let Err(e) = vmm_cancel(sock).await {
                tracing::info!("migration {id}: the source VMM did not take the cancel: {e}");
            }
        }
        // The record ends once the destination was told (and released its reservation).
        let deadline = Instant::now() + CANCEL_WAIT;
        let r = loop {
            let r = self.known_migration(id).await?;
            if r.outcome != MigrationOutcome::Active || Instant::now() >= deadline {
                break r;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        if r.outcome == MigrationOutcome::Active {
            return Ok(r);
        }
        match r.outcome {
            MigrationOutcome::Cancelled => Ok(r),
            other => Err(Error::Conflict(format!(
                "migration {id} could not be cancelled: it ended {} ({})",
                other.as_str(),
                r.reason_code
            ))),
        }
    }

    async fn set_progress(&self, name: &str, f: impl FnOnce(&mut MigrationRecord)) {
        if let Some(r) = self.outgoing.lock().await.get_mut(name) {
            f(r);
        }
    }

    /// The source's side after the checks: reserve, migrate, follow, complete or abort.
    async fn run_outgoing(
        self: &Arc<Self>,
        name: &str,
        peer: Peer,
        incoming: IncomingMigration,
        req: MigrateVm,
        started: Instant,
        checks_ms: f64,
    ) {
        let id = incoming.migration_id.clone();
        self.faults.at(Step::Checks, &id);
        let result = self.outgoing_steps(name, &peer, &incoming, &req, started).await;
        let mut record = match self.outgoing.lock().await.remove(name) {
            Some(r) => r,
            None => return,
        };
        record.progress = None;
        record.ended_unix_ms = Some(unix_ms());
        let wall_ms = started.elapsed().as_secs_f64() * 1000.0;
        match result {
            Ok((report, marks)) => {
                self.faults.at(Step::After, &id);
                record.outcome = MigrationOutcome::Completed;
                record.reason_code = report.reason_code.to_string();
                record.reason = report.reason.clone();
                record.downtime_ms = Some(report.downtime_ms);
                record.bytes = Some(report.bytes_transferred);
                record.passes = serde_json::to_value(&report.passes).ok();
                record.total_ms = Some(wall_ms);
                record.orchestration_ms = Some((wall_ms - report.total_ms).max(0.0));
                if let Err(e) = tell(&peer, &paths::complete(&id), &record).await {
                    // The destination completes it itself when its reservation's time is up
                    // (its VMM runs the VM).
                    tracing::warn!("migration {id}: cannot tell the destination it completed: {e}");
                }
                tracing::info!(
                    "migration {id}: the destination completed it (+{:.1} ms)",
                    started.elapsed().as_secs_f64() * 1e3
                );
                // Outside the VMM's migration: the checks, the reservation, starting and
                // following it, and the destination's completion (it owns the VM now).
                let handed_ms = started.elapsed().as_secs_f64() * 1000.0;
                record.orchestration_ms = Some((handed_ms - report.total_ms).max(0.0));
                // The VM is the destination's: this host forgets it once its VMM has gone.
                self.forget_migrated(name, &id).await;
                record.total_ms = Some(started.elapsed().as_secs_f64() * 1000.0);
                record.orchestration = Some(OrchestrationSteps {
                    checks_ms,
                    reservation_ms: marks.reserved_ms - checks_ms,
                    start_ms: marks.started_ms - marks.reserved_ms,
                    follow_ms: marks.reported_ms - marks.started_ms - report.total_ms,
                    completion_ms: handed_ms - marks.reported_ms,
                    source_cleanup_ms: record.total_ms.unwrap_or_default() - handed_ms,
                });
                tracing::info!(
                    "migration {id}: completed: VM {name} runs on host {}; downtime {:.1} ms, the VMM's migration {:.1} ms, outside it {:.1} ms, total with the source VMM's exit {:.0} ms",
                    record.destination,
                    report.downtime_ms,
                    report.total_ms,
                    record.orchestration_ms.unwrap_or_default(),
                    record.total_ms.unwrap_or_default()
                );
            }
            Err((code, why, report)) => {
                // An operator's cancel (the VMM's reason code, or the daemon's own before the
                // VMM was asked): the VM stays here, as with any failure.
                record.outcome =
                    if code == CANCELLED { MigrationOutcome::Cancelled } else { MigrationOutcome::Failed };
                record.reason_code = code;
                record.reason = why;
                record.total_ms = Some(wall_ms);
                if let Some(r) = report {
                    record.downtime_ms = Some(r.downtime_ms);
                    record.bytes = Some(r.bytes_transferred);
                    record.passes = serde_json::to_value(&r.passes).ok();
                }
                tracing::warn!(
                    "migration {id}: failed ({}): {}; VM {name} keeps running here",
                    record.reason_code,
                    record.reason
                );
                if let Err(e) = tell(&peer, &paths::abort(&id), &record).await {
                    tracing::warn!(
                        "migration {id}: cannot tell the destination to release its reservation: {e}"
                    );
                }
            }
        }
        if let Err(e) = self.db.put_migration(&record).await {
            tracing::warn!("migration {id}: cannot record it: {e}");
        }
        self.cancels.lock().await.remove(&id);
        let kind = match record.outcome {
            MigrationOutcome::Completed => "migrated",
            MigrationOutcome::Cancelled => "migration-cancelled",
            _ => "migration-failed",
        };
        self.event(name, kind, &format!("migration {id} to {}: {}", record.destination, record.reason_code))
            .await;
    }

    /// Reserve, start and follow; the VMM's report when the VM runs on the destination, else
    /// the reason code, the reason and the report if there is one.
    async fn outgoing_steps(
        &self,
        name: &str,
        peer: &Peer,
        incoming: &IncomingMigration,
        req: &MigrateVm,
        started: Instant,
    ) -> Result<(ferry_api::MigrationReport, Marks), (String, String, Option<ferry_api::MigrationReport>)>
    {
        let id = incoming.migration_id.clone();
        let fail = |code: &str, why: String| (code.to_string(), why, None);
        let reservation: Reservation = peer
            .post(paths::INCOMING, incoming, PEER_SLOW)
            .await
            .map_err(|e| fail("reservation_failed", e.to_string()))?;
        let ms = || started.elapsed().as_secs_f64() * 1e3;
        let reserved_ms = ms();
        tracing::info!(
            "migration {id}: reserved on the destination: receiver at {} (+{:.1} ms)",
            reservation.listen,
            reserved_ms
        );
        self.faults.at(Step::Reserved, &id);
        let memory_pages = incoming.definition.memory_mib << 8;
        let (sock, pid, home) = {
            let vms = self.vms.lock().await;
            let vm =
                vms.get(name).ok_or_else(|| fail("vm_gone", format!("VM {name} is no longer registered")))?;
            match (&vm.row.api_socket, vm.row.pid, vm.row.state) {
                (Some(s), Some(p), VmState::Running) => (s.clone(), p, vm.row.home.clone()),
                (_, _, st) => return Err(fail("vm_not_running", format!("VM {name} is {st}"))),
            }
        };
        // The source VMM reads the key from a file at once: one only root can read, removed
        // as soon as the VMM has answered.
        let key_file = self.config.run_dir().join(format!("{id}.key"));
        let key = ferry_migration::auth::unhex(&reservation.auth_key_hex)
            .ok_or_else(|| fail("reservation_failed", "the destination's key is not hex".into()))?;
        if let Err(e) = write_key_file(&key_file, &key) {
            let _ = std::fs::remove_file(&key_file);
            return Err(fail("internal", format!("cannot write {}: {e}", key_file.display())));
        }
        if self.cancels.lock().await.contains(&id) {
            let _ = std::fs::remove_file(&key_file);
            return Err(fail(CANCELLED, "cancelled by an operator before the VMM was asked".into()));
        }
        let mut mreq = ferry_api::MigrateRequest::new(reservation.listen.clone(), key_file.clone());
        mreq.migration_id = Some(id.clone());
        if let Some(b) = req.bandwidth_mib {
            mreq.bandwidth_mib = b;
        }
        if let Some(d) = req.downtime_ms {
            mreq.downtime_ms = d;
        }
        if let Some(s) = req.streams {
            mreq.streams = s;
        }
        let s = sock.clone();
        let answer = tokio::task::spawn_blocking(move || {
            ferry_api::client::send(&s, &ferry_api::Request::Migrate(mreq), PEER_SLOW)
        })
        .await;
        let _ = std::fs::remove_file(&key_file);
        match answer {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                return Err(fail("vmm_refused", format!("the source VMM refused the migration: {e}")))
            }
            Err(e) => return Err(fail("internal", e.to_string())),
        }
        let started_ms = ms();
        tracing::info!("migration {id}: the source VMM (pid {pid}) migrates VM {name} (+{started_ms:.1} ms)");
        // A cancel that came while the VMM was being asked found no migration there: passed
        // on now (the VMM decides it against its commit).
        if self.cancels.lock().await.contains(&id) {
            if let Err(e) = vmm_cancel(sock.clone()).await {
                tracing::warn!("migration {id}: the source VMM refused the cancel: {e}");
            }
        }
        self.faults.at(Step::Started, &id);
        let report_file = home.join("migrations").join(format!("{id}.json"));
        let read_report = || {
            std::fs::read(&report_file)
                .ok()
                .and_then(|b| serde_json::from_slice::<ferry_api::MigrationReport>(&b).ok())
        };
        // The VMM's event stream carries the phases, the passes and, at the end, the report
        // (the VMM ends the stream when it exits); `GET /vm/migration` adds pages left and the
        // ETA during pre-copy only (a VMM finishing a migration answers no more requests).
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut follower = Some(spawn_follower(sock.clone(), id.clone(), tx.clone()));
        let mut tick = tokio::time::interval(PROGRESS_EVERY);
        let mut precopy = true;
        let mut restarts = 0u32;
        let report = loop {
            tokio::select! {
                followed = rx.recv() => match followed {
                    Some(Followed::Phase(phase)) => {
                        precopy = matches!(phase, ferry_api::MigrationPhase::Setup | ferry_api::MigrationPhase::PreCopy);
                        let word = serde_json::to_value(phase).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
                        tracing::info!("migration {id}: phase {word} (+{:.1} ms)", ms());
                        if phase == ferry_api::MigrationPhase::StopAndCopy {
                            self.faults.at(Step::Switchover, &id);
                        }
                        self.set_progress(name, |r| {
                            if let Some(p) = r.progress.as_mut() {
                                p.phase = word;
                            }
                        })
                        .await;
                    }
                    Some(Followed::Pass { pass, rate_mib_s, expected_downtime_ms, bytes_transferred }) => {
                        self.set_progress(name, |r| {
                            if let Some(p) = r.progress.as_mut() {
                                p.pass = p.pass.max(pass + 1);
                                p.rate_mib_s = rate_mib_s;
                                if let Some(d) = expected_downtime_ms {
                                    p.expected_downtime_ms = d;
                                }
                                p.bytes_transferred = bytes_transferred;
                            }
                        })
                        .await;
                    }
                    Some(Followed::Report(r)) => break *r,
                    Some(Followed::Ended) | None => {
                        if let Some(r) = read_report() {
                            break r;
                        }
                        if let Some(f) = follower.take() {
                            let _ = tokio::task::spawn_blocking(move || f.join()).await;
                        }
                        restarts += 1;
                        if restarts > 50 || !alive(pid) {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            if let Some(r) = read_report() {
                                break r;
                            }
                            return Err(fail(
                                "source_vmm_lost",
                                format!("the source VMM (pid {pid}) ended without a report of migration {id}"),
                            ));
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        follower = Some(spawn_follower(sock.clone(), id.clone(), tx.clone()));
                    }
                },
                _ = tick.tick(), if precopy => {
                    let s = sock.clone();
                    let status = tokio::task::spawn_blocking(move || {
                        ferry_api::client::send(&s, &ferry_api::Request::MigrationStatus, STATUS_TIMEOUT)
                    })
                    .await
                    .ok()
                    .and_then(Result::ok);
                    if let Some(ferry_api::Response::MigrationStatus(info)) = status {
                        if info.migration_id == id && info.report.is_none() {
                            self.set_progress(name, |r| {
                                r.progress = Some(MigrationProgress {
                                    phase: serde_json::to_value(info.phase)
                                        .ok()
                                        .and_then(|v| v.as_str().map(str::to_owned))
                                        .unwrap_or_default(),
                                    pass: info.pass,
                                    pages_left: info.pages_left,
                                    rate_mib_s: info.rate_mib_s,
                                    expected_downtime_ms: info.expected_downtime_ms,
                                    eta_ms: info.eta_ms,
                                    bytes_transferred: info.bytes_transferred,
                                    memory_pages,
                                    // Before pass 1 (setup) nothing is counted left yet: 0%, not 100%.
                                    percent: if info.pass == 0 {
                                        Some(0.0)
                                    } else {
                                        MigrationProgress::percent_of(info.pages_left, memory_pages)
                                    },
                                })
                            })
                            .await;
                        }
                    }
                }
            }
        };
        let reported_ms = ms();
        tracing::info!(
            "migration {id}: the source VMM reported {} (+{reported_ms:.1} ms)",
            report.reason_code
        );
        if report.vm_running_on == ferry_api::VmLocation::Destination {
            return Ok((report, Marks { reserved_ms, started_ms, reported_ms }));
        }
        Err((report.reason_code.to_string(), report.reason.clone(), Some(report)))
    }

    /// The VM runs on another host: its VMM here ends (a clean end, asked for), then the
    /// VM is unregistered here (its home stays: it is the destination's now).
    async fn forget_migrated(&self, name: &str, id: &str) {
        let pid = {
            let mut vms = self.vms.lock().await;
            let Some(vm) = vms.get_mut(name) else { return };
            vm.stop_requested = true;
            vm.row.pid
        };
        if let Some(pid) = pid {
            self.wait_end(name, pid, Duration::from_secs(30)).await;
        }
        let mut vms = self.vms.lock().await;
        if vms.get(name).is_some_and(|v| !v.row.state.has_process()) {
            vms.remove(name);
            drop(vms);
            if let Err(e) = self.db.delete(name).await {
                tracing::warn!("migration {id}: cannot forget VM {name}: {e}");
            }
            self.event(name, "unregistered", &format!("migration {id}: the VM runs on another host")).await;
        } else {
            tracing::warn!("migration {id}: the source VMM of {name} has not ended; the VM stays registered");
        }
    }

    /// `GET /migrations`: the history, newest first; active ones of this host's source side
    /// with their live progress.
    pub async fn migrations(
        &self,
        outcome: Option<MigrationOutcome>,
        id: Option<&str>,
    ) -> Result<Vec<MigrationRecord>, Error> {
        let mut list = self.db.migrations(outcome, id).await?;
        let out = self.outgoing.lock().await;
        for r in list.iter_mut().filter(|r| r.outcome == MigrationOutcome::Active) {
            if let Some(live) = out.values().find(|o| o.id == r.id) {
                r.progress = live.progress.clone();
            }
        }
        Ok(list)
    }

    /// At start-up: reservations and outgoing migrations of a previous run are gone with it;
    /// their records say so. (The VMs' own truth is in their homes' locks, reconciled
    /// before.)
    pub(super) async fn close_stale_migrations(self: &Arc<Self>) -> Result<(), Error> {
        for mut r in self.db.migrations(Some(MigrationOutcome::Active), None).await? {
            r.ended_unix_ms = Some(unix_ms());
            r.outcome = MigrationOutcome::Failed;
            r.reason_code = "daemon_restarted".into();
            r.reason = "the daemon restarted during the migration; the lock decides where the VM runs".into();
            match r.role {
                MigrationRole::Destination => {
                    // Its receiver may still be busy: settled in the background.
                    let daemon = Arc::clone(self);
                    tokio::spawn(async move {
                        if daemon.adopt_receiver(&r).await {
                            r.outcome = MigrationOutcome::Completed;
                            r.reason_code = "completed".into();
                            r.reason = "the VM ran here when the daemon came back: adopted".into();
                        }
                        tracing::warn!(
                            "migration {}: found active at start-up: {} ({})",
                            r.id,
                            r.outcome.as_str(),
                            r.reason
                        );
                        if let Err(e) = daemon.db.put_migration(&r).await {
                            tracing::warn!("migration {}: cannot record it: {e}", r.id);
                        }
                    });
                }
                MigrationRole::Source => {
                    // The source VMM's report in the home says how it ended; a VMM still
                    // migrating (re-adopted) is waited for in the background; one that never
                    // took this migration (the daemon died before asking it) will not write
                    // a report: not waited for.
                    let (home, pid, sock) = match self.vms.lock().await.get(&r.vm) {
                        Some(v) => (Some(v.row.home.clone()), v.row.pid, v.row.api_socket.clone()),
                        None => (None, None, None),
                    };
                    // The key file of a `PUT /vm/migrate` the daemon died in.
                    let _ = std::fs::remove_file(self.config.run_dir().join(format!("{}.key", r.id)));
                    let daemon = Arc::clone(self);
                    tokio::spawn(async move {
                        let file = home.map(|h| h.join("migrations").join(format!("{}.json", r.id)));
                        let read = || {
                            file.as_ref()
                                .and_then(|f| std::fs::read(f).ok())
                                .and_then(|b| serde_json::from_slice::<ferry_api::MigrationReport>(&b).ok())
                        };
                        let mut report = read();
                        let mut grace = 0;
                        // Said for a whole second: a `PUT /vm/migrate` the daemon died
                        // sending may still be on its way in.
                        let mut never = 0;
                        while report.is_none() && grace < 20 && never < 10 {
                            if !pid.is_some_and(alive) {
                                grace += 1;
                            } else if let Some(s) = sock.clone() {
                                never = if vmm_never_took(s, &r.id).await { never + 1 } else { 0 };
                            }
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            report = read();
                        }
                        if let Some(rep) = report {
                            r.downtime_ms = Some(rep.downtime_ms);
                            r.bytes = Some(rep.bytes_transferred);
                            r.reason_code = rep.reason_code.to_string();
                            r.reason = rep.reason.clone();
                            if rep.vm_running_on == ferry_api::VmLocation::Destination {
                                r.outcome = MigrationOutcome::Completed;
                            }
                        }
                        tracing::warn!(
                            "migration {}: found active at start-up: {} ({})",
                            r.id,
                            r.outcome.as_str(),
                            r.reason
                        );
                        if let Err(e) = daemon.db.put_migration(&r).await {
                            tracing::warn!("migration {}: cannot record it: {e}", r.id);
                        }
                    });
                }
            }
        }
        Ok(())
    }

    /// At start-up, an incoming migration's receiver left by the previous run: if it runs
    /// the VM, the VM is registered here with it (true); otherwise it is killed and its taps,
    /// socket and console file removed.
    async fn adopt_receiver(self: &Arc<Self>, r: &MigrationRecord) -> bool {
        let sock = self.socket_of(&r.vm);
        // A receiver in the middle of a migration is left to finish it (killing it after
        // its RESTORE_OK could leave the VM nowhere): at most the migration's own bounds.
        let deadline = Instant::now() + Duration::from_secs(60);
        let (info, running, silent) = loop {
            let s = sock.clone();
            let info = tokio::task::spawn_blocking(move || {
                ferry_api::client::send(&s, &ferry_api::Request::Info, Duration::from_secs(2))
            })
            .await
            .ok()
            .and_then(Result::ok);
            let info = match info {
                Some(ferry_api::Response::Info(i)) => Some(i),
                _ => None,
            };
            let running = info.as_ref().is_some_and(|i| {
                matches!(i.state, ferry_api::RunState::Running | ferry_api::RunState::Paused)
            });
            let idle = info.as_ref().and_then(|i| i.receiving.as_ref()).is_none_or(|rc| {
                matches!(rc.phase, ferry_api::ReceivePhase::Waiting | ferry_api::ReceivePhase::Unconfigured)
            });
            // A receiver that lives but does not answer (stopped, or too busy) is waited for
            // too: taken for gone, its socket would be removed under it.
            let silent = info.is_none() && receiver_pid(&sock).is_some();
            // Past RESTORE_OK the source may have committed: killing the receiver then
            // could leave the VM nowhere, so no deadline ends that wait (the receiver's own
            // activation is bounded).
            let activating = info
                .as_ref()
                .and_then(|i| i.receiving.as_ref())
                .is_some_and(|rc| rc.phase == ferry_api::ReceivePhase::Activating);
            if running || (!silent && idle) || (Instant::now() > deadline && !activating) {
                break (info, running, silent);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        if silent {
            // Its state is unknown: it may run the VM. Left alone with its socket; the
            // record says so.
            tracing::warn!(
                "migration {}: its receiver lives but has not answered for 60 s: left running, not adopted",
                r.id
            );
            return false;
        }
        let home = info.as_ref().and_then(|i| i.home.clone());
        if let (true, Some(info), Some(home)) = (running, &info, home) {
            let def = vmdef::load(&home).ok();
            let ds = self.config.datastore_of(&home).map(|d| d.name.clone());
            if let (Some(def), Some(datastore)) = (def, ds) {
                if !self.vms.lock().await.contains_key(&r.vm) {
                    let _ =
                        std::fs::rename(home.join(format!("console.{}.log", r.id)), home.join(CONSOLE_LOG));
                    let row = VmRow {
                        name: def.name.clone(),
                        home,
                        datastore,
                        state: VmState::Running,
                        pid: Some(info.pid),
                        api_socket: Some(sock.clone()),
                        taps: (0..def.nics.len()).map(|i| vmdef::tap_name(&def.name, i)).collect(),
                        last_exit: None,
                        last_log: Vec::new(),
                    };
                    let _ = self.evc.record(&self.db, &row.name, None).await;
                    if self.db.put(&row).await.is_ok() {
                        self.vms.lock().await.insert(
                            row.name.clone(),
                            Vm { row, def, stop_requested: false, suspending: false },
                        );
                        self.event(
                            &r.vm,
                            "adopted",
                            &format!("migration {}: its VMM pid {} runs it here", r.id, info.pid),
                        )
                        .await;
                        self.watch_pid(r.vm.clone(), info.pid);
                        tracing::info!("migration {}: adopted VM {} (VMM pid {})", r.id, r.vm, info.pid);
                        return true;
                    }
                }
            }
        }
        // A receiver still waiting (or nothing): the reservation is gone with the daemon.
        if let Some(i) = info.filter(|_| !running) {
            send_signal(i.pid, libc::SIGKILL);
        }
        if !self.vms.lock().await.contains_key(&r.vm) {
            let _ = std::fs::remove_file(&sock);
            if let Some(def_home) = self
                .config
                .datastores
                .values()
                .map(|d| d.path.join(&r.vm))
                .find(|h| h.join(format!("console.{}.log", r.id)).exists())
            {
                let _ = std::fs::remove_file(def_home.join(format!("console.{}.log", r.id)));
            }
            for i in 0..16 {
                let t = vmdef::tap_name(&r.vm, i);
                if crate::config::interface_exists(&t) {
                    crate::taps::delete(&t);
                }
            }
        }
        false
    }
}

/// Tells the destination how a migration ended (`complete` or `abort`): both are idempotent
/// (a second call answers the record), so a failed call is tried twice more.
/// When the source's steps ended, ms since the migration's request.
struct Marks {
    /// The destination's reservation answered.
    reserved_ms: f64,
    /// The source VMM answered `PUT /vm/migrate`.
    started_ms: f64,
    /// The VMM's report arrived.
    reported_ms: f64,
}

async fn tell(peer: &Peer, path: &str, record: &MigrationRecord) -> Result<(), crate::peer::Error> {
    let mut last = None;
    for attempt in 0..3 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        match peer.post::<_, MigrationRecord>(path, record, PEER_SLOW).await {
            Ok(_) => return Ok(()),
            // A refusal is an answer: asking again gets the same.
            Err(e @ crate::peer::Error::Refused { .. }) => return Err(e),
            Err(e) => {
                tracing::warn!("migration {}: {e}; trying again", record.id);
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or(crate::peer::Error::NoIdentity))
}

/// Whether the VMM on `sock` answers and has no migration `id` (it was never asked to
/// migrate it, so it will not report it). A VMM that does not answer is not known to.
async fn vmm_never_took(sock: PathBuf, id: &str) -> bool {
    let info = tokio::task::spawn_blocking(move || {
        ferry_api::client::send(&sock, &ferry_api::Request::Info, Duration::from_secs(2))
    })
    .await
    .ok()
    .and_then(Result::ok);
    matches!(info, Some(ferry_api::Response::Info(i)) if i.migration.as_ref().is_none_or(|m| m.migration_id != id))
}

/// The pid of a live receiving VMM (`ferry receive`) whose API socket is `sock`.
fn receiver_pid(sock: &std::path::Path) -> Option<u32> {
    let sock = sock.as_os_str().as_encoded_bytes();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        let mut args = cmdline.split(|&b| b == 0);
        let receives = args.clone().any(|a| a == b"receive");
        (receives && args.any(|a| a == sock) && alive(pid)).then_some(pid)
    })
}

/// Where a reservation's receiving VMM is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReceiverState {
    /// It runs the VM (running or paused).
    Runs,
    /// A migration is coming in (from the key's proof to the activation), or the process
    /// lives but its API does not answer.
    Migrating,
    /// Waiting for a connection, or gone.
    Idle,
}

/// Where the receiver `pid` on `sock` is.
async fn receiver_state(sock: PathBuf, pid: u32) -> ReceiverState {
    let info = tokio::task::spawn_blocking(move || {
        ferry_api::client::send(&sock, &ferry_api::Request::Info, Duration::from_secs(2))
    })
    .await
    .ok()
    .and_then(Result::ok);
    match info {
        Some(ferry_api::Response::Info(i)) => {
            if matches!(i.state, ferry_api::RunState::Running | ferry_api::RunState::Paused) {
                ReceiverState::Runs
            } else if i.receiving.as_ref().is_some_and(|r| {
                !matches!(r.phase, ferry_api::ReceivePhase::Waiting | ferry_api::ReceivePhase::Unconfigured)
            }) {
                ReceiverState::Migrating
            } else {
                ReceiverState::Idle
            }
        }
        _ if alive(pid) => ReceiverState::Migrating,
        _ => ReceiverState::Idle,
    }
}

/// What the follower of a source VMM's events passes on.
#[derive(Debug)]
enum Followed {
    /// A phase change.
    Phase(ferry_api::MigrationPhase),
    /// A pass ended.
    Pass {
        /// Its number.
        pass: u32,
        /// Its rate.
        rate_mib_s: f64,
        /// The downtime a stop-and-copy would cost now.
        expected_downtime_ms: Option<f64>,
        /// Bytes so far.
        bytes_transferred: u64,
    },
    /// The report: the migration has ended.
    Report(Box<ferry_api::MigrationReport>),
    /// The stream ended (or failed) without the report.
    Ended,
}

/// Follows `GET /vm/events` of the VMM on `sock` for migration `id` on a thread of its own.
fn spawn_follower(
    sock: PathBuf,
    id: String,
    tx: tokio::sync::mpsc::UnboundedSender<Followed>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let Ok(mut stream) = ferry_api::client::events(&sock, 0, Some(Duration::from_secs(900))) else {
            let _ = tx.send(Followed::Ended);
            return;
        };
        loop {
            let event = match stream.next_event() {
                Ok(Some(e)) => e,
                _ => {
                    let _ = tx.send(Followed::Ended);
                    return;
                }
            };
            if event.migration_id != id {
                continue;
            }
            let followed = match event.body {
                ferry_api::EventBody::Phase { phase, .. } => Followed::Phase(phase),
                ferry_api::EventBody::Pass {
                    pass,
                    rate_mib_s,
                    expected_downtime_ms,
                    bytes_transferred,
                    ..
                } => Followed::Pass { pass, rate_mib_s, expected_downtime_ms, bytes_transferred },
                ferry_api::EventBody::Report { report } => {
                    let _ = tx.send(Followed::Report(report));
                    return;
                }
                _ => continue,
            };
            if tx.send(followed).is_err() {
                return;
            }
        }
    })
}

/// Writes migration key `key` to a new file only root can read, in the form the VMM's
/// `Key::load` reads: the key's bytes and a newline. `Key::load` drops one trailing newline
/// (for keys written by hand), so a random key written bare lost its last byte whenever that
/// byte was a newline (1 migration in 256): the source then proved a 31-byte key, the
/// destination knew all 32 (it reads them from a pipe), and the migration failed as
/// `auth_failed`.
fn write_key_file(path: &std::path::Path, key: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    f.write_all(key)?;
    f.write_all(b"\n")
}

#[cfg(test)]
mod key_file_tests {
    #[test]
    fn a_key_file_gives_back_every_byte_of_the_key_even_a_last_newline() {
        let dir = std::env::temp_dir().join(format!("ferry-host-keyfile-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let keys: [Vec<u8>; 3] = [vec![7; 32], [vec![1; 31], vec![b'\n']].concat(), vec![b'\n'; 32]];
        for (i, key) in keys.iter().enumerate() {
            let path = dir.join(format!("{i}.key"));
            super::write_key_file(&path, key).expect("write");
            let loaded = ferry_migration::auth::Key::load(&path).expect("load");
            // Same key: a proof made with one checks with the other.
            let original = ferry_migration::auth::Key::from_bytes(key.clone()).expect("key");
            let nonce = [3u8; ferry_migration::auth::NONCE_LEN];
            let proof = loaded.prove(ferry_migration::auth::Role::Sender, "m-1", &nonce);
            assert!(original.check(ferry_migration::auth::Role::Sender, "m-1", &nonce, &proof), "key {i}");
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
