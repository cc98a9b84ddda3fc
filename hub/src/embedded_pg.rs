//! The embedded default: with no database URL, the hub keeps a private Postgres instance
//! under a data directory, created with the machine's own `initdb` and run with `pg_ctl`.
//!
//! Postgres refuses to run as root, so when the hub runs as root the server runs as the
//! `postgres` user. The server listens on a unix socket inside the data directory (private to
//! its owner) and on no TCP port, unless the socket path would be too long for the kernel, in
//! which case it takes a free loopback port.
//!
//! Whoever runs the server owns it and stops it on the way out: the hub that started it, or
//! the hub that adopted it because the one that started it is gone (killed with SIGKILL, say).
//! The owner's process id is kept in `fleet-hub.owner` in the data directory; a second hub
//! started on the same directory while the owner lives shares the server and leaves it be.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;

use nix::unistd::{Gid, Uid, User};
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};
use tokio::process::Command;

use crate::error::Error;

/// The database the hub uses inside its private instance.
pub const DATABASE_NAME: &str = "fleet_hub";
/// The superuser initdb creates.
const SUPERUSER: &str = "postgres";
/// Our settings live in their own file, included from postgresql.conf, so they are rewritten
/// at each start (the port may change) without editing the file initdb wrote.
const SETTINGS_FILE: &str = "fleet-hub.conf";
const LOG_FILE: &str = "fleet-hub-postgres.log";
/// The process id of the hub that owns the running server.
const OWNER_FILE: &str = "fleet-hub.owner";
/// What `/proc/<pid>/comm` of a live owner reads (the kernel keeps 15 bytes of the name).
const PROCESS_NAME: &str = "fleet-hub";
/// sockaddr_un holds 108 bytes including the final NUL.
const MAX_SOCKET_PATH: usize = 107;
const SOCKET_PORT: u16 = 5432;
/// How long pg_ctl may take to start or stop the server (crash recovery included).
const PG_CTL_WAIT_SECONDS: &str = "120";

// The embedded server's failures, as the hub's one [`Error`]: what the operator must
// change (a missing program, an unusable directory) is `Invalid`; a server that would not
// start or answer is `Unavailable`.

fn binaries_missing() -> Error {
    Error::Invalid(
        "the embedded database needs the PostgreSQL server programs initdb and pg_ctl, found \
         neither in PATH nor in /usr/lib/postgresql/*/bin nor in $FLEET_HUB_PG_BIN: install \
         them (Debian/Ubuntu: `apt-get install postgresql`; Fedora/RHEL: `dnf install \
         postgresql-server`) or give a database with --database-url"
            .into(),
    )
}

fn no_postgres_user() -> Error {
    Error::Invalid(
        "running as root, the embedded database must run as the `postgres` user (Postgres \
         refuses to run as root), and this machine has no such user: create it \
         (`useradd --system postgres`), run fleet-hub as an ordinary user, or give a \
         database with --database-url"
            .into(),
    )
}

fn unreachable(data_dir: &Path, blocked: &Path) -> Error {
    Error::Invalid(format!(
        "the `postgres` user cannot reach the data directory {}: {} is not searchable by it; \
         choose a data directory under a path it can reach (for example --data-dir \
         /var/lib/fleet-hub/pgdata)",
        data_dir.display(),
        blocked.display()
    ))
}

fn not_a_data_dir(data_dir: &Path) -> Error {
    Error::Invalid(format!(
        "data directory {} is not empty and holds no Postgres cluster; choose another --data-dir",
        data_dir.display()
    ))
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::unavailable(&format!("data directory {}", path.display()), source)
}

fn refused(err: sqlx::Error) -> Error {
    Error::unavailable("embedded database started but refused a connection", err)
}

/// Where the server accepts connections.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Endpoint {
    Socket { dir: PathBuf, port: u16 },
    Tcp { port: u16 },
}

