//! VMM logs into the VM's home as well as stderr.
//!
//! The binary sets up logging before the VM's home is known (`ferry run` may make a default
//! home; `ferry receive` learns it from the source), so the file layer's writer keeps the
//! first lines in memory (at most [`EARLY_MAX`] bytes) until [`open`] is given the home
//! once the VMM is built; then it writes them and everything after to
//! `HOME/logs/vmm-<host>-<pid>.log`, appended. Per-process names, because during a migration
//! the source and the destination share the home (the same directory on shared storage).

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
    /// Not a VMM process, or the file cannot be written: nothing is kept.
    Off,
}

static SINK: Mutex<Sink> = Mutex::new(Sink::Early(Vec::new()));

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

/// Opens this process's log file in `home` and writes the early lines into it. A failure is
/// reported on stderr and the VMM goes on without the file.
pub fn open(home: &Path) {
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
            *sink = Sink::File(f);
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
