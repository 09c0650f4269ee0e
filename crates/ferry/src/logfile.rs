//! VMM logs into the VM's home as well as stderr.
//!
//! The binary sets up logging before the VM's home is known (`ferry run` may make a default
//! home; `ferry receive` learns it from the source), so the file layer's writer keeps the
//! first lines in memory (at most [`EARLY_MAX`] bytes) until [`open`] is given the home
//! once the VMM is built; then it writes them and everything after to
//! `HOME/logs/vmm-<host>-<pid>.log`, appended. Per-process names, because during a migration
//! the source and the destination share the home (the same directory on shared storage).
//!
//! A VMM with a lease (`--lease`) must keep going when the datastore hangs (it has to fence
//! itself): its file is written by a thread from a bounded queue, and lines that do not fit
//! are dropped (and counted in the file once it moves again). Without a lease, lines are
//! written as they come.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Lines kept in memory before the file is open; later ones are dropped until it is.
const EARLY_MAX: usize = 1 << 20;

enum Sink {
    /// Not open yet: the early lines.
    Early(Vec<u8>),
    File(File),
    /// Written by a thread; the queue is bounded.
    Queue(std::sync::mpsc::SyncSender<Vec<u8>>),
    /// Not a VMM process, or the file cannot be written: nothing is kept.
    Off,
}

static SINK: Mutex<Sink> = Mutex::new(Sink::Early(Vec::new()));
/// Lines the queue had no room for since the writer last said so.
static DROPPED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// Lines the queue holds at most.
const QUEUE_LINES: usize = 4096;
/// The queue's writer ends (all written) on this channel.
static FINISHED: Mutex<Option<std::sync::mpsc::Receiver<()>>> = Mutex::new(None);

/// The tracing writer of the file layer.
#[derive(Debug, Clone, Copy, Default)]
pub struct Writer;

impl Write for Writer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut sink = SINK.lock().unwrap_or_else(|p| p.into_inner());
        match &mut *sink {
            Sink::Early(v) if v.len() + buf.len() <= EARLY_MAX => v.extend_from_slice(buf),
            Sink::Early(_) | Sink::Off => {}
            // A full disk must not stop the VMM: the line still went to stderr.
            Sink::File(f) => {
                let _ = f.write_all(buf);
            }
            Sink::Queue(q) => {
                if q.try_send(buf.to_vec()).is_err() {
                    DROPPED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Writer {
    type Writer = Writer;
    fn make_writer(&'a self) -> Self::Writer {
        Writer
    }
}

/// The log file of this process in `home`.
pub fn path(home: &Path) -> PathBuf {
    home.join(ferry_vmm::home::LOGS_DIR).join(format!(
        "vmm-{}-{}.log",
        ferry_vmm::home::hostname(),
        std::process::id()
    ))
}

/// Opens this process's log file in `home` and writes the early lines into it; with
/// `queued`, later lines go through a writer thread (see the module's documentation). A
/// failure is reported on stderr and the VMM goes on without the file.
pub fn open(home: &Path, queued: bool) {
    let path = path(home);
    let file = path
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| std::fs::OpenOptions::new().create(true).append(true).open(&path));
    let mut sink = SINK.lock().unwrap_or_else(|p| p.into_inner());
    match file {
        Ok(mut f) => {
            if let Sink::Early(early) = &*sink {
                let _ = f.write_all(early);
            }
            *sink = if queued { queue(f).map_or(Sink::Off, Sink::Queue) } else { Sink::File(f) };
        }
        Err(e) => {
            *sink = Sink::Off;
            drop(sink);
            tracing::warn!("cannot write the VMM log to {}: {e}; logging to stderr only", path.display());
        }
    }
}

/// Not a VMM process: drop the early lines and keep nothing.
pub fn off() {
    *SINK.lock().unwrap_or_else(|p| p.into_inner()) = Sink::Off;
}

/// Starts the writer thread of a queued file.
fn queue(mut file: File) -> Option<std::sync::mpsc::SyncSender<Vec<u8>>> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(QUEUE_LINES);
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new().name("vmm-log".into()).spawn(move || {
        for line in rx {
            let dropped = DROPPED.swap(0, std::sync::atomic::Ordering::Relaxed);
            if dropped > 0 {
                let _ = writeln!(file, "({dropped} log lines dropped: the log file did not keep up)");
            }
            let _ = file.write_all(&line);
        }
        let _ = done_tx.send(());
    });
    match spawned {
        Ok(_) => {
            *FINISHED.lock().unwrap_or_else(|p| p.into_inner()) = Some(done_rx);
            Some(tx)
        }
        Err(_) => None,
    }
}

/// At the end of the process: lets a queued file's writer finish, for at most `wait`.
pub fn finish(wait: std::time::Duration) {
    let mut sink = SINK.lock().unwrap_or_else(|p| p.into_inner());
    if matches!(*sink, Sink::Queue(_)) {
        *sink = Sink::Off;
        drop(sink);
        if let Some(done) = FINISHED.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = done.recv_timeout(wait);
        }
    }
}
