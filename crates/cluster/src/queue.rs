//! Migration limits and the controller's queue: which migrations may start now.
//!
//! A host takes part in at most `per_host` migrations leaving it and at most `per_host`
//! arriving at it (counted apart, as Hyper-V and KubeVirt count per node), and the cluster
//! in at most `per_cluster`. A request that would exceed a limit waits in the queue (kept in
//! the store, `migration_queue`); the dispatcher ([`crate::migrate::dispatch`]) starts the
//! queued ones in FIFO order as slots free up. A queued migration that cannot start yet does
//! not hold back one behind it whose hosts have free slots.
//!
//! The functions here are pure: the counts come from the controller's history (its
//! `active` migrations, those started on a host directly included).
//!
//! A migration whose hosts both stop answering does not keep its slots forever: once neither
//! its source nor its destination has answered about it for [`HOST_LOST_AFTER`] ([`Silence`]),
//! the controller records it `unknown` (reason code `host_lost`), which no longer counts
//! against the limits; the record takes the hosts' outcome once one of them answers again
//! ([`settle`]: the hosts are the authority, and a `completed` from either side wins).

use std::time::Duration;

use ferry_host_api::MigrationOutcome;

/// How long both hosts of an active migration may stay silent (no answer from either about
/// it: refused or timed-out connections, a frozen or dead daemon) before the controller
/// records it `unknown` (`host_lost`) and frees its slots, unless `[limits]
/// host_lost_after_s` says otherwise. Five times the heartbeat silence that makes a host
/// `not_responding` (6 s): a migration is not given up on because one heartbeat was late.
pub const HOST_LOST_AFTER: Duration = Duration::from_secs(30);

/// The shortest `host_lost_after_s` the configuration takes: longer than the silence that
/// makes a host `not_responding`, so that a host is never lost before it is even late.
pub const HOST_LOST_AFTER_MIN_S: u64 =
    (ferry_cluster_api::HEARTBEAT_INTERVAL_MS * ferry_cluster_api::MISSED_HEARTBEATS).div_ceil(1000) + 1;

/// When the hosts of one active migration last answered about it, as its follower saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Silence {
    last_answer_ms: u64,
    bound_ms: u64,
}

/// What the follower does about an active migration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A host answered recently enough: go on following.
    Follow,
    /// Neither host answered for `silent_ms` (at least the bound): record it `unknown`.
    Lost {
        /// How long they have been silent.
        silent_ms: u64,
    },
}

impl Silence {
    /// Following starts at `now_ms` (counted as an answer: the migration was just seen
    /// active), with `bound` ([`HOST_LOST_AFTER`] in the controller).
    pub fn new(now_ms: u64, bound: Duration) -> Silence {
        Silence { last_answer_ms: now_ms, bound_ms: bound.as_millis() as u64 }
    }

    /// The source or the destination answered about it at `now_ms` (with its record, without
    /// one, or with an error status: a daemon that answers is not lost).
    pub fn answered(&mut self, now_ms: u64) {
        self.last_answer_ms = self.last_answer_ms.max(now_ms);
    }

    /// The verdict at `now_ms`.
    pub fn verdict(&self, now_ms: u64) -> Verdict {
        let silent_ms = now_ms.saturating_sub(self.last_answer_ms);
        if silent_ms >= self.bound_ms {
            Verdict::Lost { silent_ms }
        } else {
            Verdict::Follow
        }
    }
}

/// Which host's record of a migration the controller takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The source's record.
    Source,
    /// The destination's record.
    Destination,
}

/// Whose record decides a migration, from what its source and destination each report
/// (`None`: no answer, or no record): a `completed` from either (the VM runs on the
/// destination, which holds its lock), else the source's, else the destination's once it
/// has ended there (a destination still receiving says nothing the source would not); `None`
/// when neither decides.
pub fn settle(source: Option<MigrationOutcome>, destination: Option<MigrationOutcome>) -> Option<Side> {
    use MigrationOutcome::{Active, Completed, Queued, Unknown};
    // Neither host records `queued` or `unknown`: such a report decides nothing.
    let source = source.filter(|o| !matches!(o, Queued | Unknown));
    let destination = destination.filter(|o| !matches!(o, Queued | Unknown));
    match (source, destination) {
        (_, Some(Completed)) if source != Some(Completed) => Some(Side::Destination),
        (Some(_), _) => Some(Side::Source),
        (None, Some(o)) if o != Active => Some(Side::Destination),
        _ => None,
    }
}

