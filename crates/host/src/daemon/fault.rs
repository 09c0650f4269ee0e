//! Test-only fault injection in the daemon's migration steps: `FERRY_HOST_FAULT=stop-at=STEP`
//! (read once by `ferry host serve`, parsed by [`HostFaults::parse`]; the library reads no
//! environment). At STEP the daemon logs `migration ID: fault injection: stopped at STEP` and
//! stops itself with SIGSTOP, the whole process frozen at that point, so that a test can
//! SIGKILL it exactly there (a SIGCONT lets it go on). See docs/host.md.

/// The environment variable `ferry host serve` reads the faults from.
pub const ENV: &str = "FERRY_HOST_FAULT";

/// A step of a migration by name where the daemon can be stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Source: the checks answered (the record is in the history), nothing reserved yet.
    Checks,
    /// Source: the destination's reservation answered, the VMM not yet asked.
    Reserved,
    /// Source: the VMM accepted `PUT /vm/migrate`.
    Started,
    /// Source: the VMM's event stream reports the stop-and-copy phase.
    Switchover,
    /// Source: the VMM reported the VM running on the destination; `complete` not yet sent.
    After,
    /// Destination: the receiver spawned, the reservation not yet answered.
    Reserve,
    /// Destination: the source's `complete` received, the VM not yet registered.
    Complete,
}

impl Step {
    /// Every step, in the order of a migration.
    pub const ALL: [Step; 7] = [
        Step::Checks,
        Step::Reserved,
        Step::Started,
        Step::Switchover,
        Step::After,
        Step::Reserve,
        Step::Complete,
    ];

    /// Its name in `FERRY_HOST_FAULT` and in the log.
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Checks => "checks",
            Step::Reserved => "reserved",
            Step::Started => "started",
            Step::Switchover => "switchover",
            Step::After => "after",
            Step::Reserve => "reserve",
            Step::Complete => "complete",
        }
    }
}

/// A fault list that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// An item is not `stop-at=STEP`.
    #[error("{ENV}: unknown fault {0:?} (known: stop-at=STEP)")]
    UnknownFault(String),
    /// The step is not one of [`Step::ALL`].
    #[error("{ENV}: unknown step {step:?} (known: {known})", known = Step::ALL.map(Step::as_str).join(", "))]
    UnknownStep {
        /// The step given.
        step: String,
    },
}

/// The faults a daemon injects (none by default).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostFaults {
    /// Stop the whole daemon (SIGSTOP) when a migration reaches this step.
    pub stop_at: Option<Step>,
}

impl HostFaults {
    /// Parses a comma-separated list of `stop-at=STEP`; anything else is an error.
    pub fn parse(list: &str) -> Result<Self, Error> {
        let mut f = HostFaults::default();
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match item.split_once('=') {
                Some(("stop-at", step)) => {
                    let s = Step::ALL
                        .into_iter()
                        .find(|s| s.as_str() == step)
                        .ok_or_else(|| Error::UnknownStep { step: step.to_string() })?;
                    f.stop_at = Some(s);
                }
                _ => return Err(Error::UnknownFault(item.to_string())),
            }
        }
        Ok(f)
    }

    /// At `step` of migration `id`: if asked to, logs it and stops the daemon (SIGSTOP).
    pub fn at(&self, step: Step, id: &str) {
        if self.stop_at != Some(step) {
            return;
        }
        tracing::warn!("migration {id}: fault injection: stopped at {}", step.as_str());
        // SAFETY: raise() sends a signal to this process; SIGSTOP cannot be caught and
        // stops every thread until SIGCONT (or SIGKILL, which the test sends).
        unsafe { libc::raise(libc::SIGSTOP) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_step_and_refuses_unknown_ones() {
        for s in Step::ALL {
            let f = HostFaults::parse(&format!("stop-at={}", s.as_str())).expect("parse");
            assert_eq!(f.stop_at, Some(s));
        }
        assert_eq!(HostFaults::parse("").expect("empty"), HostFaults::default());
        assert_eq!(HostFaults::parse("stop-at=nowhere"), Err(Error::UnknownStep { step: "nowhere".into() }));
        assert_eq!(HostFaults::parse("explode"), Err(Error::UnknownFault("explode".into())));
        let text = HostFaults::parse("stop-at=x").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(text.contains("checks, reserved, started, switchover, after, reserve, complete"), "{text}");
    }
}
