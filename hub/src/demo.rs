//! `fleet-hub demo`: the hub on its private database, a simulated fleet served in-process
//! over loopback HTTP (a few clusters with injected faults), the sample rollout
//! `[Prep];[Upgrade];[AbortOnFailure];[FinalizeUpgrade]`, a live view of its progress and a
//! final table; then a second rollout of a seed the registry does not have, which its
//! canaries and failure budget halt. The REST API answers throughout.
//!
//! The demo keeps its own database (`./.fleet-hub/demo/pgdata` by default), apart from the
//! one `serve` uses, so its simulated clusters never show up in a real hub's inventory. A
//! signal ends it at any point: what it runs is dropped and its private Postgres stopped.

use std::collections::{BTreeMap, HashMap};
use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::time::Duration;

use fleet_types::ibgu::{ImageBasedGroupUpgrade, ImageBasedGroupUpgradeStatus};
use spoke_core::api::ApiState;
use spoke_core::metrics::AgentMetrics;
use spoke_core::report::HubLink;
use spoke_sim::{Fault, SimConfig};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::cli::DemoArgs;
use crate::db::Database;
use crate::engine::{Engine, SystemClock};
use crate::error::Error;
use crate::http::{self, AppState};
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use crate::store;

/// Which simulated clusters misbehave, and how (cluster number, fault).
const FAULTS: &[(u32, Fault, &str)] = &[
    (3, Fault::Prep, "stateroot setup fails"),
    (
        7,
        Fault::Restore,
        "OADP restore fails after the reboot: automatic rollback",
    ),
    (12, Fault::Backup, "OADP backup fails before the reboot"),
];
/// The seed of the second, bad rollout: a tag the registry does not have.
const BAD_SEED: &str = "quay.io/openshift-kni/seed-image:4.16.0-rc.9";
/// Clusters labelled `lcm.openshift.io/canary`: the bad rollout tries its seed on these first.
const CANARIES: u32 = 3;
const JOIN_TOKEN_LEN: usize = 32;
/// The hub's usual address (`serve`'s default), taken when free.
const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// How often the live view redraws.
const REFRESH: Duration = Duration::from_millis(400);

pub async fn run(mut args: DemoArgs, shutdown: Shutdown) -> Result<(), Error> {
    if args.clusters == 0 {
        return Err(Error::Invalid("--clusters must be at least 1".into()));
    }
    println!(
        "fleet-hub demo: {} simulated single-node clusters, an image-based upgrade, then one of a \
         bad seed that its canaries stop\n",
        args.clusters
    );
    if args.database_url.is_none()
        && args.data_dir == std::path::Path::new(crate::cli::DEMO_DATA_DIR)
        && let Some(blocked) = crate::embedded_pg::unreachable_by_server(&args.data_dir)
    {
        // Run as root from a home directory (mode 0700), say: the server's `postgres` user
        // cannot enter it. The demo's scratch database then lives where it can.
        let elsewhere = std::env::temp_dir().join("fleet-hub-demo/pgdata");
        println!(
            "  note       the postgres user cannot enter {}: the demo's database goes under {}",
            blocked.display(),
            elsewhere.display()
        );
        args.data_dir = elsewhere;
    }
    let db = Database::open(args.database_url.as_deref(), &args.data_dir).await?;
    // Opening is not cut short (it may be creating the cluster); a signal that came
    // meanwhile is acted on now.
    let stay = args.stay;
    let outcome = match shutdown.requested() {
        Some(signal) => Err(Error::Interrupted(signal)),
        None => tokio::select! {
            r = demo(&db, args) => r,
            signal = shutdown.wait() => Err(Error::Interrupted(signal)),
        },
    };
    // With --stay, the hub and the fleet serve (their tasks held) until the signal, which is
    // then the demo's normal end. The wait is outside the race above, so its outcome cannot
    // depend on which of the two a signal wakes first.
    if outcome.is_ok() && stay {
        shutdown.wait().await;
    }
    // The hub and the fleet stop before their database does.
    let outcome = outcome.map(drop);
    let closed = db.close().await;
    outcome.and(closed)
}

