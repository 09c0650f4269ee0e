//! High availability: two or more controllers on one database, one active at a time.
//!
//! The active controller holds the leader lease, a row in the database
//! ([`crate::store::lease`]) with the holder's name and URL, a term raised at every takeover
//! and an expiry on the DATABASE's clock. Every [`Timing::renew_every`] the active renews it
//! for [`Timing::ttl`]; a standby takes it once it expired (one conditional `UPDATE`).
//!
//! Self-fencing: an active that has not renewed successfully within
//! [`Timing::renew_deadline`] (shorter than the TTL) of its last successful renewal SENT steps
//! down by itself, so it stops acting before any standby can take the lease: the database set
//! the expiry at least a TTL after that renewal was sent. Each database call of the loop is
//! bounded by [`Timing::op_deadline`] and by the time left before that deadline.
//!
//! The roles form an explicit state machine ([`Machine`]): `Standby -> Active` (took the
//! lease: term N), `Active -> SteppingDown` (lost it, or could not renew in time),
//! `SteppingDown -> Standby` (it stopped acting). Every transition is logged with the term.
//!
//! The rest of the controller asks ONE place whether to act: [`Leader::is_active`] and the
//! watch channel of [`Leader::subscribe`] (the API answers `not_active` otherwise; the
//! heartbeat watcher, the history import and the migration followers run only while active;
//! `migrate::resume` runs at every takeover).

use std::sync::Arc;
use std::time::Duration;

use ferry_cluster_api::ControllerRole as Role;
use tokio::sync::watch;

use crate::store::{self, Store};

/// The lease's timings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// How often the active renews (and every controller renews its registration).
    pub renew_every: Duration,
    /// How long a renewal makes the lease last (the database's clock).
    pub ttl: Duration,
    /// An active that has not renewed within this long after its last successful renewal
    /// was sent steps down. Shorter than `ttl`.
    pub renew_deadline: Duration,
    /// At most this long for one database call of the loop.
    pub op_deadline: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            renew_every: Duration::from_secs(1),
            ttl: Duration::from_secs(5),
            renew_deadline: Duration::from_secs(3),
            op_deadline: Duration::from_millis(1500),
        }
    }
}

/// What the loop does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attempt {
    /// Try to take the lease (a standby).
    Acquire,
    /// Renew the lease of this term (the active), within this many ms.
    Renew {
        /// The term.
        term: u64,
        /// Ms left before the renew deadline.
        within_ms: u64,
    },
    /// Stop acting (the active could not renew in time, or lost the lease).
    StepDown,
}

/// What the database answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The lease is ours, with this term.
    Acquired {
        /// The new term.
        term: u64,
    },
    /// Another controller holds the lease.
    Held,
    /// The renewal went through.
    Renewed,
    /// The lease is no longer ours (taken, or expired).
    Lost,
    /// The call failed or took too long.
    Failed,
}

/// A change of role.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    /// From.
    pub from: Role,
    /// To.
    pub to: Role,
    /// The term the transition is about.
    pub term: u64,
}

/// The role state machine, on a clock of ms the caller gives (monotonic in the controller,
/// fake in the tests).
#[derive(Clone, Debug)]
pub struct Machine {
    role: Role,
    term: u64,
    /// When the last successful renewal (or the acquisition) was sent.
    renewed_at_ms: u64,
    timing: Timing,
}

impl Machine {
    /// A standby.
    pub fn new(timing: Timing) -> Machine {
        Machine { role: Role::Standby, term: 0, renewed_at_ms: 0, timing }
    }

    /// The role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The term last held (0: never).
    pub fn term(&self) -> u64 {
        self.term
    }

    fn deadline_ms(&self) -> u64 {
        self.renewed_at_ms + self.timing.renew_deadline.as_millis() as u64
    }

    /// What to do at `now_ms`.
    pub fn next(&self, now_ms: u64) -> Attempt {
        match self.role {
            Role::Standby => Attempt::Acquire,
            Role::SteppingDown => Attempt::StepDown,
            Role::Active if now_ms >= self.deadline_ms() => Attempt::StepDown,
            Role::Active => Attempt::Renew { term: self.term, within_ms: self.deadline_ms() - now_ms },
        }
    }

