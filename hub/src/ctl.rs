//! `fleet-hub rollout ...` and `fleet-hub cluster ...`: a kubectl-style client of a hub's REST
//! API. Output is a table by default, or the API's objects as JSON or YAML (`-o`); an error
//! prints the hub's `Status` message and exits non-zero.

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use fleet_types::ibgu::{ImageBasedGroupUpgrade, ImageBasedGroupUpgradeStatus};
use fleet_types::ibu::ConditionStatus;
use serde_json::{Value, json};

/// How the client reaches the hub, and how it answers.
#[derive(Args, Debug, Clone)]
pub struct ClientArgs {
    /// The hub's URL.
    #[arg(
        long,
        global = true,
        env = "FLEET_HUB_SERVER",
        default_value = "http://127.0.0.1:8080"
    )]
    pub server: String,
    /// Bearer token (the admin token, a viewer token or a Kubernetes token).
    #[arg(long, global = true, env = "FLEET_HUB_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// CA bundle (PEM) the hub's certificate must chain to (else the usual roots).
    #[arg(long, global = true, env = "FLEET_HUB_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// Namespace of the rollouts.
    #[arg(
        short = 'n',
        long,
        global = true,
        env = "FLEET_HUB_NAMESPACE",
        default_value = "default"
    )]
    pub namespace: String,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Table,
    Json,
    Yaml,
}

#[derive(Args, Debug)]
pub struct RolloutCommand {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(subcommand)]
    pub action: RolloutAction,
}

#[derive(Subcommand, Debug)]
pub enum RolloutAction {
    /// Create an ImageBasedGroupUpgrade from a YAML or JSON file (`-` reads standard input),
    /// or change the stored one (append plan items, pause, move its window).
    Apply {
        #[arg(short = 'f', long = "filename")]
        file: String,
        /// Show the plan's batches; store nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// The rollouts of the namespace.
    List {
        /// Of every namespace.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
    },
    /// One rollout.
    Get { name: String },
    /// Status, steps, and the failed clusters with their messages.
    Describe { name: String },
    /// Progress bars until the rollout ends: exit 0 when it succeeded, 1 when it finished
    /// with failures, 2 when it halted.
    Watch { name: String },
    /// Hold every start back (`spec.paused`).
    Pause { name: String },
    /// Let starts go on.
    Resume { name: String },
    /// Every recorded transition, oldest first.
    History {
        name: String,
        #[arg(long)]
        cluster: Option<String>,
    },
    /// Delete the rollout (its history and the labels stay).
    Delete { name: String },
}

#[derive(Args, Debug)]
pub struct ClusterCommand {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(subcommand)]
    pub action: ClusterAction,
}

#[derive(Subcommand, Debug)]
pub enum ClusterAction {
    /// The registered clusters.
    List {
        /// Kubernetes label selector (`site=a,!canary`).
        #[arg(short = 'l', long)]
        selector: Option<String>,
    },
    /// One cluster: labels and the last conditions of its IBU.
    Get { name: String },
    /// Set (`k=v`) or remove (`k-`) labels.
    Label {
        name: String,
        #[arg(required = true)]
        changes: Vec<String>,
    },
    /// Remove the cluster from the inventory.
    Delete { name: String },
}

/// A client of one hub.
struct Client {
    http: reqwest::Client,
    args: ClientArgs,
}

impl Client {
    fn new(args: ClientArgs) -> Result<Client, String> {
        let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(60));
        if let Some(ca) = &args.ca_file {
            let pem = std::fs::read(ca).map_err(|e| format!("--ca-file {}: {e}", ca.display()))?;
            for cert in reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| format!("--ca-file {}: {e}", ca.display()))?
            {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder.build().map_err(|e| e.to_string())?;
        Ok(Client { http, args })
    }

    fn ns(&self) -> &str {
        &self.args.namespace
    }

