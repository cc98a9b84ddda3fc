//! Test support: a fresh, real Postgres database per test.
//!
//! The server is the one CI starts (`FLEET_TEST_DATABASE_URL`, default
//! `postgres://postgres@127.0.0.1:5432/postgres`); each test gets its own database, dropped
//! when the guard goes away.

use std::str::FromStr;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};

pub fn admin_url() -> String {
    std::env::var("FLEET_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
}

pub struct TestDb {
    pub pool: PgPool,
    pub name: String,
}

impl TestDb {
    /// An empty database (no migrations applied).
    pub async fn empty() -> TestDb {
        let admin = PgConnectOptions::from_str(&admin_url()).expect("FLEET_TEST_DATABASE_URL");
        let name = format!("fleet_test_{}", uuid::Uuid::new_v4().simple());
        let mut conn = PgConnection::connect_with(&admin)
            .await
            .unwrap_or_else(|e| panic!("tests need a Postgres server at {}: {e}", admin_url()));
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .expect("create test database");
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .connect_with(admin.database(&name))
            .await
            .expect("connect to test database");
        TestDb { pool, name }
    }

    /// A database with every migration applied.
    pub async fn migrated() -> TestDb {
        let db = TestDb::empty().await;
        hub::db::migrate(&db.pool).await.expect("migrations apply");
        db
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Best effort, on a thread of its own: Drop cannot await on the test's runtime, and
        // that runtime is blocked meanwhile, so the pool is left alone: FORCE ends its
        // connections.
        let name = self.name.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let admin = PgConnectOptions::from_str(&admin_url()).expect("admin url");
                if let Ok(mut conn) = PgConnection::connect_with(&admin).await {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                    )))
                    .execute(&mut conn)
                    .await;
                }
            });
        })
        .join()
        .ok();
    }
}
