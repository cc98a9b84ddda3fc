//! TLS on the listeners: a hub and an agent given a certificate speak only TLS, take a
//! renewed certificate without a restart, and nothing serves plain HTTP on an address other
//! hosts reach unless told to. The certificates are test-only, in `tests/fixtures/tls`
//! (`ca.crt` signed `server.crt` and `renewed.crt`, for 127.0.0.1 and localhost).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use fleet_e2e::{ChildGuard, ChildLog, binary, free_port, wait_for};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/tls")
        .join(name)
}

/// A client that trusts only the CA in `ca` and records the certificate each answer came with.
fn client(ca: &str) -> reqwest::Client {
    let pem = std::fs::read(fixture(ca)).unwrap();
    reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .tls_info(true)
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

/// A program serving `server.crt` (signed by `ca.crt`).
fn serving_tls(cmd: &mut Command) -> &mut Command {
    cmd.arg("--tls-cert-file")
        .arg(fixture("server.crt"))
        .arg("--tls-private-key-file")
        .arg(fixture("server.key"))
}

/// The DER of the first certificate in a PEM file.
fn der(name: &str) -> Vec<u8> {
    let pem = std::fs::read_to_string(fixture(name)).unwrap();
    let body: String = pem
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN CERTIFICATE"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .unwrap()
}

/// Puts the certificate and key `name` where the server reads them, each replaced whole.
fn install(dir: &Path, name: &str) {
    for (ext, to) in [("key", "tls.key"), ("crt", "tls.crt")] {
        let tmp = dir.join(format!("{to}.tmp"));
        std::fs::copy(fixture(&format!("{name}.{ext}")), &tmp).unwrap();
        std::fs::rename(&tmp, dir.join(to)).unwrap();
    }
}

/// The certificate an HTTPS GET of `url` was answered with, once it answers 200 (a new
/// client each time: a resumed TLS session would not show a renewed certificate).
async fn served_certificate(ca: &str, url: &str) -> Vec<u8> {
    wait_for("an HTTPS answer", Duration::from_secs(30), || async {
        let res = client(ca).get(url).send().await.ok()?;
        (res.status() == 200).then_some(())?;
        res.extensions()
            .get::<reqwest::tls::TlsInfo>()
            .and_then(|i| i.peer_certificate().map(<[u8]>::to_vec))
    })
    .await
}

#[tokio::test]
async fn a_tls_hub_speaks_only_tls_and_takes_a_renewed_certificate_without_a_restart() {
    let db = fleet_e2e::TestDb::empty().await;
    let dir = tempfile::tempdir().unwrap();
    install(dir.path(), "server");
    let port = free_port();
    let log = ChildLog::new(dir.path(), "fleet-hub");
    let _hub = ChildGuard(
        Command::new(binary("fleet-hub"))
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--database-url", &db.url(), "--admin-token", "s3cret"])
            .arg("--tls-cert-file")
            .arg(dir.path().join("tls.crt"))
            .arg("--tls-private-key-file")
            .arg(dir.path().join("tls.key"))
            .stdout(Stdio::null())
            .stderr(log.stdio())
            .spawn()
            .unwrap(),
    );
    let url = format!("https://127.0.0.1:{port}/healthz");
    assert_eq!(served_certificate("ca.crt", &url).await, der("server.crt"));
    // Plain HTTP gets no answer; a client that does not trust the CA refuses the hub.
    let plain = reqwest::get(format!("http://127.0.0.1:{port}/healthz")).await;
    assert!(plain.is_err(), "plain HTTP answered: {plain:?}");
    let stranger = client("other-ca.crt").get(&url).send().await;
    let err = format!("{:?}", stranger.unwrap_err());
    assert!(
        err.contains("UnknownIssuer") || err.contains("certificate"),
        "{err}"
    );
    // cert-manager renews the files in place: the next handshake presents the new one.
    install(dir.path(), "renewed");
    wait_for(
        "the renewed certificate",
        Duration::from_secs(30),
        || async { (served_certificate("ca.crt", &url).await == der("renewed.crt")).then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn the_agent_serves_its_api_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let log = ChildLog::new(dir.path(), "spoke-agent");
    let mut cmd = crate::spoke::agent_command(&dir.path().join("state"), port);
    serving_tls(&mut cmd)
        .stdout(Stdio::null())
        .stderr(log.stdio());
    let _agent = ChildGuard(cmd.spawn().unwrap());
    let client = client("ca.crt");
    let ibu = wait_for(
        "the agent's API over TLS",
        Duration::from_secs(30),
        || async {
            let res = client
                .get(format!("https://127.0.0.1:{port}/v1/ibu"))
                .bearer_auth(crate::spoke::TOKEN)
                .send()
                .await
                .ok()?;
            (res.status() == 200).then_some(res.json::<serde_json::Value>().await.ok()?)
        },
    )
    .await;
    assert_eq!(ibu["kind"], "ImageBasedUpgrade");
}

#[test]
fn plain_http_where_other_hosts_reach_is_refused_unless_asked_for() {
    let run = |bin: &str, args: &[&str]| {
        let out = Command::new(binary(bin))
            .args(args)
            .env_remove("DATABASE_URL")
            .env_remove("SPOKE_HUB_URL")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let refused = "--listen 0.0.0.0:0 is reachable from other hosts: give --tls-cert-file and --tls-private-key-file, or --insecure-http to serve plain HTTP there";
    for (bin, args) in [
        ("fleet-hub", vec!["serve", "--listen", "0.0.0.0:0"]),
        (
            "spoke-agent",
            vec!["serve", "--cluster-name", "sno1", "--listen", "0.0.0.0:0"],
        ),
    ] {
        let (code, err) = run(bin, &args);
        assert_eq!(code, Some(2), "{bin}: {err}");
        assert!(err.contains(refused), "{bin}: {err}");
    }
    let key = fixture("server.key");
    let (code, err) = run(
        "fleet-hub",
        &["serve", "--tls-private-key-file", key.to_str().unwrap()],
    );
    assert_eq!(code, Some(2));
    assert!(
        err.contains("--tls-private-key-file needs --tls-cert-file"),
        "{err}"
    );
    let ca = fixture("client-ca.crt");
    let (code, err) = run(
        "fleet-hub",
        &["serve", "--client-ca-file", ca.to_str().unwrap()],
    );
    assert_eq!(code, Some(2));
    assert!(
        err.contains("--client-ca-file needs --tls-cert-file and --tls-private-key-file"),
        "{err}"
    );
    // A key that is not the certificate's is named as such.
    let other = fixture("renewed.key");
    let (code, err) = run(
        "spoke-agent",
        &[
            "serve",
            "--cluster-name",
            "sno1",
            "--tls-cert-file",
            fixture("server.crt").to_str().unwrap(),
            "--tls-private-key-file",
            other.to_str().unwrap(),
        ],
    );
    assert_eq!(code, Some(2));
    assert!(err.contains("is not the key of --tls-cert-file"), "{err}");
}

/// A hub serving `server.crt` (signed by `ca.crt`) on a loopback port, with its database.
async fn tls_hub(dir: &Path) -> (ChildGuard, u16, fleet_e2e::TestDb) {
    tls_hub_with(dir, &[]).await
}

/// `tls_hub`, with more flags.
async fn tls_hub_with(
    dir: &Path,
    extra: &[&std::ffi::OsStr],
) -> (ChildGuard, u16, fleet_e2e::TestDb) {
    let db = fleet_e2e::TestDb::empty().await;
    install(dir, "server");
    let port = free_port();
    let log = ChildLog::new(dir, "fleet-hub");
    let hub = ChildGuard(
        Command::new(binary("fleet-hub"))
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--database-url", &db.url(), "--admin-token", "s3cret"])
            .args(["--join-token", "j0in"])
            .arg("--tls-cert-file")
            .arg(dir.join("tls.crt"))
            .arg("--tls-private-key-file")
            .arg(dir.join("tls.key"))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log.stdio())
            .spawn()
            .unwrap(),
    );
    served_certificate("ca.crt", &format!("https://127.0.0.1:{port}/healthz")).await;
    (hub, port, db)
}

#[tokio::test]
async fn the_agent_talks_only_to_a_hub_its_ca_file_trusts() {
    let dir = tempfile::tempdir().unwrap();
    let (_hub, hub_port, _db) = tls_hub(dir.path()).await;
    let hub_url = format!("https://127.0.0.1:{hub_port}");
    let agent = |ca: &str, state: &str, port: u16| {
        let mut cmd = crate::spoke::agent_command(&dir.path().join(state), port);
        cmd.args([
            "--hub-url",
            &hub_url,
            "--join-token",
            "j0in",
            "--hub-ca-file",
        ])
        .arg(fixture(ca));
        cmd
    };
    // Another CA: the agent stops at start, saying why, and the hub never hears of it.
    let err_file = dir.path().join("wrong-ca.log");
    let mut wrong = agent("other-ca.crt", "wrong", free_port());
    wrong
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err_file).unwrap());
    let mut wrong = ChildGuard(wrong.spawn().unwrap());
    let status = wait_for("the agent to stop", Duration::from_secs(30), || {
        let exited = wrong.0.try_wait().unwrap();
        async move { exited }
    })
    .await;
    assert_eq!(status.code(), Some(2));
    let err = std::fs::read_to_string(&err_file).unwrap();
    assert!(
        err.contains("hub certificate not trusted: invalid peer certificate: UnknownIssuer"),
        "{err}"
    );
    // The hub's CA: the agent registers over TLS, and, serving TLS itself, gives the hub an
    // https endpoint.
    let log = ChildLog::new(dir.path(), "spoke-agent");
    let port = free_port();
    let mut cmd = agent("ca.crt", "right", port);
    serving_tls(&mut cmd)
        .stdout(Stdio::null())
        .stderr(log.stdio());
    let _agent = ChildGuard(cmd.spawn().unwrap());
    let admin = client("ca.crt");
    let names = wait_for("the agent registered", Duration::from_secs(30), || async {
        let list: serde_json::Value = admin
            .get(format!("{hub_url}/v1/clusters"))
            .bearer_auth("s3cret")
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let names: Vec<(String, String)> = list["items"]
            .as_array()?
            .iter()
            .map(|c| (c["name"].to_string(), c["endpoint"].to_string()))
            .collect();
        (!names.is_empty()).then_some(names)
    })
    .await;
    assert_eq!(
        names,
        [(
            "\"sno1\"".to_string(),
            format!("\"https://127.0.0.1:{port}\"")
        )]
    );
}

/// The lowercase hex SHA-256 of a fixture certificate, as the hub pins it.
fn pin(name: &str) -> String {
    fleet_server::tls::fingerprint(&der(name))
}

/// The pinned certificate of each registered cluster.
async fn pins(client: &reqwest::Client, hub_url: &str) -> Option<Vec<(String, String)>> {
    let list: serde_json::Value = client
        .get(format!("{hub_url}/v1/clusters"))
        .bearer_auth("s3cret")
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    Some(
        list["items"]
            .as_array()?
            .iter()
            .map(|c| {
                (
                    c["name"].as_str().unwrap_or_default().to_string(),
                    c["certificateSha256"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                )
            })
            .collect(),
    )
}

#[tokio::test]
async fn a_rollout_with_tls_on_every_hop_pushes_only_to_the_registered_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (_hub, hub_port, _db) = tls_hub(dir.path()).await;
    let hub_url = format!("https://127.0.0.1:{hub_port}");
    let fleet_dir = dir.path().join("fleet-tls");
    std::fs::create_dir_all(&fleet_dir).unwrap();
    install(&fleet_dir, "server");
    let fleet_port = free_port();
    let log = ChildLog::new(dir.path(), "sim-fleet");
    let _fleet = ChildGuard(
        Command::new(binary("spoke-agent"))
            .args(["sim-fleet", "--count", "2", "--prefix", "edge"])
            .args(["--listen", &format!("127.0.0.1:{fleet_port}")])
            .arg("--state-dir")
            .arg(dir.path().join("fleet-state"))
            .args(["--hub-url", &hub_url, "--join-token", "j0in"])
            .arg("--hub-ca-file")
            .arg(fixture("ca.crt"))
            .arg("--tls-cert-file")
            .arg(fleet_dir.join("tls.crt"))
            .arg("--tls-private-key-file")
            .arg(fleet_dir.join("tls.key"))
            .args([
                "--label",
                "site=tls",
                "--sim-step-ms",
                "10",
                "--sim-reboot-ms",
                "50",
            ])
            .env_remove("SPOKE_HUB_URL")
            .stdout(Stdio::null())
            .stderr(log.stdio())
            .spawn()
            .unwrap(),
    );
    let admin = client("ca.crt");
    let pinned_to = |cert: &'static str| {
        let (admin, hub_url) = (admin.clone(), hub_url.clone());
        move || {
            let (admin, hub_url) = (admin.clone(), hub_url.clone());
            async move {
                let want = pin(cert);
                let mut pins = pins(&admin, &hub_url).await?;
                pins.retain(|(name, _)| name.starts_with("edge"));
                (pins.len() == 2 && pins.iter().all(|(_, p)| *p == want)).then_some(pins)
            }
        }
    };
    let pins_now = wait_for(
        "both spokes registered with their certificate",
        Duration::from_secs(30),
        pinned_to("server.crt"),
    )
    .await;
    assert_eq!(
        pins_now.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        ["edge1", "edge2"]
    );

    // Someone registers edge1's address under another name with another certificate: the
    // hub will not push there, since the address presents a certificate it did not pin.
    let register = admin
        .post(format!("{hub_url}/v1/clusters/register"))
        .bearer_auth("j0in")
        .json(&serde_json::json!({
            "name": "impostor",
            "endpoint": format!("https://127.0.0.1:{fleet_port}/clusters/edge1"),
            "labels": {"site": "elsewhere"},
            "certificateSha256": pin("renewed.crt"),
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(register.status(), 200);
    let impostor: serde_json::Value = register.json().await.unwrap();
    let impostor_credential = impostor["credential"].as_str().unwrap().to_string();
    let rollout = |name: &str, site: &str| {
        serde_json::json!({
            "apiVersion": "lcm.openshift.io/v1alpha1",
            "kind": "ImageBasedGroupUpgrade",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {
                "clusterLabelSelectors": [{"matchLabels": {"site": site}}],
                "ibuSpec": {"seedImageRef": {"version": "4.16.0", "image": "quay.io/seed:4.16.0"}},
                "plan": [{"actions": ["Prep", "Upgrade", "FinalizeUpgrade"],
                          "rolloutStrategy": {"maxConcurrency": 2, "timeout": 30}}]
            }
        })
    };
    let create = |body: serde_json::Value| {
        let (admin, hub_url) = (admin.clone(), hub_url.clone());
        async move {
            let res = admin
                .post(format!("{hub_url}/v1/rollouts"))
                .bearer_auth("s3cret")
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), 201, "{}", res.text().await.unwrap());
        }
    };
    create(rollout("impostor", "elsewhere")).await;
    let refused = format!(
        "the spoke presented certificate sha256:{}, not the one it registered (sha256:{})",
        pin("server.crt"),
        pin("renewed.crt")
    );
    wait_for("the push refused", Duration::from_secs(30), || async {
        let log = std::fs::read_to_string(dir.path().join("fleet-hub.log")).unwrap_or_default();
        log.contains(&refused).then_some(())
    })
    .await;

    // cert-manager renews the spokes' certificate: each registers it, as itself, before
    // the hub pushes to it again.
    install(&fleet_dir, "renewed");
    wait_for(
        "both spokes registered their renewed certificate",
        Duration::from_secs(30),
        pinned_to("renewed.crt"),
    )
    .await;
    create(rollout("tls", "tls")).await;
    let url = format!("{hub_url}/v1/rollouts/default/tls");
    wait_for(
        "the rollout over TLS to complete",
        Duration::from_secs(60),
        || async {
            let g: serde_json::Value = admin
                .get(&url)
                .bearer_auth("s3cret")
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            (g["status"]["conditions"][0]["reason"] == "Completed").then_some(())
        },
    )
    .await;
    // Metrics are served over TLS too.
    for (url, series) in [
        (
            format!("{hub_url}/metrics"),
            "fleet_hub_action_duration_seconds_count{action=\"FinalizeUpgrade\",result=\"completed\"} 2",
        ),
        (
            format!("https://127.0.0.1:{fleet_port}/metrics"),
            "spoke_reports_total{result=\"sent\"}",
        ),
    ] {
        let text = admin
            .get(&url)
            .bearer_auth("s3cret")
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(text.contains(series), "{url} lacks {series}:\n{text}");
    }

    // The audit trail names who changed what, from where.
    let trail = get_json(&admin, &format!("{hub_url}/v1/audit")).await;
    let changes: Vec<String> = trail["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            assert!(
                e["source"]
                    .as_str()
                    .is_some_and(|s| s.starts_with("127.0.0.1:")),
                "{e}"
            );
            format!("{} {} {}", e["actor"], e["verb"], e["name"]).replace('"', "")
        })
        .collect();
    for change in [
        "join-token register edge1",
        "join-token register edge2",
        "join-token register impostor",
        "admin create impostor",
        "cluster:edge1 register edge1",
        "cluster:edge2 register edge2",
        "admin create tls",
    ] {
        assert!(changes.iter().any(|c| c == change), "{change}: {changes:?}");
    }

    // No secret this run used is in anything it wrote or answered: logs, metrics, the API's
    // answers (errors too), the audit trail, history, a spoke's must-gather.
    let api_token = std::fs::read_to_string(dir.path().join("fleet-state/api-token")).unwrap();
    let refused = admin
        .post(format!("{hub_url}/v1/clusters/edge1/status"))
        .bearer_auth(&impostor_credential)
        .json(&serde_json::json!({"sequence": 99, "agentId": "x", "ibu": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 403);
    let mut outputs = vec![
        ("the refused report's answer", refused.text().await.unwrap()),
        (
            "the hub's log",
            std::fs::read_to_string(dir.path().join("fleet-hub.log")).unwrap(),
        ),
        ("the fleet's log", log.text()),
        ("the audit trail", trail.to_string()),
    ];
    for path in [
        "/v1/clusters",
        "/v1/rollouts",
        "/v1/rollouts/default/tls/history",
        "/v1/rollouts/default/impostor/history",
        "/metrics",
    ] {
        outputs.push((path, get_text(&admin, &format!("{hub_url}{path}")).await));
    }
    let fleet_url = format!("https://127.0.0.1:{fleet_port}");
    outputs.push((
        "the fleet's metrics",
        get_text(&admin, &format!("{fleet_url}/metrics")).await,
    ));
    let gathered = admin
        .get(format!("{fleet_url}/clusters/edge1/v1/must-gather"))
        .bearer_auth(api_token.trim())
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(&gathered[..]));
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let mut text = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut text).unwrap();
        outputs.push(("must-gather", String::from_utf8_lossy(&text).into_owned()));
    }
    assert!(outputs.len() > 10, "must-gather had files");
    for secret in [
        "s3cret",
        "j0in",
        api_token.trim(),
        impostor_credential.as_str(),
    ] {
        for (what, text) in &outputs {
            assert!(
                !text.contains(secret),
                "{what} holds a secret ({secret}):\n{text}"
            );
        }
    }
}