    /// Sends a request; answers the body of a success, or the `Status` message of a refusal.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<(&str, String)>,
    ) -> Result<Value, String> {
        let url = format!("{}{path}", self.args.server.trim_end_matches('/'));
        let mut req = self.http.request(method, &url);
        if let Some(token) = &self.args.token {
            req = req.bearer_auth(token);
        }
        if let Some((content_type, text)) = body {
            req = req.header("Content-Type", content_type).body(text);
        }
        let res = req
            .send()
            .await
            .map_err(|e| format!("{}: {e}", self.args.server))?;
        let code = res.status();
        let text = res.text().await.map_err(|e| e.to_string())?;
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if code.is_success() {
            Ok(value)
        } else {
            Err(value["message"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| format!("{code}: {value}")))
        }
    }

    async fn get(&self, path: &str) -> Result<Value, String> {
        self.call(reqwest::Method::GET, path, None).await
    }

    fn rollout_path(&self, name: &str) -> String {
        format!("/v1/rollouts/{}/{}", enc(self.ns()), enc(name))
    }

    /// Prints the object as asked, or the table `table` makes of it.
    fn print(&self, value: &Value, table: impl FnOnce(&Value) -> String) -> Result<(), String> {
        let text = match self.args.output {
            Output::Table => table(value),
            Output::Json => serde_json::to_string_pretty(value).map_err(|e| e.to_string())? + "\n",
            Output::Yaml => serde_yaml::to_string(value).map_err(|e| e.to_string())?,
        };
        print!("{text}");
        Ok(())
    }
}

fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// Columns padded to their widest cell.
fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut out = String::new();
        let last = cells.len().saturating_sub(1);
        for (i, c) in cells.into_iter().enumerate() {
            if i == last {
                out.push_str(&c);
            } else {
                out.push_str(&format!("{c:<w$}   ", w = widths[i]));
            }
        }
        out.trim_end().to_string() + "\n"
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        out.push_str(&line(r));
    }
    out
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) if s.is_empty() => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn condition<'a>(status: &'a Value, type_: &str) -> Option<&'a Value> {
    status["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

/// A rollout's one-word state: the reason of `Progressing`, and `Paused` while paused.
fn state(r: &Value) -> String {
    let reason =
        condition(&r["status"], "Progressing").map_or("Pending".into(), |c| s(&c["reason"]));
    if r["spec"]["paused"] == true && reason == "InProgress" {
        "Paused".into()
    } else {
        reason
    }
}

fn rollout_row(r: &Value) -> Vec<String> {
    let summary = r["status"]["summary"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let n = |k: &str| -> i64 { summary.iter().filter_map(|x| x[k].as_i64()).sum() };
    let selected = summary
        .first()
        .and_then(|x| x["selected"].as_i64())
        .unwrap_or(0);
    let done = summary
        .last()
        .and_then(|x| x["completed"].as_i64())
        .unwrap_or(0);
    vec![
        s(&r["metadata"]["namespace"]),
        s(&r["metadata"]["name"]),
        state(r),
        format!(
            "{}/{}",
            summary.len(),
            r["spec"]["plan"].as_array().map_or(0, Vec::len)
        ),
        selected.to_string(),
        done.to_string(),
        (n("failed") + n("timedOut")).to_string(),
        s(&r["status"]["startedAt"]),
    ]
}

const ROLLOUT_COLUMNS: [&str; 8] = [
    "NAMESPACE",
    "NAME",
    "STATE",
    "STEPS",
    "CLUSTERS",
    "DONE",
    "FAILED",
    "STARTED",
];

fn describe(r: &Value) -> String {
    let mut out = format!(
        "Name:        {}/{}\n",
        s(&r["metadata"]["namespace"]),
        s(&r["metadata"]["name"])
    );
    let st = &r["status"];
    for type_ in ["Progressing", "Succeeded", "Paused"] {
        if let Some(c) = condition(st, type_) {
            out.push_str(&format!(
                "{:<12} {} ({}): {}\n",
                format!("{type_}:"),
                s(&c["status"]),
                s(&c["reason"]),
                s(&c["message"])
            ));
        }
    }
    if let Some(w) = r["spec"]["maintenanceWindow"].as_object() {
        out.push_str(&format!(
            "Window:      {} for {} min, {}\n",
            s(&w["start"]),
            s(&w["durationMinutes"]),
            w.get("timeZone").map_or("UTC".into(), s)
        ));
    }
    out.push_str(&format!(
        "Started:     {}\nCompleted:   {}\n\nSteps:\n",
        s(&st["startedAt"]),
        s(&st["completedAt"])
    ));
    let plan = r["spec"]["plan"].as_array().cloned().unwrap_or_default();
    let rows = plan
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let actions: Vec<String> = item["actions"]
                .as_array()
                .into_iter()
                .flatten()
                .map(s)
                .collect();
            let sum = st["summary"]
                .as_array()
                .and_then(|l| l.iter().find(|x| x["step"] == i));
            let v = |k: &str| sum.map_or("-".into(), |x| s(&x[k]));
            vec![
                i.to_string(),
                actions.join(","),
                v("selected"),
                v("completed"),
                v("failed"),
                v("timedOut"),
                v("inProgress"),
                v("pending"),
            ]
        })
        .collect();
    let steps = table(
        &[
            "STEP",
            "ACTIONS",
            "SELECTED",
            "COMPLETED",
            "FAILED",
            "TIMED-OUT",
            "RUNNING",
            "PENDING",
        ],
        rows,
    );
    for l in steps.lines() {
        out.push_str(&format!("  {l}\n"));
    }
    let mut failed = vec![];
    for c in st["clusters"].as_array().into_iter().flatten() {
        for a in c["failedActions"].as_array().into_iter().flatten() {
            failed.push(format!(
                "  {} {}: {}\n",
                s(&c["name"]),
                s(&a["action"]),
                s(&a["message"])
            ));
        }
    }
    if !failed.is_empty() {
        out.push_str("\nFailed clusters:\n");
        out.extend(failed);
    }
    out
}

