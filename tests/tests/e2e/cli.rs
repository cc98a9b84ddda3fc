//! `fleet-hub rollout ...` and `fleet-hub cluster ...`, the binary as an operator types it,
//! against a hub driving simulated spokes.

use std::process::Command;

use fleet_e2e::{TestDb, binary};
use spoke_sim::Fault;

use crate::rollout::{ADMIN, start_fleet, start_hub};

/// What one run of `fleet-hub ARGS` printed and how it exited.
struct Ran {
    code: i32,
    out: String,
    err: String,
}

async fn fleet_hub(server: &str, token: &str, args: &[&str]) -> Ran {
    let mut cmd = Command::new(binary("fleet-hub"));
    cmd.args(args)
        .env("FLEET_HUB_SERVER", server)
        .env("FLEET_HUB_TOKEN", token)
        .env_remove("FLEET_HUB_NAMESPACE");
    let out = tokio::task::spawn_blocking(move || cmd.output().expect("fleet-hub runs"))
        .await
        .unwrap();
    Ran {
        code: out.status.code().unwrap_or(-1),
        out: String::from_utf8_lossy(&out.stdout).into_owned(),
        err: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn manifest(name: &str, clusters: &str, plan: &str) -> String {
    format!(
        "apiVersion: lcm.openshift.io/v1alpha1
kind: ImageBasedGroupUpgrade
metadata:
  name: {name}
spec:
  clusterLabelSelectors:
  - matchExpressions:
    - {{key: name, operator: In, values: [{clusters}]}}
  ibuSpec:
    seedImageRef: {{version: 4.16.0, image: quay.io/seed:4.16.0}}
  plan:
{plan}"
    )
}

#[tokio::test]
async fn the_cli_applies_watches_describes_and_labels() {
    let db = TestDb::empty().await;
    let hub = start_hub(&db).await;
    let engine = tokio::spawn(hub.engine.clone().run());
    let _fleet = start_fleet(&hub, &["c1", "c2", "c3"], &[("c3", Fault::Prep)]).await;
    let dir = tempfile::tempdir().unwrap();
    let url = hub.url.clone();
    let run = |args: Vec<String>| {
        let url = url.clone();
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            fleet_hub(&url, ADMIN, &args).await
        }
    };
    let argv = |s: &str| -> Vec<String> { s.split_whitespace().map(str::to_string).collect() };
    let file = dir.path().join("cli.yaml");
    let one_step =
        "  - actions: [Prep, Upgrade]\n    rolloutStrategy: {maxConcurrency: 2, timeout: 30}\n";
    std::fs::write(&file, manifest("cli", "c1, c2, c3", one_step)).unwrap();
    let f = file.display().to_string();

    // The dry run shows the batches; nothing is stored.
    let dry = run(argv(&format!("rollout apply -f {f} --dry-run"))).await;
    assert_eq!(dry.code, 0, "{}", dry.err);
    assert!(dry.out.contains("[c1 c2] [c3]"), "{}", dry.out);
    assert!(run(argv("rollout list")).await.out.lines().count() == 1);

    let created = run(argv(&format!("rollout apply -f {f}"))).await;
    assert_eq!(
        created.out, "rollout default/cli created\n",
        "{}",
        created.err
    );
    // c3 fails its Prep: the rollout finishes with a failure, exit 1.
    let watched = run(argv("rollout watch cli")).await;
    assert_eq!(watched.code, 1, "{}{}", watched.out, watched.err);
    assert!(
        watched.out.contains("step 0 [Prep,Upgrade]"),
        "{}",
        watched.out
    );

    let list = run(argv("rollout list")).await;
    assert!(
        list.out.starts_with("NAMESPACE   NAME   STATE")
            && list.out.contains("default     cli    Completed"),
        "{}",
        list.out
    );
    let json: serde_json::Value =
        serde_json::from_str(&run(argv("rollout get cli -o json")).await.out).unwrap();
    assert_eq!(json["metadata"]["name"], "cli");
    let yaml = run(argv("rollout get cli -o yaml")).await.out;
    assert!(yaml.contains("kind: ImageBasedGroupUpgrade"), "{yaml}");
    let described = run(argv("rollout describe cli")).await.out;
    assert!(
        described.contains("Failed clusters:\n  c3 Prep: "),
        "{described}"
    );
    assert!(described.contains("Succeeded:"), "{described}");
    let history = run(argv("rollout history cli --cluster c3")).await.out;
    assert!(history.contains("ActionFailed"), "{history}");
    assert!(!history.contains(" c1 "), "{history}");

    // Applying the manifest with a step more appends it; the same again changes nothing.
    let two_steps = format!(
        "{one_step}  - actions: [AbortOnFailure]\n    rolloutStrategy: {{maxConcurrency: 2, timeout: 30}}\n"
    );
    std::fs::write(&file, manifest("cli", "c1, c2, c3", &two_steps)).unwrap();
    assert_eq!(
        run(argv(&format!("rollout apply -f {f}"))).await.out,
        "rollout default/cli configured\n"
    );
    assert_eq!(run(argv("rollout watch cli")).await.code, 1);
    assert_eq!(
        run(argv(&format!("rollout apply -f {f}"))).await.out,
        "rollout default/cli unchanged\n"
    );
    assert_eq!(
        run(argv("rollout pause cli")).await.out,
        "rollout default/cli paused\n"
    );
    assert_eq!(
        run(argv("rollout resume cli")).await.out,
        "rollout default/cli resumed\n"
    );

    // A canary that fails halts its rollout: exit 2.
    let canary =
        "  - actions: [Prep]\n    rolloutStrategy: {maxConcurrency: 2, canaryClusters: 1}\n";
    let halted = dir.path().join("halted.yaml");
    std::fs::write(&halted, manifest("halted", "c3", canary)).unwrap();
    let h = halted.display().to_string();
    assert_eq!(run(argv(&format!("rollout apply -f {h}"))).await.code, 0);
    let watched = run(argv("rollout watch halted")).await;
    assert_eq!(watched.code, 2, "{}{}", watched.out, watched.err);
    assert!(
        watched.out.contains("HALTED (CanaryFailed)"),
        "{}",
        watched.out
    );

    // Clusters: by selector, labelled and unlabelled.
    let listed = run(argv("cluster list -l name=c1")).await.out;
    assert_eq!(listed.lines().count(), 2, "{listed}");
    assert!(
        listed.lines().nth(1).unwrap().starts_with("c1 "),
        "{listed}"
    );
    assert_eq!(
        run(argv("cluster label c1 site=a")).await.out,
        "cluster c1 labeled\n"
    );
    assert!(run(argv("cluster get c1")).await.out.contains("  site=a\n"));
    run(argv("cluster label c1 site-")).await;
    assert!(!run(argv("cluster get c1")).await.out.contains("site=a"));

    // Errors: the hub's message, exit 1.
    let missing = run(argv("rollout get nope")).await;
    assert_eq!(
        (missing.code, missing.err.as_str()),
        (1, "fleet-hub: rollout default/nope not found\n")
    );
    let refused = fleet_hub(&hub.url, "wrong-token", &["rollout", "list"]).await;
    assert_eq!(refused.code, 1);
    assert!(refused.err.starts_with("fleet-hub: "), "{}", refused.err);
    let deleted = run(argv("rollout delete halted")).await;
    assert_eq!(
        deleted.out,
        "rollout default/halted deleted; its history is kept\n"
    );
    let completion = run(argv("completion bash")).await;
    assert_eq!(completion.code, 0);
    assert!(completion.out.contains("fleet-hub"), "{}", completion.out);
    engine.abort();
}
