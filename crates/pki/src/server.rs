//! Serving an axum router over mutual TLS on a TCP listener.
//!
//! Each accepted connection gets its own task: the TLS handshake runs under a timeout (a
//! peer that stalls it holds only its own task), a peer without a client certificate
//! chaining to the cluster CA is refused by the handshake itself (no byte of a request is
//! read), then the connection is served with hyper's HTTP/1.1 server and each request gets
//! the peer's [`PeerIdentity`] and its address (`axum::extract::ConnectInfo<SocketAddr>`) in
//! its extensions.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::identity::{Kind, PeerIdentity};

/// Limits of [`serve_tls_with`].
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Longest a TLS handshake may take before the connection is dropped.
    pub handshake_timeout: Duration,
    /// Longest a connection may take to send a request's headers.
    pub header_timeout: Duration,
    /// After shutdown, longest to wait for requests in flight before dropping them.
    pub drain_timeout: Duration,
    /// Connections served at once; further ones are closed at once.
    pub max_connections: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(5),
            max_connections: 1024,
        }
    }
}

/// Serves `router` over TLS on `listener` with [`ServeOptions::default`] until `shutdown`
/// completes, then stops accepting, lets requests in flight finish (at most
/// [`ServeOptions::drain_timeout`]) and returns.
pub async fn serve_tls(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    router: Router,
    shutdown: impl Future<Output = ()> + Send,
) {
    serve_tls_with(listener, config, router, shutdown, ServeOptions::default()).await
}

/// [`serve_tls`] with explicit limits.
pub async fn serve_tls_with(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    router: Router,
    shutdown: impl Future<Output = ()> + Send,
    options: ServeOptions,
) {
    let acceptor = TlsAcceptor::from(config);
    let (stop_tx, stop_rx) = watch::channel(false);
    let slots = Arc::new(Semaphore::new(options.max_connections));
    let mut tasks = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: wait a little, keep serving.
                        tracing::warn!(error = %e, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    tracing::warn!(%peer, "too many connections; closing a new one");
                    continue;
                };
                let conn = Connection {
                    acceptor: acceptor.clone(),
                    router: router.clone(),
                    options: options.clone(),
                    stop: stop_rx.clone(),
                    _slot: slot,
                };
                tasks.spawn(conn.run(stream, peer));
            }
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let drained =
        tokio::time::timeout(options.drain_timeout, async { while tasks.join_next().await.is_some() {} })
            .await;
    if drained.is_err() {
        tracing::warn!(left = tasks.len(), "connections still open after the drain timeout; dropping them");
        tasks.abort_all();
    }
}

struct Connection {
    acceptor: TlsAcceptor,
    router: Router,
    options: ServeOptions,
    stop: watch::Receiver<bool>,
    _slot: OwnedSemaphorePermit,
}

impl Connection {
    async fn run(mut self, stream: TcpStream, peer: SocketAddr) {
        let _ = stream.set_nodelay(true);
        let handshake = tokio::time::timeout(self.options.handshake_timeout, self.acceptor.accept(stream));
        let handshake = tokio::select! {
            h = handshake => h,
            // Shutting down: a connection not yet authenticated has no request to finish.
            () = async { let _ = self.stop.wait_for(|stop| *stop).await; } => return,
        };
        let tls = match handshake {
            Err(_) => {
                tracing::info!(%peer, "TLS handshake timed out; connection closed");
                return;
            }
            Ok(Err(e)) => {
                tracing::info!(%peer, error = %e, "TLS handshake refused");
                return;
            }
            Ok(Ok(tls)) => tls,
        };
        let identity = match tls.get_ref().1.peer_certificates().and_then(|c| c.first()) {
            Some(der) => match PeerIdentity::from_der(der) {
                Ok(id) => id,
                Err(e) => {
                    tracing::info!(%peer, error = %e, "peer certificate refused");
                    return;
                }
            },
            // The verifier requires a certificate; this is only reached if that changed.
            None => {
                tracing::info!(%peer, "peer sent no certificate");
                return;
            }
        };
        tracing::debug!(%peer, name = %identity.name, kind = %identity.kind, "TLS peer authenticated");
        let router = self.router;
        let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            request.extensions_mut().insert(identity.clone());
            request.extensions_mut().insert(axum::extract::ConnectInfo(peer));
            let mut router = router.clone();
            async move { tower_service::Service::call(&mut router, request).await }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(self.options.header_timeout)
            .serve_connection(TokioIo::new(tls), service);
        let mut conn = std::pin::pin!(conn);
        let result = tokio::select! {
            r = conn.as_mut() => r,
            () = async { let _ = self.stop.wait_for(|stop| *stop).await; } => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        if let Err(e) = result {
            tracing::debug!(%peer, error = %e, "connection ended with an error");
        }
    }
}

/// An axum middleware that lets only Ferry hosts through (403 for clients and for requests
/// without a peer identity): `router.route_layer(axum::middleware::from_fn(require_host))`
/// on the routes that only other hosts' daemons may call.
pub async fn require_host(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    match request.extensions().get::<PeerIdentity>() {
        Some(peer) if peer.kind == Kind::Host => next.run(request).await,
        Some(peer) => (
            axum::http::StatusCode::FORBIDDEN,
            format!("{} is a client certificate; only a Ferry host may call this", peer.name),
        )
            .into_response(),
        None => (axum::http::StatusCode::FORBIDDEN, "no peer identity").into_response(),
    }
}
