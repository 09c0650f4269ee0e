//! `ferry host`: the per-host daemon (hostd). It keeps the host's VMs (homes on datastores),
//! starts and supervises their VMM processes (which outlive it), makes their taps on port
//! groups' bridges, and reports the host's inventory, through an HTTP API
//! ([`api::router`], types in `ferry-host-api`). See `docs/host.md`.

pub mod api;
pub mod config;
pub mod daemon;
pub mod datastore;
pub mod db;
pub mod evc;
pub mod inventory;
pub mod join;
pub mod peer;
pub mod taps;
pub mod vmdef;

/// Errors running the daemon.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is wrong.
    #[error(transparent)]
    Config(#[from] config::Error),
    /// Start-up failed.
    #[error(transparent)]
    Daemon(#[from] daemon::Error),
    /// The host's TLS identity cannot be loaded.
    #[error("cannot load the host's TLS identity from {dir} (make it with `ferry host init`)", dir = .dir.display())]
    Identity {
        /// The identity directory.
        dir: std::path::PathBuf,
        /// Why.
        #[source]
        source: ferry_pki::tls::Error,
    },
    /// The listen address cannot be bound.
    #[error("cannot listen on {addr}")]
    Listen {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Cluster membership cannot start.
    #[error("cannot start the cluster membership")]
    Join(#[source] join::Error),
    /// Serving failed.
    #[error("the API server failed")]
    Serve(#[source] std::io::Error),
}

/// Runs the daemon with the configuration in `config_file` until SIGTERM or SIGINT. VMMs keep
/// running when it ends. `faults` are for tests only ([`daemon::fault`]).
pub async fn run(config_file: &std::path::Path, faults: daemon::fault::HostFaults) -> Result<(), Error> {
    let config = config::load(config_file)?;
    let addr = config.listen;
    // Mutual TLS on the API's port: clients and peer hosts present a certificate of the
    // cluster CA, or are refused before a request is read.
    let dir = config.identity_dir.clone();
    let tls = ferry_pki::server_config(&dir).map_err(|source| Error::Identity { dir, source })?;
    let daemon = daemon::Daemon::start(config, faults).await?;
    let listener =
        tokio::net::TcpListener::bind(addr).await.map_err(|source| Error::Listen { addr, source })?;
    let local = listener.local_addr().map_err(Error::Serve)?;
    tracing::info!("ferry host {} listening on {local}", daemon.config().name);
    let shutdown = async {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
        else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("ferry host: stopping (the VMs keep running)");
    };
    // Cluster membership (`ferry host join`): its routes, and heartbeats to the controller.
    let cluster = join::Cluster::start(daemon.clone()).await.map_err(Error::Join)?;
    let router = api::router(daemon).merge(join::router(cluster));
    api::serve(listener, std::sync::Arc::new(tls), router, shutdown).await;
    Ok(())
}