/// Runs the demo to its summary; answers the tasks that serve the hub and the fleet (they
/// stop when the set is dropped: nothing the demo started outlives it).
async fn demo(db: &Database, args: DemoArgs) -> Result<JoinSet<()>, Error> {
    let DemoArgs {
        clusters,
        database_url: _,
        data_dir,
        listen,
        sim_step_ms,
        sim_reboot_ms,
        fleet_listen,
        stay,
    } = args;
    if db.is_embedded() {
        println!(
            "  database   private Postgres under {} ({})",
            data_dir.display(),
            db.url
        );
    } else {
        println!("  database   {}", db.url);
    }
    let mut tasks = JoinSet::new();

    // The hub: engine and REST API.
    let metrics = Metrics::new()?;
    let engine = Engine::new(db.pool.clone(), Arc::new(SystemClock), metrics.clone());
    tasks.spawn(engine.clone().run());
    let join_token = uuid::Uuid::new_v4().simple().to_string()[..JOIN_TOKEN_LEN].to_string();
    let state = AppState {
        pool: db.pool.clone(),
        metrics,
        engine: engine.clone(),
        admin_token: None,
        viewer_tokens: Vec::new(),
        join_token: Some(join_token.clone()),
        join_token_file: None,
        credential_ttl: crate::http::CREDENTIAL_TTL,
        kube_auth: None,
    };
    let listener = match listen {
        Some(listen) => TcpListener::bind(listen).await.map_err(|source| {
            Error::unavailable(
                &format!("listening on {listen} (choose another with --listen)"),
                source,
            )
        })?,
        // The usual port when it is free, else any: the demo must start on a busy machine.
        None => match TcpListener::bind(DEFAULT_LISTEN).await {
            Ok(l) => l,
            Err(_) => TcpListener::bind("127.0.0.1:0")
                .await
                .map_err(|source| Error::unavailable("listening on 127.0.0.1:0", source))?,
        },
    };
    let hub_addr = listener
        .local_addr()
        .map_err(|source| Error::unavailable("listening on the hub's address", source))?;
    tasks.spawn(async move {
        let _ = axum::serve(listener, http::router(state)).await;
    });
    let hub_url = format!("http://{hub_addr}");
    println!("  hub API    {hub_url}   (try: curl -s {hub_url}/v1/rollouts | jq)");

    // The fleet: simulated agents on one loopback listener, registering like real ones.
    let fleet_dir = data_dir
        .parent()
        .unwrap_or(std::path::Path::new("."))
        .join("fleet");
    let _ = std::fs::remove_dir_all(&fleet_dir);
    let fleet_listener = TcpListener::bind(fleet_listen).await.map_err(|source| {
        Error::unavailable(
            &format!("listening on {fleet_listen} (choose another with --fleet-listen)"),
            source,
        )
    })?;
    let fleet_url = format!(
        "http://{}",
        fleet_listener
            .local_addr()
            .map_err(|source| Error::unavailable("listening on the fleet's address", source))?
    );
    let metrics = AgentMetrics::new()?;
    let mut agents = HashMap::new();
    for i in 1..=clusters {
        let name = format!("spoke{i}");
        let faults = FAULTS
            .iter()
            .filter(|(n, _, _)| *n == i)
            .map(|(_, f, _)| *f)
            .collect();
        let config = SimConfig {
            current_version: "4.15.0".into(),
            step: Duration::from_millis(sim_step_ms),
            reboot: Duration::from_millis(sim_reboot_ms),
            faults,
            missing_images: [BAD_SEED.to_string()].into(),
            ..Default::default()
        };
        let mut labels = BTreeMap::from([
            ("name".into(), name.clone()),
            ("demo".into(), "true".into()),
        ]);
        if i <= CANARIES {
            labels.insert(fleet_types::labels::CANARY_LABEL.into(), String::new());
        }
        let link = HubLink {
            hub_urls: vec![hub_url.clone()],
            current: Default::default(),
            join_token: join_token.clone(),
            endpoint: format!("{fleet_url}/clusters/{name}"),
            labels,
            agent_id: uuid::Uuid::new_v4().to_string(),
            client: HubLink::client(),
            certificate: None,
            requests: None,
        };
        let agent = spoke_sim::start_agent(
            name.clone(),
            &fleet_dir.join(&name),
            config,
            &metrics,
            Some(link),
        )
        .await
        .map_err(|e| Error::internal("starting a simulated agent", e))?;
        agents.insert(name, agent);
    }
    let fleet_state = Arc::new(ApiState {
        agents,
        single: None,
        api_token: None,
        metrics,
    });
    tasks.spawn(async move {
        let _ = axum::serve(fleet_listener, spoke_core::api::router(fleet_state)).await;
    });
    println!("  fleet      {clusters} agents under {fleet_url}/clusters/<name>");
    for (n, _, what) in FAULTS.iter().filter(|(n, _, _)| *n <= clusters) {
        println!("             spoke{n}: {what}");
    }

    // Wait for every agent to register and report, and start clean: no labels of an
    // earlier demo's rollout, no cluster of an earlier, larger demo.
    let names: Vec<String> = (1..=clusters).map(|i| format!("spoke{i}")).collect();
    for old in store::cluster_list(&db.pool).await? {
        if old.labels.get("demo").is_some_and(|v| v == "true") && !names.contains(&old.name) {
            store::cluster_delete(&db.pool, &old.name).await?;
            let why = "a cluster of an earlier, larger demo; its credential is revoked";
            audit(&db.pool, "delete", "clusters", None, &old.name, why).await;
        }
    }
    loop {
        let known = store::cluster_list(&db.pool).await?;
        let ready = names
            .iter()
            .filter(|n| known.iter().any(|c| &c.name == *n && c.ibu.is_some()))
            .count();
        if ready == names.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for n in &names {
        let stale: serde_json::Map<String, serde_json::Value> = store::cluster_fetch(&db.pool, n)
            .await?
            .map(|c| {
                c.labels
                    .into_keys()
                    .filter(|k| fleet_types::labels::is_ibgu_label(k))
                    .map(|k| (k, serde_json::Value::Null))
                    .collect()
            })
            .unwrap_or_default();
        if !stale.is_empty() {
            store::cluster_patch_labels(&db.pool, n, &stale).await?;
            let why = "the ibgu-* labels of an earlier demo removed";
            audit(&db.pool, "patch", "clusters", None, n, why).await;
        }
    }

    let name = format!("demo-{}", chrono::Utc::now().format("%Y%m%d-%H%M%S"));
    let plan = serde_json::json!([
        {"actions": ["Prep"], "rolloutStrategy": {"maxConcurrency": 5, "timeout": 30}},
        {"actions": ["Upgrade"], "rolloutStrategy": {"maxConcurrency": 5, "timeout": 30}},
        {"actions": ["AbortOnFailure"], "rolloutStrategy": {"maxConcurrency": 5, "timeout": 10}},
        {"actions": ["FinalizeUpgrade"], "rolloutStrategy": {"maxConcurrency": 5, "timeout": 10}}
    ]);
    let seed = "quay.io/openshift-kni/seed-image:4.16.0";
    store_rollout(db, &name, seed, plan, "the demo's rollout").await?;
    engine.trigger();
    println!(
        "  rollout    default/{name}: [Prep];[Upgrade];[AbortOnFailure];[FinalizeUpgrade], 5 clusters per batch"
    );
    println!("             curl -s {hub_url}/v1/rollouts/default/{name} | jq .status");
    println!("             curl -s {hub_url}/v1/rollouts/default/{name}/history | jq\n");

    let final_status = watch(db, &name).await?;
    println!(
        "\n{}",
        render_summary(&final_status, &store::cluster_list(&db.pool).await?)
    );
    let succeeded = final_status
        .conditions
        .iter()
        .find(|c| c.type_ == "Succeeded")
        .map(|s| format!("Succeeded={:?}: {}", s.status, s.message));
    if let Some(line) = &succeeded {
        println!("{line}");
    }

    // A second rollout with a seed the registry does not have: the canaries fail, the
    // failure budget halts it, the rest of the fleet is never touched.
    let bad = bad_rollout(db, &name).await?;
    engine.trigger();
    println!(
        "\n  rollout    default/{bad}: [Prep] of seed {BAD_SEED} (not in the registry),\n             \
         {CANARIES} canaries (lcm.openshift.io/canary) first, maxFailures 2\n"
    );
    let bad_status = watch(db, &bad).await?;
    let touched = bad_status.clusters.len();
    println!(
        "\n  halted     {touched} of {} cluster(s) tried the bad seed; the others were never touched",
        bad_status.summary.first().map_or(0, |s| s.selected)
    );
    for c in &bad_status.clusters {
        for a in &c.failed_actions {
            println!("             {} {}: {}", c.name, a.action, a.message);
        }
    }
    println!("             curl -s {hub_url}/v1/rollouts/default/{bad}/history | jq\n");
    // The first rollout's outcome is the demo's last word.
    if let Some(line) = &succeeded {
        println!("{name}: {line}");
    }
    if stay {
        println!(
            "\nstill serving until Ctrl-C: hub {hub_url} (/metrics), fleet {fleet_url} (/metrics)\n\
             history: curl -s {hub_url}/v1/rollouts/default/{name}/history | jq"
        );
    } else {
        println!("{}", after_exit_hint(db, &data_dir, &name));
    }
    Ok(tasks)
}

/// The live view of one rollout until it ends (completed or halted): answers its status.
async fn watch(db: &Database, name: &str) -> Result<ImageBasedGroupUpgradeStatus, Error> {
    let tty = std::io::stdout().is_terminal();
    let mut drawn = 0usize;
    let mut last_text = String::new();
    loop {
        let row = store::rollout_fetch(&db.pool, "default", name).await?;
        let Some(row) = row else {
            return Err(Error::Internal(format!(
                "rollout default/{name} disappeared"
            )));
        };
        let status = row.object.status.clone().unwrap_or_default();
        let text = render_progress(&row.object, &status);
        if tty {
            if drawn > 0 {
                print!("\x1b[{drawn}A\x1b[J");
            }
            print!("{text}");
            drawn = text.lines().count();
        } else if text != last_text {
            print!("{text}");
        }
        let _ = std::io::stdout().flush();
        last_text = text;
        if row.phase == "Completed" {
            return Ok(status);
        }
        tokio::time::sleep(REFRESH).await;
    }
}

/// Stores the demo's bad rollout (after the good one, `first`): answers its name.
async fn bad_rollout(db: &Database, first: &str) -> Result<String, Error> {
    let name = format!("{first}-bad-seed");
    let plan = serde_json::json!([
        {"actions": ["Prep"], "rolloutStrategy": {"maxConcurrency": 5, "timeout": 30,
          "canaryClusters": CANARIES, "batchGrowthFactor": 2, "maxFailures": 2}}
    ]);
    let why = "the demo's rollout of a seed the registry does not have";
    store_rollout(db, &name, BAD_SEED, plan, why).await?;
    Ok(name)
}

/// Stores one of the demo's rollouts over its clusters (and says so in the audit trail).
async fn store_rollout(
    db: &Database,
    name: &str,
    seed: &str,
    plan: serde_json::Value,
    why: &str,
) -> Result<(), Error> {
    let ibgu: ImageBasedGroupUpgrade = serde_json::from_value(serde_json::json!({
        "apiVersion": "lcm.openshift.io/v1alpha1",
        "kind": "ImageBasedGroupUpgrade",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "clusterLabelSelectors": [{"matchLabels": {"demo": "true"}}],
            "ibuSpec": {"seedImageRef": {"version": "4.16.0", "image": seed}},
            "plan": plan
        }
    }))
    .map_err(|e| Error::internal("the demo's rollout", e))?;
    store::rollout_insert(&db.pool, &ibgu).await?;
    audit(&db.pool, "create", "rollouts", Some("default"), name, why).await;
    Ok(())
}

