//! The daemon's client of other hosts' daemons (migration by name): JSON over HTTPS with
//! mutual TLS (`ferry_pki::Client`: this host's certificate, only the cluster CA trusted),
//! connections kept between calls (the daemon's client has keep-alive), every call with a
//! deadline; errors name the peer and the step.

use std::time::Duration;

use ferry_host_api::ApiError;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// How long connecting (and the TLS handshake) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors talking to a peer daemon. Each names the peer and the step.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The URL is not one this client speaks.
    #[error("{0}: not an https://HOST:PORT URL")]
    Url(String),
    /// This host has no TLS identity to call other hosts with.
    #[error("this host has no TLS identity to call other hosts with (make it with `ferry host init`)")]
    NoIdentity,
    /// Nothing answered in time, or the exchange failed.
    #[error("the host daemon at {url} did not answer {what}")]
    Unreachable {
        /// The peer.
        url: String,
        /// The request.
        what: String,
        /// Why.
        #[source]
        source: Box<ferry_pki::client::Error>,
    },
    /// The answer is not the expected JSON.
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
    client: ferry_pki::Client,
}

/// `https://HOST:PORT` of `url` (`https://HOST:PORT[/]` or `HOST:PORT`), or `None`.
fn base(url: &str) -> Option<String> {
    let rest = url.strip_prefix("https://").unwrap_or(url);
    let authority = rest.trim_end_matches('/');
    (!authority.is_empty() && !authority.contains('/') && !authority.contains("://"))
        .then(|| format!("https://{authority}"))
}

impl Peer {
    /// A client of the daemon at `url`, calling with `client` (this host's identity).
    pub fn new(url: &str, client: Option<&ferry_pki::Client>) -> Result<Self, Error> {
        let url = base(url).ok_or_else(|| Error::Url(url.to_string()))?;
        let client = client.ok_or(Error::NoIdentity)?.clone();
        Ok(Peer { url, client })
    }

    /// Its URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// `GET path` within `deadline`.
    pub async fn get<T: DeserializeOwned>(&self, path: &str, deadline: Duration) -> Result<T, Error> {
        self.call(axum::http::Method::GET, path, None, deadline).await
    }

    /// `POST path` with `body` within `deadline`.
    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        deadline: Duration,
    ) -> Result<T, Error> {
        let value = serde_json::to_value(body).map_err(|e| Error::Malformed {
            url: self.url.clone(),
            what: format!("POST {path}"),
            reason: e.to_string(),
        })?;
        self.call(axum::http::Method::POST, path, Some(value), deadline).await
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: axum::http::Method,
        path: &str,
        body: Option<serde_json::Value>,
        deadline: Duration,
    ) -> Result<T, Error> {
        let what = format!("{method} {path}");
        let client = self.client.clone().with_timeouts(CONNECT_TIMEOUT, deadline);
        let answer =
            client.request(method, &format!("{}{path}", self.url), body.as_ref()).await.map_err(|e| {
                Error::Unreachable { url: self.url.clone(), what: what.clone(), source: Box::new(e) }
            })?;
        if !answer.is_success() {
            let error = serde_json::from_slice::<ApiError>(&answer.body).unwrap_or_else(|_| ApiError {
                code: ferry_host_api::ErrorCode::Internal,
                message: format!("HTTP {}: {}", answer.status, String::from_utf8_lossy(&answer.body).trim()),
            });
            return Err(Error::Refused { url: self.url.clone(), what, error });
        }
        serde_json::from_slice(&answer.body).map_err(|e| Error::Malformed {
            url: self.url.clone(),
            what,
            reason: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn urls() {
        assert_eq!(super::base("https://10.0.0.2:7443/").as_deref(), Some("https://10.0.0.2:7443"));
        assert_eq!(super::base("10.0.0.2:7443").as_deref(), Some("https://10.0.0.2:7443"));
        assert!(super::base("http://a:1").is_none());
        assert!(super::base("https://a:1/x").is_none());
    }
}