/// A running private Postgres. Dropping it stops the server if this process owns it.
#[derive(Debug)]
pub struct EmbeddedPostgres {
    data_dir: PathBuf,
    bin_dir: PathBuf,
    run_as: Option<(Uid, Gid)>,
    endpoint: Endpoint,
    /// This process started the server or adopted it, and stops it.
    owned: bool,
    stopped: bool,
}

impl EmbeddedPostgres {
    /// Creates the cluster under `data_dir` on first use, starts the server (or adopts one
    /// already running there) and makes sure the hub's database exists.
    pub async fn start(data_dir: &Path) -> Result<Self, Error> {
        let bin_dir = find_bin_dir()?;
        let data_dir = std::path::absolute(data_dir).map_err(io_err(data_dir))?;
        let run_as = if Uid::effective().is_root() {
            let user = User::from_name(SUPERUSER)
                .ok()
                .flatten()
                .ok_or_else(no_postgres_user)?;
            Some((user.uid, user.gid))
        } else {
            None
        };
        prepare_dir(&data_dir, run_as)?;

        let mut pg = EmbeddedPostgres {
            data_dir,
            bin_dir,
            run_as,
            endpoint: Endpoint::Tcp { port: 0 },
            owned: false,
            stopped: false,
        };
        if !pg.data_dir.join("PG_VERSION").exists() {
            pg.initdb().await?;
        }
        match pg.running_endpoint().await {
            Some(endpoint) => {
                pg.endpoint = endpoint;
                match pg.live_owner() {
                    Some(owner) => {
                        tracing::warn!(data_dir = %pg.data_dir.display(), owner, "sharing the embedded Postgres another fleet-hub runs: it stops when that hub exits");
                    }
                    None => {
                        pg.take_ownership()?;
                        tracing::info!(data_dir = %pg.data_dir.display(), "adopting the embedded Postgres a stopped hub left running: it stops when this hub exits");
                    }
                }
            }
            None => {
                pg.endpoint = choose_endpoint(&pg.data_dir)?;
                pg.write_settings()?;
                // Owned before it is started: whatever happens next, the way out stops it.
                pg.take_ownership()?;
                pg.pg_ctl(
                    &["start", "-w", "-t", PG_CTL_WAIT_SECONDS, "-l"],
                    Some(LOG_FILE),
                )
                .await?;
                tracing::info!(data_dir = %pg.data_dir.display(), endpoint = %pg.url(), "embedded Postgres started");
            }
        }
        pg.ensure_database().await?;
        Ok(pg)
    }

    /// The process id of the live fleet-hub that owns the running server: this one (the
    /// server is owned by another handle here) or another.
    fn live_owner(&self) -> Option<u32> {
        let me = std::process::id();
        if locked_owned_here().contains(&self.data_dir) {
            return Some(me);
        }
        let text = fs::read_to_string(self.data_dir.join(OWNER_FILE)).ok()?;
        let pid: u32 = text.trim().parse().ok().filter(|&p| p != me)?;
        // A pid alone may have been reused by any process since: the name must match too.
        let comm = fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        (comm.trim_end() == PROCESS_NAME).then_some(pid)
    }

    fn take_ownership(&mut self) -> Result<(), Error> {
        let path = self.data_dir.join(OWNER_FILE);
        fs::write(&path, format!("{}\n", std::process::id())).map_err(io_err(&path))?;
        locked_owned_here().insert(self.data_dir.clone());
        self.owned = true;
        Ok(())
    }

    /// Forgets the ownership once the server is stopped.
    fn release(&self) {
        let _ = fs::remove_file(self.data_dir.join(OWNER_FILE));
        locked_owned_here().remove(&self.data_dir);
    }

    /// How to connect to the hub's database.
    pub fn connect_options(&self) -> PgConnectOptions {
        self.options_for(DATABASE_NAME)
    }

