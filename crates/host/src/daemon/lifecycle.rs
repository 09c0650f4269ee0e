//! A VM's lifecycle: start (spawn its VMM and make its taps), stop, kill, suspend,
//! resume, snapshot.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_host_api::{Action, VmDefinition, VmState};

use super::*;
use crate::db::{unix_ms, VmRow};
use crate::vmdef;

impl Daemon {
    /// Makes a tap for each of `def`'s NICs on its port group's bridge; on a failure, the
    /// taps already made are deleted and the error names the NIC.
    pub(crate) async fn make_taps(&self, def: &VmDefinition) -> Result<Vec<String>, Error> {
        let mut taps: Vec<String> = Vec::new();
        for (i, nic) in def.nics.iter().enumerate() {
            let tap = vmdef::tap_name(&def.name, i);
            let bridge = self.config.portgroups.get(&nic.portgroup).cloned().unwrap_or_default();
            let t = tap.clone();
            let made = tokio::task::spawn_blocking(move || crate::taps::create(&t, &bridge))
                .await
                .map_err(|e| Error::BadRequest(e.to_string()));
            if let Err(source) =
                made.and_then(|r| r.map_err(|source| Error::Tap { vm: def.name.clone(), index: i, source }))
            {
                for t in &taps {
                    crate::taps::delete(t);
                }
                return Err(source);
            }
            taps.push(tap);
        }
        Ok(taps)
    }

    /// `POST /vms/NAME/ACTION`.
    pub async fn action(self: &Arc<Self>, name: &str, action: Action) -> Result<VmDetail, Error> {
        let state =
            self.vms.lock().await.get(name).map(|v| v.row.state).ok_or_else(|| Error::NoVm(name.into()))?;
        match action {
            Action::Start => self.start_vm(name, false).await?,
            Action::Resume if state == VmState::Suspended => self.start_vm(name, true).await?,
            Action::Resume => {
                self.api_call(name, ferry_api::Request::Resume, VmState::Paused, VmState::Running).await?
            }
            Action::Stop => self.end_vm(name, libc::SIGTERM, STOP_TIMEOUT).await?,
            Action::Kill => self.end_vm(name, libc::SIGKILL, Duration::from_secs(10)).await?,
            Action::Suspend => self.suspend_vm(name).await?,
            Action::Snapshot => self.snapshot_vm(name).await?,
        }
        self.show(name).await
    }

    async fn api_call(
        &self,
        name: &str,
        req: ferry_api::Request,
        from: VmState,
        to: VmState,
    ) -> Result<(), Error> {
        let sock = {
            let vms = self.vms.lock().await;
            let vm = vms.get(name).ok_or_else(|| Error::NoVm(name.into()))?;
            if vm.row.state != from {
                return Err(Error::Conflict(format!("VM {name} is {}, not {from}", vm.row.state)));
            }
            transition(from, to)?;
            vm.row.api_socket.clone().ok_or_else(|| Error::Conflict(format!("VM {name} has no VMM")))?
        };
        tokio::task::spawn_blocking(move || ferry_api::client::send(&sock, &req, API_TIMEOUT))
            .await
            .map_err(|e| Error::BadRequest(e.to_string()))?
            .map_err(|source| Error::Vmm { vm: name.into(), source })?;
        self.set_state(name, to).await;
        Ok(())
    }

