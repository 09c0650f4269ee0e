//! `ferry cluster`: the controller. It keeps the cluster's inventory (hosts, the datastores
//! and port groups each sees, their VMs) and its migration history in one store
//! ([`store`]: SQLite or PostgreSQL), fed by the host daemons' heartbeats. See
//! `docs/cluster.md`.

pub mod store;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
