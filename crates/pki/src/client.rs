//! A small HTTPS JSON client with a Ferry identity: presents the identity's certificate and
//! trusts only the cluster CA. One connection per request by default (the CLI makes a few
//! requests per command); [`Client::with_keep_alive`] keeps connections for reuse (the host
//! daemons: a migration by name makes several calls to one peer, and a TLS handshake with
//! client authentication costs several ms).
//!
//! A kept connection is used again only while it is younger than its idle bound and open.
//! A request that failed on a kept connection is sent again on a new connection when it is
//! known not to have left (hyper gives it back), when it is a `GET`, or when the server
//! closed or reset the connection without a byte of an answer (a server that restarted or
//! dropped the idle connection just then: it handled the request only if it died while
//! doing so; callers whose requests must not be sent twice even then should not keep
//! connections). Any other failure is the caller's.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

/// Idle connections kept per server.
const MAX_IDLE_PER_SERVER: usize = 4;

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// An open connection waiting for its next request.
struct Kept {
    sender: Sender,
    peer: Option<PeerIdentity>,
    since: Instant,
}

/// Connections kept for reuse, by server address (`host:port`).
struct Pool {
    idle: Duration,
    kept: Mutex<HashMap<String, Vec<Kept>>>,
}

impl Pool {
    /// A kept connection to `addr` that is open and young enough; older or closed ones are
    /// dropped (which closes them).
    fn take(&self, addr: &str) -> Option<Kept> {
        let mut kept = self.kept.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let list = kept.get_mut(addr)?;
        while let Some(k) = list.pop() {
            if k.since.elapsed() < self.idle && !k.sender.is_closed() {
                return Some(k);
            }
        }
        None
    }