    /// Start (`restore` = resume from the suspend checkpoint).
    async fn start_vm(self: &Arc<Self>, name: &str, restore: bool) -> Result<(), Error> {
        let (mut row, def, lease) = {
            let mut vms = self.vms.lock().await;
            let vm = vms.get_mut(name).ok_or_else(|| Error::NoVm(name.into()))?;
            if vm.row.state == VmState::Elsewhere {
                // It was held by someone else at the last look; spawn_vmm checks again.
                vm.row.state = VmState::Defined;
            }
            let allowed = if restore {
                vm.row.state == VmState::Suspended
            } else {
                matches!(vm.row.state, VmState::Defined | VmState::Crashed)
            };
            if !allowed {
                return Err(Error::Conflict(format!(
                    "VM {name} is {}; {} needs it {}",
                    vm.row.state,
                    if restore { "resume" } else { "start" },
                    if restore {
                        "suspended or paused"
                    } else {
                        "defined or crashed (a suspended VM resumes)"
                    }
                )));
            }
            transition(vm.row.state, VmState::Starting)?;
            // Reserve the VM before anything slow: a second start sees `starting`.
            vm.row.state = VmState::Starting;
            vm.stop_requested = false;
            vm.suspending = false;
            let lease = self.config.datastores.get(&vm.row.datastore).and_then(|d| d.lease.clone());
            (vm.row.clone(), vm.def.clone(), lease)
        };
        let before = if restore {
            VmState::Suspended
        } else {
            self.vms.lock().await.get(name).and_then(|v| v.row.last_exit.as_ref()).map_or(
                VmState::Defined,
                |e| {
                    if e.requested || e.code == Some(0) {
                        VmState::Defined
                    } else {
                        VmState::Crashed
                    }
                },
            )
        };
        // A fresh start gets the cluster's CPU baseline; a resume keeps its CPUID.
        let evc = if restore { None } else { Some(self.evc.for_start(&self.kvm_features)) };
        match self.spawn_vmm(&mut row, &def, lease.as_ref(), restore, evc.as_ref()).await {
            Ok(child) => {
                if let Some(evc) = &evc {
                    self.evc.record(&self.db, name, evc.generation).await?;
                }
                let pid = child.id();
                {
                    let mut vms = self.vms.lock().await;
                    if let Some(vm) = vms.get_mut(name) {
                        vm.row = row.clone();
                    }
                }
                self.db.put(&row).await?;
                self.event(
                    name,
                    "starting",
                    &format!("VMM pid {pid}{}", if restore { ", from its suspend checkpoint" } else { "" }),
                )
                .await;
                self.watch_child(name.to_string(), child);
                self.wait_started(name, pid).await
            }
            Err(e) => {
                let mut vms = self.vms.lock().await;
                if let Some(vm) = vms.get_mut(name) {
                    vm.row.state =
                        if matches!(e, Error::HeldElsewhere { .. }) { VmState::Elsewhere } else { before };
                }
                Err(e)
            }
        }
    }

