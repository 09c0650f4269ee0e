//! When to stop pre-copy: the decision taken after every pass.
//!
//! After each pass the sender knows how many pages the guest dirtied while it ran and how
//! fast the last pass moved data. From those it estimates the downtime a stop-and-copy
//! would cost now (the dirty pages at the measured bandwidth, plus the fixed cost of the
//! state and the switchover) and decides:
//!
//! - **stop-and-copy** when the expected downtime is within the limit and another pass
//!   would not buy much: the dirty set no longer halves from pass to pass, it is already
//!   tiny, or the pass budget is spent. Iterating while the set still shrinks fast is cheap
//!   and is what takes the downtime from the limit (300 ms) down to a few milliseconds;
//! - **give up** (the VM stays on the source) when copying what is left would take longer
//!   than [`MAX_REMAINING_COPY`] (vSphere's rule), after `max_iterations` passes without
//!   reaching the limit, or when the migration has run longer than its timeout;
//! - otherwise **another pass**.

use std::time::Duration;

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
/// to time, that carried enough to time), or, if none is, the best of the rest.
pub fn bandwidth(passes: &[PassMeasure]) -> f64 {
    let rate = |p: &PassMeasure| if p.ms > 0.0 { p.bytes as f64 / p.ms } else { 0.0 };
    match passes.iter().rev().find(|p| p.ms >= MIN_MEASURE_MS && p.bytes >= MIN_MEASURE_BYTES) {
        Some(p) => rate(p),
        None => passes.iter().map(rate).fold(0.0, f64::max),
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
    let expected = expected_downtime_ms(dirty, bw);
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
        // Another pass pays off only while the dirty set keeps halving.
        if last.pass > 1 && dirty * 2 > last.pages {
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
        PassMeasure { pass, pages, bytes: pages * WIRE_BYTES_PER_PAGE, ms, dirtied }
    }

    #[test]
    fn keeps_going_while_the_dirty_set_halves() {
        // 1 GB/s; 10,000 dirty pages cost ~41 ms: within 300 ms, but still shrinking.
        let p = [pass(1, 250_000, 1000.0, 20_000), pass(2, 20_000, 80.0, 2_000)];
        assert_eq!(decide(&p, Duration::from_secs(1), &LIMITS), Decision::Continue);
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
        let first = PassMeasure { pass: 1, pages: 65_536, bytes: 14 << 20, ms: 100.0, dirtied: 900 };
        let nothing = PassMeasure { pass: 2, pages: 900, bytes: 40, ms: 10.0, dirtied: 130 };
        assert!((bandwidth(&[first, nothing]) - (14 << 20) as f64 / 100.0).abs() < 1.0);
    }
}