/// The limits (`[limits]` in the controller's configuration).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Migrations leaving one host at once, and (apart) arriving at one host.
    pub per_host: u32,
    /// Migrations in the whole cluster at once.
    pub per_cluster: u32,
    /// How long both hosts of an active migration may stay silent before it is recorded
    /// `unknown` and its slots freed ([`HOST_LOST_AFTER`] by default).
    pub host_lost_after: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { per_host: 2, per_cluster: 8, host_lost_after: HOST_LOST_AFTER }
    }
}

/// A migration's two hosts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pair {
    /// The host it leaves.
    pub source: String,
    /// The host it goes to.
    pub destination: String,
}

impl Pair {
    /// `source` to `destination`.
    pub fn new(source: &str, destination: &str) -> Pair {
        Pair { source: source.to_string(), destination: destination.to_string() }
    }
}

/// Why a migration must wait: the first limit it would exceed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Wait {
    /// The cluster runs `per_cluster` migrations.
    Cluster {
        /// The limit.
        limit: u32,
    },
    /// `host` has `per_host` migrations leaving it.
    Outgoing {
        /// The host.
        host: String,
        /// The limit.
        limit: u32,
    },
    /// `host` has `per_host` migrations arriving.
    Incoming {
        /// The host.
        host: String,
        /// The limit.
        limit: u32,
    },
}

impl std::fmt::Display for Wait {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Wait::Cluster { limit } => write!(f, "the cluster runs {limit} migrations (limits.per_cluster)"),
            Wait::Outgoing { host, limit } => {
                write!(f, "host {host} has {limit} migrations leaving it (limits.per_host)")
            }
            Wait::Incoming { host, limit } => {
                write!(f, "host {host} has {limit} migrations arriving (limits.per_host)")
            }
        }
    }
}

/// Whether `next` may start beside the migrations `running`; the first limit it would
/// exceed if not.
pub fn admit(limits: Limits, running: &[Pair], next: &Pair) -> Result<(), Wait> {
    if running.len() as u64 >= u64::from(limits.per_cluster) {
        return Err(Wait::Cluster { limit: limits.per_cluster });
    }
    let out = running.iter().filter(|p| p.source == next.source).count() as u64;
    if out >= u64::from(limits.per_host) {
        return Err(Wait::Outgoing { host: next.source.clone(), limit: limits.per_host });
    }
    let inc = running.iter().filter(|p| p.destination == next.destination).count() as u64;
    if inc >= u64::from(limits.per_host) {
        return Err(Wait::Incoming { host: next.destination.clone(), limit: limits.per_host });
    }
    Ok(())
}