/// How to run this very binary from here: `target/release/fleet-hub` after `cargo run`.
fn self_command() -> String {
    let exe = std::env::current_exe().ok();
    let cwd = std::env::current_dir().ok();
    match (exe, cwd) {
        (Some(exe), Some(cwd)) => match exe.strip_prefix(&cwd) {
            Ok(relative) => relative.display().to_string(),
            Err(_) => exe.display().to_string(),
        },
        _ => "fleet-hub".to_string(),
    }
}

/// What still works once the demo has exited (its hub and, for the private database, the
/// database too are stopped by then).
fn after_exit_hint(db: &Database, data_dir: &std::path::Path, rollout: &str) -> String {
    let history = format!("curl -s http://127.0.0.1:8080/v1/rollouts/default/{rollout}/history");
    let serve = if db.is_embedded() {
        format!("{} serve --data-dir {}", self_command(), data_dir.display())
    } else {
        format!("{} serve --database-url '{}'", self_command(), db.url)
    };
    format!(
        "\nThe demo's hub has stopped; the rollout and its history are kept in its database.\n\
         To browse them, serve that database and ask the API:\n  \
         {serve}\n  \
         {history} | jq\n\
         or run the demo again with --stay to keep it serving after the rollout."
    )
}

fn bar(done: u32, failed: u32, running: u32, total: u32) -> String {
    const WIDTH: u32 = 30;
    if total == 0 {
        return format!("[{}]", " ".repeat(WIDTH as usize));
    }
    let cells = |n: u32| (n * WIDTH).div_ceil(total).min(WIDTH) as usize;
    let (d, f, r) = (cells(done), cells(failed), cells(running));
    let used = (d + f + r).min(WIDTH as usize);
    format!(
        "[{}{}{}{}]",
        "#".repeat(d),
        "x".repeat(f.min(WIDTH as usize - d)),
        ">".repeat(r.min((WIDTH as usize).saturating_sub(d + f))),
        ".".repeat(WIDTH as usize - used)
    )
}

