//! The store's schema, version by version. The same version numbers and the same statements
//! on SQLite and PostgreSQL: only types both understand (`TEXT`, `BIGINT`, `DOUBLE
//! PRECISION`), no auto-increment (sequence numbers are the store's), upserts with
//! `ON CONFLICT ... DO UPDATE`.
//!
//! Live state (what the hosts last reported): `hosts`, `host_datastores`, `host_portgroups`,
//! `host_vms`; replaced host by host at each heartbeat. Version 2: EVC (`evc_generations`,
//! history; `evc_vms`, `evc_refused`). Version 3: `migration_queue` (migrations waiting for
//! a slot). Version 4: high availability (`controller_lease`, `controllers`). Version 5: indexes of
//! the inventory tables by host. History
//! (append-only; a migration's row changes only from `queued` to `active` to its end):
//! `migrations`, `migration_events`.

/// `(version, statements)`, oldest first. Never edit a released version: add one.
pub const MIGRATIONS: &[(u32, &[&str])] = &[
    (
        1,
        &[
            "CREATE TABLE hosts (
            name TEXT PRIMARY KEY,
            api_url TEXT NOT NULL,
            state TEXT NOT NULL,
            maintenance BIGINT NOT NULL,
            joined_unix_ms BIGINT NOT NULL,
            last_seen_unix_ms BIGINT NOT NULL,
            info TEXT NOT NULL
        )",
            "CREATE TABLE host_datastores (
            datastore_id TEXT NOT NULL,
            host TEXT NOT NULL,
            name TEXT NOT NULL,
            path TEXT NOT NULL,
            free_bytes BIGINT NOT NULL,
            total_bytes BIGINT NOT NULL,
            PRIMARY KEY (datastore_id, host)
        )",
            "CREATE TABLE host_portgroups (
            name TEXT NOT NULL,
            host TEXT NOT NULL,
            bridge TEXT NOT NULL,
            present BIGINT NOT NULL,
            PRIMARY KEY (name, host)
        )",
            "CREATE TABLE host_vms (
            name TEXT NOT NULL,
            host TEXT NOT NULL,
            state TEXT NOT NULL,
            memory_mib BIGINT NOT NULL,
            vcpus BIGINT NOT NULL,
            datastore TEXT NOT NULL,
            reported_unix_ms BIGINT NOT NULL,
            PRIMARY KEY (name, host)
        )",
            "CREATE TABLE migrations (
            id TEXT PRIMARY KEY,
            vm TEXT NOT NULL,
            source TEXT NOT NULL,
            destination TEXT NOT NULL,
            started_unix_ms BIGINT NOT NULL,
            ended_unix_ms BIGINT,
            outcome TEXT NOT NULL,
            reason_code TEXT NOT NULL,
            record TEXT NOT NULL
        )",
            "CREATE INDEX migrations_vm ON migrations (vm)",
            "CREATE TABLE migration_events (
            migration_id TEXT NOT NULL,
            seq BIGINT NOT NULL,
            at_unix_ms BIGINT NOT NULL,
            kind TEXT NOT NULL,
            message TEXT NOT NULL,
            PRIMARY KEY (migration_id, seq)
        )",
        ],
    ),
    (
        2,
        &[
            // EVC: every CPU baseline the cluster had (history: appended, the newest is
            // current), the generation each VM was powered on under (as its host reported it;
            // kept when the VM moves to a host that did not power it on), and the hosts
            // refused at join for lacking baseline features (their offer, for
            // `--baseline-of`).
            "CREATE TABLE evc_generations (
            generation BIGINT PRIMARY KEY,
            features TEXT NOT NULL,
            set_by TEXT NOT NULL,
            set_unix_ms BIGINT NOT NULL
        )",
            "CREATE TABLE evc_vms (
            vm TEXT PRIMARY KEY,
            generation BIGINT NOT NULL,
            host TEXT NOT NULL,
            reported_unix_ms BIGINT NOT NULL
        )",
            "CREATE TABLE evc_refused (
            host TEXT PRIMARY KEY,
            features TEXT NOT NULL,
            lacking TEXT NOT NULL,
            at_unix_ms BIGINT NOT NULL
        )",
        ],
    ),
    (
        3,
        &[
            // The migrations waiting for a slot (limits), oldest first by `seq`: the request
            // to send when one starts. Each also has its `migrations` row (outcome
            // `queued`) for the history.
            "CREATE TABLE migration_queue (
            id TEXT PRIMARY KEY,
            seq BIGINT NOT NULL,
            vm TEXT NOT NULL,
            source TEXT NOT NULL,
            destination TEXT NOT NULL,
            request TEXT NOT NULL,
            queued_unix_ms BIGINT NOT NULL
        )",
        ],
    ),
    (
        4,
        &[
            // High availability (crate::leader): one lease row (id 1) that the active
            // controller renews and a standby takes once it expired, times on the database's
            // clock, `term` raised at every takeover; and the registry of every controller
            // (standbys included) with its URL and last renewal, for the hosts and the CLI.
            "CREATE TABLE controller_lease (
            id BIGINT PRIMARY KEY,
            holder TEXT NOT NULL,
            holder_url TEXT NOT NULL,
            term BIGINT NOT NULL,
            acquired_unix_ms BIGINT NOT NULL,
            renewed_unix_ms BIGINT NOT NULL,
            expires_unix_ms BIGINT NOT NULL
        )",
            "INSERT INTO controller_lease (id, holder, holder_url, term, acquired_unix_ms, renewed_unix_ms, expires_unix_ms)
             VALUES (1, '', '', 0, 0, 0, 0)",
            "CREATE TABLE controllers (
            name TEXT PRIMARY KEY,
            url TEXT NOT NULL,
            started_unix_ms BIGINT NOT NULL,
            last_seen_unix_ms BIGINT NOT NULL
        )",
        ],
    ),
    (
        5,
        &[
            // Scale (`ferry-bench cluster`): every heartbeat finds its host's rows by host;
            // the primary keys lead with the VM, datastore or port group, so without these
            // each heartbeat scanned all 40,000 VM rows of a 2,500-host cluster.
            "CREATE INDEX host_vms_host ON host_vms (host)",
            "CREATE INDEX host_datastores_host ON host_datastores (host)",
            "CREATE INDEX host_portgroups_host ON host_portgroups (host)",
        ],
    ),
    (
        6,
        &[
            // Scale: every write of a host's `info` raises its revision, so a controller keeps
            // the decoded inventories in memory and decodes again only those whose revision
            // moved (`Store::hosts`). Never lower than the write's time in ms, so a host that
            // left and joined again does not repeat a revision a cache may hold.
            "ALTER TABLE hosts ADD COLUMN info_rev BIGINT NOT NULL DEFAULT 0",
            // The migrations that hold memory on their destination (active, queued, just
            // completed), found without reading the whole history.
            "CREATE INDEX migrations_outcome ON migrations (outcome, ended_unix_ms)",
        ],
    ),
];

/// The newest version this binary knows.
pub fn latest() -> u32 {
    MIGRATIONS.last().map_or(0, |m| m.0)
}
