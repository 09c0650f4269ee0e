//! A small HTTPS JSON client with a Ferry identity: presents the identity's certificate and
//! trusts only the cluster CA. One connection per request (the CLI makes a few requests per
//! command; the daemons' calls are not frequent enough to need a pool yet).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{header, Method, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::identity::PeerIdentity;
use crate::tls;

/// Largest response body accepted.
pub const MAX_BODY: usize = 64 << 20;

/// Errors of a request.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The identity directory is unusable.
    #[error("cannot load the TLS identity")]
    Identity(#[from] tls::Error),
    /// The URL is not `https://HOST[:PORT]/PATH`.
    #[error("invalid URL {0:?}: expected https://HOST[:PORT]/PATH")]
    Url(String),
    /// The TCP connection failed.
    #[error("cannot connect to {addr}")]
    Connect {
        /// `host:port`.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The TLS handshake failed: the server's certificate is not from our CA (or is not a
    /// host certificate for that address), or the server refused our certificate.
    #[error("TLS with {addr} failed")]
    Tls {
        /// `host:port`.
        addr: String,
        /// Why.
        #[source]
        source: rustls::Error,
    },
    /// A step took longer than its deadline.
    #[error("{step} with {addr} timed out after {after:?}")]
    Timeout {
        /// `host:port`.
        addr: String,
        /// "connect", "TLS handshake" or "request".
        step: &'static str,
        /// The deadline.
        after: Duration,
    },
    /// The connection failed below HTTP (closed, reset) or the response is not HTTP.
    #[error("HTTP exchange with {addr} failed")]
    Http {
        /// `host:port`.
        addr: String,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The server answered with an error status.
    #[error("{addr} answered {status}: {body}")]
    Status {
        /// `host:port`.
        addr: String,
        /// The HTTP status code.
        status: u16,
        /// The response body, as text.
        body: String,
    },
    /// The body is not JSON.
    #[error("the response is not JSON")]
    Json(#[source] serde_json::Error),
    /// The blocking client's runtime cannot start.
    #[error("cannot start the client runtime")]
    Runtime(#[source] std::io::Error),
}

impl Error {
    /// The rustls error behind this error, if the failure was TLS's.
    pub fn tls_error(&self) -> Option<&rustls::Error> {
        match self {
            Error::Tls { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// A response: status and body.
#[derive(Debug, Clone)]
pub struct Response {
    /// `host:port` of the server.
    pub addr: String,
    /// The server as its certificate names it (`None` if the certificate has no Ferry name,
    /// which a certificate from our CA always has).
    pub peer: Option<PeerIdentity>,
    /// HTTP status code.
    pub status: u16,
    /// The body.
    pub body: Bytes,
}

impl Response {
    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// `Err(Error::Status)` unless the status is 2xx.
    pub fn error_for_status(self) -> Result<Response, Error> {
        if self.is_success() {
            Ok(self)
        } else {
            Err(Error::Status {
                addr: self.addr,
                status: self.status,
                body: String::from_utf8_lossy(&self.body).trim().to_string(),
            })
        }
    }

    /// The body parsed as JSON (an empty body is `null`).
    pub fn json(&self) -> Result<Value, Error> {
        if self.body.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&self.body).map_err(Error::Json)
    }
}

/// An async HTTPS JSON client with a Ferry identity.
#[derive(Clone)]
pub struct Client {
    connector: TlsConnector,
    connect_timeout: Duration,
    request_timeout: Duration,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client presenting `identity_dir/cert.pem` and trusting only `identity_dir/ca.pem`,
    /// with a 5 s connect (and handshake) timeout and a 30 s request timeout.
    pub fn new(identity_dir: &Path) -> Result<Client, Error> {
        Ok(Client::from_config(Arc::new(tls::client_config(identity_dir)?)))
    }

    /// A client with an existing rustls configuration.
    pub fn from_config(config: Arc<rustls::ClientConfig>) -> Client {
        Client {
            connector: TlsConnector::from(config),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
        }
    }

    /// Sets the connect and TLS handshake timeout (each) and the request timeout.
    pub fn with_timeouts(mut self, connect: Duration, request: Duration) -> Client {
        self.connect_timeout = connect;
        self.request_timeout = request;
        self
    }

    /// `GET url`.
    pub async fn get(&self, url: &str) -> Result<Response, Error> {
        self.request(Method::GET, url, None).await
    }

    /// `POST url` with a JSON body.
    pub async fn post(&self, url: &str, body: &Value) -> Result<Response, Error> {
        self.request(Method::POST, url, Some(body)).await
    }

    /// `PUT url` with a JSON body.
    pub async fn put(&self, url: &str, body: &Value) -> Result<Response, Error> {
        self.request(Method::PUT, url, Some(body)).await
    }

    /// `DELETE url`.
    pub async fn delete(&self, url: &str) -> Result<Response, Error> {
        self.request(Method::DELETE, url, None).await
    }

    /// `GET url`, a 2xx status required, the body parsed as JSON.
    pub async fn get_json(&self, url: &str) -> Result<Value, Error> {
        self.get(url).await?.error_for_status()?.json()
    }

    /// Sends one request (JSON body if given) on a new connection.
    pub async fn request(&self, method: Method, url: &str, body: Option<&Value>) -> Result<Response, Error> {
        let target = Target::parse(url)?;
        let addr = target.addr();
        let tcp = tokio::time::timeout(
            self.connect_timeout,
            TcpStream::connect((target.host.as_str(), target.port)),
        )
        .await
        .map_err(|_| Error::Timeout { addr: addr.clone(), step: "connect", after: self.connect_timeout })?
        .map_err(|source| Error::Connect { addr: addr.clone(), source })?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(target.host.clone()).map_err(|_| Error::Url(url.to_string()))?;
        let tls = tokio::time::timeout(self.connect_timeout, self.connector.connect(name, tcp))
            .await
            .map_err(|_| Error::Timeout {
                addr: addr.clone(),
                step: "TLS handshake",
                after: self.connect_timeout,
            })?
            .map_err(|e| exchange_error(&addr, e.into()))?;

        let peer = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|der| PeerIdentity::from_der(der).ok());
        let body = match body {
            Some(v) => Bytes::from(serde_json::to_vec(v).map_err(Error::Json)?),
            None => Bytes::new(),
        };
        let mut builder = hyper::Request::builder()
            .method(method)
            .uri(target.path.as_str())
            .header(header::HOST, target.authority.as_str())
            .header(header::ACCEPT, "application/json");
        if !body.is_empty() {
            builder = builder.header(header::CONTENT_TYPE, "application/json");
        }
        let request = builder.body(Full::new(body)).map_err(|_| Error::Url(url.to_string()))?;

        let exchange = async {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .map_err(|e| exchange_error(&addr, e.into()))?;
            let mut driver = tokio::spawn(conn);
            let response = match sender.send_request(request).await {
                Ok(r) => Ok(r),
                // The connection's own error says why the request failed: with TLS 1.3
                // the server's refusal of our certificate arrives as an alert read there.
                Err(e) => Err(match (&mut driver).await {
                    Ok(Err(conn_error)) if find_rustls(&conn_error).is_some() => {
                        exchange_error(&addr, conn_error.into())
                    }
                    _ => exchange_error(&addr, e.into()),
                }),
            };
            let result = match response {
                Ok(response) => {
                    let status = response.status().as_u16();
                    match Limited::new(response.into_body(), MAX_BODY).collect().await {
                        Ok(collected) => {
                            Ok(Response { addr: addr.clone(), peer, status, body: collected.to_bytes() })
                        }
                        Err(e) => Err(exchange_error(&addr, e)),
                    }
                }
                Err(e) => Err(e),
            };
            driver.abort();
            result
        };
        tokio::time::timeout(self.request_timeout, exchange).await.map_err(|_| Error::Timeout {
            addr: addr.clone(),
            step: "request",
            after: self.request_timeout,
        })?
    }
}

/// A TLS failure anywhere in `error`'s chain becomes [`Error::Tls`]; anything else
/// [`Error::Http`].
fn exchange_error(addr: &str, error: Box<dyn std::error::Error + Send + Sync>) -> Error {
    match find_rustls(error.as_ref()) {
        Some(source) => Error::Tls { addr: addr.to_string(), source },
        None => Error::Http { addr: addr.to_string(), source: error },
    }
}

fn find_rustls(error: &(dyn std::error::Error + 'static)) -> Option<rustls::Error> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(r) = e.downcast_ref::<rustls::Error>() {
            return Some(r.clone());
        }
        // io::Error::source skips the error it wraps; look inside it.
        if let Some(inner) = e.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            if let Some(r) = inner.downcast_ref::<rustls::Error>() {
                return Some(r.clone());
            }
        }
        current = e.source();
    }
    None
}

#[derive(Debug)]
struct Target {
    host: String,
    port: u16,
    authority: String,
    path: String,
}

impl Target {
    fn parse(url: &str) -> Result<Target, Error> {
        let bad = || Error::Url(url.to_string());
        let uri: Uri = url.parse().map_err(|_| bad())?;
        if uri.scheme_str() != Some("https") {
            return Err(bad());
        }
        let authority = uri.authority().ok_or_else(bad)?;
        let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_string();
        if host.is_empty() {
            return Err(bad());
        }
        let port = authority.port_u16().unwrap_or(443);
        let path = uri.path_and_query().map(|p| p.as_str().to_string()).unwrap_or_else(|| "/".to_string());
        Ok(Target { host, port, authority: authority.as_str().to_string(), path })
    }

    fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// A blocking wrapper of [`Client`] for synchronous code (the `ferry` CLI): a
/// current-thread runtime inside. Do not call it from within a tokio runtime.
#[derive(Debug)]
pub struct BlockingClient {
    runtime: tokio::runtime::Runtime,
    client: Client,
}

impl BlockingClient {
    /// See [`Client::new`].
    pub fn new(identity_dir: &Path) -> Result<BlockingClient, Error> {
        BlockingClient::from_client(Client::new(identity_dir)?)
    }

    /// Wraps an async client.
    pub fn from_client(client: Client) -> Result<BlockingClient, Error> {
        let runtime =
            tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(Error::Runtime)?;
        Ok(BlockingClient { runtime, client })
    }

    /// See [`Client::with_timeouts`].
    pub fn with_timeouts(mut self, connect: Duration, request: Duration) -> BlockingClient {
        self.client = self.client.with_timeouts(connect, request);
        self
    }

    /// `GET url`.
    pub fn get(&self, url: &str) -> Result<Response, Error> {
        self.runtime.block_on(self.client.get(url))
    }

    /// `POST url` with a JSON body.
    pub fn post(&self, url: &str, body: &Value) -> Result<Response, Error> {
        self.runtime.block_on(self.client.post(url, body))
    }

    /// `PUT url` with a JSON body.
    pub fn put(&self, url: &str, body: &Value) -> Result<Response, Error> {
        self.runtime.block_on(self.client.put(url, body))
    }

    /// `DELETE url`.
    pub fn delete(&self, url: &str) -> Result<Response, Error> {
        self.runtime.block_on(self.client.delete(url))
    }

    /// `GET url`, a 2xx status required, the body parsed as JSON.
    pub fn get_json(&self, url: &str) -> Result<Value, Error> {
        self.runtime.block_on(self.client.get_json(url))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_parsed() {
        let t = Target::parse("https://host-a:7443/vm/list?x=1").expect("parse");
        assert_eq!((t.host.as_str(), t.port, t.path.as_str()), ("host-a", 7443, "/vm/list?x=1"));
        assert_eq!(t.addr(), "host-a:7443");
        let t = Target::parse("https://[::1]:9/").expect("parse v6");
        assert_eq!((t.host.as_str(), t.port), ("::1", 9));
        assert_eq!(t.addr(), "[::1]:9");
        assert_eq!(Target::parse("https://h").expect("default port").port, 443);
        for bad in ["http://h:1/", "h:1", "https:///x", ""] {
            assert!(matches!(Target::parse(bad), Err(Error::Url(_))), "{bad:?}");
        }
    }

    #[test]
    fn status_errors() {
        let r = Response {
            addr: "h:1".into(),
            peer: None,
            status: 404,
            body: Bytes::from_static(b"no such VM\n"),
        };
        assert!(!r.is_success());
        match r.error_for_status() {
            Err(Error::Status { status: 404, body, .. }) => assert_eq!(body, "no such VM"),
            other => panic!("unexpected {other:?}"),
        }
        let r =
            Response { addr: "h:1".into(), peer: None, status: 200, body: Bytes::from_static(b"{\"a\":1}") };
        assert_eq!(r.json().expect("json")["a"], 1);
    }
}