/// One line per plan step: done / failed / running / pending with a bar.
pub fn render_progress(
    ibgu: &ImageBasedGroupUpgrade,
    status: &ImageBasedGroupUpgradeStatus,
) -> String {
    let mut out = String::new();
    for (i, item) in ibgu.spec.plan.iter().enumerate() {
        let actions: Vec<&str> = item.actions.iter().map(|a| a.as_str()).collect();
        let label = format!("step {i} [{}]", actions.join(","));
        match status.summary.get(i) {
            Some(s) => {
                let failed = s.failed + s.timed_out;
                out.push_str(&format!(
                    "{label:<24} {} {:>3} done {:>3} failed {:>3} running {:>3} pending  of {}\n",
                    bar(s.completed, failed, s.in_progress, s.selected),
                    s.completed,
                    failed,
                    s.in_progress,
                    s.pending,
                    s.selected
                ));
            }
            None => out.push_str(&format!("{label:<24} {} not started\n", bar(0, 0, 0, 0))),
        }
    }
    if let Some(c) = status.conditions.first() {
        let halted =
            c.status == fleet_types::ibu::ConditionStatus::False && c.reason != "Completed";
        if halted {
            out.push_str(&format!("HALTED ({}): {}\n", c.reason, c.message));
        } else {
            out.push_str(&format!("{}\n", c.message));
        }
    }
    if let Some(p) = status.conditions.iter().find(|c| c.type_ == "Paused") {
        out.push_str(&format!("PAUSED: {}\n", p.message));
    }
    out
}

