//! Supervision: a watcher per VMM records how it ended; start-up reconciles the database
//! with the homes and re-adopts the VMMs still alive.

use std::sync::Arc;
use std::time::Duration;

use ferry_host_api::{ExitInfo, VmState};

use super::*;
use crate::db::unix_ms;
use crate::vmdef;

impl Daemon {
    /// Start-up: each row against its home and its VMM. The home's lock wins.
    pub(super) async fn reconcile(self: &Arc<Self>) -> Result<(), Error> {
        for mut row in self.db.all().await? {
            let def = match vmdef::load(&row.home) {
                Ok(d) => d,
                Err(e) => {
                    // The home is gone or unreadable: the home is the truth, so the VM is
                    // no longer this host's. The row goes; the event says why.
                    tracing::warn!(vm = %row.name, "unregistered: its home cannot be read: {e}");
                    self.db
                        .event(Some(&row.name), "unregistered", &format!("its home cannot be read: {e}"))
                        .await?;
                    self.db.delete(&row.name).await?;
                    continue;
                }
            };
            let sock = self.socket_of(&row.name);
            let info = {
                let s = sock.clone();
                tokio::task::spawn_blocking(move || {
                    ferry_api::client::send(&s, &ferry_api::Request::Info, API_TIMEOUT)
                })
                .await
                .ok()
                .and_then(Result::ok)
            };
            let info = match info {
                Some(ferry_api::Response::Info(i))
                    if i.home.as_deref().and_then(|h| std::fs::canonicalize(h).ok())
                        == std::fs::canonicalize(&row.home).ok() =>
                {
                    Some(i)
                }
                _ => None,
            };
            let before = row.state;
            let adopt = match (info, row.pid) {
                (Some(info), _) => Some((
                    info.pid,
                    if info.state == ferry_api::RunState::Paused {
                        VmState::Paused
                    } else {
                        VmState::Running
                    },
                )),
                // Its socket does not answer, but the pid recorded is alive and is a VMM of
                // this home (its command line names it): adopt it too.
                (None, Some(pid)) if before.has_process() && alive(pid) && runs_home(pid, &row.home) => {
                    Some((pid, VmState::Running))
                }
                _ => None,
            };
            if let Some((pid, state)) = adopt {
                // A VMM of this VM is alive: adopt it.
                row.pid = Some(pid);
                row.api_socket = Some(sock);
                // A stop asked of the previous daemon still stands: its end is not a crash.
                let stopping = before == VmState::Stopping;
                row.state = if stopping { VmState::Stopping } else { state };
                row.taps = (0..def.nics.len()).map(|i| vmdef::tap_name(&def.name, i)).collect();
                self.db.put(&row).await?;
                self.vms.lock().await.insert(
                    row.name.clone(),
                    Vm { row: row.clone(), def, stop_requested: stopping, suspending: false },
                );
                self.event(
                    &row.name,
                    "adopted",
                    &format!("VMM pid {pid} re-adopted ({before} in the database)"),
                )
                .await;
                self.watch_pid(row.name.clone(), pid);
                continue;
            }
            // No VMM of ours answers. Does anyone hold the home's lock?
            let home = row.home.clone();
            let status = tokio::task::spawn_blocking(move || ferry_vmm::home::status(&home))
                .await
                .ok()
                .and_then(Result::ok);
            let holder = status.as_ref().and_then(|s| self.held_by_other(&row.datastore, s));
            let was_running = before.has_process();
            for t in row.taps.drain(..) {
                crate::taps::delete(&t);
            }
            let _ = std::fs::remove_file(self.socket_of(&row.name));
            if let Some(holder) = holder {
                tracing::info!(vm = %row.name, "its home is held by {holder}");
                row.state = VmState::Elsewhere;
                row.pid = None;
                row.api_socket = None;
            } else if was_running {
                let clean = status.as_ref().and_then(|s| s.lock.as_ref()).is_some_and(|l| !l.held);
                row.state =
                    if before == VmState::Stopping || clean { VmState::Defined } else { VmState::Crashed };
                row.last_exit = Some(ExitInfo {
                    code: None,
                    signal: None,
                    requested: before == VmState::Stopping,
                    description: "ended while the daemon was not running (exit status unknown)".into(),
                    at_unix_ms: unix_ms(),
                });
                row.last_log = last_run_tail(&row.home.join(VM_LOG), LAST_LOG_LINES);
                row.pid = None;
                row.api_socket = None;
            } else if before == VmState::Elsewhere
                || (before == VmState::Suspended && !row.home.join(SUSPEND_DIR).is_dir())
            {
                row.state = VmState::Defined;
            }
            if row.state != before {
                self.event(
                    &row.name,
                    "reconciled",
                    &format!("{before} in the database, {} from its home", row.state),
                )
                .await;
            }
            self.db.put(&row).await?;
            self.vms
                .lock()
                .await
                .insert(row.name.clone(), Vm { row, def, stop_requested: false, suspending: false });
        }
        Ok(())
    }