    /// Keeps `sender` for the next request to `addr`, if it can take one.
    fn put(&self, addr: &str, sender: Sender, peer: Option<PeerIdentity>) {
        if sender.is_closed() {
            return;
        }
        let mut kept = self.kept.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for list in kept.values_mut() {
            list.retain(|k| k.since.elapsed() < self.idle && !k.sender.is_closed());
        }
        kept.retain(|_, l| !l.is_empty());
        let list = kept.entry(addr.to_string()).or_default();
        if list.len() < MAX_IDLE_PER_SERVER {
            list.push(Kept { sender, peer, since: Instant::now() });
        }
    }
}

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
    /// Kept connections (shared by clones), if enabled.
    pool: Option<Arc<Pool>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("keep_alive", &self.pool.as_ref().map(|p| p.idle))
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
            pool: None,
        }
    }

    /// Keeps connections open after their request, each for at most `idle` between two
    /// requests, and sends later requests to the same server over them (this client and its
    /// clones share them). A server that closes a kept connection costs a new one, never an
    /// error of a request that did not leave.
    pub fn with_keep_alive(mut self, idle: Duration) -> Client {
        self.pool = Some(Arc::new(Pool { idle, kept: Mutex::new(HashMap::new()) }));
        self
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

    /// Sends one request (JSON body if given): on a kept connection if there is one (see
    /// [`Client::with_keep_alive`]), else on a new connection.
    pub async fn request(&self, method: Method, url: &str, body: Option<&Value>) -> Result<Response, Error> {
        let target = Target::parse(url)?;
        let addr = target.addr();
        let body = match body {
            Some(v) => Bytes::from(serde_json::to_vec(v).map_err(Error::Json)?),
            None => Bytes::new(),
        };
        let mut builder = hyper::Request::builder()
            .method(method.clone())
            .uri(target.path.as_str())
            .header(header::HOST, target.authority.as_str())
            .header(header::ACCEPT, "application/json");
        if !body.is_empty() {
            builder = builder.header(header::CONTENT_TYPE, "application/json");
        }
        let mut request = builder.body(Full::new(body)).map_err(|_| Error::Url(url.to_string()))?;
        let deadline = tokio::time::Instant::now() + self.request_timeout;
        let timed_out =
            || Error::Timeout { addr: addr.clone(), step: "request", after: self.request_timeout };

        if let Some(pool) = &self.pool {
            while let Some(kept) = pool.take(&addr) {
                let again = clone_request(&request);
                let Kept { mut sender, peer, .. } = kept;
                let sent = tokio::time::timeout_at(deadline, async {
                    // Until the connection has finished its previous exchange; an error if
                    // it was closed meanwhile.
                    if sender.ready().await.is_err() {
                        return Err((Some(request), true));
                    }
                    match sender.try_send_request(request).await {
                        Ok(response) => Ok(read_response(&addr, peer.clone(), response).await),
                        Err(mut e) => {
                            let unsent = e.take_message();
                            Err((unsent, closed_without_answer(e.error())))
                        }
                    }
                })
                .await
                .map_err(|_| timed_out())?;
                match sent {
                    Ok(Ok(response)) => {
                        pool.put(&addr, sender, peer);
                        return Ok(response);
                    }
                    // The body could not be read: the connection is not reused.
                    Ok(Err(e)) => return Err(e),
                    // It did not leave: on the next connection.
                    Err((Some(unsent), _)) => request = unsent,
                    // It may have left: sent again if it is a GET or if the server closed
                    // the connection without answering.
                    Err((None, closed)) if closed || method == Method::GET => request = again,
                    Err((None, _)) => {
                        return Err(Error::Http {
                            addr: addr.clone(),
                            source: "a kept connection failed during the request".into(),
                        })
                    }
                }
            }
        }

        let connected = async {
            let tcp = tokio::time::timeout(
                self.connect_timeout,
                TcpStream::connect((target.host.as_str(), target.port)),
            )
            .await
            .map_err(|_| Error::Timeout { addr: addr.clone(), step: "connect", after: self.connect_timeout })?
            .map_err(|source| Error::Connect { addr: addr.clone(), source })?;
            let _ = tcp.set_nodelay(true);
            let name = ServerName::try_from(target.host.clone()).map_err(|_| Error::Url(url.to_string()))?;
            tokio::time::timeout(self.connect_timeout, self.connector.connect(name, tcp))
                .await
                .map_err(|_| Error::Timeout {
                    addr: addr.clone(),
                    step: "TLS handshake",
                    after: self.connect_timeout,
                })?
                .map_err(|e| exchange_error(&addr, e.into()))
        };
        let tls = connected.await?;

        let peer = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|der| PeerIdentity::from_der(der).ok());

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
                Ok(response) => read_response(&addr, peer.clone(), response).await,
                Err(e) => Err(e),
            };
            match (&self.pool, &result) {
                // The driver runs on while the connection is kept; dropping the sender
                // (expiry, a full pool) ends it.
                (Some(pool), Ok(_)) => pool.put(&addr, sender, peer),
                _ => driver.abort(),
            }
            result
        };
        tokio::time::timeout(self.request_timeout, exchange).await.map_err(|_| timed_out())?
    }
}

/// Whether `e` says the server closed or reset the connection before any answer.
fn closed_without_answer(e: &hyper::Error) -> bool {
    if e.is_incomplete_message() || e.is_closed() || e.is_canceled() {
        return true;
    }
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = current {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
            return matches!(io.kind(), BrokenPipe | ConnectionAborted | ConnectionReset | UnexpectedEof);
        }
        current = c.source();
    }
    false
}

/// A copy of `request` (its body is in memory).
fn clone_request(request: &hyper::Request<Full<Bytes>>) -> hyper::Request<Full<Bytes>> {
    let mut copy = hyper::Request::new(request.body().clone());
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.headers_mut() = request.headers().clone();
    copy
}

/// The response's status and body (at most [`MAX_BODY`]).
async fn read_response(
    addr: &str,
    peer: Option<PeerIdentity>,
    response: hyper::Response<hyper::body::Incoming>,
) -> Result<Response, Error> {
    let status = response.status().as_u16();
    match Limited::new(response.into_body(), MAX_BODY).collect().await {
        Ok(collected) => Ok(Response { addr: addr.to_string(), peer, status, body: collected.to_bytes() }),
        Err(e) => Err(exchange_error(addr, e)),
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