/// Which of `queue` (oldest first) start now beside `running`: their indices, in order.
/// Each one started counts against the limits of those after it.
pub fn plan(limits: Limits, running: &[Pair], queue: &[Pair]) -> Vec<usize> {
    let mut now = running.to_vec();
    let mut start = Vec::new();
    for (i, q) in queue.iter().enumerate() {
        if admit(limits, &now, q).is_ok() {
            now.push(q.clone());
            start.push(i);
        }
    }
    start
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str, d: &str) -> Pair {
        Pair::new(s, d)
    }

    const TWO: Limits = Limits { per_host: 2, per_cluster: 8, host_lost_after: HOST_LOST_AFTER };

    #[test]
    fn two_per_host_run_and_the_third_waits() {
        let q = [p("a", "b"), p("a", "b"), p("a", "b")];
        assert_eq!(plan(TWO, &[], &q), vec![0, 1]);
        assert_eq!(
            admit(TWO, &[p("a", "b"), p("a", "b")], &q[2]),
            Err(Wait::Outgoing { host: "a".into(), limit: 2 })
        );
        // One ended: the oldest waiting one goes.
        assert_eq!(plan(TWO, &[p("a", "b")], &q[2..]), vec![0]);
    }

    #[test]
    fn outgoing_and_incoming_are_counted_apart() {
        // a sends two and receives two: both at its limit, neither blocks the other.
        let running = [p("a", "b"), p("a", "c"), p("b", "a")];
        assert_eq!(admit(TWO, &running, &p("c", "a")), Ok(()));
        assert_eq!(admit(TWO, &running, &p("a", "d")), Err(Wait::Outgoing { host: "a".into(), limit: 2 }));
        let running = [p("b", "a"), p("c", "a")];
        assert_eq!(admit(TWO, &running, &p("d", "a")), Err(Wait::Incoming { host: "a".into(), limit: 2 }));
        assert_eq!(admit(TWO, &running, &p("a", "d")), Ok(()));
    }

    #[test]
    fn fifo_without_head_of_line_blocking() {
        let running = [p("a", "b"), p("a", "c")];
        // The first waits for a; the second (other hosts) goes; the third waits for a too.
        let q = [p("a", "d"), p("c", "d"), p("a", "e"), p("e", "d")];
        assert_eq!(plan(TWO, &running, &q), vec![1, 3]);
        // The two started fill d's incoming slots: a later one to d waits.
        assert_eq!(plan(TWO, &running, &[p("c", "d"), p("e", "d"), p("f", "d")]), vec![0, 1]);
    }

    #[test]
    fn a_migration_is_lost_only_after_both_hosts_were_silent_for_the_bound() {
        let bound = Duration::from_secs(30);
        let mut s = Silence::new(1_000, bound);
        assert_eq!(s.verdict(1_000), Verdict::Follow);
        assert_eq!(s.verdict(30_999), Verdict::Follow);
        assert_eq!(s.verdict(31_000), Verdict::Lost { silent_ms: 30_000 });
        // One answer (either host) starts the count again.
        s.answered(20_000);
        assert_eq!(s.verdict(31_000), Verdict::Follow);
        assert_eq!(s.verdict(49_999), Verdict::Follow);
        assert_eq!(s.verdict(50_000), Verdict::Lost { silent_ms: 30_000 });
        // An answer seen late (an older time) does not move the count back.
        s.answered(10_000);
        assert_eq!(s.verdict(50_000), Verdict::Lost { silent_ms: 30_000 });
        // A clock that seems to go back is no silence.
        assert_eq!(s.verdict(5_000), Verdict::Follow);
        // The controller's bound is longer than a host's not_responding silence.
        let not_responding = ferry_cluster_api::HEARTBEAT_INTERVAL_MS * ferry_cluster_api::MISSED_HEARTBEATS;
        assert!(HOST_LOST_AFTER.as_millis() as u64 > not_responding);
        assert!(HOST_LOST_AFTER_MIN_S * 1000 > not_responding);
    }

    #[test]
    fn the_hosts_records_settle_it_and_completed_always_wins() {
        use MigrationOutcome::*;
        // Completed from either side wins, whatever the other says.
        assert_eq!(settle(Some(Failed), Some(Completed)), Some(Side::Destination));
        assert_eq!(settle(None, Some(Completed)), Some(Side::Destination));
        assert_eq!(settle(Some(Active), Some(Completed)), Some(Side::Destination));
        assert_eq!(settle(Some(Completed), Some(Failed)), Some(Side::Source));
        assert_eq!(settle(Some(Completed), None), Some(Side::Source));
        // Otherwise the source's record.
        assert_eq!(settle(Some(Failed), Some(Failed)), Some(Side::Source));
        assert_eq!(settle(Some(Active), None), Some(Side::Source));
        assert_eq!(settle(Some(Cancelled), Some(Active)), Some(Side::Source));
        // The destination's alone only once it has ended there.
        assert_eq!(settle(None, Some(Failed)), Some(Side::Destination));
        assert_eq!(settle(None, Some(Active)), None);
        assert_eq!(settle(None, None), None);
        // The controller's own outcomes decide nothing.
        assert_eq!(settle(Some(Unknown), Some(Queued)), None);
        assert_eq!(settle(Some(Queued), Some(Failed)), Some(Side::Destination));
        // Never failed where a host says completed.
        for s in [None, Some(Active), Some(Failed), Some(Refused), Some(Cancelled), Some(Completed)] {
            for d in [None, Some(Active), Some(Failed), Some(Refused), Some(Cancelled), Some(Completed)] {
                let taken = match settle(s, d) {
                    Some(Side::Source) => s,
                    Some(Side::Destination) => d,
                    None => None,
                };
                if s == Some(Completed) || d == Some(Completed) {
                    assert_eq!(taken, Some(Completed), "{s:?} {d:?}");
                }
            }
        }
    }

    #[test]
    fn the_cluster_limit() {
        let limits = Limits { per_host: 2, per_cluster: 3, ..Limits::default() };
        let q = [p("a", "b"), p("c", "d"), p("e", "f"), p("g", "h")];
        assert_eq!(plan(limits, &[], &q), vec![0, 1, 2]);
        assert_eq!(
            admit(limits, &[p("a", "b"), p("c", "d"), p("e", "f")], &q[3]),
            Err(Wait::Cluster { limit: 3 })
        );
        let one = Limits { per_host: 1, per_cluster: 1, ..Limits::default() };
        assert_eq!(plan(one, &[], &q), vec![0]);
        assert_eq!(plan(one, &[p("x", "y")], &q), Vec::<usize>::new());
    }
}
