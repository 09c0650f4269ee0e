//! Membership of a cluster: `ferry host join CONTROLLER_URL` records the controller in the
//! daemon's database (`cluster` table) and from then on a task sends it a heartbeat with
//! this host's inventory (`GET /host`) every [`HEARTBEAT_INTERVAL_MS`], over mutual TLS with
//! the host's own certificate (the controller takes the host's name from it).
//! `ferry host leave` tells the controller and stops. A daemon that restarts resumes the
//! heartbeats of the controller it had joined.
//!
//! Standby controllers (docs/cluster.md "High availability"): every heartbeat answer names
//! every controller of the cluster; when the heartbeat fails (no answer, a 5xx) or the
//! controller answers `not_active`, the daemon tries at once the active controller that
//! answer named, then the others, and follows the first that takes the heartbeat (recorded
//! as the cluster's controller in its database, with the list: host schema version 5). A
//! join given a standby joins the active controller it names.
//!
//! Routes: `GET /cluster` ([`Membership`]), `POST /cluster/join` ([`JoinCluster`]),
//! `POST /cluster/leave`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use ferry_cluster_api::{paths, Heartbeat, HeartbeatAck, HEARTBEAT_INTERVAL_MS};
use ferry_host_api::{ApiError, ErrorCode};
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Mutex};

use crate::api::Failure;
use crate::daemon::Shared;

/// The daemon's membership endpoints.
pub mod routes {
    /// `GET`: [`super::Membership`].
    pub const CLUSTER: &str = "/cluster";
    /// `POST` [`super::JoinCluster`]: join; answers [`super::Membership`].
    pub const JOIN: &str = "/cluster/join";
    /// `POST` (no body): leave; answers [`super::Membership`].
    pub const LEAVE: &str = "/cluster/leave";
}

/// `POST /cluster/join`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct JoinCluster {
    /// The controller (`https://HOST:PORT`).
    pub controller_url: String,
}

/// `GET /cluster`: the controller this host joined, and how its heartbeats go.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Membership {
    /// The controller, if this host joined one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controller_url: Option<String>,
    /// The controller's name (its certificate's), once it answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controller: Option<String>,
    /// When this host joined, ms since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub joined_unix_ms: Option<u64>,
    /// The last heartbeat the controller took, ms since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_ack_unix_ms: Option<u64>,
    /// Why the last heartbeat failed, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The generation of the cluster's CPU baseline (EVC) this host applies to the VMs it
    /// powers on (from the controller's last heartbeat answer), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evc_generation: Option<u64>,
    /// Every controller of the cluster the active one named in its last heartbeat answer
    /// (standbys included): where this host turns when `controller_url` fails or answers
    /// `not_active`. `controller_url` is the one it talks to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub controllers: Vec<String>,
}

/// Errors of joining and leaving.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The URL is not `https://HOST:PORT`.
    #[error("controller URL {0:?}: expected https://HOST:PORT")]
    Url(String),
    /// The host's identity cannot be loaded.
    #[error("cannot load the host's TLS identity")]
    Identity(#[source] ferry_pki::client::Error),
    /// The controller did not take the heartbeat.
    #[error("the controller at {url} did not take this host's heartbeat")]
    Controller {
        /// The controller.
        url: String,
        /// Why.
        #[source]
        source: ferry_pki::client::Error,
    },
    /// The controller's answer is not a heartbeat acknowledgement.
    #[error("the controller at {url} answered something that is not a heartbeat acknowledgement: {reason}")]
    Malformed {
        /// The controller.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// The controller refused this host: it lacks features of the cluster's CPU baseline.
    #[error("the controller at {url} refused this host: {message}")]
    BelowBaseline {
        /// The controller.
        url: String,
        /// The controller's words (the features, how to lower the baseline, the VMs that
        /// would keep it).
        message: String,
    },
    /// The controller is a standby; the active one is elsewhere (or none is active now).
    #[error("the controller at {url} is a standby: {message}")]
    NotActive {
        /// The controller.
        url: String,
        /// The active controller's URL, if one is active.
        active_url: Option<String>,
        /// The controller's words.
        message: String,
    },
    /// This host joined no controller.
    #[error("this host joined no controller")]
    NotJoined,
    /// The daemon's database failed.
    #[error(transparent)]
    Db(#[from] crate::db::Error),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        let code = match &e {
            Error::Url(_) | Error::Controller { .. } | Error::Malformed { .. } | Error::NotActive { .. } => {
                ErrorCode::BadRequest
            }
            Error::NotJoined | Error::BelowBaseline { .. } => ErrorCode::Conflict,
            Error::Identity(_) | Error::Db(_) => ErrorCode::Internal,
        };
        Failure::from_api(ApiError { code, message: crate::api::with_causes(&e) })
    }
}