    /// A libpq-style URL of the hub's database, for people (`psql "<url>"`) and child processes.
    pub fn url(&self) -> String {
        match &self.endpoint {
            // No user before an empty host: URL parsers (sqlx's since 0.9.1) refuse it.
            Endpoint::Socket { dir, port } => format!(
                "postgres:///{DATABASE_NAME}?host={}&port={port}&user={SUPERUSER}",
                dir.display()
            ),
            Endpoint::Tcp { port } => {
                format!("postgres://{SUPERUSER}@127.0.0.1:{port}/{DATABASE_NAME}")
            }
        }
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Stops the server if this process owns it (a shared one belongs to its owner).
    pub async fn stop(mut self) -> Result<(), Error> {
        self.stopped = true;
        if self.owned {
            self.pg_ctl(
                &["stop", "-w", "-m", "fast", "-t", PG_CTL_WAIT_SECONDS],
                None,
            )
            .await?;
            self.release();
            tracing::info!(data_dir = %self.data_dir.display(), "embedded Postgres stopped");
        }
        Ok(())
    }

    fn options_for(&self, database: &str) -> PgConnectOptions {
        let options = PgConnectOptions::new()
            .username(SUPERUSER)
            .database(database);
        match &self.endpoint {
            Endpoint::Socket { dir, port } => options.socket(dir).port(*port),
            Endpoint::Tcp { port } => options.host("127.0.0.1").port(*port),
        }
    }

    async fn initdb(&self) -> Result<(), Error> {
        let is_empty = fs::read_dir(&self.data_dir)
            .map_err(io_err(&self.data_dir))?
            .next()
            .is_none();
        if !is_empty {
            return Err(not_a_data_dir(&self.data_dir));
        }
        tracing::info!(data_dir = %self.data_dir.display(), "creating the embedded Postgres cluster");
        let mut cmd = self.command("initdb");
        cmd.arg("-D").arg(&self.data_dir).args([
            "-U",
            SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
        ]);
        run(cmd, "initdb").await?;
        let conf = self.data_dir.join("postgresql.conf");
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(&conf)
            .map_err(io_err(&conf))?;
        writeln!(
            f,
            "\n# fleet-hub: its own settings\ninclude_if_exists '{SETTINGS_FILE}'"
        )
        .map_err(io_err(&conf))?;
        Ok(())
    }

    /// Writes the listening settings for this start.
    fn write_settings(&self) -> Result<(), Error> {
        let quote = |p: &Path| p.display().to_string().replace('\'', "''");
        let listen = match &self.endpoint {
            Endpoint::Socket { dir, port } => format!(
                "listen_addresses = ''\nport = {port}\nunix_socket_directories = '{}'\n",
                quote(dir)
            ),
            Endpoint::Tcp { port } => format!(
                "listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = ''\n"
            ),
        };
        // The benchmark drives many concurrent sessions; 200 leaves room for several hubs.
        let text = format!("# written by fleet-hub at each start\n{listen}max_connections = 200\n");
        let path = self.data_dir.join(SETTINGS_FILE);
        fs::write(&path, text).map_err(io_err(&path))?;
        if let Some((uid, gid)) = self.run_as {
            nix::unistd::chown(&path, Some(uid), Some(gid)).map_err(|e| io_err(&path)(e.into()))?;
        }
        Ok(())
    }

    /// The endpoint of a server already running on this data directory, from its
    /// `postmaster.pid` (line 4: port, line 5: socket directory, line 6: listen address).
    async fn running_endpoint(&self) -> Option<Endpoint> {
        let mut status = self.command("pg_ctl");
        status.arg("status").arg("-D").arg(&self.data_dir);
        if run(status, "pg_ctl status").await.is_err() {
            return None;
        }
        let pid_file = fs::read_to_string(self.data_dir.join("postmaster.pid")).ok()?;
        let lines: Vec<&str> = pid_file.lines().collect();
        let port: u16 = lines.get(3)?.trim().parse().ok()?;
        let socket_dir = lines.get(4).map(|s| s.trim()).unwrap_or("");
        let listen = lines.get(5).map(|s| s.trim()).unwrap_or("");
        if !socket_dir.is_empty() {
            Some(Endpoint::Socket {
                dir: PathBuf::from(socket_dir),
                port,
            })
        } else if !listen.is_empty() {
            Some(Endpoint::Tcp { port })
        } else {
            None
        }
    }

    async fn ensure_database(&self) -> Result<(), Error> {
        let mut conn = PgConnection::connect_with(&self.options_for("postgres"))
            .await
            .map_err(refused)?;
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
                .bind(DATABASE_NAME)
                .fetch_one(&mut conn)
                .await
                .map_err(refused)?;
        if !exists {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "CREATE DATABASE {DATABASE_NAME}"
            )))
            .execute(&mut conn)
            .await
            .map_err(refused)?;
        }
        conn.close().await.map_err(refused)?;
        Ok(())
    }

    async fn pg_ctl(&self, args: &[&str], log_file: Option<&str>) -> Result<(), Error> {
        let mut cmd = self.command("pg_ctl");
        cmd.arg("-D").arg(&self.data_dir).args(args);
        if let Some(log) = log_file {
            cmd.arg(self.data_dir.join(log));
        }
        run(cmd, "pg_ctl").await
    }

    /// A command for one of the server programs, as the user the server runs as.
    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin_dir.join(program));
        cmd.current_dir(&self.data_dir)
            .env("LC_ALL", "C")
            .stdin(Stdio::null());
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid.as_raw()).gid(gid.as_raw());
        }
        cmd
    }

    /// The synchronous stop used when the value is dropped without `stop()`.
    fn stop_blocking(&mut self) {
        if self.stopped || !self.owned {
            return;
        }
        self.stopped = true;
        let mut cmd = std::process::Command::new(self.bin_dir.join("pg_ctl"));
        cmd.arg("-D")
            .arg(&self.data_dir)
            .args(["stop", "-w", "-m", "fast"])
            .current_dir(&self.data_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some((uid, gid)) = self.run_as {
            std::os::unix::process::CommandExt::uid(&mut cmd, uid.as_raw());
            std::os::unix::process::CommandExt::gid(&mut cmd, gid.as_raw());
        }
        match cmd.status() {
            Ok(_) => self.release(),
            Err(err) => tracing::warn!(%err, "could not stop the embedded Postgres"),
        }
    }
}

