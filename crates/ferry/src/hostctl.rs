//! The CLI's client of the host daemon (`ferry host serve`): blocking HTTP/1.1 with JSON,
//! one request per connection, over mutual TLS.
//!
//! The transport is in one place, [`HostClient::connect`]: a TCP stream to an
//! `https://HOST:PORT` URL wrapped in a rustls client session that presents the CLI's
//! certificate and trusts only the cluster CA (the identity directory: `--identity`, else
//! `$FERRY_IDENTITY`, else `~/.config/ferry/identity`; `ferry ca issue --kind client` makes
//! one). The rest of this module speaks HTTP over whatever stream it returns.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ferry_host_api::ApiError;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// The daemon's default address.
pub const DEFAULT_URL: &str = "https://127.0.0.1:7443";
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
    /// The CLI's TLS identity cannot be used.
    #[error("cannot use the TLS identity in {dir} (make one with `ferry ca issue --kind client --out DIR`, and pass --identity DIR or set FERRY_IDENTITY)", dir = .dir.display())]
    Identity {
        /// The identity directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: ferry_pki::tls::Error,
    },
    /// No identity directory was given and none is at the default place.
    #[error("no TLS identity: pass --identity DIR or set FERRY_IDENTITY (a directory with cert.pem, key.pem and ca.pem from `ferry ca issue --kind client`)")]
    NoIdentity,
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
    /// The CLI's certificate and the cluster CA.
    tls: Arc<rustls::ClientConfig>,
}

/// Splits `url` (`https://HOST:PORT`, or `HOST:PORT`) into its authority.
fn authority_of(url: &str) -> Result<String, Error> {
    let rest = if let Some(r) = url.strip_prefix("https://") {
        r
    } else if url.starts_with("http://") {
        return Err(Error::Url(format!(
            "{url}: the host daemon speaks only HTTPS with mutual TLS; use https://HOST:PORT"
        )));
    } else if url.contains("://") {
        return Err(Error::Url(format!("{url}: not an https://HOST:PORT URL")));
    } else {
        url
    };
    let authority = rest.trim_end_matches('/').to_string();
    if authority.is_empty() || authority.contains('/') || !authority.contains(':') {
        return Err(Error::Url(format!("{url}: not an https://HOST:PORT URL")));
    }
    Ok(authority)
}

impl HostClient {
    /// A client of the daemon at `url` (`https://HOST:PORT`, or `HOST:PORT`) with the TLS
    /// identity in `identity` (default: `$FERRY_IDENTITY`, else `~/.config/ferry/identity`).
    pub fn new(url: &str, identity: Option<PathBuf>) -> Result<Self, Error> {
        let authority = authority_of(url)?;
        let dir = identity.or_else(ferry_pki::default_identity_dir).ok_or(Error::NoIdentity)?;
        let tls = ferry_pki::client_config(&dir).map_err(|source| Error::Identity { dir, source })?;
        Ok(HostClient { url: url.to_string(), authority, tls: Arc::new(tls) })
    }

    /// The transport: TCP, then a TLS session that presents the CLI's certificate and
    /// accepts only a daemon certificate of the cluster CA naming the host dialled.
    fn connect(&self) -> Result<Box<dyn Stream>, Error> {
        let connect = |source| Error::Connect { url: self.url.clone(), source };
        let io = |source| Error::Io { url: self.url.clone(), source };
        let host = match self.authority.rsplit_once(':') {
            Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']').to_string(),
            None => self.authority.clone(),
        };
        let name = rustls::pki_types::ServerName::try_from(host)
            .map_err(|e| Error::Url(format!("{}: {e}", self.url)))?;
        let addrs = self.authority.to_socket_addrs().map_err(connect)?;
        let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "the name has no address");
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
                Ok(s) => {
                    s.set_read_timeout(Some(ANSWER_TIMEOUT)).map_err(io)?;
                    s.set_write_timeout(Some(CONNECT_TIMEOUT)).map_err(io)?;
                    let session = rustls::ClientConnection::new(self.tls.clone(), name.clone())
                        .map_err(|e| io(std::io::Error::other(e)))?;
                    return Ok(Box::new(rustls::StreamOwned::new(session, s)));
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
        match stream.take(MAX_RESPONSE).read_to_end(&mut raw) {
            Ok(_) => {}
            // A TLS peer that closes without close_notify: what came is checked by its length.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
            Err(e) => return Err(io(e)),
        }
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
        assert_eq!(authority_of("https://127.0.0.1:7443").expect("url"), "127.0.0.1:7443");
        assert_eq!(authority_of("127.0.0.1:7443/").expect("url"), "127.0.0.1:7443");
        assert_eq!(authority_of("https://[::1]:7443").expect("url"), "[::1]:7443");
        assert!(authority_of("http://a:1").is_err());
        assert!(authority_of("ftp://a:1").is_err());
        assert!(authority_of("https://a").is_err());
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