    /// Waits for a VMM this daemon spawned, on a thread of its own.
    pub(super) fn watch_child(self: &Arc<Self>, name: String, mut child: std::process::Child) {
        let daemon = Arc::clone(self);
        let pid = child.id();
        let spawned = std::thread::Builder::new().name(format!("watch-{name}")).spawn(move || {
            use std::os::unix::process::ExitStatusExt;
            let (code, signal) = match child.wait() {
                Ok(st) => (st.code(), st.signal()),
                Err(_) => (None, None),
            };
            let rt = daemon.runtime.clone();
            rt.block_on(daemon.on_exit(&name, pid, code, signal, true));
        });
        if let Err(e) = spawned {
            tracing::error!("cannot start a watcher thread: {e}");
        }
    }

    /// Waits for a re-adopted VMM (not this daemon's child) through its pidfd.
    pub(super) fn watch_pid(self: &Arc<Self>, name: String, pid: u32) {
        let daemon = Arc::clone(self);
        let spawned = std::thread::Builder::new().name(format!("watch-{name}")).spawn(move || {
            // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
            let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) } as i32;
            if fd >= 0 {
                let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
                loop {
                    // SAFETY: one valid pollfd; the descriptor is ours until closed below.
                    let rc = unsafe { libc::poll(&mut pfd, 1, -1) };
                    if rc > 0
                        || (rc < 0
                            && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted)
                    {
                        break;
                    }
                }
                // SAFETY: closing the descriptor pidfd_open gave us.
                unsafe { libc::close(fd) };
            } else {
                while alive(pid) {
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
            let rt = daemon.runtime.clone();
            rt.block_on(daemon.on_exit(&name, pid, None, None, false));
        });
        if let Err(e) = spawned {
            tracing::error!("cannot start a watcher thread: {e}");
        }
    }

    /// A VMM ended: records how, deletes its taps and socket.
    async fn on_exit(&self, name: &str, pid: u32, code: Option<i32>, signal: Option<i32>, child: bool) {
        // For a VMM that is not our child, whether it released the home's lock cleanly tells
        // a stop from a crash; read before taking the daemon's lock.
        // Whoever holds the home now (another host's VMM after a migration) decides too.
        let (home, datastore) = match self.vms.lock().await.get(name) {
            Some(v) => (Some(v.row.home.clone()), v.row.datastore.clone()),
            None => (None, String::new()),
        };
        let status = match home {
            Some(h) => home_status(h).await,
            None => None,
        };
        let released = !child && status.as_ref().and_then(|s| s.lock.as_ref()).is_some_and(|l| !l.held);
        let holder = status.as_ref().and_then(|s| self.held_by_other(&datastore, s));
        let mut vms = self.vms.lock().await;
        let Some(vm) = vms.get_mut(name) else { return };
        if vm.row.pid != Some(pid) {
            return;
        }
        for t in vm.row.taps.drain(..) {
            crate::taps::delete(&t);
        }
        if let Some(s) = vm.row.api_socket.take() {
            let _ = std::fs::remove_file(s);
        }
        let description = match (code, signal) {
            (Some(c), _) => format!("exit code {c}"),
            (None, Some(s)) => format!("signal {s} ({})", signal_name(s)),
            (None, None) if child => "exit status unknown".to_string(),
            (None, None) => "exit status unknown (a re-adopted VMM, not this daemon's child)".to_string(),
        };
        let requested = vm.stop_requested || vm.suspending;
        let from = vm.row.state;
        let to = if let Some(h) = &holder {
            // Its VMM handed the VM on (a migration): it runs elsewhere now.
            tracing::info!(vm = name, "its home is held by {h}");
            VmState::Elsewhere
        } else if vm.suspending && vm.row.home.join(SUSPEND_DIR).is_dir() {
            VmState::Suspended
        } else if requested || code == Some(0) || (!child && code.is_none() && released) {
            // Asked to end, or the guest powered off.
            VmState::Defined
        } else {
            VmState::Crashed
        };
        if let Err(e) = transition(from, to) {
            tracing::warn!(vm = name, "{e}");
        }
        vm.row.state = to;
        vm.row.pid = None;
        vm.row.last_log = last_run_tail(&vm.row.home.join(VM_LOG), LAST_LOG_LINES);
        vm.row.last_exit = Some(ExitInfo {
            code,
            signal,
            requested,
            description: description.clone(),
            at_unix_ms: unix_ms(),
        });
        vm.stop_requested = false;
        vm.suspending = false;
        let row = vm.row.clone();
        // Recorded, with its event, before the lock goes: a `show` never sees the new state
        // without the event that explains it.
        if let Err(e) = self.db.put(&row).await {
            tracing::warn!(vm = name, "cannot record the VMM's end: {e}");
        }
        let kind = match to {
            VmState::Crashed => "crashed",
            VmState::Elsewhere => "elsewhere",
            _ => "ended",
        };
        self.event(name, kind, &format!("VMM pid {pid} ended: {description}; now {to}")).await;
        drop(vms);
    }
}