/// The membership's state, shared by the routes and the heartbeat task.
#[derive(Debug)]
pub struct Cluster {
    daemon: Shared,
    client: ferry_pki::Client,
    status: Mutex<Membership>,
    /// The controller to send heartbeats to (`None`: none).
    target: watch::Sender<Option<String>>,
}

fn check_url(url: &str) -> Result<String, Error> {
    let rest = url.strip_prefix("https://").ok_or_else(|| Error::Url(url.to_string()))?;
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() || rest.contains('/') || !rest.contains(':') {
        return Err(Error::Url(url.to_string()));
    }
    Ok(format!("https://{rest}"))
}

impl Cluster {
    /// Loads the membership from the database and starts the heartbeat task (which sends
    /// nothing until this host joined a controller).
    pub async fn start(daemon: Shared) -> Result<Arc<Cluster>, Error> {
        let client = ferry_pki::Client::new(&daemon.config().identity_dir)
            .map_err(Error::Identity)?
            .with_timeouts(Duration::from_secs(2), Duration::from_secs(5));
        let joined = daemon.db().controller().await?;
        let mut status = Membership::default();
        if let Some((url, at)) = &joined {
            status.controller_url = Some(url.clone());
            status.joined_unix_ms = Some(*at);
            status.controllers = daemon.db().controllers().await?;
        }
        let (target, _) = watch::channel(joined.map(|j| j.0));
        let cluster = Arc::new(Cluster { daemon, client, status: Mutex::new(status), target });
        tokio::spawn(heartbeats(cluster.clone()));
        Ok(cluster)
    }

    /// One heartbeat to `url` (`join`: the first of a join).
    async fn beat(&self, url: &str, join: bool) -> Result<HeartbeatAck, Error> {
        let config = self.daemon.config();
        let beat = Heartbeat {
            api_url: format!("https://{}", config.listen),
            maintenance: config.maintenance,
            join,
            info: self.daemon.host_info().await,
        };
        let body = serde_json::to_value(&beat)
            .map_err(|e| Error::Malformed { url: url.to_string(), reason: e.to_string() })?;
        let answer = self
            .client
            .post(&format!("{url}{}", paths::HEARTBEAT), &body)
            .await
            .and_then(ferry_pki::Response::error_for_status)
            .map_err(|source| refused(url, source))?;
        serde_json::from_slice(&answer.body)
            .map_err(|e| Error::Malformed { url: url.to_string(), reason: e.to_string() })
    }

    async fn note(&self, result: &Result<HeartbeatAck, Error>) {
        let mut status = self.status.lock().await;
        match result {
            Ok(ack) => {
                if status.last_error.is_some() {
                    tracing::info!("controller {}: heartbeats taken again", ack.controller);
                }
                status.controller = Some(ack.controller.clone());
                if !ack.controllers.is_empty() && status.controllers != ack.controllers {
                    status.controllers = ack.controllers.clone();
                    if let Err(e) = self.daemon.db().set_controllers(&ack.controllers).await {
                        tracing::warn!("cannot keep the cluster's controllers: {e}");
                    }
                }
                if let Err(e) = self.daemon.evc().set_baseline(self.daemon.db(), ack.evc.as_ref()).await {
                    tracing::warn!("cannot keep the cluster's CPU baseline: {e}");
                }
                status.last_ack_unix_ms = Some(crate::db::unix_ms());
                status.last_error = None;
            }
            Err(e) => {
                // The whole chain: the controller's answer says why (a removed host, say).
                let mut text = e.to_string();
                let mut source = std::error::Error::source(e);
                while let Some(s) = source {
                    text.push_str(": ");
                    text.push_str(&s.to_string());
                    source = s.source();
                }
                if status.last_error.as_deref() != Some(text.as_str()) {
                    tracing::warn!("heartbeat failed: {text}");
                }
                status.last_error = Some(text);
            }
        }
    }