/// Reads a manifest (YAML or JSON) from a file or standard input.
fn read_manifest(file: &str) -> Result<Value, String> {
    let text = if file == "-" {
        let mut t = String::new();
        std::io::stdin()
            .read_to_string(&mut t)
            .map_err(|e| format!("reading standard input: {e}"))?;
        t
    } else {
        std::fs::read_to_string(file).map_err(|e| format!("{file}: {e}"))?
    };
    let doc: Value = serde_yaml::from_str(&text).map_err(|e| format!("{file}: {e}"))?;
    if !doc.is_object() {
        return Err(format!("{file}: not an ImageBasedGroupUpgrade manifest"));
    }
    Ok(doc)
}

pub async fn rollout(cmd: RolloutCommand) -> Result<u8, String> {
    let c = Client::new(cmd.client)?;
    match cmd.action {
        RolloutAction::Apply { file, dry_run } => apply(&c, &file, dry_run).await,
        RolloutAction::List { all_namespaces } => {
            let list = c.get("/v1/rollouts").await?;
            let items: Vec<Value> = list["items"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|r| all_namespaces || r["metadata"]["namespace"] == c.ns())
                .cloned()
                .collect();
            c.print(&json!({"items": items}), |v| {
                let rows = v["items"].as_array().into_iter().flatten().map(rollout_row);
                table(&ROLLOUT_COLUMNS, rows.collect())
            })?;
            Ok(0)
        }
        RolloutAction::Get { name } => {
            let r = c.get(&c.rollout_path(&name)).await?;
            c.print(&r, |r| table(&ROLLOUT_COLUMNS, vec![rollout_row(r)]))?;
            Ok(0)
        }
        RolloutAction::Describe { name } => {
            let r = c.get(&c.rollout_path(&name)).await?;
            c.print(&r, describe)?;
            Ok(0)
        }
        RolloutAction::Watch { name } => watch(&c, &name).await,
        RolloutAction::Pause { name } => set_paused(&c, &name, "pause").await,
        RolloutAction::Resume { name } => set_paused(&c, &name, "resume").await,
        RolloutAction::History { name, cluster } => {
            let mut path = format!("{}/history", c.rollout_path(&name));
            if let Some(cl) = &cluster {
                path.push_str(&format!("?cluster={}", enc(cl)));
            }
            let h = c.get(&path).await?;
            c.print(&h, |h| {
                let rows = h["items"].as_array().into_iter().flatten().map(|e| {
                    vec![
                        s(&e["time"]),
                        s(&e["cluster"]),
                        s(&e["step"]),
                        s(&e["action"]),
                        s(&e["event"]),
                        s(&e["actor"]),
                        s(&e["message"]),
                    ]
                });
                table(
                    &[
                        "TIME", "CLUSTER", "STEP", "ACTION", "EVENT", "ACTOR", "MESSAGE",
                    ],
                    rows.collect(),
                )
            })?;
            Ok(0)
        }
        RolloutAction::Delete { name } => {
            let answer = c
                .call(reqwest::Method::DELETE, &c.rollout_path(&name), None)
                .await?;
            println!("{}", s(&answer["message"]));
            Ok(0)
        }
    }
}