impl Drop for EmbeddedPostgres {
    fn drop(&mut self) {
        self.stop_blocking();
    }
}

/// The data directories whose server this process owns (a second handle on one of them, as
/// tests open, shares it).
fn locked_owned_here() -> std::sync::MutexGuard<'static, BTreeSet<PathBuf>> {
    static OWNED_HERE: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());
    OWNED_HERE.lock().unwrap_or_else(|p| p.into_inner())
}

async fn run(mut cmd: Command, program: &str) -> Result<(), Error> {
    let out = cmd
        .output()
        .await
        .map_err(|e| Error::unavailable(&format!("running {program}"), e))?;
    if out.status.success() {
        return Ok(());
    }
    let mut output = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if output.is_empty() {
        output = String::from_utf8_lossy(&out.stdout).trim().to_string();
    }
    Err(Error::Unavailable(format!(
        "{program} failed ({}): {output}",
        out.status
    )))
}

/// `$FLEET_HUB_PG_BIN`, then PATH, then the newest `/usr/lib/postgresql/<major>/bin`.
fn find_bin_dir() -> Result<PathBuf, Error> {
    let has_both = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    if let Some(dir) = std::env::var_os("FLEET_HUB_PG_BIN").map(PathBuf::from) {
        return if has_both(&dir) {
            Ok(dir)
        } else {
            Err(binaries_missing())
        };
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if has_both(&dir) {
                return Ok(dir);
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse::<u32>().ok()?;
            Some((major, e.path().join("bin")))
        })
        .filter(|(_, dir)| has_both(dir))
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, dir)| dir)
        .ok_or_else(binaries_missing)
}

