//! When to stop pre-copy: the decision taken after every pass.
//!
//! After each pass the sender knows how many pages the guest dirtied while it ran and how
//! fast the last pass moved data. From those it estimates the downtime a stop-and-copy
//! would cost now (the dirty pages at the measured bandwidth, plus the fixed cost of the
//! state and the switchover) and decides:
//!
//! - **stop-and-copy** when the expected downtime is within the limit and another pass
//!   would not buy much: the last pass left dirty three quarters or more of what it sent
//!   ([`ANOTHER_PASS_BELOW`]), the set is already tiny, or the pass budget is spent. Iterating while the set still shrinks fast is cheap
//!   and is what takes the downtime from the limit (300 ms) down to a few milliseconds;
//! - **give up** (the VM stays on the source) when copying what is left would take longer
//!   than [`MAX_REMAINING_COPY`] (vSphere's rule), after `max_iterations` passes without
//!   reaching the limit, or when the migration has run longer than its timeout;
//! - otherwise **another pass**.
//!
//! A guest that dirties memory as fast as the link copies it makes the passes stop
//! shrinking while the expected downtime stays above the limit: pre-copy has **stalled**
//! ([`stalled`]: three passes, or one pass after a policy stepped in, without the dirty set
//! falling below 90% of the smallest before it). What follows is the operator's [`Policy`]:
//! throttle the vCPUs in steps (auto-converge), raise the downtime limit in steps up to a
//! maximum, or give up at once. [`Convergence`] keeps that state across passes.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::outcome::ReasonCode;

/// Bytes one page costs on the wire (address + data).
pub const WIRE_BYTES_PER_PAGE: u64 = 8 + 4096;
/// Copying what is left may not take longer than this (vSphere gives up at 100 s).
pub const MAX_REMAINING_COPY: Duration = Duration::from_secs(100);
/// A dirty set this small is not worth another pass.
pub const TINY_DIRTY_PAGES: u64 = 16;
/// Estimated fixed cost of the switchover (state, restore, activation), ms.
pub const SWITCHOVER_MS: f64 = 1.0;

/// The operator's limits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limits {
    /// Largest acceptable downtime, ms.
    pub downtime_ms: u64,
    /// Most pre-copy passes before giving up.
    pub max_iterations: u32,
    /// Longest the whole migration may take before giving up.
    pub timeout: Duration,
}

/// What to do when pre-copy stalls (the guest dirties memory as fast as it is copied).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// Slow the vCPUs down in steps ([`THROTTLE_INITIAL`]%, then [`THROTTLE_STEP`]% more
    /// per stalled pass, up to [`THROTTLE_MAX`]%) until the dirty set shrinks; give up if it
    /// still stalls at the maximum. The guest runs slower during the migration only.
    #[default]
    AutoConverge,
    /// Raise the downtime limit in [`DOWNTIME_STEPS`] equal steps up to the request's
    /// maximum; give up if it still stalls there.
    RaiseDowntime,
    /// Give up at once (the VM stays on the source, at full speed).
    GiveUp,
}

impl Policy {
    /// The name used in requests and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::AutoConverge => "auto-converge",
            Policy::RaiseDowntime => "raise-downtime",
            Policy::GiveUp => "give-up",
        }
    }
}

impl std::fmt::Display for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Policy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto-converge" => Ok(Policy::AutoConverge),
            "raise-downtime" => Ok(Policy::RaiseDowntime),
            "give-up" => Ok(Policy::GiveUp),
            _ => {
                Err(format!("unknown convergence policy {s:?}: use auto-converge, raise-downtime or give-up"))
            }
        }
    }
}

/// Within the downtime limit, another pass is made while the last one left dirty less than
/// this share of the pages it sent: each pass then costs at most three quarters of the one
/// before, so the passes still to go cost at most three times the last one. (It was one
/// half; a guest that dirtied at about half the link's rate then stopped at random after
/// one pass or several, with downtime between 3 and 39 ms in the same benchmark.)
pub const ANOTHER_PASS_BELOW: f64 = 0.75;

