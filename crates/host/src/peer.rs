//! The daemon's client of other hosts' daemons (migration by name): JSON over HTTP/1.1, one
//! request per connection, every call with a deadline.
//!
//! The transport is in one place, [`Peer::exchange`]: today a plain TCP stream to an
//! `http://HOST:PORT` URL; mutual TLS with the host's identity (`ferry_pki::Client`) replaces
//! it, the rest does not change.

use std::time::Duration;

use ferry_host_api::ApiError;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The largest answer accepted.
const MAX_RESPONSE: u64 = 16 << 20;

/// Errors talking to a peer daemon. Each names the peer and the step.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The URL is not one this client speaks.
    #[error("{0}: not an http://HOST:PORT URL")]
    Url(String),
    /// Nothing answered in time, or the exchange failed.
    #[error("the host daemon at {url} did not answer {what}")]
    Unreachable {
        /// The peer.
        url: String,
        /// The request.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The answer is not HTTP or not the expected JSON.
    #[error("the host daemon at {url} sent a malformed answer to {what}: {reason}")]
    Malformed {
        /// The peer.
        url: String,
        /// The request.
        what: String,
        /// What is wrong.
        reason: String,
    },
    /// The peer refused or failed the request.
    #[error("the host daemon at {url} refused {what}: {error}")]
    Refused {
        /// The peer.
        url: String,
        /// The request.
        what: String,
        /// Its answer.
        error: ApiError,
    },
}

/// Another host's daemon.
#[derive(Clone, Debug)]
pub struct Peer {
    url: String,
    authority: String,
}

impl Peer {
    /// A client of the daemon at `url` (`http://HOST:PORT` or `HOST:PORT`).
    pub fn new(url: &str) -> Result<Self, Error> {
        let rest = url.strip_prefix("http://").unwrap_or(url);
        let authority = rest.trim_end_matches('/').to_string();
        if authority.is_empty() || authority.contains('/') || authority.contains("://") {
            return Err(Error::Url(url.to_string()));
        }
        Ok(Peer { url: url.to_string(), authority })
    }

    /// Its URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// `GET path` within `deadline`.
    pub async fn get<T: DeserializeOwned>(&self, path: &str, deadline: Duration) -> Result<T, Error> {
        self.call("GET", path, None, deadline).await
    }

    /// `POST path` with `body` within `deadline`.
    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        deadline: Duration,
    ) -> Result<T, Error> {
        let bytes = serde_json::to_vec(body).map_err(|e| Error::Malformed {
            url: self.url.clone(),
            what: format!("POST {path}"),
            reason: e.to_string(),
        })?;
        self.call("POST", path, Some(bytes), deadline).await
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
        deadline: Duration,
    ) -> Result<T, Error> {
        let what = format!("{method} {path}");
        let raw = match tokio::time::timeout(deadline, self.exchange(method, path, body.unwrap_or_default()))
            .await
        {
            Ok(r) => r,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {} ms", deadline.as_millis()),
            )),
        }
        .map_err(|source| Error::Unreachable {
            url: self.url.clone(),
            what: what.clone(),
            source,
        })?;
        let malformed =
            |reason: String| Error::Malformed { url: self.url.clone(), what: what.clone(), reason };
        let (status, body) = parse_response(&raw).map_err(malformed)?;
        if !(200..300).contains(&status) {
            let error = serde_json::from_slice::<ApiError>(&body).unwrap_or_else(|_| ApiError {
                code: ferry_host_api::ErrorCode::Internal,
                message: format!("HTTP {status}: {}", String::from_utf8_lossy(&body).trim()),
            });
            return Err(Error::Refused { url: self.url.clone(), what, error });
        }
        serde_json::from_slice(&body).map_err(|e| malformed(e.to_string()))
    }

    /// One exchange: the raw answer. TLS goes here.
    async fn exchange(&self, method: &str, path: &str, body: Vec<u8>) -> std::io::Result<Vec<u8>> {
        let mut stream = tokio::net::TcpStream::connect(&self.authority).await?;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.authority,
            body.len()
        );
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(&body).await?;
        stream.flush().await?;
        let mut raw = Vec::new();
        (&mut stream).take(MAX_RESPONSE).read_to_end(&mut raw).await?;
        Ok(raw)
    }
}

/// Splits an HTTP/1.1 response into its status and body (Content-Length, chunked, or to the
/// end).
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
    let (mut chunked, mut length) = (false, None);
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
        let (mut out, mut at) = (Vec::new(), 0);
        loop {
            let nl = rest[at..].windows(2).position(|w| w == b"\r\n").ok_or("truncated chunk")? + at;
            let size_text = std::str::from_utf8(&rest[at..nl]).map_err(|_| "bad chunk size")?;
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| "bad chunk size")?;
            at = nl + 2;
            if size == 0 {
                return Ok((status, out));
            }
            out.extend_from_slice(rest.get(at..at + size).ok_or("truncated chunk")?);
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
    fn urls_and_answers() {
        assert_eq!(Peer::new("http://10.0.0.2:7443").expect("url").authority, "10.0.0.2:7443");
        assert!(Peer::new("ftp://a:1").is_err());
        let r = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(parse_response(r), Ok((200, b"{}".to_vec())));
        let r = b"HTTP/1.1 409 Conflict\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n";
        assert_eq!(parse_response(r), Ok((409, b"{}".to_vec())));
    }
}
