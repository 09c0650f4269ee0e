//! For tests (feature `testing`): a fresh PostgreSQL database per test on the server named by
//! `FERRY_TEST_POSTGRES_URL` (`scripts/postgres.sh` starts one; `scripts/test.sh` exports
//! it), dropped with its guard.

use std::sync::atomic::{AtomicU32, Ordering};

use sqlx::any::AnyPoolOptions;

/// The server's URL (its database is the one new databases are created from).
pub const POSTGRES_URL_ENV: &str = "FERRY_TEST_POSTGRES_URL";
/// Set to 1 (as `scripts/test.sh` does): a missing PostgreSQL fails the tests that use it.
pub const REQUIRE_POSTGRES_ENV: &str = "FERRY_TEST_REQUIRE_POSTGRES";

/// A database made for one test; dropped (with its connections) on drop.
#[derive(Debug)]
pub struct TestDatabase {
    admin_url: String,
    name: String,
    /// The database's URL.
    pub url: String,
}

/// The server's URL, or `None` when there is none and none is required. Panics when
/// `FERRY_TEST_REQUIRE_POSTGRES=1` and the URL is missing.
pub fn postgres_url() -> Option<String> {
    match std::env::var(POSTGRES_URL_ENV) {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(
                std::env::var(REQUIRE_POSTGRES_ENV).as_deref() != Ok("1"),
                "{REQUIRE_POSTGRES_ENV}=1 but {POSTGRES_URL_ENV} is not set: start a server with \
                 `scripts/postgres.sh start DIR` and export its URL"
            );
            eprintln!("note: {POSTGRES_URL_ENV} is not set; the PostgreSQL half of this test does not run");
            None
        }
    }
}

impl TestDatabase {
    /// A new empty database on the test server, or `None` if there is no server (and none is
    /// required).
    pub async fn create() -> Option<TestDatabase> {
        static COUNT: AtomicU32 = AtomicU32::new(0);
        let admin_url = postgres_url()?;
        sqlx::any::install_default_drivers();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let name =
            format!("ferry_test_{}_{}_{nanos}", std::process::id(), COUNT.fetch_add(1, Ordering::Relaxed));
        let admin = AnyPoolOptions::new().max_connections(1).connect(&admin_url).await.unwrap_or_else(|e| {
            panic!("cannot connect to the test PostgreSQL at {admin_url} ({POSTGRES_URL_ENV}): {e}")
        });
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&admin)
            .await
            .unwrap_or_else(|e| panic!("cannot create database {name}: {e}"));
        admin.close().await;
        let url = crate::store::with_database(&admin_url, &name);
        Some(TestDatabase { admin_url, name, url })
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        // A runtime of its own: drop may run inside or outside one.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            rt.block_on(async {
                if let Ok(admin) = AnyPoolOptions::new().max_connections(1).connect(&admin_url).await {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&admin)
                        .await;
                    admin.close().await;
                }
            });
        })
        .join();
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn database_names_are_replaced() {
        assert_eq!(
            crate::store::with_database("postgres://postgres@127.0.0.1:5433/postgres", "x"),
            "postgres://postgres@127.0.0.1:5433/x"
        );
        assert_eq!(
            crate::store::with_database("postgres://u@localhost:1/postgres?sslmode=disable", "y"),
            "postgres://u@localhost:1/y?sslmode=disable"
        );
        assert_eq!(crate::store::with_database("postgres://u@h:1", "z"), "postgres://u@h:1/z");
    }
}
