//! fleet-hub as a process: its own Postgres, signals, restart, flags, the demo as the
//! README runs it.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fleet_e2e::{binary, free_port, readme, wait_for};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::AsyncBufReadExt;

/// Generous: the first start runs initdb.
const START_DEADLINE: Duration = Duration::from_secs(90);

/// A hub serving from `work_dir` with the default data directory; its log goes to
/// `work_dir/hub.log` (kept out of the test output, shown when an assertion fails).
fn start_hub(work_dir: &Path, port: u16) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(work_dir.join("hub.log"))
        .expect("hub log");
    Command::new(binary("fleet-hub"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .current_dir(work_dir)
        .env_remove("DATABASE_URL")
        .env_remove("FLEET_HUB_DATA_DIR")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("fleet-hub starts")
}

fn hub_log(work_dir: &Path) -> String {
    std::fs::read_to_string(work_dir.join("hub.log")).unwrap_or_default()
}

/// The process id of the Postgres server running on `data_dir`, from its `postmaster.pid`.
fn postmaster(data_dir: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    text.lines().next()?.trim().parse().ok()
}

/// Whether a process runs (a zombie no longer does: nothing may have reaped it yet here).
fn running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().to_string())
        })
        .is_some_and(|rest| !rest.starts_with('Z'))
}

/// No Postgres is left on `data_dir`: no pid file, and the server that had it is gone.
fn assert_no_server(data_dir: &Path, server: i32, context: &str) {
    assert!(
        !data_dir.join("postmaster.pid").exists(),
        "{context}: postmaster.pid is still there"
    );
    assert!(!running(server), "{context}: Postgres {server} still runs");
}

fn signal(child: &Child, sig: Signal) {
    kill(Pid::from_raw(child.id() as i32), sig).expect("signal the hub");
}

async fn exit_status(child: &mut Child) -> std::process::ExitStatus {
    wait_for("fleet-hub to exit", Duration::from_secs(60), || {
        let exited = child.try_wait().expect("wait");
        async move { exited }
    })
    .await
}

async fn wait_ready(port: u16) {
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/readyz");
    wait_for("fleet-hub /readyz to answer 200", START_DEADLINE, || {
        let req = client.get(&url).send();
        async move {
            match req.await {
                Ok(r) if r.status() == 200 => Some(()),
                _ => None,
            }
        }
    })
    .await;
}

async fn terminate(mut child: Child) {
    signal(&child, Signal::SIGTERM);
    let status = exit_status(&mut child).await;
    assert!(status.success(), "SIGTERM exits 0, got {status}");
}