    /// Joins the controller at `url`: a first heartbeat must be taken, then it is recorded.
    pub async fn join(&self, url: &str) -> Result<Membership, Error> {
        let url = check_url(url)?;
        // A standby names the active controller: join that one.
        let (url, ack) = match self.beat(&url, true).await {
            Err(Error::NotActive { active_url: Some(active), .. }) => {
                let active = check_url(&active)?;
                tracing::info!("controller {url} is a standby; joining the active one at {active}");
                let ack = self.beat(&active, true).await?;
                (active, ack)
            }
            other => (url, other?),
        };
        self.daemon.db().set_controller(Some(&url)).await?;
        self.daemon.db().set_controllers(&ack.controllers).await?;
        self.daemon.evc().set_baseline(self.daemon.db(), ack.evc.as_ref()).await?;
        {
            let mut status = self.status.lock().await;
            *status = Membership {
                controller_url: Some(url.clone()),
                controller: Some(ack.controller.clone()),
                joined_unix_ms: Some(crate::db::unix_ms()),
                last_ack_unix_ms: Some(crate::db::unix_ms()),
                last_error: None,
                evc_generation: None,
                controllers: ack.controllers.clone(),
            };
        }
        self.target.send_replace(Some(url.clone()));
        tracing::info!("joined the cluster of controller {} at {url}", ack.controller);
        Ok(self.status().await)
    }

    /// Leaves: tells the controller (a controller that does not answer is told nothing:
    /// it marks the host not_responding), stops the heartbeats, forgets the controller.
    pub async fn leave(&self) -> Result<Membership, Error> {
        let url = self.status.lock().await.controller_url.clone().ok_or(Error::NotJoined)?;
        self.target.send_replace(None);
        let told = self
            .client
            .post(&format!("{url}{}", paths::LEAVE), &serde_json::Value::Null)
            .await
            .and_then(ferry_pki::Response::error_for_status);
        self.daemon.db().set_controller(None).await?;
        self.daemon.db().set_controllers(&[]).await?;
        self.daemon.evc().set_baseline(self.daemon.db(), None).await?;
        let mut status = self.status.lock().await;
        let before = std::mem::take(&mut *status);
        if let Err(e) = told {
            tracing::warn!("left the cluster at {url}, but the controller was not told: {e}");
            status.last_error = Some(format!("the controller at {url} was not told: {e}"));
        } else {
            tracing::info!("left the cluster at {url}");
        }
        Ok(Membership { last_error: status.last_error.clone(), ..before })
    }

    /// The membership now.
    pub async fn status(&self) -> Membership {
        let mut m = self.status.lock().await.clone();
        m.evc_generation = self.daemon.evc().baseline().map(|b| b.generation);
        m
    }
}

/// The error of a heartbeat the controller did not take: typed when the controller's answer
/// is (its error code, never its text).
fn refused(url: &str, source: ferry_pki::client::Error) -> Error {
    if let ferry_pki::client::Error::Status { body, .. } = &source {
        if let Ok(e) = serde_json::from_str::<ferry_cluster_api::ApiError>(body) {
            if e.code == ferry_cluster_api::ErrorCode::CpuBelowBaseline {
                return Error::BelowBaseline { url: url.to_string(), message: e.message };
            }
        }
        if let Ok(e) = serde_json::from_str::<ferry_cluster_api::NotActive>(body) {
            if e.code == ferry_cluster_api::ErrorCode::NotActive {
                return Error::NotActive {
                    url: url.to_string(),
                    active_url: e.active_url,
                    message: e.message,
                };
            }
        }
    }
    Error::Controller { url: url.to_string(), source }
}

