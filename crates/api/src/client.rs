//! A blocking client for the API socket: one request per connection, HTTP/1.1.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::types::{
    ApiError, Event, MigrationInfo, MigrationStarted, ReceiveStarted, Request, Response, SnapshotReport,
    VmInfo,
};

/// The largest response accepted.
const MAX_RESPONSE: u64 = 16 << 20;

/// Errors talking to a VMM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Nothing listens there.
    #[error("cannot connect to the VMM's API socket {path} (is the VM running with --api-socket {path}?)", path = .path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The exchange failed.
    #[error("the API request to {path} failed", path = .path.display())]
    Io {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The VMM closed the connection without a word of answer: it exited or was killed.
    #[error("the VMM went away (its API socket {path} closed the connection without answering)", path = .path.display())]
    Closed {
        /// The socket.
        path: PathBuf,
    },
    /// The answer is not HTTP or not the expected JSON.
    #[error("the VMM sent a malformed answer: {0}")]
    Malformed(String),
    /// The VMM refused or failed the request.
    #[error("{0}")]
    Refused(ApiError),
}

/// Sends `request` to the VMM listening on `socket` and waits up to `timeout` for the answer.
pub fn send(socket: &Path, request: &Request, timeout: Duration) -> Result<Response, Error> {
    let mut stream =
        UnixStream::connect(socket).map_err(|source| Error::Connect { path: socket.to_owned(), source })?;
    let io = |source| Error::Io { path: socket.to_owned(), source };
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let body = request.body().unwrap_or_default();
    let head = format!(
        "{} {} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        request.method(),
        request.path(),
        body.len()
    );
    stream.write_all(head.as_bytes()).map_err(io)?;
    stream.write_all(&body).map_err(io)?;
    let mut raw = Vec::new();
    match stream.take(MAX_RESPONSE).read_to_end(&mut raw) {
        Ok(_) => {}
        // A VMM killed mid-request resets the connection.
        Err(e) if raw.is_empty() && e.kind() == std::io::ErrorKind::ConnectionReset => {
            return Err(Error::Closed { path: socket.to_owned() })
        }
        Err(e) => return Err(io(e)),
    }
    if raw.is_empty() {
        return Err(Error::Closed { path: socket.to_owned() });
    }
    let (status, body) = parse_response(&raw)?;
    if !(200..300).contains(&status) {
        let mut e: ApiError = serde_json::from_slice(body)
            .unwrap_or_else(|_| ApiError { status, message: String::from_utf8_lossy(body).into_owned() });
        e.status = status;
        return Err(Error::Refused(e));
    }
    let bad = |e: serde_json::Error| Error::Malformed(e.to_string());
    Ok(match request {
        Request::Info => Response::Info(serde_json::from_slice::<VmInfo>(body).map_err(bad)?),
        Request::Snapshot(_) => {
            Response::Snapshot(serde_json::from_slice::<SnapshotReport>(body).map_err(bad)?)
        }
        Request::Migrate(_) => {
            Response::MigrationStarted(serde_json::from_slice::<MigrationStarted>(body).map_err(bad)?)
        }
        Request::MigrationStatus => {
            Response::MigrationStatus(Box::new(serde_json::from_slice::<MigrationInfo>(body).map_err(bad)?))
        }
        Request::Receive(_) => {
            Response::ReceiveStarted(serde_json::from_slice::<ReceiveStarted>(body).map_err(bad)?)
        }
        Request::Pause | Request::Resume | Request::MigrateCancel => Response::Done,
    })
}

/// The largest event line accepted from `GET /vm/events`.
const MAX_EVENT_LINE: usize = 4 << 20;

/// A connection to `GET /vm/events`: `EventStream::next` returns events as the VMM sends
/// them.
#[derive(Debug)]
pub struct EventStream {
    path: PathBuf,
    reader: std::io::BufReader<UnixStream>,
    /// Left of the current chunk (chunked transfer encoding).
    chunk_left: usize,
    line: Vec<u8>,
    done: bool,
}

