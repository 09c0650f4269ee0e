//! The CLI's client of the host daemon (`ferry host serve`): blocking HTTP/1.1 with JSON,
//! one request per connection.
//!
//! The transport is in one place, [`HostClient::connect`]: today a plain TCP stream to an
//! `http://HOST:PORT` URL. Mutual TLS replaces that function (wrap the TCP stream in a TLS
//! client session with the CLI's certificate and the cluster CA, for `https://` URLs); the
//! rest of this module speaks HTTP over whatever stream it returns.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use ferry_host_api::ApiError;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// The daemon's default address.
pub const DEFAULT_URL: &str = "http://127.0.0.1:7443";
/// The largest answer accepted.
const MAX_RESPONSE: u64 = 64 << 20;
/// Connecting gives up after this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// An answer may take this long (a suspend writes all of a VM's memory).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(600);

/// Errors talking to the daemon.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The URL is not one this client speaks.
    #[error("{0}")]
    Url(String),
    /// Nothing answers there.
    #[error("cannot reach the host daemon at {url} (is `ferry host serve` running there?)")]
    Connect {
        /// The daemon's URL.
        url: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The exchange failed.
    #[error("the request to the host daemon at {url} failed")]
    Io {
        /// The daemon's URL.
        url: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The answer is not HTTP or not the expected JSON.
    #[error("the host daemon at {url} sent a malformed answer: {reason}")]
    Malformed {
        /// The daemon's URL.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// The daemon refused or failed the request.
    #[error("{0}")]
    Refused(ApiError),
}

/// A stream to the daemon.
trait Stream: Read + Write {}
impl<T: Read + Write> Stream for T {}

/// A client of one daemon.
#[derive(Debug, Clone)]
pub struct HostClient {
    url: String,
    /// `HOST:PORT`.
    authority: String,
}

impl HostClient {
    /// A client of the daemon at `url` (`http://HOST:PORT`, or `HOST:PORT`).
    pub fn new(url: &str) -> Result<Self, Error> {
        let rest = if let Some(r) = url.strip_prefix("http://") {
            r
        } else if url.starts_with("https://") {
            return Err(Error::Url(format!(
                "{url}: https is not built into this ferry yet; use http://HOST:PORT"
            )));
        } else if url.contains("://") {
            return Err(Error::Url(format!("{url}: not an http://HOST:PORT URL")));
        } else {
            url
        };
        let authority = rest.trim_end_matches('/').to_string();
        if authority.is_empty() || authority.contains('/') {
            return Err(Error::Url(format!("{url}: not an http://HOST:PORT URL")));
        }
        Ok(HostClient { url: url.to_string(), authority })
    }

    /// The transport: TLS goes here.
    fn connect(&self) -> Result<Box<dyn Stream>, Error> {
        let connect = |source| Error::Connect { url: self.url.clone(), source };
        let addrs = self.authority.to_socket_addrs().map_err(connect)?;
        let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "the name has no address");
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
                Ok(s) => {
                    let io = |source| Error::Io { url: self.url.clone(), source };
                    s.set_read_timeout(Some(ANSWER_TIMEOUT)).map_err(io)?;
                    s.set_write_timeout(Some(CONNECT_TIMEOUT)).map_err(io)?;
                    return Ok(Box::new(s));
                }
                Err(e) => last = e,
            }
        }
        Err(connect(last))
    }

    /// `GET path`, answer decoded as `T`.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, Error> {
        self.decode(self.request("GET", path, None)?)
    }

    /// `POST path` with `body` as JSON, answer decoded as `T`.
    pub fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T, Error> {
        let bytes = serde_json::to_vec(body)
            .map_err(|e| Error::Malformed { url: self.url.clone(), reason: e.to_string() })?;
        self.decode(self.request("POST", path, Some(bytes))?)
    }

    /// `DELETE path`, answer decoded as `T`.
    pub fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, Error> {
        self.decode(self.request("DELETE", path, None)?)
    }

    fn decode<T: DeserializeOwned>(&self, (status, body): (u16, Vec<u8>)) -> Result<T, Error> {
        if !(200..300).contains(&status) {
            return Err(Error::Refused(serde_json::from_slice::<ApiError>(&body).unwrap_or_else(|_| {
                ApiError {
                    code: if status < 500 {
                        ferry_host_api::ErrorCode::BadRequest
                    } else {
                        ferry_host_api::ErrorCode::Internal
                    },
                    message: format!("HTTP {status}: {}", String::from_utf8_lossy(&body).trim()),
                }
            })));
        }
        serde_json::from_slice(&body)
            .map_err(|e| Error::Malformed { url: self.url.clone(), reason: e.to_string() })
    }

    /// One exchange: the status and the body.
    fn request(&self, method: &str, path: &str, body: Option<Vec<u8>>) -> Result<(u16, Vec<u8>), Error> {
        let mut stream = self.connect()?;
        let io = |source| Error::Io { url: self.url.clone(), source };
        let body = body.unwrap_or_default();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.authority,
            body.len()
        );
        stream.write_all(head.as_bytes()).map_err(io)?;
        stream.write_all(&body).map_err(io)?;
        stream.flush().map_err(io)?;
        let mut raw = Vec::new();
        stream.take(MAX_RESPONSE).read_to_end(&mut raw).map_err(io)?;
        parse_response(&raw).map_err(|reason| Error::Malformed { url: self.url.clone(), reason })
    }
}

/// Splits an HTTP/1.1 response into its status and body (Content-Length, chunked, or to
/// the end).
fn parse_response(raw: &[u8]) -> Result<(u16, Vec<u8>), String> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or("no end of headers")?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| "headers are not text")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let mut chunked = false;
    let mut length = None;
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
                chunked = true;
            } else if k == "content-length" {
                length = v.parse::<usize>().ok();
            }
        }
    }
    let rest = &raw[end + 4..];
    if chunked {
        let mut out = Vec::new();
        let mut at = 0;
        loop {
            let nl = rest[at..].windows(2).position(|w| w == b"\r\n").ok_or("truncated chunk")? + at;
            let size_text = std::str::from_utf8(&rest[at..nl]).map_err(|_| "bad chunk size")?;
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| "bad chunk size")?;
            at = nl + 2;
            if size == 0 {
                return Ok((status, out));
            }
            let chunk = rest.get(at..at + size).ok_or("truncated chunk")?;
            out.extend_from_slice(chunk);
            at += size + 2;
        }
    }
    match length {
        Some(n) => Ok((status, rest.get(..n).ok_or("truncated body")?.to_vec())),
        None => Ok((status, rest.to_vec())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(HostClient::new("http://127.0.0.1:7443").expect("url").authority, "127.0.0.1:7443");
        assert_eq!(HostClient::new("127.0.0.1:7443/").expect("url").authority, "127.0.0.1:7443");
        assert!(HostClient::new("https://a:1").is_err());
        assert!(HostClient::new("ftp://a:1").is_err());
    }

    #[test]
    fn responses() {
        let r = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(parse_response(r), Ok((200, b"{}".to_vec())));
        let r = b"HTTP/1.1 404 Not Found\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n";
        assert_eq!(parse_response(r), Ok((404, b"{}".to_vec())));
        assert!(parse_response(b"garbage").is_err());
    }
}
