//! `ferry cluster`: the controller. It keeps the cluster's inventory (hosts, the datastores
//! and port groups each sees, their VMs) and its migration history in one store
//! ([`store`]: SQLite or PostgreSQL), fed by the host daemons' heartbeats over mutual TLS.
//! See `docs/cluster.md`.

pub mod config;
pub mod evc;
pub mod leader;
pub mod migrate;
pub mod placement;
pub mod precheck;
pub mod queue;
pub mod server;
pub mod store;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

use std::sync::Arc;
use std::time::Duration;

use ferry_cluster_api::{HEARTBEAT_INTERVAL_MS, MISSED_HEARTBEATS};

/// How often the controller looks for hosts that stopped answering.
const STALE_CHECK: Duration = Duration::from_millis(500);

/// How often the hosts' own migration histories are imported.
const IMPORT_EVERY: Duration = Duration::from_secs(5);

/// Errors running the controller.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is wrong.
    #[error(transparent)]
    Config(#[from] config::Error),
    /// The store cannot be opened.
    #[error(transparent)]
    Store(#[from] store::Error),
    /// The controller's TLS identity cannot be loaded.
    #[error("cannot load the controller's TLS identity from {dir} (make it with `ferry cluster init`)", dir = .dir.display())]
    Identity {
        /// The identity directory.
        dir: std::path::PathBuf,
        /// Why.
        #[source]
        source: ferry_pki::tls::Error,
    },
    /// The controller's client of the hosts cannot be made.
    #[error("cannot use the controller's TLS identity in {dir} as a client: {reason}", dir = .dir.display())]
    Client {
        /// The identity directory.
        dir: std::path::PathBuf,
        /// Why.
        reason: String,
    },
    /// The state directory cannot be made.
    #[error("cannot create the state directory {dir}", dir = .dir.display())]
    StateDir {
        /// The directory.
        dir: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
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
}

/// Runs the controller with the configuration in `config_file` until SIGTERM or SIGINT.
pub async fn run(config_file: &std::path::Path) -> Result<(), Error> {
    let config = config::load(config_file)?;
    let dir = config.identity_dir.clone();
    let tls = ferry_pki::server_config(&dir).map_err(|source| Error::Identity { dir, source })?;
    std::fs::create_dir_all(&config.state_dir)
        .map_err(|source| Error::StateDir { dir: config.state_dir.clone(), source })?;
    let store = store::Store::open(&config.database).await?;
    tracing::info!("controller store: {} {}", store.backend(), store.location());
    let addr = config.listen;
    let listener =
        tokio::net::TcpListener::bind(addr).await.map_err(|source| Error::Listen { addr, source })?;
    let local = listener.local_addr().map_err(|source| Error::Listen { addr, source })?;
    let dir = config.identity_dir.clone();
    let client = ferry_pki::Client::new(&dir)
        .map_err(|e| Error::Client { dir, reason: e.to_string() })?
        .with_timeouts(Duration::from_secs(5), Duration::from_secs(60));
    let leader = leader::Leader::new(&config.name, &config.url, leader::Timing::default());
    let controller = Arc::new(server::Controller {
        name: config.name.clone(),
        store: store.clone(),
        client,
        leader: leader.clone(),
        limits: config.limits,
        dispatch: tokio::sync::Mutex::new(()),
        wake: tokio::sync::Notify::new(),
        placing: placement::Pending::default(),
    });
    tracing::info!(
        "ferry cluster {} listening on {local} (API {}), standby until it holds the leader lease",
        config.name,
        config.url
    );
    tracing::info!(
        "migration limits: {} per host (outgoing and incoming apart), {} per cluster; a migration \
         whose hosts are both silent for {} s is recorded unknown and frees its slots",
        config.limits.per_host,
        config.limits.per_cluster,
        config.limits.host_lost_after.as_secs()
    );
    // The lease has a pool of its own: its renewals never wait behind the API's queries.
    let lease_store = store::Store::open(&config.database).await?;
    let lease = tokio::spawn(leader.clone().run(lease_store.clone()));
    let takeovers = tokio::spawn(on_takeover(controller.clone()));
    let dispatcher = tokio::spawn(migrate::dispatch(controller.clone()));
    let watcher = tokio::spawn(watch_heartbeats(store.clone(), leader.clone()));
    let importer = {
        let controller = controller.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(IMPORT_EVERY).await;
                if controller.leader.is_active() {
                    migrate::import_histories(&controller).await;
                }
            }
        })
    };
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
        tracing::info!("ferry cluster: stopping");
    };
    ferry_pki::serve_tls(listener, Arc::new(tls), server::router(controller), shutdown).await;
    watcher.abort();
    importer.abort();
    takeovers.abort();
    dispatcher.abort();
    lease.abort();
    leader.release(&lease_store).await;
    lease_store.close().await;
    store.close().await;
    Ok(())
}

/// At every takeover (a new term): follows again the migrations the history holds as active.
async fn on_takeover(controller: Arc<server::Controller>) {
    let mut status = controller.leader.subscribe();
    let mut followed_term = 0;
    loop {
        let now = status.borrow_and_update().clone();
        if now.role == ferry_cluster_api::ControllerRole::Active && now.term != followed_term {
            followed_term = now.term;
            migrate::resume(&controller).await;
        }
        if status.changed().await.is_err() {
            return;
        }
    }
}

/// Marks `not_responding` the hosts whose heartbeats stopped ([`MISSED_HEARTBEATS`]
/// intervals without one). Idempotent: rerun after any restart. Only while active, and not in
/// the first `MISSED_HEARTBEATS` intervals after a takeover: the hosts' heartbeats went
/// nowhere while no controller was active, and they need that long to find the new one.
async fn watch_heartbeats(store: store::Store, leader: Arc<leader::Leader>) {
    let silence = HEARTBEAT_INTERVAL_MS * MISSED_HEARTBEATS;
    loop {
        tokio::time::sleep(STALE_CHECK).await;
        if !leader.active_for(Duration::from_millis(silence)) {
            continue;
        }
        match store.mark_not_responding(store::unix_ms().saturating_sub(silence)).await {
            Ok(names) => {
                for name in names {
                    tracing::warn!("host {name}: no heartbeat for {silence} ms; not_responding");
                }
            }
            Err(e) => tracing::warn!("cannot check the hosts' heartbeats: {e}"),
        }
    }
}

/// An error with its causes, in one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