/// The final table: per cluster (in natural name order), its outcome and its labels; then
/// each failure with its whole message, which a table column would cut.
pub fn render_summary(
    status: &ImageBasedGroupUpgradeStatus,
    clusters: &[store::ClusterRecord],
) -> String {
    let mut out = format!(
        "{:<10} {:<44} {:<16} {}\n",
        "CLUSTER", "COMPLETED", "FAILED", "IBGU LABELS"
    );
    let mut rows: Vec<_> = status.clusters.iter().collect();
    rows.sort_by(|a, b| fleet_types::names::natural_cmp(&a.name, &b.name));
    let mut failures = String::new();
    for c in rows {
        let actions = |list: &[fleet_types::ibgu::ActionMessage]| -> Vec<String> {
            list.iter().map(|a| a.action.to_string()).collect()
        };
        let (done, failed) = (actions(&c.completed_actions), actions(&c.failed_actions));
        for a in &c.failed_actions {
            failures.push_str(&format!("  {} {}: {}\n", c.name, a.action, a.message));
        }
        let labels: Vec<String> = clusters
            .iter()
            .find(|x| x.name == c.name)
            .map(|x| {
                x.labels
                    .keys()
                    .filter(|k| fleet_types::labels::is_ibgu_label(k))
                    .map(|k| {
                        k.trim_start_matches(fleet_types::labels::IBGU_LABEL_PREFIX)
                            .to_string()
                    })
                    .collect()
            })
            .unwrap_or_default();
        let or_dash = |v: Vec<String>| {
            if v.is_empty() {
                "-".into()
            } else {
                v.join(",")
            }
        };
        out.push_str(&format!(
            "{:<10} {:<44} {:<16} {}\n",
            c.name,
            or_dash(done),
            or_dash(failed),
            or_dash(labels),
        ));
    }
    if !failures.is_empty() {
        out.push_str("\nFailures:\n");
        out.push_str(&failures);
    }
    out
}

/// Notes a change the demo makes itself (not through the API) in the audit trail.
async fn audit(
    pool: &sqlx::PgPool,
    verb: &str,
    resource: &str,
    namespace: Option<&str>,
    name: &str,
    message: &str,
) {
    let entry = store::AuditEntry {
        time: chrono::Utc::now(),
        actor: "demo".into(),
        verb: verb.into(),
        resource: resource.into(),
        namespace: namespace.map(str::to_string),
        name: Some(name.to_string()),
        message: message.into(),
        ..store::AuditEntry::default()
    };
    if let Err(err) = store::audit_insert(pool, &entry).await {
        tracing::error!(%err, "writing the audit trail failed");
    }
}