    /// Makes the taps and spawns the VMM; on error nothing is left.
    async fn spawn_vmm(
        &self,
        row: &mut VmRow,
        def: &VmDefinition,
        lease: Option<&crate::config::LeaseSettings>,
        restore: bool,
        evc: Option<&crate::evc::StartCpuid>,
    ) -> Result<std::process::Child, Error> {
        let home = row.home.clone();
        {
            let h = home.clone();
            let status = tokio::task::spawn_blocking(move || ferry_vmm::home::status(&h))
                .await
                .map_err(|e| Error::BadRequest(e.to_string()))??;
            if let Some(holder) = self.held_by_other(&row.datastore, &status) {
                return Err(Error::HeldElsewhere { vm: def.name.clone(), holder });
            }
        }
        self.check_portgroups(def)?;
        let taps = self.make_taps(def).await?;
        let sock = self.socket_of(&def.name);
        let _ = std::fs::remove_file(&sock);
        let mut cmd = std::process::Command::new(&self.config.ferry_binary);
        if restore {
            cmd.arg("restore").arg("--from").arg(home.join(SUSPEND_DIR));
        } else {
            cmd.arg("run");
            match (&def.guest, &def.kernel) {
                (Some(g), _) => cmd.arg("--guest").arg(g),
                (None, Some(k)) => cmd.arg("--kernel").arg(home.join(k)),
                (None, None) => &mut cmd,
            };
            cmd.arg("--memory").arg(format!("{}M", def.memory_mib));
            cmd.arg("--cpus").arg(def.vcpus.to_string());
            cmd.arg("--cmdline").arg(&def.cmdline);
            for d in &def.disks {
                let mut s = format!("path={}", home.join(&d.file).display());
                if d.readonly {
                    s.push_str(",readonly=on");
                }
                cmd.arg("--disk").arg(s);
            }
            for (nic, tap) in def.nics.iter().zip(&taps) {
                cmd.arg("--net").arg(format!("tap={tap},mac={}", nic.mac));
            }
        }
        // This host's hidden features (it stands for a host without them) and, on a fresh
        // start, the VM's own (a restored VM keeps the CPUID it had).
        let mut hide = self.config.cpu_hide.clone();
        if !restore {
            hide.extend(def.cpu_hide.iter().filter(|f| !self.config.cpu_hide.contains(f)).cloned());
        }
        // What this host offers beyond the cluster's baseline (EVC).
        for f in evc.map(|e| e.hide.as_slice()).unwrap_or_default() {
            if !hide.contains(f) {
                hide.push(f.clone());
            }
        }
        if !hide.is_empty() {
            cmd.arg("--cpu-hide").arg(hide.join(","));
        }
        cmd.arg("--serial").arg(format!("file:{}", home.join(CONSOLE_LOG).display()));
        cmd.arg("--api-socket").arg(&sock);
        cmd.arg("--home").arg(&home);
        if let Some(l) = lease {
            cmd.arg("--lease").arg(l.to_arg());
        }
        let log_path = home.join(VM_LOG);
        let cleanup = |taps: &[String]| {
            for t in taps {
                crate::taps::delete(t);
            }
        };
        let log = match std::fs::OpenOptions::new().create(true).append(true).open(&log_path) {
            Ok(f) => f,
            Err(e) => {
                cleanup(&taps);
                return Err(io("open", &log_path)(e));
            }
        };
        let log2 = match log.try_clone() {
            Ok(f) => f,
            Err(e) => {
                cleanup(&taps);
                return Err(io("open", &log_path)(e));
            }
        };
        {
            use std::io::Write;
            let mut l = &log;
            let _ = writeln!(
                l,
                "{START_MARK}{}: {} {:?}",
                self.config.name,
                if restore { "resume" } else { "start" },
                cmd
            );
        }
        cmd.stdin(std::process::Stdio::null()).stdout(log).stderr(log2);
        {
            use std::os::unix::process::CommandExt;
            // SAFETY: setsid is async-signal-safe and touches no memory of the parent; it
            // makes the VMM a session of its own, so it outlives the daemon and its signals.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::setsid() < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = match cmd.spawn() {
            Ok(c) => c,
            Err(source) => {
                cleanup(&taps);
                return Err(Error::Spawn { binary: self.config.ferry_binary.clone(), source });
            }
        };
        row.state = VmState::Starting;
        row.pid = Some(child.id());
        row.api_socket = Some(sock);
        row.taps = taps;
        Ok(child)
    }

