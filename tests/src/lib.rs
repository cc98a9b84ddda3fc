//! Support for the end-to-end tests: find the workspace's binaries and run them as child
//! processes, the way an operator would; give each test a fresh real Postgres database.

pub mod fake_kube;
pub mod prom;
pub mod readme;

use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The path of a binary of this workspace, built by `cargo test --workspace` (or
/// `cargo build`) next to the test executable's own directory.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test>-<hash> (tests) or target/<profile>/<bin> (fleet-bench)
    let mut profile_dir = exe.parent().expect("executable has a directory");
    if profile_dir.file_name().is_some_and(|n| n == "deps") {
        profile_dir = profile_dir.parent().expect("deps has a parent");
    }
    let path = profile_dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: run the tests with `cargo test --workspace`, which builds it",
        path.display()
    );
    path
}

/// A free loopback port (the listener is closed before the port is handed out).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Polls `check` until it returns `Some`, or panics with `what` after `deadline`.
pub async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A child process killed when dropped, so a failing test leaves nothing running.
pub struct ChildGuard(pub std::process::Child);

impl ChildGuard {
    pub fn pid(&self) -> i32 {
        self.0.id() as i32
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A child process's log: kept in a file so that a passing test prints nothing of it, and
/// printed on the test's output when the test fails (while the value is dropped in a panic).
pub struct ChildLog {
    path: PathBuf,
}

impl ChildLog {
    pub fn new(dir: &std::path::Path, name: &str) -> ChildLog {
        ChildLog {
            path: dir.join(format!("{name}.log")),
        }
    }

    /// For `Command::stderr`: appends to the log file.
    pub fn stdio(&self) -> std::process::Stdio {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map(std::process::Stdio::from)
            .unwrap_or_else(|e| panic!("{}: {e}", self.path.display()))
    }

    pub fn text(&self) -> String {
        std::fs::read_to_string(&self.path).unwrap_or_default()
    }
}

impl Drop for ChildLog {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- {} ---\n{}", self.path.display(), self.text());
        }
    }
}

// ---------------------------------------------------------------------------------------
// A fresh, real Postgres database per test.
//
// The server is the one CI starts (`FLEET_TEST_DATABASE_URL`, default
// `postgres://postgres@127.0.0.1:5432/postgres`); each test gets its own database, dropped
// when the guard goes away.

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
}

impl TestDb {
    /// The URL of this database, for a hub started as a process.
    pub fn url(&self) -> String {
        let admin = admin_url();
        let (base, query) = match admin.split_once('?') {
            Some((b, q)) => (b.to_string(), format!("?{q}")),
            None => (admin.clone(), String::new()),
        };
        let server = base.rsplit_once('/').map(|(s, _)| s).unwrap_or(&base);
        format!("{server}/{}{query}", self.name)
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
