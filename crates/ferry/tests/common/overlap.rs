//! The overlap checker of issue 11: reads a VM home's `runs.log` (JSON lines
//! `{"v":1,"pid":P,"host":H,"event":"run"|"stop","generation":N,"monotonic_ns":T,...}`,
//! appended by every VMM that runs the VM) and checks that the VM never ran twice:
//! (a) the intervals [run, next stop of the same pid) of different pids never overlap;
//! (b) across all `run` events in time order the generation strictly increases.
//! An interval still open at the end of the log ends where the test says: at the moment it
//! saw a process frozen (SIGSTOP, state T) before killing it, or "now" for a live one.

use std::collections::HashMap;
use std::path::Path;

/// One line of `runs.log`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub pid: u32,
    pub run: bool,
    pub generation: u64,
    pub ns: u64,
}

/// A span in which `pid` may have run the VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interval {
    pub pid: u32,
    pub generation: u64,
    pub start: u64,
    pub end: u64,
    /// Still open at the end of the log (killed while running, or running now).
    pub open: bool,
}

/// What a clean log held.
#[derive(Debug)]
pub struct Summary {
    pub events: usize,
    pub intervals: Vec<Interval>,
}

/// Where open intervals end: at the frozen time of a process the test froze and killed,
/// else at `now` for a process that still lives. `None`: unknown (a VMM died without a
/// `stop` and not by the test's hand), which is an error.
pub struct Ends<'a> {
    pub frozen: &'a [(u32, u64)],
    pub live: &'a dyn Fn(u32) -> bool,
    pub now: u64,
}

impl Ends<'_> {
    fn of(&self, pid: u32) -> Option<u64> {
        if let Some(&(_, t)) = self.frozen.iter().find(|(p, _)| *p == pid) {
            return Some(t);
        }
        (self.live)(pid).then_some(self.now)
    }
}

/// Parses `runs.log` text; an error names the line.
pub fn parse(text: &str) -> Result<Vec<Event>, String> {
    let mut v = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let j: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| format!("runs.log line {}: not JSON ({e}): {line}", i + 1))?;
        let bad = |what: &str| format!("runs.log line {}: {what}: {line}", i + 1);
        if j["v"] != 1 {
            return Err(bad("v is not 1"));
        }
        let run = match j["event"].as_str() {
            Some("run") => true,
            Some("stop") => false,
            _ => return Err(bad("event is neither run nor stop")),
        };
        let num = |k: &str| j[k].as_u64().ok_or_else(|| bad(&format!("no numeric {k}")));
        v.push(Event {
            pid: num("pid")? as u32,
            run,
            generation: num("generation")?,
            ns: num("monotonic_ns")?,
        });
    }
    Ok(v)
}

/// Checks events (in any order; sorted by time here). A run of a pid whose interval is
/// open continues it; a stop with none open is ignored (a pause of a paused VM).
pub fn check(mut events: Vec<Event>, ends: &Ends) -> Result<Summary, String> {
    events.sort_by_key(|e| e.ns);
    let n = events.len();
    let mut last_run: Option<&Event> = None;
    for e in events.iter().filter(|e| e.run) {
        if let Some(prev) = last_run {
            if e.generation <= prev.generation {
                return Err(format!(
                    "generation went back or repeated: pid {} ran generation {} at {} ns after pid {} ran \
                     generation {} at {} ns",
                    e.pid, e.generation, e.ns, prev.pid, prev.generation, prev.ns
                ));
            }
        }
        last_run = Some(e);
    }
    let mut open: HashMap<u32, (u64, u64)> = HashMap::new();
    let mut intervals = Vec::new();
    for e in &events {
        if e.run {
            open.entry(e.pid).or_insert((e.ns, e.generation));
        } else if let Some((start, generation)) = open.remove(&e.pid) {
            intervals.push(Interval { pid: e.pid, generation, start, end: e.ns, open: false });
        }
    }
    for (pid, (start, generation)) in open {
        let end = ends.of(pid).ok_or_else(|| {
            format!("pid {pid} ran generation {generation} from {start} ns and never stopped, but it was not frozen by the test and is not alive")
        })?;
        intervals.push(Interval { pid, generation, start, end, open: true });
    }
    intervals.sort_by_key(|i| i.start);
    for (k, a) in intervals.iter().enumerate() {
        for b in &intervals[k + 1..] {
            if a.pid != b.pid && a.start < b.end && b.start < a.end {
                return Err(format!("the VM ran twice: {a:?} overlaps {b:?}"));
            }
        }
    }
    Ok(Summary { events: n, intervals })
}

/// CLOCK_MONOTONIC now, in ns (the clock of `monotonic_ns`).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Whether `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    proc_state(pid).is_some_and(|s| s != 'Z' && s != 'X')
}

/// The state letter of /proc/PID/stat (after the command's closing parenthesis).
pub fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// Stops `pid` (SIGSTOP), waits until /proc shows it stopped (T), reads CLOCK_MONOTONIC,
/// then kills it (SIGKILL). Returns the frozen time (nothing of it ran after that), or
/// None if it had already ended on its own (then it was not killed).
pub fn freeze_then_kill(pid: u32) -> Option<u64> {
    // SAFETY: signalling a process this test started (and has not reaped yet).
    unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
    // A thread in uninterruptible sleep (an fsync on a loaded machine) stops only once it
    // leaves it: seen taking over 10 s here, and over 30 s while a cold build wrote
    // gigabytes to the same disk. It runs no guest code meanwhile, so waiting is safe.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        match proc_state(pid) {
            Some('T') => break,
            None | Some('Z') | Some('X') => return None,
            Some(other) => assert!(
                std::time::Instant::now() < deadline,
                "pid {pid} still shows state {other} 120 s after SIGSTOP"
            ),
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let at = monotonic_ns();
    // SAFETY: as above.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    Some(at)
}

/// Checks `home/runs.log`: non-empty, parseable, no overlap, generations increasing.
pub fn check_home(home: &Path, frozen: &[(u32, u64)]) -> Result<Summary, String> {
    let path = home.join("runs.log");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let events = parse(&text)?;
    if events.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    let live = |p: u32| alive(p);
    check(events, &Ends { frozen, live: &live, now: monotonic_ns() })
        .map_err(|e| format!("{e}\nruns.log:\n{text}"))
}
