//! A blocking client for the API socket: one request per connection, HTTP/1.1.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::types::{ApiError, MigrationReport, Request, Response, SnapshotReport, VmInfo};

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
    stream.take(MAX_RESPONSE).read_to_end(&mut raw).map_err(io)?;
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
            Response::Migration(serde_json::from_slice::<MigrationReport>(body).map_err(bad)?)
        }
        Request::Pause | Request::Resume | Request::MigrateCancel => Response::Done,
    })
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