    /// Waits for a new VMM's API to answer (running) or for it to exit (an error with its log).
    async fn wait_started(&self, name: &str, pid: u32) -> Result<(), Error> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let (state, sock, row) = {
                let vms = self.vms.lock().await;
                let vm = vms.get(name).ok_or_else(|| Error::NoVm(name.into()))?;
                (vm.row.state, vm.row.api_socket.clone(), vm.row.clone())
            };
            if state != VmState::Starting || row.pid != Some(pid) {
                if state.has_process() {
                    return Ok(());
                }
                return Err(Error::StartFailed {
                    vm: name.into(),
                    exit: row.last_exit.map(|e| e.description).unwrap_or_default(),
                    log: row.last_log.join("\n"),
                });
            }
            if let Some(sock) = sock {
                let info = tokio::task::spawn_blocking(move || {
                    ferry_api::client::send(&sock, &ferry_api::Request::Info, API_TIMEOUT)
                })
                .await
                .ok()
                .and_then(Result::ok);
                if let Some(ferry_api::Response::Info(i)) = info {
                    let to = if i.state == ferry_api::RunState::Paused {
                        VmState::Paused
                    } else {
                        VmState::Running
                    };
                    self.set_state(name, to).await;
                    self.event(name, "running", &format!("VMM pid {pid} answers on its API socket")).await;
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(Error::Conflict(format!(
                    "the VMM of {name} (pid {pid}) did not answer on its API socket within {} s; it is still starting (see `ferry vm log {name}`)",
                    START_TIMEOUT.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stop (SIGTERM) or kill (SIGKILL), then wait for the end.
    async fn end_vm(&self, name: &str, sig: i32, wait: Duration) -> Result<(), Error> {
        let pid = {
            let mut vms = self.vms.lock().await;
            let vm = vms.get_mut(name).ok_or_else(|| Error::NoVm(name.into()))?;
            let pid = match (vm.row.state.has_process(), vm.row.pid) {
                (true, Some(pid)) => pid,
                _ => {
                    return Err(Error::Conflict(format!(
                        "VM {name} is {}: no VMM runs it here",
                        vm.row.state
                    )))
                }
            };
            transition(vm.row.state, VmState::Stopping)?;
            vm.stop_requested = true;
            vm.row.state = VmState::Stopping;
            let row = vm.row.clone();
            drop(vms);
            self.db.put(&row).await?;
            pid
        };
        self.event(name, "stopping", &format!("{} to VMM pid {pid}", signal_name(sig))).await;
        send_signal(pid, sig);
        self.wait_end(name, pid, wait).await;
        Ok(())
    }

    /// Waits (at most `wait`) until the VM's VMM `pid` has been recorded as ended.
    pub(super) async fn wait_end(&self, name: &str, pid: u32, wait: Duration) {
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            {
                let vms = self.vms.lock().await;
                match vms.get(name) {
                    Some(vm) if vm.row.pid == Some(pid) => {}
                    _ => return,
                }
            }
            // The VMM's watcher records its end at once; a short period here keeps a
            // migrated VM's clean-up from waiting for the next look.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn running_socket(&self, name: &str) -> Result<(PathBuf, u32), Error> {
        let vms = self.vms.lock().await;
        let vm = vms.get(name).ok_or_else(|| Error::NoVm(name.into()))?;
        match (vm.row.state, &vm.row.api_socket, vm.row.pid) {
            (VmState::Running | VmState::Paused, Some(s), Some(p)) => Ok((s.clone(), p)),
            (state, _, _) => Err(Error::Conflict(format!("VM {name} is {state}, not running or paused"))),
        }
    }

    async fn suspend_vm(&self, name: &str) -> Result<(), Error> {
        let (sock, pid) = self.running_socket(name).await?;
        let home = self
            .vms
            .lock()
            .await
            .get(name)
            .map(|v| v.row.home.clone())
            .ok_or_else(|| Error::NoVm(name.into()))?;
        let dir = home.join(SUSPEND_DIR);
        if dir.exists() {
            // The previous suspend's checkpoint; the running VM no longer needs it (a
            // restored VM's memory mapping keeps its data).
            std::fs::remove_dir_all(&dir).map_err(io("remove", &dir))?;
        }
        if let Some(vm) = self.vms.lock().await.get_mut(name) {
            vm.suspending = true;
        }
        let req = ferry_api::Request::Snapshot(ferry_api::SnapshotRequest { to: dir.clone(), stop: true });
        let done =
            tokio::task::spawn_blocking(move || ferry_api::client::send(&sock, &req, SNAPSHOT_TIMEOUT))
                .await
                .map_err(|e| Error::BadRequest(e.to_string()))?;
        if let Err(source) = done {
            if let Some(vm) = self.vms.lock().await.get_mut(name) {
                vm.suspending = false;
            }
            return Err(Error::Vmm { vm: name.into(), source });
        }
        self.event(name, "suspending", &format!("checkpoint written to {}", dir.display())).await;
        self.wait_end(name, pid, STOP_TIMEOUT).await;
        Ok(())
    }

    async fn snapshot_vm(&self, name: &str) -> Result<(), Error> {
        let (sock, _) = self.running_socket(name).await?;
        let home = self
            .vms
            .lock()
            .await
            .get(name)
            .map(|v| v.row.home.clone())
            .ok_or_else(|| Error::NoVm(name.into()))?;
        let dir = home.join("snapshots").join(unix_ms().to_string());
        let req = ferry_api::Request::Snapshot(ferry_api::SnapshotRequest { to: dir.clone(), stop: false });
        tokio::task::spawn_blocking(move || ferry_api::client::send(&sock, &req, SNAPSHOT_TIMEOUT))
            .await
            .map_err(|e| Error::BadRequest(e.to_string()))?
            .map_err(|source| Error::Vmm { vm: name.into(), source })?;
        self.event(name, "snapshot", &format!("checkpoint written to {}", dir.display())).await;
        Ok(())
    }
}