#[tokio::test]
async fn serve_with_no_configuration_runs_its_own_postgres_and_keeps_data() {
    let work = tempfile::tempdir().unwrap();
    // Running as root, the private Postgres runs as `postgres`, which must reach the directory.
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let data_dir = work.path().join(".fleet-hub/pgdata");

    let port = free_port();
    let hub = start_hub(work.path(), port);
    wait_ready(port).await;
    assert!(
        data_dir.join("PG_VERSION").is_file(),
        "created under ./.fleet-hub/pgdata"
    );
    let created = std::fs::metadata(data_dir.join("PG_VERSION"))
        .unwrap()
        .modified()
        .unwrap();
    let server = postmaster(&data_dir).expect("the private Postgres runs");
    terminate(hub).await;
    assert_no_server(&data_dir, server, "after SIGTERM");

    let port = free_port();
    let hub = start_hub(work.path(), port);
    wait_ready(port).await;
    let reused = std::fs::metadata(data_dir.join("PG_VERSION"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(created, reused, "the second start reuses the same cluster");
    // Postgres's NOTICE that the migrations table exists is not logged at every start.
    let log = hub_log(work.path());
    assert!(log.contains("database ready and migrated"), "{log}");
    assert!(!log.contains("_sqlx_migrations"), "{log}");
    // Ctrl-C stops it the same way.
    let server = postmaster(&data_dir).expect("the private Postgres runs");
    let mut hub = hub;
    signal(&hub, Signal::SIGINT);
    let status = exit_status(&mut hub).await;
    assert!(status.success(), "SIGINT drains and exits 0, got {status}");
    assert_no_server(&data_dir, server, "after SIGINT");
}

#[tokio::test]
async fn a_hub_killed_outright_leaves_postgres_to_the_next_which_stops_it() {
    let work = tempfile::tempdir().unwrap();
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let data_dir = work.path().join(".fleet-hub/pgdata");

    let port = free_port();
    let mut first = start_hub(work.path(), port);
    wait_ready(port).await;
    let server = postmaster(&data_dir).expect("the private Postgres runs");
    // SIGKILL cannot be caught: the server outlives the hub.
    signal(&first, Signal::SIGKILL);
    exit_status(&mut first).await;
    assert!(running(server), "Postgres outlives a hub killed outright");

    let port = free_port();
    let second = start_hub(work.path(), port);
    wait_ready(port).await;
    assert_eq!(
        postmaster(&data_dir),
        Some(server),
        "adopted, not restarted"
    );
    terminate(second).await;
    assert_no_server(&data_dir, server, "the adopter stops what it adopted");
    let log = hub_log(work.path());
    assert!(log.contains("adopting the embedded Postgres"), "{log}");
}

#[tokio::test]
async fn an_error_after_the_start_of_postgres_stops_it() {
    let work = tempfile::tempdir().unwrap();
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let data_dir = work.path().join(".fleet-hub/pgdata");
    // The listen address is taken: the hub fails after its database is up.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let mut hub = start_hub(work.path(), port);
    let status = exit_status(&mut hub).await;
    assert_eq!(status.code(), Some(1), "{}", hub_log(work.path()));
    let log = hub_log(work.path());
    assert!(log.contains("embedded Postgres started"), "{log}");
    assert!(log.contains("Address already in use"), "{log}");
    assert!(
        !data_dir.join("postmaster.pid").exists(),
        "the failed hub stopped its Postgres: {log}"
    );
}

#[tokio::test]
async fn kube_mode_without_a_cluster_says_so_before_starting() {
    let empty = tempfile::tempdir().unwrap();
    let out = Command::new(binary("fleet-hub"))
        .args(["serve", "--kube"])
        .env_remove("DATABASE_URL")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("KUBECONFIG", empty.path().join("missing-kubeconfig"))
        .env("HOME", empty.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--kube: no Kubernetes configuration"), "{err}");
}

#[tokio::test]
async fn help_documents_every_contract_flag() {
    let help = |bin: &str, sub: &str| {
        let out = Command::new(binary(bin))
            .args([sub, "--help"])
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    };
    let serve = help("fleet-hub", "serve");
    for flag in [
        "--listen",
        "FLEET_HUB_LISTEN",
        "--database-url",
        "DATABASE_URL",
        "--admin-token",
        "FLEET_HUB_ADMIN_TOKEN",
        "--join-token",
        "FLEET_HUB_JOIN_TOKEN",
        "--kube",
        "--data-dir",
        "--tls-cert-file",
        "--tls-private-key-file",
        "--insecure-http",
    ] {
        assert!(serve.contains(flag), "fleet-hub serve --help lacks {flag}");
    }
    assert!(help("fleet-hub", "demo").contains("--clusters"));
    let agent = help("spoke-agent", "serve");
    for flag in [
        "--cluster-name",
        "SPOKE_CLUSTER_NAME",
        "--listen",
        "SPOKE_LISTEN",
        "--state-dir",
        "SPOKE_STATE_DIR",
        "--tls-cert-file",
        "SPOKE_TLS_CERT_FILE",
        "--insecure-http",
        "--hub-url",
        "SPOKE_HUB_URL",
        "--join-token",
        "SPOKE_JOIN_TOKEN",
        "--api-token",
        "SPOKE_API_TOKEN",
        "--label",
        "--host",
        "--current-version",
        "--sim-step-ms",
        "--sim-reboot-ms",
        "--fault",
        "--sim-namespace",
        "--sim-crd",
        "--sim-lvms",
        "ostree",
        "--host-root",
        "SPOKE_HOST_ROOT",
        "--host-exec",
        "--cluster-version",
        "--reboot-wait-seconds",
    ] {
        assert!(
            agent.contains(flag),
            "spoke-agent serve --help lacks {flag}"
        );
    }
    let fleet = help("spoke-agent", "sim-fleet");
    for flag in [
        "--count",
        "--prefix",
        "--listen",
        "--state-dir",
        "--hub-url",
        "--join-token",
        "--label",
        "--fault",
        "--sim-step-ms",
    ] {
        assert!(
            fleet.contains(flag),
            "spoke-agent sim-fleet --help lacks {flag}"
        );
    }
}

/// The README's main command as the tests run it: the binary `cargo run -p PACKAGE` runs,
/// with the README's arguments. Extra flags only make the simulated fleet faster.
fn readme_demo() -> Command {
    let (main, _) = readme::two_commands();
    let run = readme::parse_cargo_run(&main).unwrap_or_else(|e| panic!("README: {e}"));
    let bin = readme::default_run(&run.package)
        .unwrap_or_else(|| panic!("package {} has no default-run", run.package));
    let mut cmd = Command::new(binary(&bin));
    cmd.args(&run.args)
        .args(["--listen", "127.0.0.1:0", "--sim-step-ms", "20"])
        .env_remove("DATABASE_URL")
        .env_remove("FLEET_HUB_DEMO_DATA_DIR")
        .env_remove("FLEET_HUB_LISTEN");
    cmd
}

#[test]
fn the_readme_commands_are_the_ones_ci_and_the_demo_test_run() {
    let (main, tests) = readme::two_commands();
    let run = readme::parse_cargo_run(&main).unwrap();
    assert_eq!(run.package, "hub", "{main}");
    assert!(run.release, "the main command builds optimised: {main}");
    assert_eq!(run.args, ["demo"], "{main}");
    assert_eq!(
        readme::default_run("hub").as_deref(),
        Some("fleet-hub"),
        "`cargo run -p hub` must know which binary to run"
    );
    assert_eq!(tests, "bash .ci/run");
    let ci = std::fs::read_to_string(readme::workspace().join(".ci/run")).unwrap();
    assert!(
        ci.lines()
            .any(|l| l.trim_start().starts_with("cargo test --workspace")),
        ".ci/run runs the workspace's tests"
    );
    // CI also runs the main command verbatim, as read from the README.
    assert!(
        ci.contains("readme_main_command") && ci.contains("eval \"$main\""),
        ".ci/run runs the README's main command"
    );
}

/// The README's demo run in `dir` to its end; it must exit 0.
async fn finished_demo(dir: &Path, extra: &[&str]) -> std::process::Output {
    let out = tokio::process::Command::from(readme_demo())
        .args(extra)
        .args(["--sim-reboot-ms", "50"])
        .current_dir(dir)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), out)
        .await
        .expect("the demo finishes")
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[tokio::test]
async fn the_demo_runs_start_to_finish_on_its_own_database() {
    let work = tempfile::tempdir().unwrap();
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = finished_demo(work.path(), &["--clusters", "5"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("All plan steps are completed"), "{text}");
    let row = |name: &str| {
        text.lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or("")
            .to_string()
    };
    // spoke3 fails its Prep by design, and the whole message is shown; the others finish
    // the whole plan. Rows come in natural order.
    assert!(row("spoke3").contains(" Prep "), "{text}");
    assert!(
        text.contains("Failures:\n  spoke3 Prep: failed to setup stateroot"),
        "{text}"
    );
    assert!(
        row("spoke1").contains("Prep,Upgrade,FinalizeUpgrade"),
        "{text}"
    );
    assert!(
        text.contains("Succeeded=False: 1 of 5 cluster(s) failed an action"),
        "{text}"
    );
    // The second rollout's seed is not in the registry: its three canaries fail, the
    // failure budget halts it, shown in the live view; no other cluster is touched.
    assert!(
        text.contains(
            "HALTED (FailureBudgetExceeded): plan step 0: 3 cluster(s) failed, more than \
             maxFailures 2"
        ),
        "{text}"
    );
    assert!(
        text.contains("3 of 5 cluster(s) tried the bad seed; the others were never touched"),
        "{text}"
    );
    assert!(text.contains("manifest unknown"), "{text}");
    // The hint after the summary names what works once the demo has exited.
    assert!(
        text.contains("fleet-hub serve --data-dir ./.fleet-hub/demo/pgdata"),
        "{text}"
    );
    assert!(!text.contains("Ctrl-C"), "{text}");
    // Its own database, apart from the one `serve` uses; stopped with the demo.
    let data_dir = work.path().join(".fleet-hub/demo/pgdata");
    assert!(data_dir.join("PG_VERSION").is_file());
    assert!(!work.path().join(".fleet-hub/pgdata").exists());
    assert!(
        !data_dir.join("postmaster.pid").exists(),
        "its Postgres is stopped"
    );
    // Nothing but the demo's own output: no log lines, no colour codes.
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("WARN") && !err.contains('\x1b'), "{err}");
    assert!(!text.contains('\x1b'), "no terminal codes in a pipe");
}

/// The demo's changes, those through the API and its own, are in the audit trail: a second,
/// smaller demo on the same database shows it removing what the first left.
#[tokio::test]
async fn the_demo_leaves_an_audit_trail_of_every_change() {
    let db = fleet_e2e::TestDb::empty().await;
    let work = tempfile::tempdir().unwrap();
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    for clusters in ["3", "2"] {
        finished_demo(
            work.path(),
            &["--clusters", clusters, "--database-url", &db.url()],
        )
        .await;
    }
    let rows: Vec<(String, String, String, Option<String>)> =
        sqlx::query_as("SELECT actor, verb, resource, name FROM audit ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let rows: Vec<String> = rows
        .into_iter()
        .map(|(actor, verb, resource, name)| {
            let name = name.unwrap_or_default();
            // The rollouts' names carry the time of the demo.
            let name = if name.starts_with("demo-") {
                "demo-<time>".into()
            } else {
                name
            };
            format!("{actor} {verb} {resource} {name}")
        })
        .collect();
    let mut first: Vec<&str> = rows[..3].iter().map(String::as_str).collect();
    first.sort();
    assert_eq!(
        first,
        [
            "join-token register clusters spoke1",
            "join-token register clusters spoke2",
            "join-token register clusters spoke3"
        ],
        "{rows:#?}"
    );
    // The good rollout, then the one of a bad seed.
    assert_eq!(rows[3], "demo create rollouts demo-<time>", "{rows:#?}");
    assert_eq!(rows[4], "demo create rollouts demo-<time>", "{rows:#?}");
    let mut second: Vec<&str> = rows[5..].iter().map(String::as_str).collect();
    second.sort();
    // The bad seed's canaries kept their prep-failed labels: the next demo removes them.
    assert_eq!(
        second,
        [
            "demo create rollouts demo-<time>",
            "demo create rollouts demo-<time>",
            "demo delete clusters spoke3",
            "demo patch clusters spoke1",
            "demo patch clusters spoke2",
            "join-token register clusters spoke1",
            "join-token register clusters spoke2",
        ],
        "{rows:#?}"
    );
}

/// Lines of the demo's standard output, as they come.
struct DemoOutput(tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>);

impl DemoOutput {
    async fn until(&mut self, what: &str) -> String {
        let mut seen = String::new();
        let found = tokio::time::timeout(START_DEADLINE, async {
            while let Ok(Some(line)) = self.0.next_line().await {
                seen.push_str(&line);
                seen.push('\n');
                if line.contains(what) {
                    return true;
                }
            }
            false
        })
        .await;
        assert_eq!(found, Ok(true), "the demo never printed {what:?}:\n{seen}");
        seen
    }
}

fn start_demo(work: &Path, extra: &[&str]) -> (tokio::process::Child, DemoOutput, PathBuf) {
    let mut child = tokio::process::Command::from(readme_demo())
        .args(["--clusters", "3"])
        .args(extra)
        .current_dir(work)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("the demo starts");
    let lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    (
        child,
        DemoOutput(lines),
        work.join(".fleet-hub/demo/pgdata"),
    )
}

#[tokio::test]
async fn the_demo_stops_its_postgres_on_sigterm_and_ctrl_c() {
    let work = tempfile::tempdir().unwrap();
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();

    // --stay: after the rollout it serves until a signal, which is then its normal end.
    let (mut demo, mut out, data_dir) = start_demo(work.path(), &["--stay"]);
    out.until("still serving until Ctrl-C").await;
    let server = postmaster(&data_dir).expect("the demo's Postgres runs");
    kill(Pid::from_raw(demo.id().unwrap() as i32), Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(60), demo.wait())
        .await
        .expect("the demo exits")
        .unwrap();
    assert!(status.success(), "SIGTERM after the rollout: {status}");
    assert_no_server(&data_dir, server, "demo --stay after SIGTERM");

    // Ctrl-C in the middle of the rollout: the demo stops short and says so by its code.
    let (mut demo, mut out, data_dir) = start_demo(work.path(), &["--sim-reboot-ms", "60000"]);
    out.until("rollout    default/").await;
    let server = postmaster(&data_dir).expect("the demo's Postgres runs");
    kill(Pid::from_raw(demo.id().unwrap() as i32), Signal::SIGINT).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(60), demo.wait())
        .await
        .expect("the demo exits")
        .unwrap();
    assert_eq!(status.code(), Some(130), "interrupted mid-rollout");
    assert_no_server(&data_dir, server, "demo after SIGINT mid-rollout");
}

/// Run as root from a directory the `postgres` user cannot enter (a home directory), the
/// README's main command still works: the demo puts its scratch database where it can.
#[tokio::test]
async fn the_demo_runs_as_root_from_a_private_directory() {
    if !nix::unistd::Uid::effective().is_root() {
        return; // Not root: the server runs as this user, who can enter its own directory.
    }
    let work = tempfile::tempdir().unwrap();
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let out = finished_demo(work.path(), &["--clusters", "2"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("the postgres user cannot enter") && text.contains("fleet-hub-demo/pgdata"),
        "{text}"
    );
    assert!(text.contains("All plan steps are completed"), "{text}");
}

#[test]
fn a_viewer_token_without_an_admin_token_is_refused() {
    let out = Command::new(binary("fleet-hub"))
        .args(["serve", "--viewer-token", "v"])
        .env_remove("DATABASE_URL")
        .env_remove("FLEET_HUB_ADMIN_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--viewer-token needs --admin-token: without it the API is open to everyone"),
        "{err}"
    );
}

#[tokio::test]
async fn the_join_token_file_is_read_again_when_it_changes() {
    let db = fleet_e2e::TestDb::empty().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("join-token");
    std::fs::write(&file, "first-token\n").unwrap();
    let port = free_port();
    let _hub = fleet_e2e::ChildGuard(
        Command::new(binary("fleet-hub"))
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--database-url", &db.url(), "--admin-token", "s3cret"])
            .arg("--join-token-file")
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_ready(port).await;
    let register = |token: &'static str| async move {
        reqwest::Client::new()
            .post(format!("http://127.0.0.1:{port}/v1/clusters/register"))
            .bearer_auth(token)
            .json(&serde_json::json!({"name": "sno1", "endpoint": "http://127.0.0.1:1"}))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(register("first-token").await, 200);
    // Replaced (as a Secret's file is): the old token is refused at once, the new one taken.
    let tmp = dir.path().join("join-token.tmp");
    std::fs::write(&tmp, "second-token\n").unwrap();
    std::fs::rename(&tmp, &file).unwrap();
    assert_eq!(register("first-token").await, 401);
    assert_eq!(register("second-token").await, 200);
}

/// Every connection is a file: both programs raise their soft open-file limit to the hard
/// one at start, and say so when even that is below what their connection limits need.
#[tokio::test]
async fn both_programs_raise_their_open_file_limit() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let db = fleet_e2e::TestDb::empty().await;
    let port = fleet_e2e::free_port();
    let programs = [
        (
            "fleet-hub",
            vec![
                "serve".to_string(),
                "--listen".into(),
                format!("127.0.0.1:{port}"),
                "--database-url".into(),
                db.url(),
            ],
        ),
        (
            "spoke-agent",
            vec![
                "serve".into(),
                "--cluster-name".into(),
                "sno1".into(),
                "--listen".into(),
                format!("127.0.0.1:{}", fleet_e2e::free_port()),
                "--state-dir".into(),
                dir.path().join("state").display().to_string(),
            ],
        ),
    ];
    for (bin, args) in programs {
        let log = fleet_e2e::ChildLog::new(dir.path(), bin);
        let mut cmd = Command::new(fleet_e2e::binary(bin));
        cmd.args(&args)
            .env_remove("DATABASE_URL")
            .env_remove("SPOKE_HUB_URL")
            .stdout(Stdio::null())
            .stderr(log.stdio());
        // Started with a soft limit of 256 under a hard one of 1024, below what it wants.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::resource::setrlimit(
                    nix::sys::resource::Resource::RLIMIT_NOFILE,
                    256,
                    1024,
                )
                .map_err(std::io::Error::from)
            });
        }
        let child = fleet_e2e::ChildGuard(cmd.spawn().unwrap());
        let limits = format!("/proc/{}/limits", child.pid());
        fleet_e2e::wait_for(
            &format!("{bin} to raise its limit"),
            Duration::from_secs(30),
            || {
                let text = std::fs::read_to_string(&limits).unwrap_or_default();
                let line = text
                    .lines()
                    .find(|l| l.starts_with("Max open files"))
                    .unwrap_or("")
                    .to_string();
                let said = log
                    .text()
                    .contains("the open-file limit is below what the connection limits need");
                async move {
                    (line.split_whitespace().collect::<Vec<_>>().get(3..5)
                        == Some(&["1024", "1024"][..])
                        && said)
                        .then_some(())
                }
            },
        )
        .await;
    }
}