/// Whether a heartbeat that failed with `e` should be tried on another controller: the
/// controller cannot be reached, failed (5xx) or is a standby; not when it answered with a
/// decision about this host (a 4xx: removed, below the CPU baseline, malformed).
fn try_others(e: &Error) -> bool {
    match e {
        Error::NotActive { .. } => true,
        Error::Controller { source: ferry_pki::client::Error::Status { status, .. }, .. } => *status >= 500,
        Error::Controller { .. } | Error::Malformed { .. } => true,
        _ => false,
    }
}

impl Cluster {
    /// The heartbeat to `url` failed with `e`: tries the active controller it named, then
    /// every other known controller, once each; the first that took the heartbeat.
    async fn fail_over(&self, url: &str, e: &Error) -> Option<(String, HeartbeatAck)> {
        let mut candidates = Vec::new();
        if let Error::NotActive { active_url: Some(active), .. } = e {
            candidates.push(active.clone());
        }
        candidates.extend(self.status.lock().await.controllers.iter().cloned());
        let mut tried = vec![url.to_string()];
        for candidate in candidates {
            let Ok(candidate) = check_url(&candidate) else { continue };
            if tried.contains(&candidate) {
                continue;
            }
            tried.push(candidate.clone());
            match self.beat(&candidate, false).await {
                Ok(ack) => {
                    tracing::info!(
                        "controller at {url} failed or stands by; controller {} at {candidate} took the heartbeat: following it",
                        ack.controller
                    );
                    return Some((candidate, ack));
                }
                Err(e) => tracing::debug!("controller at {candidate} did not take the heartbeat either: {e}"),
            }
        }
        None
    }
}

/// Sends a heartbeat every interval while a controller is set; when it fails or stands by,
/// tries the others the controllers named.
async fn heartbeats(cluster: Arc<Cluster>) {
    let mut target = cluster.target.subscribe();
    loop {
        let url = target.borrow_and_update().clone();
        if let Some(url) = url {
            let mut result = cluster.beat(&url, false).await;
            if let Err(e) = &result {
                if try_others(e) {
                    if let Some((other, ack)) = cluster.fail_over(&url, e).await {
                        // Only if nobody joined or left meanwhile.
                        let moved = cluster.target.send_if_modified(|t| {
                            if t.as_deref() == Some(url.as_str()) {
                                *t = Some(other.clone());
                                true
                            } else {
                                false
                            }
                        });
                        if moved {
                            // Recorded, so that a restart starts there.
                            target.borrow_and_update();
                            if let Err(e) = cluster.daemon.db().set_controller(Some(&other)).await {
                                tracing::warn!("cannot record the controller {other}: {e}");
                            }
                            cluster.status.lock().await.controller_url = Some(other);
                            result = Ok(ack);
                        }
                    }
                }
            }
            cluster.note(&result).await;
        }
        // The next beat, or at once when the controller changes.
        let _ = tokio::time::timeout(Duration::from_millis(HEARTBEAT_INTERVAL_MS), target.changed()).await;
    }
}

/// The membership routes.
pub fn router(cluster: Arc<Cluster>) -> Router {
    Router::new()
        .route(routes::CLUSTER, get(status))
        .route(routes::JOIN, post(join))
        .route(routes::LEAVE, post(leave))
        .with_state(cluster)
}

async fn status(State(c): State<Arc<Cluster>>) -> Json<Membership> {
    Json(c.status().await)
}

async fn join(State(c): State<Arc<Cluster>>, bytes: axum::body::Bytes) -> Result<Json<Membership>, Failure> {
    let req: JoinCluster = serde_json::from_slice(&bytes).map_err(|e| {
        Failure::from_api(ApiError {
            code: ErrorCode::BadRequest,
            message: format!("malformed request body: {e}"),
        })
    })?;
    Ok(Json(c.join(&req.controller_url).await?))
}

async fn leave(State(c): State<Arc<Cluster>>) -> Result<Json<Membership>, Failure> {
    Ok(Json(c.leave().await?))
}

#[cfg(test)]
mod tests {
    #[test]
    fn controller_urls() {
        assert_eq!(super::check_url("https://10.0.0.1:7444/").expect("ok"), "https://10.0.0.1:7444");
        assert!(super::check_url("http://10.0.0.1:7444").is_err());
        assert!(super::check_url("https://10.0.0.1").is_err());
        assert!(super::check_url("https://10.0.0.1:1/x").is_err());
    }
}