    fn go(&mut self, to: Role) -> Option<Transition> {
        let allowed = matches!(
            (self.role, to),
            (Role::Standby, Role::Active)
                | (Role::Active, Role::SteppingDown)
                | (Role::SteppingDown, Role::Standby)
        );
        if !allowed {
            return None;
        }
        let t = Transition { from: self.role, to, term: self.term };
        self.role = to;
        Some(t)
    }

    /// Applies the answer to a call sent at `sent_ms`, at `now_ms`; the transition it caused.
    pub fn record(&mut self, sent_ms: u64, now_ms: u64, outcome: &Outcome) -> Option<Transition> {
        match (self.role, outcome) {
            (Role::Standby, Outcome::Acquired { term }) => {
                self.term = *term;
                self.renewed_at_ms = sent_ms;
                self.go(Role::Active)
            }
            (Role::Active, Outcome::Renewed) => {
                self.renewed_at_ms = self.renewed_at_ms.max(sent_ms);
                if now_ms >= self.deadline_ms() {
                    // It went through, but too late to trust: the standbys may be about to
                    // take over.
                    return self.go(Role::SteppingDown);
                }
                None
            }
            (Role::Active, Outcome::Lost) => self.go(Role::SteppingDown),
            (Role::Active, _) if now_ms >= self.deadline_ms() => self.go(Role::SteppingDown),
            _ => None,
        }
    }

    /// The deadline passed without a renewal: steps down.
    pub fn step_down(&mut self) -> Option<Transition> {
        self.go(Role::SteppingDown)
    }

    /// The controller stopped acting: a standby again.
    pub fn stepped_down(&mut self) -> Option<Transition> {
        self.go(Role::Standby)
    }
}

/// What the rest of the controller sees.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    /// The role.
    pub role: Role,
    /// The term held (Active), or last held.
    pub term: u64,
    /// Since when it is active.
    pub active_since: Option<tokio::time::Instant>,
    /// The active controller as last read from the lease (name, URL, term), if unexpired.
    pub holder: Option<(String, String, u64)>,
}

/// The leader lease of one controller.
#[derive(Debug)]
pub struct Leader {
    name: String,
    url: String,
    timing: Timing,
    status: watch::Sender<Status>,
    /// The API URLs of the controllers registered recently, this one first.
    known: std::sync::Mutex<Vec<String>>,
    /// Since when the loop's database calls fail, and the last failure (`None`: the last one
    /// went through).
    database_fault: std::sync::Mutex<Option<(tokio::time::Instant, String)>>,
}

/// A controller whose registration is older than this is no longer offered to the hosts.
const FORGET_AFTER: Duration = Duration::from_secs(600);