async fn get_text(client: &reqwest::Client, url: &str) -> String {
    let res = client.get(url).bearer_auth("s3cret").send().await.unwrap();
    assert_eq!(res.status(), 200, "{url}");
    res.text().await.unwrap()
}

async fn get_json(client: &reqwest::Client, url: &str) -> serde_json::Value {
    serde_json::from_str(&get_text(client, url).await).unwrap()
}

/// A client that trusts `ca.crt` and presents the client certificate `name` (`.crt`, `.key`).
fn client_presenting(name: &str) -> reqwest::Client {
    let mut pem = std::fs::read(fixture(&format!("{name}.crt"))).unwrap();
    pem.extend(std::fs::read(fixture(&format!("{name}.key"))).unwrap());
    reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(
            reqwest::Certificate::from_pem(&std::fs::read(fixture("ca.crt")).unwrap()).unwrap(),
        )
        .identity(reqwest::Identity::from_pem(&pem).unwrap())
        .build()
        .unwrap()
}

/// With `--client-ca-file`, a spoke whose client certificate (from that CA) names its cluster
/// registers and reports with neither join token nor credential; a certificate from another
/// CA is refused in the handshake, and one naming another cluster registers nothing.
#[tokio::test]
async fn a_client_certificate_stands_for_the_join_token_and_the_credential() {
    let dir = tempfile::tempdir().unwrap();
    let client_ca = fixture("client-ca.crt");
    let flags = ["--client-ca-file".as_ref(), client_ca.as_os_str()];
    let (_hub, port, _db) = tls_hub_with(dir.path(), &flags).await;
    let hub_url = format!("https://127.0.0.1:{port}");
    let registration = |name: &str| serde_json::json!({"name": name, "endpoint": "http://127.0.0.1:1", "agentId": "run-1"});
    // Another CA's certificate: no TLS session at all.
    let stranger = client_presenting("stranger-client")
        .post(format!("{hub_url}/v1/clusters/register"))
        .bearer_auth("j0in")
        .json(&registration("edge1"))
        .send()
        .await;
    assert!(stranger.is_err(), "{stranger:?}");
    // edge1's certificate registers edge1, not edge2.
    let edge1 = client_presenting("edge1-client");
    let res = edge1
        .post(format!("{hub_url}/v1/clusters/register"))
        .json(&registration("edge2"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    // The agent itself, with its certificate and no join token.
    let agent_port = free_port();
    let agent_log = ChildLog::new(dir.path(), "spoke-agent");
    let mut cmd = crate::spoke::agent_command_named("edge1", &dir.path().join("agent"), agent_port);
    cmd.args(["--hub-url", &hub_url])
        .arg("--hub-ca-file")
        .arg(fixture("ca.crt"))
        .arg("--hub-client-cert-file")
        .arg(fixture("edge1-client.crt"))
        .arg("--hub-client-key-file")
        .arg(fixture("edge1-client.key"))
        .stdout(Stdio::null())
        .stderr(agent_log.stdio());
    let _agent = ChildGuard(cmd.spawn().unwrap());
    let admin = client("ca.crt");
    wait_for(
        "edge1 registered and reporting",
        Duration::from_secs(30),
        || async {
            let c: serde_json::Value = admin
                .get(format!("{hub_url}/v1/clusters/edge1"))
                .bearer_auth("s3cret")
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            c["ibu"]["kind"].as_str().map(|_| ())
        },
    )
    .await;
    // A report with the certificate alone is taken as the cluster's.
    let report = serde_json::json!({"sequence": 1_000_000, "agentId": "x", "ibu": {
        "apiVersion": "lca.openshift.io/v1", "kind": "ImageBasedUpgrade",
        "metadata": {"name": "upgrade"}, "spec": {"stage": "Idle"}}});
    let res = edge1
        .post(format!("{hub_url}/v1/clusters/edge1/status"))
        .json(&report)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "{}", res.text().await.unwrap());
    let res = edge1
        .post(format!("{hub_url}/v1/clusters/edge2/status"))
        .json(&report)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401, "not edge2's");
    let trail = get_json(&admin, &format!("{hub_url}/v1/audit")).await;
    let actors: Vec<&str> = trail["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["verb"] == "register" && e["code"] == 200)
        .filter_map(|e| e["actor"].as_str())
        .collect();
    assert_eq!(actors, ["cert:edge1"], "{trail}");
}

/// `--tls-min-version VersionTLS13` turns TLS 1.2 clients away; TLS 1.3 ones are served.
#[tokio::test]
async fn the_oldest_tls_version_is_a_flag() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let log = ChildLog::new(dir.path(), "spoke-agent");
    let mut cmd = crate::spoke::agent_command(&dir.path().join("state"), port);
    serving_tls(&mut cmd)
        .args(["--tls-min-version", "VersionTLS13"])
        .stdout(Stdio::null())
        .stderr(log.stdio());
    let _agent = ChildGuard(cmd.spawn().unwrap());
    let url = format!("https://127.0.0.1:{port}/healthz");
    assert_eq!(served_certificate("ca.crt", &url).await, der("server.crt"));
    let pem = std::fs::read(fixture("ca.crt")).unwrap();
    let old = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .max_tls_version(reqwest::tls::Version::TLS_1_2)
        .build()
        .unwrap();
    let refused = old.get(&url).send().await;
    let err = format!("{:?}", refused.unwrap_err());
    assert!(
        err.contains("ProtocolVersion") || err.contains("protocol"),
        "{err}"
    );
}