/// First throttle auto-converge applies, percent of each vCPU's time taken away.
pub const THROTTLE_INITIAL: u8 = 20;
/// Added at each further stalled pass, percent.
pub const THROTTLE_STEP: u8 = 10;
/// The most auto-converge takes, percent.
pub const THROTTLE_MAX: u8 = 99;
/// Steps from the downtime limit to its maximum under [`Policy::RaiseDowntime`].
pub const DOWNTIME_STEPS: u64 = 4;
/// A pass "shrank" the dirty set when it left less than this share of the smallest set of
/// the passes before it in the window.
pub const STALL_SHRINK: f64 = 0.9;
/// Passes that must fail to shrink before pre-copy counts as stalled (pass 1 included:
/// it is the first measure of the dirty rate).
pub const STALL_PASSES: usize = 3;

/// Whether pre-copy stalled over `window` (the passes since the start, or since a policy
/// last stepped in, that one included): with at least `need` passes, the last one left a
/// dirty set no smaller than [`STALL_SHRINK`] of the smallest before it.
pub fn stalled(window: &[PassMeasure], need: usize) -> bool {
    let need = need.max(2);
    if window.len() < need {
        return false;
    }
    let (last, before) = window.split_last().expect("at least two passes");
    let best = before.iter().map(|p| p.dirtied).min().unwrap_or(u64::MAX);
    last.dirtied as f64 >= best as f64 * STALL_SHRINK
}

/// What a policy did after a pass, for the sender to carry out and the report to show.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Throttle the vCPUs to this percent (of each one's time taken away).
    Throttle(u8),
    /// The downtime limit is now this, ms.
    DowntimeLimit(u64),
}

/// The convergence state of one migration: its passes, the current throttle and downtime
/// limit, and what the policy did.
#[derive(Clone, Debug)]
pub struct Convergence {
    limits: Limits,
    policy: Policy,
    max_downtime_ms: u64,
    passes: Vec<PassMeasure>,
    /// Index in `passes` of the pass after which the policy last stepped in.
    window_start: usize,
    acted: bool,
    throttle: u8,
    downtime_ms: u64,
    actions: Vec<(u32, Action)>,
}

impl Convergence {
    /// A migration's convergence under `policy`; `max_downtime_ms` bounds
    /// [`Policy::RaiseDowntime`] (it is raised to `limits.downtime_ms` if lower).
    pub fn new(limits: Limits, policy: Policy, max_downtime_ms: u64) -> Self {
        Self {
            limits,
            policy,
            max_downtime_ms: max_downtime_ms.max(limits.downtime_ms),
            passes: Vec::new(),
            window_start: 0,
            acted: false,
            throttle: 0,
            downtime_ms: limits.downtime_ms,
            actions: Vec::new(),
        }
    }

    /// The vCPU throttle now, percent.
    pub fn throttle(&self) -> u8 {
        self.throttle
    }

    /// The downtime limit now, ms.
    pub fn downtime_limit_ms(&self) -> u64 {
        self.downtime_ms
    }

    /// The passes so far.
    pub fn passes(&self) -> &[PassMeasure] {
        &self.passes
    }

    /// What the policy did, with the pass after which it did it.
    pub fn actions(&self) -> &[(u32, Action)] {
        &self.actions
    }