impl Leader {
    /// A standby named `name` whose API is at `url`.
    pub fn new(name: &str, url: &str, timing: Timing) -> Arc<Leader> {
        let (status, _) =
            watch::channel(Status { role: Role::Standby, term: 0, active_since: None, holder: None });
        Arc::new(Leader {
            name: name.to_string(),
            url: url.to_string(),
            timing,
            status,
            known: std::sync::Mutex::new(vec![url.to_string()]),
            database_fault: std::sync::Mutex::new(None),
        })
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its API URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Whether this controller holds the lease and may act.
    pub fn is_active(&self) -> bool {
        self.status.borrow().role == Role::Active
    }

    /// Whether it is active in `term`, and has been for at least `d`.
    pub fn active_for(&self, d: Duration) -> bool {
        let s = self.status.borrow();
        s.role == Role::Active && s.active_since.is_some_and(|t| t.elapsed() >= d)
    }

    /// The term it holds, if active.
    pub fn active_term(&self) -> Option<u64> {
        let s = self.status.borrow();
        (s.role == Role::Active).then_some(s.term)
    }

    /// The API URLs of the controllers registered in the last ten minutes, this one first.
    pub fn known(&self) -> Vec<String> {
        self.known.lock().map(|k| k.clone()).unwrap_or_else(|_| vec![self.url.clone()])
    }

    /// Whether the lease loop's database calls fail now: for how long, and the last failure.
    pub fn database_fault(&self) -> Option<(Duration, String)> {
        let fault = self.database_fault.lock().ok()?;
        fault.as_ref().map(|(since, why)| (since.elapsed(), why.clone()))
    }

    /// The outcome of a database call sent at `sent`: `None` it went through, else why not.
    fn note_database(&self, sent: tokio::time::Instant, failure: Option<String>) {
        if let Ok(mut fault) = self.database_fault.lock() {
            match failure {
                None => *fault = None,
                Some(why) => {
                    let since = fault.as_ref().map_or(sent, |(t, _)| *t);
                    *fault = Some((since, why));
                }
            }
        }
    }

    /// The status now.
    pub fn status(&self) -> Status {
        self.status.borrow().clone()
    }

    /// Changes of the status.
    pub fn subscribe(&self) -> watch::Receiver<Status> {
        self.status.subscribe()
    }

    fn apply(&self, t: Option<Transition>) {
        let Some(t) = t else { return };
        match t.to {
            Role::Active => {
                tracing::info!("controller {}: {} -> {} (term {})", self.name, t.from, t.to, t.term)
            }
            _ => tracing::warn!("controller {}: {} -> {} (term {})", self.name, t.from, t.to, t.term),
        }
        self.status.send_modify(|s| {
            s.role = t.to;
            s.term = t.term;
            s.active_since = (t.to == Role::Active).then(tokio::time::Instant::now);
            if t.to == Role::Active {
                s.holder = Some((self.name.clone(), self.url.clone(), t.term));
            }
        });
    }

    fn note_holder(&self, read: &store::lease::LeaseRead) {
        let holder = (!read.lease.expired && !read.lease.holder.is_empty())
            .then(|| (read.lease.holder.clone(), read.lease.holder_url.clone(), read.lease.term));
        self.status.send_if_modified(|s| {
            if s.holder != holder {
                s.holder = holder;
                true
            } else {
                false
            }
        });
    }

    /// One database call bounded by `within`: its result, or `None` when it failed or took
    /// too long (logged).
    async fn bounded<T>(
        &self,
        what: &str,
        within: Duration,
        call: impl std::future::Future<Output = Result<T, store::Error>>,
    ) -> Option<T> {
        let sent = tokio::time::Instant::now();
        match tokio::time::timeout(within, call).await {
            Ok(Ok(v)) => {
                self.note_database(sent, None);
                Some(v)
            }
            Ok(Err(e)) => {
                let why = crate::error_chain(&e);
                tracing::warn!("controller {}: {what}: {why}", self.name);
                self.note_database(sent, Some(why));
                None
            }
            Err(_) => {
                tracing::warn!(
                    "controller {}: {what}: no answer from the database within {within:?}",
                    self.name
                );
                self.note_database(sent, Some(format!("no answer from the database within {within:?}")));
                None
            }
        }
    }

    /// The loop: renews or takes the lease every [`Timing::renew_every`] until the process
    /// ends (or the task is aborted), and renews this controller's registration.
    pub async fn run(self: Arc<Self>, store: Store) {
        let base = tokio::time::Instant::now();
        let ms = move || base.elapsed().as_millis() as u64;
        let mut machine = Machine::new(self.timing);
        let ttl = self.timing.ttl.as_millis() as u64;
        let mut registered = false;
        loop {
            let tick = tokio::time::Instant::now();
            match machine.next(ms()) {
                Attempt::Acquire => {
                    let sent = ms();
                    let got = self
                        .bounded(
                            "cannot try to take the leader lease",
                            self.timing.op_deadline,
                            store.lease_acquire(&self.name, &self.url, ttl),
                        )
                        .await;
                    let outcome = match got {
                        Some(Some(term)) => Outcome::Acquired { term },
                        Some(None) => Outcome::Held,
                        None => Outcome::Failed,
                    };
                    self.apply(machine.record(sent, ms(), &outcome));
                }
                Attempt::Renew { term, within_ms } => {
                    let sent = ms();
                    let within = self.timing.op_deadline.min(Duration::from_millis(within_ms));
                    let outcome = match self
                        .bounded(
                            "cannot renew the leader lease",
                            within,
                            store.lease_renew(&self.name, term, ttl),
                        )
                        .await
                    {
                        Some(true) => Outcome::Renewed,
                        Some(false) => {
                            tracing::warn!(
                                "controller {}: the leader lease of term {term} is no longer ours",
                                self.name
                            );
                            Outcome::Lost
                        }
                        None => Outcome::Failed,
                    };
                    self.apply(machine.record(sent, ms(), &outcome));
                }
                Attempt::StepDown => {
                    // Stop acting first (the watch channel tells every task), then give the
                    // lease back if the database answers (a standby may take it at once).
                    self.apply(machine.step_down());
                    let term = machine.term();
                    let _ = self
                        .bounded(
                            "cannot release the leader lease",
                            self.timing.op_deadline,
                            store.lease_release(&self.name, term),
                        )
                        .await;
                    self.apply(machine.stepped_down());
                    continue;
                }
            }
            // The other calls of the tick: never past the active's renew deadline (the next
            // tick steps down at once then).
            let budget = |machine: &Machine| match machine.next(ms()) {
                Attempt::Acquire => Some(self.timing.op_deadline),
                Attempt::Renew { within_ms, .. } => {
                    Some(self.timing.op_deadline.min(Duration::from_millis(within_ms)))
                }
                Attempt::StepDown => None,
            };
            // The registration: every controller, standby or active.
            let Some(within) = budget(&machine) else { continue };
            if self
                .bounded(
                    "cannot renew this controller's registration",
                    within,
                    store.controller_seen(&self.name, &self.url, !registered),
                )
                .await
                .is_some()
            {
                registered = true;
            }
            // Who is active, and the controllers the hosts and the CLI may turn to.
            let Some(within) = budget(&machine) else { continue };
            if let Some(read) = self.bounded("cannot read the leader lease", within, store.lease()).await {
                self.note_holder(&read);
                let Some(within) = budget(&machine) else { continue };
                if let Some(all) =
                    self.bounded("cannot read the controllers", within, store.controllers(&read)).await
                {
                    let mut urls = vec![self.url.clone()];
                    for c in all.into_iter().filter(|c| c.age_ms <= FORGET_AFTER.as_millis() as u64) {
                        if !urls.contains(&c.url) {
                            urls.push(c.url);
                        }
                    }
                    if let Ok(mut known) = self.known.lock() {
                        *known = urls;
                    }
                }
            }
            // The next tick, or at once when the deadline would pass before it.
            let mut wake = tick + self.timing.renew_every;
            if let Attempt::Renew { within_ms, .. } = machine.next(ms()) {
                wake = wake.min(tokio::time::Instant::now() + Duration::from_millis(within_ms));
            }
            tokio::time::sleep_until(wake).await;
        }
    }

    /// Gives the lease back (a controller that stops): a standby takes it at its next try.
    pub async fn release(&self, store: &Store) {
        let status = self.status();
        if status.role != Role::Active {
            return;
        }
        self.status.send_modify(|s| {
            s.role = Role::Standby;
            s.active_since = None;
        });
        tracing::info!(
            "controller {}: stopping; releasing the leader lease of term {}",
            self.name,
            status.term
        );
        let _ = self
            .bounded(
                "cannot release the leader lease",
                self.timing.op_deadline,
                store.lease_release(&self.name, status.term),
            )
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::{Attempt, Machine, Outcome, Role, Timing};

    fn machine() -> Machine {
        Machine::new(Timing::default())
    }

    #[test]
    fn a_standby_takes_the_lease_and_renews_it() {
        let mut m = machine();
        assert_eq!(m.next(0), Attempt::Acquire);
        assert_eq!(m.record(0, 10, &Outcome::Held), None);
        assert_eq!(m.role(), Role::Standby);
        assert_eq!(m.record(0, 10, &Outcome::Failed), None);
        let t = m.record(1000, 1010, &Outcome::Acquired { term: 7 }).expect("transition");
        assert_eq!((t.from, t.to, t.term), (Role::Standby, Role::Active, 7));
        assert_eq!(m.next(2000), Attempt::Renew { term: 7, within_ms: 2000 });
        assert_eq!(m.record(2000, 2020, &Outcome::Renewed), None);
        // The deadline counts from the last renewal sent.
        assert_eq!(m.next(3000), Attempt::Renew { term: 7, within_ms: 2000 });
    }

    #[test]
    fn an_active_that_cannot_renew_steps_down_before_the_ttl() {
        let timing = Timing::default();
        let mut m = machine();
        m.record(0, 5, &Outcome::Acquired { term: 3 });
        // Failures within the deadline: still active.
        assert_eq!(m.record(1000, 2500, &Outcome::Failed), None);
        assert_eq!(m.role(), Role::Active);
        // The deadline passes: step down, well before a standby could take over (TTL).
        let deadline = timing.renew_deadline.as_millis() as u64;
        assert!(deadline < timing.ttl.as_millis() as u64);
        assert_eq!(m.next(deadline), Attempt::StepDown);
        let t = m.step_down().expect("transition");
        assert_eq!((t.from, t.to, t.term), (Role::Active, Role::SteppingDown, 3));
        // While stepping down it does nothing else.
        assert_eq!(m.next(deadline + 1), Attempt::StepDown);
        assert_eq!(m.record(deadline, deadline + 1, &Outcome::Acquired { term: 4 }), None);
        let t = m.stepped_down().expect("transition");
        assert_eq!((t.from, t.to), (Role::SteppingDown, Role::Standby));
        assert_eq!(m.next(deadline + 2), Attempt::Acquire);
    }

    #[test]
    fn a_failed_renewal_past_the_deadline_steps_down_at_once() {
        let mut m = machine();
        m.record(0, 0, &Outcome::Acquired { term: 1 });
        let t = m.record(1000, 3100, &Outcome::Failed).expect("transition");
        assert_eq!(t.to, Role::SteppingDown);
    }

    #[test]
    fn a_renewal_answered_too_late_does_not_keep_it_active() {
        let mut m = machine();
        m.record(0, 0, &Outcome::Acquired { term: 1 });
        // Sent at 100 (deadline 3100), answered at 3200: the deadline counts from when it was
        // sent (3100), so it is stale by the time it is known.
        let t = m.record(100, 3200, &Outcome::Renewed).expect("transition");
        assert_eq!(t.to, Role::SteppingDown);
    }

    #[test]
    fn a_lost_lease_steps_down_at_once() {
        let mut m = machine();
        m.record(0, 0, &Outcome::Acquired { term: 1 });
        let t = m.record(1000, 1001, &Outcome::Lost).expect("transition");
        assert_eq!((t.from, t.to, t.term), (Role::Active, Role::SteppingDown, 1));
    }

    #[test]
    fn a_database_fault_counts_from_the_first_failed_call_until_one_goes_through() {
        let leader = super::Leader::new("c1", "https://127.0.0.1:1", Timing::default());
        assert_eq!(leader.database_fault(), None);
        let first = tokio::time::Instant::now() - std::time::Duration::from_secs(2);
        leader.note_database(first, Some("refused".into()));
        leader.note_database(tokio::time::Instant::now(), Some("no answer within 1.5s".into()));
        let (for_, why) = leader.database_fault().expect("a fault");
        // Since the first failed call was sent, with the last reason.
        assert!(for_ >= std::time::Duration::from_secs(2), "{for_:?}");
        assert_eq!(why, "no answer within 1.5s");
        leader.note_database(tokio::time::Instant::now(), None);
        assert_eq!(leader.database_fault(), None);
    }

    #[test]
    fn only_checked_transitions() {
        let mut m = machine();
        // A standby neither steps down nor becomes a standby again.
        assert_eq!(m.step_down(), None);
        assert_eq!(m.stepped_down(), None);
        assert_eq!(m.record(0, 0, &Outcome::Renewed), None);
        assert_eq!(m.record(0, 0, &Outcome::Lost), None);
        assert_eq!(m.role(), Role::Standby);
    }
}
