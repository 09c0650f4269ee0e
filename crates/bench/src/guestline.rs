//! What the dirtier guest felt during a migration, from its console: its progress lines
//! (`dirtier: rate=<pages/s> pages/s rounds=<n> max_gap_us=<us> ok`, docs/design.md) before
//! the migration, while it ran on the source during the migration, and the first one on the
//! destination (its interval holds the switchover).

use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The report interval the benchmark asks dirtier for (`report_ms=`), short enough that a
/// migration of about a second spans several lines.
pub const REPORT_MS: u64 = 100;

/// One progress line.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    pub rate: u64,
    pub rounds: u64,
    pub max_gap_us: u64,
}

/// Parses a progress line.
pub fn parse(line: &str) -> Option<Progress> {
    let rest = line.trim_end().strip_prefix("dirtier: rate=")?.strip_suffix(" ok")?;
    let (rate, rest) = rest.split_once(" pages/s rounds=")?;
    let (rounds, gap) = rest.split_once(" max_gap_us=")?;
    Some(Progress { rate: rate.parse().ok()?, rounds: rounds.parse().ok()?, max_gap_us: gap.parse().ok()? })
}

/// The progress lines in a console file so far (none if it cannot be read).
pub fn lines(console: &Path) -> Vec<Progress> {
    std::fs::read_to_string(console).map(|s| s.lines().filter_map(parse).collect()).unwrap_or_default()
}

/// Waits (at most `timeout`) for the console to hold more than `after` progress lines and
/// returns the first new one.
pub fn wait_line(console: &Path, after: usize, timeout: Duration) -> Option<Progress> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(p) = lines(console).get(after) {
            return Some(*p);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Progress lines to wait for before migrating: the first ones include the first touch of
/// every page of the working set, not the steady state.
pub const WARM_LINES: usize = 10;

/// Waits until the console holds [`WARM_LINES`] progress lines.
pub fn wait_warm(console: &Path, timeout: Duration) -> anyhow::Result<()> {
    wait_line(console, WARM_LINES - 1, timeout).map(|_| ()).ok_or_else(|| {
        anyhow::anyhow!("dirtier printed fewer than {WARM_LINES} progress lines in {}", console.display())
    })
}

/// The guest's figures for one migration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Felt {
    /// Pages/s before the migration (mean of the last five lines).
    pub rate_before: f64,
    /// Pages/s while migrating: mean of the source's lines printed during the migration and
    /// the destination's first line.
    pub rate_during: f64,
    /// The longest pause between two of its TSC readings over those lines, ms (as the
    /// guest's TSC shows it: a VMM that sets the TSC to its saved value on the destination
    /// hides the time the TSC was not running).
    pub max_gap_ms: f64,
    /// How many lines that was.
    pub lines_during: usize,
}

/// Figures from the lines `before` the migration started, the source's lines `during` it,
/// and the destination's first line.
pub fn felt(before: &[Progress], during: &[Progress], first_on_destination: Option<Progress>) -> Felt {
    let tail = &before[before.len().saturating_sub(5)..];
    let mean = |v: &[Progress]| {
        if v.is_empty() {
            0.0
        } else {
            v.iter().map(|p| p.rate as f64).sum::<f64>() / v.len() as f64
        }
    };
    let mut all: Vec<Progress> = during.to_vec();
    all.extend(first_on_destination);
    Felt {
        rate_before: mean(tail),
        rate_during: mean(&all),
        max_gap_ms: all.iter().map(|p| p.max_gap_us).max().unwrap_or(0) as f64 / 1000.0,
        lines_during: all.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_line() {
        assert_eq!(
            parse("dirtier: rate=412345 pages/s rounds=17 max_gap_us=1234 ok"),
            Some(Progress { rate: 412345, rounds: 17, max_gap_us: 1234 })
        );
        assert_eq!(parse("dirtier: ready"), None);
        assert_eq!(parse("dirtier: rate=x pages/s rounds=17 max_gap_us=1234 ok"), None);
    }

    #[test]
    fn felt_takes_the_worst_gap_and_the_mean_rate() {
        let p = |rate, max_gap_us| Progress { rate, rounds: 0, max_gap_us };
        let f = felt(&[p(10, 1), p(20, 1)], &[p(4, 3000)], Some(p(2, 50_000)));
        assert_eq!(f, Felt { rate_before: 15.0, rate_during: 3.0, max_gap_ms: 50.0, lines_during: 2 });
    }
}