    /// The policy.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// Records pass `m`, `elapsed` into the migration, and decides what follows. When the
    /// decision is to go on and the policy stepped in, the action says how (the sender
    /// throttles the vCPUs before the next pass).
    pub fn after_pass(&mut self, m: PassMeasure, elapsed: Duration) -> (Decision, Option<Action>) {
        self.passes.push(m);
        let limits = Limits { downtime_ms: self.downtime_ms, ..self.limits };
        let decision = decide(&self.passes, elapsed, &limits);
        // The policy may step in only where pre-copy would go on anyway: a stop-and-copy is
        // within the limit, and a give-up (pass budget, timeout, a remainder that takes over
        // 100 s) is not the policy's to overrule.
        let stuck = decision == Decision::Continue;
        if !stuck {
            return (decision, None);
        }
        let need = if self.acted { 2 } else { STALL_PASSES };
        if !stalled(&self.passes[self.window_start..], need) {
            return (decision, None);
        }
        let dirty = m.dirtied;
        let expected = expected_downtime(&self.passes, dirty);
        let window: Vec<String> =
            self.passes[self.window_start..].iter().map(|p| p.dirtied.to_string()).collect();
        let why = format!(
            "pre-copy stalled: passes {}-{} left {} dirty pages; expected downtime {expected:.0} ms \
             exceeds the {} ms limit",
            self.passes[self.window_start].pass,
            m.pass,
            window.join(", "),
            self.downtime_ms
        );
        let action = match self.policy {
            Policy::GiveUp => None,
            Policy::AutoConverge if self.throttle < THROTTLE_MAX => {
                let next = if self.throttle == 0 {
                    THROTTLE_INITIAL
                } else {
                    self.throttle.saturating_add(THROTTLE_STEP).min(THROTTLE_MAX)
                };
                self.throttle = next;
                Some(Action::Throttle(next))
            }
            Policy::RaiseDowntime if self.downtime_ms < self.max_downtime_ms => {
                let step = (self.max_downtime_ms - self.limits.downtime_ms).div_ceil(DOWNTIME_STEPS).max(1);
                self.downtime_ms = (self.downtime_ms + step).min(self.max_downtime_ms);
                Some(Action::DowntimeLimit(self.downtime_ms))
            }
            Policy::AutoConverge => {
                return (
                    Decision::GiveUp(
                        ReasonCode::NoConvergence,
                        format!("{why}, with the vCPUs throttled by {THROTTLE_MAX}%"),
                    ),
                    None,
                )
            }
            Policy::RaiseDowntime => {
                return (
                    Decision::GiveUp(
                        ReasonCode::NoConvergence,
                        format!("{why}, its maximum (raise-downtime)"),
                    ),
                    None,
                )
            }
        };
        let Some(action) = action else {
            return (Decision::GiveUp(ReasonCode::NoConvergence, format!("{why} (policy give-up)")), None);
        };
        self.acted = true;
        self.window_start = self.passes.len() - 1;
        self.actions.push((m.pass, action));
        // With a raised limit the same pass may now be within it.
        if let Action::DowntimeLimit(ms) = action {
            let limits = Limits { downtime_ms: ms, ..self.limits };
            let again = decide(&self.passes, elapsed, &limits);
            if matches!(again, Decision::StopAndCopy(_)) {
                return (again, Some(action));
            }
        }
        (Decision::Continue, Some(action))
    }
}

/// What one finished pass measured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PassMeasure {
    /// Pass number, from 1.
    pub pass: u32,
    /// Pages it sent.
    pub pages: u64,
    /// Bytes it put on the wire: on the stream that will carry the stop-and-copy, when
    /// the pass used several (the estimate of the downtime needs that stream's rate).
    pub bytes: u64,
    /// How long it took, ms.
    pub ms: f64,
    /// Pages the guest dirtied while it ran (what the next pass must send).
    pub dirtied: u64,
    /// Bytes it put on the wire over all streams: with `bytes`' rate, what a page costs
    /// ([`page_cost`]; delta encoding makes re-sent pages much cheaper than 4 KiB).
    pub wire_bytes: u64,
}

/// Bytes one more page is expected to cost on the wire: what the last pass after the first
/// paid per page (pass 1 goes mostly as zero markers and says nothing about re-sent pages),
/// between 16 bytes and [`WIRE_BYTES_PER_PAGE`]; a whole page before there is such a pass.
pub fn page_cost(passes: &[PassMeasure]) -> f64 {
    match passes.iter().rev().find(|p| p.pass > 1 && p.pages >= TINY_DIRTY_PAGES) {
        Some(p) => (p.wire_bytes as f64 / p.pages as f64).clamp(16.0, WIRE_BYTES_PER_PAGE as f64),
        None => WIRE_BYTES_PER_PAGE as f64,
    }
}