/// Opens `GET /vm/events?since=SEQ` on `socket`. `idle` bounds each wait for data (an
/// event stream can be quiet for long: pass `None` to wait for ever).
pub fn events(socket: &Path, since: u64, idle: Option<Duration>) -> Result<EventStream, Error> {
    let mut stream =
        UnixStream::connect(socket).map_err(|source| Error::Connect { path: socket.to_owned(), source })?;
    let io = |source| Error::Io { path: socket.to_owned(), source };
    stream.set_write_timeout(Some(Duration::from_secs(5))).map_err(io)?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).map_err(io)?;
    let head =
        format!("GET /vm/events?since={since} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(head.as_bytes()).map_err(io)?;
    let mut reader = std::io::BufReader::new(stream);
    let mut head = Vec::new();
    loop {
        let mut line = Vec::new();
        let n =
            std::io::BufRead::read_until(&mut (&mut reader).take(16 << 10), b'\n', &mut line).map_err(io)?;
        if n == 0 {
            if head.is_empty() {
                return Err(Error::Closed { path: socket.to_owned() });
            }
            return Err(Error::Malformed("no end of headers".into()));
        }
        head.extend_from_slice(&line);
        if line == b"\r\n" || head.len() > 64 << 10 {
            break;
        }
    }
    let (status, _) = parse_response(&head)?;
    let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
    if !(200..300).contains(&status) {
        // The error answers are small and carry a content-length.
        let len = text
            .lines()
            .find_map(|l| l.strip_prefix("content-length:").and_then(|v| v.trim().parse::<usize>().ok()))
            .unwrap_or(0)
            .min(64 << 10);
        let mut body = vec![0; len];
        let _ = reader.read_exact(&mut body);
        let mut e: ApiError = serde_json::from_slice(&body)
            .unwrap_or_else(|_| ApiError { status, message: String::from_utf8_lossy(&body).into_owned() });
        e.status = status;
        return Err(Error::Refused(e));
    }
    if !text.contains("transfer-encoding: chunked") {
        return Err(Error::Malformed("the event stream is not chunked".into()));
    }
    reader.get_ref().set_read_timeout(idle).map_err(io)?;
    Ok(EventStream { path: socket.to_owned(), reader, chunk_left: 0, line: Vec::new(), done: false })
}

impl EventStream {
    /// The next event; `Ok(None)` once the VMM ended the stream (it is ending). An error of
    /// kind `Closed` or `Io` means the connection broke: reconnect with `since` = the last
    /// `seq` seen.
    pub fn next_event(&mut self) -> Result<Option<Event>, Error> {
        loop {
            if let Some(end) = self.line.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.line.drain(..=end).collect();
                let text = line.trim_ascii();
                if text.is_empty() {
                    continue;
                }
                return serde_json::from_slice(text).map(Some).map_err(|e| Error::Malformed(e.to_string()));
            }
            if self.done {
                return Ok(None);
            }
            if self.line.len() > MAX_EVENT_LINE {
                return Err(Error::Malformed("an event line is too long".into()));
            }
            self.fill()?;
        }
    }

    /// Reads the next piece of chunked body into `line`.
    fn fill(&mut self) -> Result<(), Error> {
        let io = |source| Error::Io { path: self.path.clone(), source };
        if self.chunk_left == 0 {
            let mut size = Vec::new();
            let n = std::io::BufRead::read_until(&mut (&mut self.reader).take(1024), b'\n', &mut size)
                .map_err(io)?;
            if n == 0 {
                return Err(Error::Closed { path: self.path.clone() });
            }
            let text = String::from_utf8_lossy(&size);
            let hex = text.trim().split(';').next().unwrap_or("");
            if hex.is_empty() {
                // The CRLF that ends the previous chunk.
                return Ok(());
            }
            let n = usize::from_str_radix(hex, 16)
                .map_err(|_| Error::Malformed(format!("bad chunk size {hex:?}")))?;
            if n == 0 {
                self.done = true;
                return Ok(());
            }
            self.chunk_left = n;
        }
        let mut buf = [0u8; 8192];
        let want = self.chunk_left.min(buf.len());
        let n = self.reader.read(&mut buf[..want]).map_err(io)?;
        if n == 0 {
            return Err(Error::Closed { path: self.path.clone() });
        }
        self.chunk_left -= n;
        self.line.extend_from_slice(&buf[..n]);
        Ok(())
    }
}

/// Splits an HTTP/1.1 response into status and body.
fn parse_response(raw: &[u8]) -> Result<(u16, &[u8]), Error> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| Error::Malformed("no end of headers".into()))?;
    let head =
        std::str::from_utf8(&raw[..split]).map_err(|_| Error::Malformed("headers are not text".into()))?;
    let status_line = head.lines().next().unwrap_or("");
    let mut parts = status_line.split_whitespace();
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
        return Err(Error::Malformed(format!("bad status line {status_line:?}")));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(Error::Malformed(format!("bad status line {status_line:?}")));
    }
    let status = code.parse().map_err(|_| Error::Malformed(format!("bad status line {status_line:?}")))?;
    let mut body = &raw[split + 4..];
    let length = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case("content-length").then(|| v.trim().parse::<usize>().ok()).flatten()
    });
    if let Some(n) = length {
        if n > body.len() {
            return Err(Error::Malformed("truncated body".into()));
        }
        body = &body[..n];
    }
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_responses() {
        let (s, b) = parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}").expect("ok");
        assert_eq!((s, b), (200, &b"{}"[..]));
        let (s, b) = parse_response(b"HTTP/1.1 204 No Content\r\n\r\n").expect("ok");
        assert_eq!((s, b.len()), (204, 0));
        assert!(parse_response(b"garbage").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n{}").is_err());
        assert!(parse_response(b"SPDY 200\r\n\r\n").is_err());
    }
}
