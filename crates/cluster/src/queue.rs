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

/// The limits (`[limits]` in the controller's configuration).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Migrations leaving one host at once, and (apart) arriving at one host.
    pub per_host: u32,
    /// Migrations in the whole cluster at once.
    pub per_cluster: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { per_host: 2, per_cluster: 8 }
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

    const TWO: Limits = Limits { per_host: 2, per_cluster: 8 };

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
    fn the_cluster_limit() {
        let limits = Limits { per_host: 2, per_cluster: 3 };
        let q = [p("a", "b"), p("c", "d"), p("e", "f"), p("g", "h")];
        assert_eq!(plan(limits, &[], &q), vec![0, 1, 2]);
        assert_eq!(
            admit(limits, &[p("a", "b"), p("c", "d"), p("e", "f")], &q[3]),
            Err(Wait::Cluster { limit: 3 })
        );
        let one = Limits { per_host: 1, per_cluster: 1 };
        assert_eq!(plan(one, &[], &q), vec![0]);
        assert_eq!(plan(one, &[p("x", "y")], &q), Vec::<usize>::new());
    }
}