/// The downtime a stop-and-copy of `dirty` pages would cost after `passes`, ms.
pub fn expected_downtime(passes: &[PassMeasure], dirty: u64) -> f64 {
    let bw = bandwidth(passes);
    if bw <= 0.0 {
        return f64::INFINITY;
    }
    dirty as f64 * page_cost(passes) / bw + SWITCHOVER_MS
}

/// The decision.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Send the dirtied pages in another pass.
    Continue,
    /// Pause and copy the rest; the reason says why now.
    StopAndCopy(String),
    /// Stop migrating; the VM stays on the source. The code (`no_convergence` or
    /// `timeout`) and the reason are reported.
    GiveUp(crate::outcome::ReasonCode, String),
}

/// Passes shorter than this are too short to measure bandwidth with.
const MIN_MEASURE_MS: f64 = 5.0;
/// Passes that carried less than this (on the measured stream) say nothing about the link:
/// with several streams, a small pass's batches can all go to the other streams, leaving
/// the first one its PassEnd alone, timed over the whole pass.
const MIN_MEASURE_BYTES: u64 = 64 << 10;

/// Bandwidth estimate in bytes per millisecond: the last measurable pass's (one long enough
/// to time, that carried enough to time), or, if none is, the best of the rest, each at the
/// better of its measured stream's rate and all its streams' rate. (With several streams the
/// measured one can carry almost nothing in a long pass 1: its rate alone would be near zero
/// and the expected downtime hours, a migration given up for an estimate, not for the link.)
pub fn bandwidth(passes: &[PassMeasure]) -> f64 {
    let rate = |p: &PassMeasure| if p.ms > 0.0 { p.bytes as f64 / p.ms } else { 0.0 };
    let wire_rate = |p: &PassMeasure| if p.ms > 0.0 { p.wire_bytes as f64 / p.ms } else { 0.0 };
    match passes.iter().rev().find(|p| p.ms >= MIN_MEASURE_MS && p.bytes >= MIN_MEASURE_BYTES) {
        Some(p) => rate(p),
        None => passes.iter().map(|p| rate(p).max(wire_rate(p))).fold(0.0, f64::max),
    }
}

/// The downtime a stop-and-copy of `dirty` pages would cost at `bandwidth` bytes/ms.
pub fn expected_downtime_ms(dirty: u64, bandwidth: f64) -> f64 {
    if bandwidth <= 0.0 {
        return f64::INFINITY;
    }
    dirty as f64 * WIRE_BYTES_PER_PAGE as f64 / bandwidth + SWITCHOVER_MS
}