async fn set_paused(c: &Client, name: &str, verb: &str) -> Result<u8, String> {
    let path = format!("{}/{verb}", c.rollout_path(name));
    let r = c.call(reqwest::Method::POST, &path, None).await?;
    c.print(&r, |_| format!("rollout {}/{name} {verb}d\n", c.ns()))?;
    Ok(0)
}

async fn apply(c: &Client, file: &str, dry_run: bool) -> Result<u8, String> {
    let mut doc = read_manifest(file)?;
    if doc["metadata"]["namespace"].is_null() {
        doc["metadata"]["namespace"] = json!(c.ns());
    }
    let ns = s(&doc["metadata"]["namespace"]);
    let name = s(&doc["metadata"]["name"]);
    let body = Some(("application/json", doc.to_string()));
    if dry_run {
        let plan = c
            .call(reqwest::Method::POST, "/v1/rollouts?dryRun=All", body)
            .await?;
        c.print(&plan, |p| {
            let rows = p["steps"].as_array().into_iter().flatten().map(|st| {
                let actions: Vec<String> = st["actions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(s)
                    .collect();
                let batches: Vec<String> = st["batches"]
                    .as_array()
                    .map(|b| {
                        b.iter()
                            .map(|b| {
                                let names: Vec<String> =
                                    b.as_array().into_iter().flatten().map(s).collect();
                                format!("[{}]", names.join(" "))
                            })
                            .collect()
                    })
                    .unwrap_or_else(|| vec!["(selected when the step starts)".into()]);
                vec![s(&st["step"]), actions.join(","), batches.join(" ")]
            });
            table(&["STEP", "ACTIONS", "BATCHES"], rows.collect())
        })?;
        return Ok(0);
    }
    let path = format!("/v1/rollouts/{}/{}", enc(&ns), enc(&name));
    let stored = c.get(&path).await;
    let (verb, answer) = match stored {
        Err(why) if why.ends_with("not found") => {
            let created = c.call(reqwest::Method::POST, "/v1/rollouts", body).await?;
            ("created", created)
        }
        Err(why) => return Err(why),
        Ok(old) => {
            let mut patch = json!({"spec": doc["spec"]});
            for key in ["labels", "annotations"] {
                if !doc["metadata"][key].is_null() {
                    patch["metadata"][key] = doc["metadata"][key].clone();
                }
            }
            let changed = old["spec"] != doc["spec"];
            let new = c
                .call(
                    reqwest::Method::PATCH,
                    &path,
                    Some(("application/merge-patch+json", patch.to_string())),
                )
                .await?;
            (if changed { "configured" } else { "unchanged" }, new)
        }
    };
    c.print(&answer, |_| format!("rollout {ns}/{name} {verb}\n"))?;
    Ok(0)
}

/// How a rollout ended, for `watch`'s exit code: 0 succeeded, 1 failures, 2 halted.
fn outcome(status: &ImageBasedGroupUpgradeStatus) -> Option<u8> {
    let progressing = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Progressing")?;
    if progressing.status != ConditionStatus::False {
        return None;
    }
    if progressing.reason != "Completed" {
        return Some(2);
    }
    let ok = status
        .conditions
        .iter()
        .any(|c| c.type_ == "Succeeded" && c.status == ConditionStatus::True);
    Some(if ok { 0 } else { 1 })
}

async fn watch(c: &Client, name: &str) -> Result<u8, String> {
    let tty = std::io::stdout().is_terminal();
    let (mut drawn, mut last) = (0usize, String::new());
    loop {
        let r = c.get(&c.rollout_path(name)).await?;
        let ibgu: ImageBasedGroupUpgrade =
            serde_json::from_value(r).map_err(|e| format!("the hub's answer: {e}"))?;
        let status = ibgu.status.clone().unwrap_or_default();
        let text = crate::demo::render_progress(&ibgu, &status);
        if tty {
            if drawn > 0 {
                print!("\x1b[{drawn}A\x1b[J");
            }
            print!("{text}");
            drawn = text.lines().count();
        } else if text != last {
            print!("{text}");
        }
        let _ = std::io::stdout().flush();
        last = text;
        if let Some(code) = outcome(&status) {
            return Ok(code);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

pub async fn cluster(cmd: ClusterCommand) -> Result<u8, String> {
    let c = Client::new(cmd.client)?;
    let cluster_row = |v: &Value| {
        let conds = v["ibu"]["status"]["conditions"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let last = conds.last().cloned().unwrap_or(Value::Null);
        vec![
            s(&v["name"]),
            s(&v["ibu"]["spec"]["stage"]),
            s(&last["reason"]),
            s(&v["lastSeen"]),
        ]
    };
    let columns = ["NAME", "STAGE", "STATE", "LAST SEEN"];
    match cmd.action {
        ClusterAction::List { selector } => {
            let path = match &selector {
                Some(sel) => format!("/v1/clusters?labelSelector={}", enc(sel)),
                None => "/v1/clusters".into(),
            };
            let list = c.get(&path).await?;
            c.print(&list, |l| {
                let rows = l["items"].as_array().into_iter().flatten().map(cluster_row);
                table(&columns, rows.collect())
            })?;
        }
        ClusterAction::Get { name } => {
            let v = c.get(&format!("/v1/clusters/{}", enc(&name))).await?;
            c.print(&v, |v| {
                let mut out = table(&columns, vec![cluster_row(v)]);
                out.push_str("\nLabels:\n");
                for (k, val) in v["labels"].as_object().into_iter().flatten() {
                    out.push_str(&format!("  {k}={}\n", val.as_str().unwrap_or_default()));
                }
                out.push_str("\nConditions of its IBU:\n");
                let conds = v["ibu"]["status"]["conditions"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                let rows = conds.iter().map(|c| {
                    vec![
                        s(&c["type"]),
                        s(&c["status"]),
                        s(&c["reason"]),
                        s(&c["message"]),
                    ]
                });
                for l in table(&["TYPE", "STATUS", "REASON", "MESSAGE"], rows.collect()).lines() {
                    out.push_str(&format!("  {l}\n"));
                }
                out
            })?;
        }
        ClusterAction::Label { name, changes } => {
            let mut labels = serde_json::Map::new();
            for change in &changes {
                if let Some((k, v)) = change.split_once('=') {
                    labels.insert(k.to_string(), json!(v));
                } else if let Some(k) = change.strip_suffix('-') {
                    labels.insert(k.to_string(), Value::Null);
                } else {
                    return Err(format!(
                        "{change:?}: give k=v to set a label or k- to remove it"
                    ));
                }
            }
            let body = json!({"labels": labels}).to_string();
            let v = c
                .call(
                    reqwest::Method::PATCH,
                    &format!("/v1/clusters/{}", enc(&name)),
                    Some(("application/merge-patch+json", body)),
                )
                .await?;
            c.print(&v, |_| format!("cluster {name} labeled\n"))?;
        }
        ClusterAction::Delete { name } => {
            let answer = c
                .call(
                    reqwest::Method::DELETE,
                    &format!("/v1/clusters/{}", enc(&name)),
                    None,
                )
                .await?;
            println!("{}", s(&answer["message"]));
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_pad_every_column_but_the_last() {
        let t = table(
            &["NAME", "STATE"],
            vec![
                vec!["a".into(), "Completed".into()],
                vec!["longer".into(), "-".into()],
            ],
        );
        assert_eq!(t, "NAME     STATE\na        Completed\nlonger   -\n");
    }

    #[test]
    fn the_watch_exit_code_says_how_the_rollout_ended() {
        let st = |p: &str, reason: &str, succeeded: Option<&str>| {
            let mut conditions =
                vec![json!({"type": "Progressing", "status": p, "reason": reason})];
            if let Some(s) = succeeded {
                conditions.push(json!({"type": "Succeeded", "status": s, "reason": "x"}));
            }
            serde_json::from_value::<ImageBasedGroupUpgradeStatus>(
                json!({"conditions": conditions}),
            )
            .unwrap()
        };
        assert_eq!(outcome(&st("True", "InProgress", None)), None);
        assert_eq!(outcome(&st("False", "Completed", Some("True"))), Some(0));
        assert_eq!(outcome(&st("False", "Completed", Some("False"))), Some(1));
        assert_eq!(
            outcome(&st("False", "CanaryFailed", Some("False"))),
            Some(2)
        );
    }
}