/// Creates the data directory (mode 0700, owned by the server's user) and checks that the
/// server's user can reach it.
fn prepare_dir(data_dir: &Path, run_as: Option<(Uid, Gid)>) -> Result<(), Error> {
    fs::create_dir_all(data_dir).map_err(io_err(data_dir))?;
    fs::set_permissions(data_dir, fs::Permissions::from_mode(0o700)).map_err(io_err(data_dir))?;
    let Some((uid, gid)) = run_as else {
        return Ok(());
    };
    nix::unistd::chown(data_dir, Some(uid), Some(gid)).map_err(|e| io_err(data_dir)(e.into()))?;
    match blocked_ancestor(data_dir, uid, gid) {
        Some(blocked) => Err(unreachable(data_dir, &blocked)),
        None => Ok(()),
    }
}

/// The first existing directory above `dir` that the user cannot search (enter).
fn blocked_ancestor(dir: &Path, uid: Uid, gid: Gid) -> Option<PathBuf> {
    dir.ancestors().skip(1).find_map(|d| {
        let meta = fs::metadata(d).ok()?;
        let mode = meta.mode();
        let searchable = if meta.uid() == uid.as_raw() {
            mode & 0o100 != 0
        } else if meta.gid() == gid.as_raw() {
            mode & 0o010 != 0
        } else {
            mode & 0o001 != 0
        };
        (!searchable).then(|| d.to_path_buf())
    })
}

/// Run as root, the server runs as `postgres`: the directory above `data_dir` that this
/// user cannot enter, if any (so a caller can choose another place before starting).
pub fn unreachable_by_server(data_dir: &Path) -> Option<PathBuf> {
    if !Uid::effective().is_root() {
        return None;
    }
    let user = User::from_name(SUPERUSER).ok().flatten()?;
    let data_dir = std::path::absolute(data_dir).ok()?;
    blocked_ancestor(&data_dir, user.uid, user.gid)
}

/// The socket inside the data directory when its path fits, else a free loopback port.
fn choose_endpoint(data_dir: &Path) -> Result<Endpoint, Error> {
    let socket = data_dir.join(format!(".s.PGSQL.{SOCKET_PORT}"));
    if socket.as_os_str().len() <= MAX_SOCKET_PATH {
        return Ok(Endpoint::Socket {
            dir: data_dir.to_path_buf(),
            port: SOCKET_PORT,
        });
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(io_err(data_dir))?;
    let port = listener.local_addr().map_err(io_err(data_dir))?.port();
    Ok(Endpoint::Tcp { port })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_url_given_to_people_and_child_processes_parses() {
        use std::str::FromStr;
        for endpoint in [
            Endpoint::Socket {
                dir: PathBuf::from("/var/lib/fleet-hub/pgdata"),
                port: 5432,
            },
            Endpoint::Tcp { port: 40000 },
        ] {
            let pg = EmbeddedPostgres {
                data_dir: PathBuf::from("/var/lib/fleet-hub/pgdata"),
                bin_dir: PathBuf::from("/usr/bin"),
                run_as: None,
                endpoint,
                owned: false,
                stopped: true,
            };
            let url = pg.url();
            let parsed = PgConnectOptions::from_str(&url).unwrap_or_else(|e| panic!("{url}: {e}"));
            assert_eq!(parsed.get_database(), Some(DATABASE_NAME), "{url}");
            assert_eq!(parsed.get_username(), SUPERUSER, "{url}");
        }
    }

    #[test]
    fn short_paths_use_the_socket_long_paths_a_port() {
        let short = choose_endpoint(Path::new("/var/lib/fleet-hub/pgdata")).unwrap();
        assert_eq!(
            short,
            Endpoint::Socket {
                dir: PathBuf::from("/var/lib/fleet-hub/pgdata"),
                port: SOCKET_PORT
            }
        );
        let long = PathBuf::from(format!("/tmp/{}", "x".repeat(120)));
        assert!(matches!(choose_endpoint(&long).unwrap(), Endpoint::Tcp { port } if port > 0));
    }
}