/// Decides what follows the last of `passes`, `elapsed` into the migration.
pub fn decide(passes: &[PassMeasure], elapsed: Duration, limits: &Limits) -> Decision {
    let Some(last) = passes.last() else {
        return Decision::Continue;
    };
    let bw = bandwidth(passes);
    let dirty = last.dirtied;
    let expected = expected_downtime(passes, dirty);
    let remaining_copy_ms = expected - SWITCHOVER_MS;
    if remaining_copy_ms > MAX_REMAINING_COPY.as_secs_f64() * 1e3 {
        return Decision::GiveUp(
            ReasonCode::NoConvergence,
            format!(
                "copying the {dirty} dirty pages left would take {:.0} s at {:.0} MB/s, more than the \
             {} s allowed",
                remaining_copy_ms / 1e3,
                bw / 1e3,
                MAX_REMAINING_COPY.as_secs()
            ),
        );
    }
    let within = expected <= limits.downtime_ms as f64;
    if within {
        if dirty <= TINY_DIRTY_PAGES {
            return Decision::StopAndCopy(format!(
                "{dirty} dirty pages left; expected downtime {expected:.1} ms"
            ));
        }
        if last.pass >= limits.max_iterations {
            return Decision::StopAndCopy(format!(
                "pass budget of {} spent; expected downtime {expected:.1} ms is within {} ms",
                limits.max_iterations, limits.downtime_ms
            ));
        }
        // Another pass pays off only while the dirty set keeps shrinking well.
        if last.pass > 1 && dirty as f64 >= last.pages as f64 * ANOTHER_PASS_BELOW {
            return Decision::StopAndCopy(format!(
                "the dirty set stopped shrinking ({} -> {dirty} pages); expected downtime \
                 {expected:.1} ms is within {} ms",
                last.pages, limits.downtime_ms
            ));
        }
    }
    if elapsed >= limits.timeout {
        return Decision::GiveUp(
            ReasonCode::Timeout,
            format!(
                "timeout of {} s reached with {dirty} pages dirty (expected downtime {expected:.0} ms, \
             limit {} ms)",
                limits.timeout.as_secs(),
                limits.downtime_ms
            ),
        );
    }
    if !within && last.pass >= limits.max_iterations {
        return Decision::GiveUp(
            ReasonCode::NoConvergence,
            format!(
                "did not converge in {} passes: {dirty} pages dirty, expected downtime {expected:.0} ms \
             exceeds the {} ms limit (the guest dirties memory faster than it can be copied)",
                limits.max_iterations, limits.downtime_ms
            ),
        );
    }
    Decision::Continue
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits { downtime_ms: 300, max_iterations: 30, timeout: Duration::from_secs(600) };

    fn pass(pass: u32, pages: u64, ms: f64, dirtied: u64) -> PassMeasure {
        PassMeasure {
            pass,
            pages,
            bytes: pages * WIRE_BYTES_PER_PAGE,
            ms,
            dirtied,
            wire_bytes: pages * WIRE_BYTES_PER_PAGE,
        }
    }

    #[test]
    fn keeps_going_while_the_dirty_set_shrinks() {
        // 1 GB/s; 10,000 dirty pages cost ~41 ms: within 300 ms, but still shrinking.
        let p = [pass(1, 250_000, 1000.0, 20_000), pass(2, 20_000, 80.0, 2_000)];
        assert_eq!(decide(&p, Duration::from_secs(1), &LIMITS), Decision::Continue);
    }

    #[test]
    fn keeps_going_at_a_little_over_half() {
        // 16,385 pages sent, 8,853 dirtied (54%, a memstress run that used to stop here with
        // 33 ms of downtime): another pass.
        let p = [pass(1, 150_000, 480.0, 16_385), pass(2, 16_385, 108.0, 8_853)];
        assert_eq!(decide(&p, Duration::from_secs(1), &LIMITS), Decision::Continue);
        // 74%: still; 75%: stop.
        let p = [pass(1, 150_000, 480.0, 16_385), pass(2, 16_000, 108.0, 11_999)];
        assert_eq!(decide(&p, Duration::from_secs(1), &LIMITS), Decision::Continue);
        let p = [pass(1, 150_000, 480.0, 16_385), pass(2, 16_000, 108.0, 12_000)];
        assert!(matches!(decide(&p, Duration::from_secs(1), &LIMITS), Decision::StopAndCopy(_)));
    }

    #[test]
    fn stops_when_tiny_or_no_longer_shrinking() {
        let p = [pass(1, 250_000, 1000.0, 10)];
        assert!(matches!(decide(&p, Duration::from_secs(1), &LIMITS), Decision::StopAndCopy(_)));
        let p = [pass(1, 250_000, 1000.0, 20_000), pass(2, 20_000, 80.0, 15_000)];
        match decide(&p, Duration::from_secs(1), &LIMITS) {
            Decision::StopAndCopy(r) => assert!(r.contains("stopped shrinking"), "{r}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_slow_link_keeps_iterating_then_gives_up() {
        // 10 MB/s and 60,000 dirty pages: ~25 s of copying, far above 300 ms.
        let p = [pass(1, 60_000, 24_600.0, 60_000)];
        assert_eq!(decide(&p, Duration::from_secs(25), &LIMITS), Decision::Continue);
        let p: Vec<_> = (1..=30).map(|i| pass(i, 60_000, 24_600.0, 60_000)).collect();
        match decide(&p, Duration::from_secs(100), &LIMITS) {
            Decision::GiveUp(c, r) => {
                assert_eq!(c, ReasonCode::NoConvergence);
                assert!(r.contains("did not converge in 30 passes"), "{r}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn gives_up_when_the_rest_takes_over_100_s() {
        // 1 MB/s and 100,000 pages: ~410 s.
        let p = [pass(1, 1000, 4104.0, 100_000)];
        match decide(&p, Duration::from_secs(5), &LIMITS) {
            Decision::GiveUp(c, r) => {
                assert_eq!(c, ReasonCode::NoConvergence);
                assert!(r.contains("more than the 100 s allowed"), "{r}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn timeout_gives_up() {
        let limits = Limits { timeout: Duration::from_secs(2), ..LIMITS };
        let p = [pass(1, 60_000, 24_600.0, 60_000)];
        assert!(matches!(
            decide(&p, Duration::from_secs(3), &limits),
            Decision::GiveUp(ReasonCode::Timeout, _)
        ));
    }

    #[test]
    fn bandwidth_ignores_passes_too_short_to_measure() {
        let p = [pass(1, 250_000, 1000.0, 100), pass(2, 100, 0.1, 10)];
        assert!((bandwidth(&p) - 250_000.0 * WIRE_BYTES_PER_PAGE as f64 / 1000.0).abs() < 1.0);
        assert_eq!(expected_downtime_ms(5, 0.0), f64::INFINITY);
    }

    /// A pass whose measured stream carried only its PassEnd (the other streams took every
    /// batch) is long enough to time but says nothing about the link.
    #[test]
    fn bandwidth_ignores_passes_that_carried_almost_nothing() {
        let first = PassMeasure {
            pass: 1,
            pages: 65_536,
            bytes: 14 << 20,
            ms: 100.0,
            dirtied: 900,
            wire_bytes: 14 << 20,
        };
        let nothing = PassMeasure { pass: 2, pages: 900, bytes: 40, ms: 10.0, dirtied: 130, wire_bytes: 40 };
        assert!((bandwidth(&[first, nothing]) - (14 << 20) as f64 / 100.0).abs() < 1.0);
    }

    /// Several streams, and the measured one carried only its PassEnd in a long pass 1: the
    /// estimate falls back to what all streams carried, not to ~0 (which gave up migrations
    /// as needing hours).
    #[test]
    fn bandwidth_falls_back_to_all_streams_when_no_pass_is_measurable() {
        let first =
            PassMeasure { pass: 1, pages: 65_536, bytes: 40, ms: 2000.0, dirtied: 900, wire_bytes: 14 << 20 };
        assert!((bandwidth(&[first]) - (14 << 20) as f64 / 2000.0).abs() < 1.0);
        assert!(expected_downtime(&[first], 900) < 1000.0);
    }

    fn run(
        policy: Policy,
        dirty: impl Fn(u32, u8, u64) -> u64,
        max_downtime: u64,
    ) -> (Decision, Convergence) {
        // 100 MB/s; pass 1 sends 65,536 pages.
        let mut c = Convergence::new(LIMITS, policy, max_downtime);
        let mut pages = 65_536;
        for n in 1..=40 {
            let d = dirty(n, c.throttle(), c.downtime_limit_ms());
            let m = pass(n, pages, pages as f64 * WIRE_BYTES_PER_PAGE as f64 / 100_000.0, d);
            let (decision, _) = c.after_pass(m, Duration::from_secs(u64::from(n)));
            if decision != Decision::Continue {
                return (decision, c);
            }
            pages = d;
        }
        panic!("no decision in 40 passes");
    }

    #[test]
    fn a_stall_is_found_in_three_passes_and_give_up_acts_at_once() {
        // 20,000 pages dirty every pass: ~820 ms of copying against a 300 ms limit.
        let (d, c) = run(Policy::GiveUp, |_, _, _| 20_000, 0);
        match d {
            Decision::GiveUp(ReasonCode::NoConvergence, r) => assert!(r.contains("stalled"), "{r}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(c.passes().len(), STALL_PASSES);
        assert!(c.actions().is_empty());
    }

    #[test]
    fn a_shrinking_dirty_set_is_not_a_stall() {
        let (d, c) = run(Policy::GiveUp, |n, _, _| 40_000 >> n, 0);
        assert!(matches!(d, Decision::StopAndCopy(_)), "{d:?}");
        assert!(c.actions().is_empty());
    }

    #[test]
    fn auto_converge_throttles_in_steps_until_the_dirty_set_shrinks() {
        // The guest dirties in proportion to the time it keeps: 20,000 pages a pass at full
        // speed; at a 60% throttle it leaves few enough to stop and copy.
        let (d, c) = run(
            Policy::AutoConverge,
            |_, t, _| if t >= 60 { 500 } else { 20_000 * u64::from(100 - t) / 100 },
            0,
        );
        assert!(matches!(d, Decision::StopAndCopy(_)), "{d:?}");
        let steps: Vec<u8> = c
            .actions()
            .iter()
            .map(|(_, a)| match a {
                Action::Throttle(t) => *t,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(steps, [20, 30, 40, 50, 60]);
        assert_eq!(c.actions()[0].0, 3, "first step after the third pass");
    }

    #[test]
    fn auto_converge_gives_up_at_the_maximum_throttle() {
        let (d, c) = run(Policy::AutoConverge, |_, _, _| 20_000, 0);
        match d {
            Decision::GiveUp(ReasonCode::NoConvergence, r) => assert!(r.contains("throttled by 99%"), "{r}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(c.throttle(), THROTTLE_MAX);
        assert_eq!(c.actions().last().map(|a| a.1), Some(Action::Throttle(99)));
    }

    #[test]
    fn raise_downtime_raises_the_limit_up_to_its_maximum() {
        // 20,000 pages at 100 MB/s is ~820 ms: reachable with a 1,000 ms maximum.
        let (d, c) = run(Policy::RaiseDowntime, |_, _, _| 20_000, 1000);
        assert!(matches!(d, Decision::StopAndCopy(_)), "{d:?}");
        let limits: Vec<u64> = c
            .actions()
            .iter()
            .map(|(_, a)| match a {
                Action::DowntimeLimit(ms) => *ms,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(limits, [475, 650, 825]);
        assert_eq!(c.downtime_limit_ms(), 825);
        // Out of reach: give up at the maximum.
        let (d, _) = run(Policy::RaiseDowntime, |_, _, _| 60_000, 1000);
        assert!(matches!(d, Decision::GiveUp(ReasonCode::NoConvergence, _)), "{d:?}");
    }

    #[test]
    fn policy_names_round_trip() {
        for p in [Policy::AutoConverge, Policy::RaiseDowntime, Policy::GiveUp] {
            assert_eq!(p.as_str().parse::<Policy>(), Ok(p));
            assert_eq!(serde_json::to_string(&p).expect("json"), format!("\"{p}\""));
        }
        assert!("fast".parse::<Policy>().is_err());
    }

    /// Re-sent pages that went as small deltas make the next stop-and-copy cheap: the
    /// estimate follows what the last pass paid per page, not 4 KiB.
    #[test]
    fn the_downtime_estimate_follows_the_cost_of_a_re_sent_page() {
        // 2 MB/s; pass 2 sent 257 whole pages, pass 3 the same pages as 40-byte deltas.
        let p1 = pass(1, 16_384, 600.0, 257);
        let p2 = pass(2, 257, 527.0, 257);
        let p3 =
            PassMeasure { pass: 3, pages: 257, bytes: 10_280, ms: 10.0, dirtied: 257, wire_bytes: 10_280 };
        assert!(expected_downtime(&[p1, p2], 257) > 500.0);
        let e = expected_downtime(&[p1, p2, p3], 257);
        assert!(e < 10.0, "{e}");
        assert!(matches!(decide(&[p1, p2, p3], Duration::from_secs(2), &LIMITS), Decision::StopAndCopy(_)));
    }
}
