//! The migration event ring behind `GET /vm/events`.
//!
//! Producers (the migration thread, the VMM thread, a destination's receive loop) push
//! events with [`Events::push`]: a short critical section on a mutex and a `watch` send,
//! never a wait on a subscriber. The ring keeps the last [`RING`] events; each subscriber
//! keeps only its cursor (the last sequence number it was sent) and copies events out of
//! the ring as its connection takes them, so a client that never reads costs the VMM
//! nothing but that cursor, and one that falls more than [`RING`] events behind is told
//! with a `gap` event and skips ahead.

use std::collections::VecDeque;
use std::sync::Mutex;

use crate::types::{Event, EventBody, Side};

/// Events kept for clients that reconnect.
pub const RING: usize = 1024;

/// A bounded ring of events with a sequence number per event (from 1).
#[derive(Debug)]
pub struct Events {
    ring: Mutex<Ring>,
    /// The last sequence number pushed; subscribers wait on its changes.
    last: tokio::sync::watch::Sender<u64>,
}

#[derive(Debug, Default)]
struct Ring {
    events: VecDeque<Event>,
    next: u64,
    closed: bool,
}

/// What a subscriber gets for its cursor.
#[derive(Debug, PartialEq)]
pub enum Batch {
    /// Events after the cursor (possibly starting with a `gap`), the cursor to keep.
    Events(Vec<Event>, u64),
    /// Nothing new; the ring is open: wait for [`Events::subscribe`]'s watch to change.
    Wait,
    /// Nothing new and the ring is closed (the VMM is ending): end the stream.
    Closed,
}

impl Default for Events {
    fn default() -> Self {
        Self::new()
    }
}

impl Events {
    /// An empty ring.
    pub fn new() -> Self {
        Self { ring: Mutex::new(Ring { next: 1, ..Ring::default() }), last: tokio::sync::watch::channel(0).0 }
    }

    /// Appends an event of `migration_id` seen from `side`; returns its sequence number.
    /// Never blocks on a subscriber.
    pub fn push(&self, migration_id: &str, side: Side, body: EventBody) -> u64 {
        let seq = {
            let mut r = self.ring.lock().unwrap_or_else(|p| p.into_inner());
            let seq = r.next;
            r.next += 1;
            if r.events.len() == RING {
                r.events.pop_front();
            }
            r.events.push_back(Event { seq, migration_id: migration_id.to_string(), side, body });
            seq
        };
        self.last.send_replace(seq);
        seq
    }

    /// No more events will come (the VMM is ending): streams end once they have sent
    /// what the ring holds.
    pub fn close(&self) {
        let last = {
            let mut r = self.ring.lock().unwrap_or_else(|p| p.into_inner());
            r.closed = true;
            r.next - 1
        };
        // Wakes every subscriber, even if no event came since it last looked.
        self.last.send_modify(|v| *v = last);
    }

    /// A receiver that changes whenever an event is pushed (or the ring closes).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.last.subscribe()
    }

    /// The last sequence number given out (0 before the first event).
    pub fn last_seq(&self) -> u64 {
        let r = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        r.next - 1
    }

    /// Events with a sequence number above `cursor`, at most `max` of them. If the ring no
    /// longer holds the one right after `cursor`, the batch starts with a `gap` event
    /// naming what was missed, numbered as the last one missed.
    pub fn after(&self, cursor: u64, max: usize) -> Batch {
        let r = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        let Some(first) = r.events.front().map(|e| e.seq) else {
            return if r.closed { Batch::Closed } else { Batch::Wait };
        };
        let last = r.next - 1;
        if cursor >= last {
            return if r.closed { Batch::Closed } else { Batch::Wait };
        }
        let mut out = Vec::new();
        if cursor + 1 < first {
            out.push(Event {
                seq: first - 1,
                migration_id: String::new(),
                side: Side::Source,
                body: EventBody::Gap { missed_from: cursor + 1, missed_to: first - 1 },
            });
        }
        let skip = (cursor + 1).saturating_sub(first) as usize;
        let room = max.saturating_sub(out.len()).max(1);
        out.extend(r.events.iter().skip(skip).take(room).cloned());
        let cursor = out.last().map(|e| e.seq).unwrap_or(cursor);
        Batch::Events(out, cursor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::MigrationPhase;

    fn phase(e: &Events, n: usize) {
        for _ in 0..n {
            e.push("m-1", Side::Source, EventBody::Phase { phase: MigrationPhase::PreCopy, reason: None });
        }
    }

    fn seqs(b: Batch) -> (Vec<u64>, u64) {
        match b {
            Batch::Events(v, c) => (v.iter().map(|e| e.seq).collect(), c),
            other => panic!("expected events, got {other:?}"),
        }
    }

    #[test]
    fn a_cursor_resumes_without_duplicates() {
        let e = Events::new();
        assert_eq!(e.after(0, 10), Batch::Wait);
        phase(&e, 5);
        assert_eq!(seqs(e.after(0, 3)), (vec![1, 2, 3], 3));
        assert_eq!(seqs(e.after(3, 10)), (vec![4, 5], 5));
        assert_eq!(e.after(5, 10), Batch::Wait);
        e.close();
        assert_eq!(e.after(5, 10), Batch::Closed);
        assert_eq!(seqs(e.after(4, 10)), (vec![5], 5));
    }

    #[test]
    fn the_ring_is_bounded_and_a_late_cursor_gets_a_gap() {
        let e = Events::new();
        phase(&e, RING + 10);
        let (v, c) = match e.after(0, 2) {
            Batch::Events(v, c) => (v, c),
            other => panic!("{other:?}"),
        };
        assert_eq!(v[0].body, EventBody::Gap { missed_from: 1, missed_to: 10 });
        assert_eq!(v[0].seq, 10);
        assert_eq!(v[1].seq, 11);
        assert_eq!(c, 11);
        assert_eq!(e.last_seq(), RING as u64 + 10);
        assert_eq!(e.ring.lock().expect("lock").events.len(), RING);
    }
}
