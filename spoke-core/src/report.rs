//! Reporting to the hub: register with the join token, then send the IBU after every change
//! with a growing sequence number. While the hub is away, retry with backoff; once it
//! answers again, the current state goes first, so nothing the hub needs is lost. With
//! several hub URLs (replicas without a load balancer), the agent talks to one and moves on
//! to the next when it stops answering.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use fleet_types::messages::{RegisterRequest, RegisterResponse, StatusReportRef};
use reqwest::StatusCode;

use crate::metrics::AgentMetrics;
use crate::spoke::Spoke;

/// Backoff bounds while the hub does not answer.
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A hub that takes longer than this to answer counts as away.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle connections to the hub are dropped after this long.
const POOL_IDLE: Duration = Duration::from_secs(5);
/// How often a quiet agent looks whether its serving certificate was renewed.
const CERTIFICATE_CHECK: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct HubLink {
    /// The hub's URLs (one, or one per replica): never empty.
    pub hub_urls: Vec<String>,
    /// Which of them the agent talks to now. Shared by the agents of one process
    /// (`sim-fleet`), so that one agent's finding a hub gone spares the others the attempt.
    pub current: Arc<AtomicUsize>,
    pub join_token: String,
    /// How the hub reaches this agent's API.
    pub endpoint: String,
    pub labels: BTreeMap<String, String>,
    /// Identifies this run of the agent: a new one restarts the hub's sequence check.
    pub agent_id: String,
    pub client: reqwest::Client,
    /// The certificate the agent's API serves, when it serves TLS: registered with the hub,
    /// which pushes only to that certificate, and registered again when it is renewed.
    pub certificate: Option<fleet_server::tls::ServingCert>,
    /// Shared by many agents in one process (`sim-fleet`): at most this many requests to the
    /// hub at once, so that the process holds a bounded number of connections (files)
    /// however many agents it runs. `None` for an agent alone.
    pub requests: Option<Arc<tokio::sync::Semaphore>>,
}

impl HubLink {
    /// The URL talked to now, and its place in the list.
    fn hub(&self) -> (usize, &str) {
        let at = self.current.load(Ordering::Relaxed) % self.hub_urls.len().max(1);
        let url = self
            .hub_urls
            .get(at)
            .map_or("", |u| u.trim_end_matches('/'));
        (at, url)
    }

    /// The hub at `at` stopped answering: move on to the next one, unless another agent of
    /// this process already did. Answers whether there is another one to try.
    fn move_on(&self, at: usize, agent: &str, why: &str) -> bool {
        let n = self.hub_urls.len();
        if n < 2 {
            return false;
        }
        let next = (at + 1) % n;
        if self
            .current
            .compare_exchange(at, next, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            tracing::warn!(cluster = %agent, from = %self.hub_urls[at], to = %self.hub_urls[next], %why, "the hub stopped answering; moving on to the next");
        }
        true
    }

    pub fn client() -> reqwest::Client {
        Self::builder().build().unwrap_or_default()
    }

    /// A client that trusts only the CAs of the PEM bundle `cas` for the hub's certificate
    /// (`--hub-ca-file`; without it, the usual roots), and presents `identity` (a PEM
    /// certificate and its key, `--hub-client-cert-file`) when the hub asks for one.
    pub fn client_with(
        cas: Option<&[u8]>,
        identity: Option<&[u8]>,
    ) -> Result<reqwest::Client, String> {
        let mut builder = Self::builder();
        if let Some(pem) = cas {
            let cas = reqwest::Certificate::from_pem_bundle(pem).map_err(|e| e.to_string())?;
            if cas.is_empty() {
                return Err("no CERTIFICATE in it".into());
            }
            builder = builder.tls_built_in_root_certs(false);
            for ca in cas {
                builder = builder.add_root_certificate(ca);
            }
        }
        if let Some(pem) = identity {
            let identity = reqwest::Identity::from_pem(pem)
                .map_err(|e| format!("the client certificate: {e}"))?;
            builder = builder.identity(identity);
        }
        builder.build().map_err(|e| e.to_string())
    }

    fn builder() -> reqwest::ClientBuilder {
        reqwest::Client::builder()
            // Below the hub's idle timeout (10 s): a connection is not reused just as the
            // hub closes it, and a quiet spoke holds no connection at the hub.
            .pool_idle_timeout(POOL_IDLE)
            .timeout(REQUEST_TIMEOUT)
            // Every request carries the join token or the cluster's credential: a hub that
            // answers with a redirect is told so (see `answered`), never followed.
            .redirect(reqwest::redirect::Policy::none())
    }
}

enum Failure {
    /// The hub refused our credential: register again.
    Unauthorized,
    /// The node went away (a reboot began) while the report was being made: nothing sent.
    Away,
    /// The hub did not answer (no connection, no answer in time, or a 5xx): another
    /// replica may.
    Unanswered(String),
    /// The hub pointed elsewhere (a redirect, not followed): the agent's `--hub-url` is
    /// wrong, which the operator must hear of.
    Redirected(String),
    Other(String),
}

/// A request that got no answer, or one that says the hub cannot serve it now.
fn unanswered(e: reqwest::Error) -> Failure {
    Failure::Unanswered(e.to_string())
}

/// A request the hub answered with something else than success or a refused credential. A
/// redirect names where it points: the agent does not follow it, and `--hub-url` should.
fn answered(what: &str, res: &reqwest::Response) -> Failure {
    let code = res.status();
    let mut why = format!("{what} answered {code}");
    if code.is_redirection() {
        let to = res
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|l| l.to_str().ok())
            .unwrap_or("nowhere");
        why.push_str(&format!(
            ", to {to}: the agent does not follow redirects (they would carry its credential); give --hub-url the hub's own URL"
        ));
        return Failure::Redirected(why);
    }
    if code.is_server_error() {
        Failure::Unanswered(why)
    } else {
        Failure::Other(why)
    }
}

/// Checks the hub URLs given to an agent: each an `http` or `https` URL.
pub fn check_hub_urls(urls: &[String]) -> Result<(), String> {
    for url in urls {
        match reqwest::Url::parse(url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
            Ok(_) => return Err(format!("--hub-url {url:?}: not an http or https URL")),
            Err(e) => return Err(format!("--hub-url {url:?}: {e}")),
        }
    }
    Ok(())
}

pub async fn run<S: Spoke>(agent: Arc<S>, link: HubLink, metrics: AgentMetrics) {
    // Where reports go, by hub, parsed once: a bad hub URL fails every report the same way.
    let status_urls: Vec<Result<reqwest::Url, String>> = link
        .hub_urls
        .iter()
        .map(|hub| {
            reqwest::Url::parse(&format!(
                "{}/v1/clusters/{}/status",
                hub.trim_end_matches('/'),
                agent.name()
            ))
            .map_err(|e| format!("the hub URL {hub:?}: {e}"))
        })
        .collect();
    let mut changes = agent.session().subscribe();
    let mut backoff = BACKOFF_MIN;
    // Hubs found not answering since the last answer: once every one was tried, back off.
    let mut unanswered = 0;
    // The certificate the hub pinned at the last registration.
    let mut pinned: Option<String> = None;
    // When to trade the credential for a new one: at two thirds of its life.
    let mut renew_at: Option<tokio::time::Instant> = None;
    // Whether the hub has yet to hear the current state.
    let mut owed = true;
    loop {
        if agent.check_reachable().is_err() {
            // Rebooting or simulated unreachable: nothing leaves the node.
            if changes.changed().await.is_err() {
                return;
            }
            owed = true;
            continue;
        }
        let serving = link.certificate.as_ref().map(|c| c.fingerprint());
        // The hub this round talks to: a failure moves on from this one.
        let (at, hub) = link.hub();
        let result = match agent.session().credential() {
            None => register(&*agent, &link, hub, &link.join_token, &serving).await,
            // A renewed certificate: registered again, as the cluster, so that the hub
            // pins it before it pushes again.
            Some(credential) if serving.is_some() && serving != pinned => {
                register(&*agent, &link, hub, &credential, &serving).await
            }
            Some(credential) if renew_at.is_some_and(|t| tokio::time::Instant::now() >= t) => {
                renew(&*agent, &link, hub, &credential).await
            }
            Some(credential) if owed => {
                changes.borrow_and_update();
                let url = status_urls
                    .get(at)
                    .cloned()
                    .unwrap_or_else(|| Err("no hub URL".into()));
                send(&*agent, &link, url, &credential).await
            }
            Some(_) => {
                tokio::select! {
                    changed = changes.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        owed = true;
                    }
                    _ = tokio::time::sleep(CERTIFICATE_CHECK), if link.certificate.is_some() => {}
                    _ = sleep_until(renew_at), if renew_at.is_some() => {}
                }
                continue;
            }
        };
        if result.is_ok() {
            unanswered = 0;
        }
        match result {
            Ok(Done::Registered(expires_at)) => {
                backoff = BACKOFF_MIN;
                pinned = serving;
                renew_at = renewal_time(expires_at);
                // Registered just now: report the current state at once.
                owed = true;
            }
            Ok(Done::Renewed(expires_at)) => {
                backoff = BACKOFF_MIN;
                renew_at = renewal_time(expires_at);
            }
            Ok(Done::Reported) => {
                backoff = BACKOFF_MIN;
                metrics.report("sent");
                owed = false;
            }
            Err(Failure::Away) => {}
            Err(Failure::Unauthorized) => {
                tracing::warn!(cluster = %agent.name(), "the hub refused our credential; registering again");
                agent.session().clear_credential();
                metrics.report("failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
            Err(Failure::Unanswered(why)) => {
                metrics.report("failed");
                unanswered += 1;
                if link.move_on(at, agent.name(), &why) && unanswered < link.hub_urls.len() {
                    // Another replica may answer: ask it at once.
                    continue;
                }
                unanswered = 0;
                tracing::debug!(cluster = %agent.name(), %why, ?backoff, "hub not reachable; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
            Err(failure @ (Failure::Redirected(_) | Failure::Other(_))) => {
                match &failure {
                    Failure::Redirected(why) => {
                        tracing::warn!(cluster = %agent.name(), %why, ?backoff, "the hub sent the agent elsewhere; retrying")
                    }
                    Failure::Other(why) => {
                        tracing::debug!(cluster = %agent.name(), %why, ?backoff, "hub refused the request; retrying")
                    }
                    _ => {}
                }
                metrics.report("failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// What a round with the hub achieved.
enum Done {
    /// Registered; the credential expires then.
    Registered(Option<chrono::DateTime<chrono::Utc>>),
    /// The credential was traded for one that expires then.
    Renewed(Option<chrono::DateTime<chrono::Utc>>),
    Reported,
}

/// When to renew a credential that expires at `expires_at`: two thirds of the way from now.
fn renewal_time(expires_at: Option<chrono::DateTime<chrono::Utc>>) -> Option<tokio::time::Instant> {
    let left = (expires_at? - chrono::Utc::now())
        .to_std()
        .unwrap_or_default();
    Some(tokio::time::Instant::now() + left * 2 / 3)
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A turn to talk to the hub, when the link's agents share a bound.
async fn turn(link: &HubLink) -> Option<tokio::sync::OwnedSemaphorePermit> {
    match &link.requests {
        Some(bound) => bound.clone().acquire_owned().await.ok(),
        None => None,
    }
}

/// Trades the credential for a new one; the hub refuses the old one from then on.
async fn renew<S: Spoke>(
    agent: &S,
    link: &HubLink,
    hub: &str,
    credential: &str,
) -> Result<Done, Failure> {
    let _turn = turn(link).await;
    let url = format!("{hub}/v1/clusters/{}/credential", agent.name());
    let res = link
        .client
        .post(&url)
        .bearer_auth(credential)
        .send()
        .await
        .map_err(unanswered)?;
    match res.status() {
        s if s.is_success() => {}
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => return Err(Failure::Unauthorized),
        _ => return Err(answered("credential renewal", &res)),
    }
    let renewed: RegisterResponse = res
        .json()
        .await
        .map_err(|e| Failure::Other(format!("credential renewal answer: {e}")))?;
    agent.session().renew_credential(renewed.credential);
    tracing::info!(cluster = %agent.name(), expires_at = ?renewed.expires_at, "credential renewed");
    Ok(Done::Renewed(renewed.expires_at))
}

/// Registers as `bearer` (the join token, or the cluster's credential to register a renewed
/// certificate), with the certificate the API serves.
async fn register<S: Spoke>(
    agent: &S,
    link: &HubLink,
    hub: &str,
    bearer: &str,
    certificate: &Option<String>,
) -> Result<Done, Failure> {
    let _turn = turn(link).await;
    let url = format!("{hub}/v1/clusters/register");
    let body = RegisterRequest {
        name: agent.name().to_string(),
        endpoint: link.endpoint.clone(),
        labels: link.labels.clone(),
        agent_id: link.agent_id.clone(),
        certificate_sha256: certificate.clone(),
    };
    let mut req = link.client.post(&url).json(&body);
    // No join token: the client certificate speaks for the agent.
    if !bearer.is_empty() {
        req = req.bearer_auth(bearer);
    }
    let res = req.send().await.map_err(unanswered)?;
    if !res.status().is_success() {
        let code = res.status();
        let failure = answered("registration", &res);
        let text = res.text().await.unwrap_or_default();
        tracing::warn!(cluster = %agent.name(), %code, %text, "registration refused");
        if bearer != link.join_token && code == StatusCode::UNAUTHORIZED {
            // The credential is no longer the cluster's: the join token next.
            return Err(Failure::Unauthorized);
        }
        return Err(failure);
    }
    let reg: RegisterResponse = res
        .json()
        .await
        .map_err(|e| Failure::Other(format!("registration answer: {e}")))?;
    agent.session().set_credential(reg.credential);
    tracing::info!(cluster = %agent.name(), %hub, certificate = certificate.as_deref().unwrap_or(""), "registered with the hub");
    Ok(Done::Registered(reg.expires_at))
}

async fn send<S: Spoke>(
    agent: &S,
    link: &HubLink,
    url: Result<reqwest::Url, String>,
    credential: &str,
) -> Result<Done, Failure> {
    let url = url.map_err(Failure::Other)?;
    let Ok(ibu) = agent.ibu().await else {
        return Err(Failure::Away);
    };
    let _turn = turn(link).await;
    let report = StatusReportRef {
        sequence: agent.session().next_sequence(),
        agent_id: &link.agent_id,
        ibu: &ibu,
    };
    let res = link
        .client
        .post(url)
        .bearer_auth(credential)
        .header(
            fleet_types::http::REQUEST_ID,
            uuid::Uuid::new_v4().to_string(),
        )
        .json(&report)
        .send()
        .await
        .map_err(unanswered)?;
    match res.status() {
        s if s.is_success() => Ok(Done::Reported),
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Err(Failure::Unauthorized),
        _ => Err(answered("report", &res)),
    }
}

#[cfg(test)]
mod tests {
    use super::{Failure, HubLink, answered, check_hub_urls};

    /// A hub that answers with a redirect is not followed: the credential stays here, and
    /// the failure says where the redirect pointed.
    #[tokio::test]
    async fn a_redirect_from_the_hub_is_named_not_followed() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        async fn serve(app: axum::Router) -> String {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            tokio::spawn(async move { axum::serve(listener, app).await });
            url
        }
        let hits = Arc::new(AtomicUsize::new(0));
        let counted = hits.clone();
        let elsewhere = serve(axum::Router::new().fallback(move || {
            counted.fetch_add(1, Ordering::SeqCst);
            async { "taken" }
        }))
        .await;
        let location = format!("{elsewhere}/v1/clusters/sno1/status");
        let to = location.clone();
        let hub = serve(axum::Router::new().fallback(move || async move {
            (
                axum::http::StatusCode::PERMANENT_REDIRECT,
                [(axum::http::header::LOCATION, to)],
            )
        }))
        .await;
        let res = HubLink::client()
            .post(format!("{hub}/v1/clusters/sno1/status"))
            .bearer_auth("credential")
            .body("{}")
            .send()
            .await
            .unwrap();
        let Failure::Redirected(why) = answered("report", &res) else {
            panic!("a redirect is not a hub that is away");
        };
        assert_eq!(
            why,
            format!(
                "report answered 308 Permanent Redirect, to {location}: the agent does not follow redirects (they would carry its credential); give --hub-url the hub's own URL"
            )
        );
        assert_eq!(hits.load(Ordering::SeqCst), 0, "the redirect was followed");
    }

    #[test]
    fn every_hub_url_is_checked_at_start() {
        let urls = |u: &[&str]| u.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            check_hub_urls(&urls(&["http://hub-a:8443", "https://hub-b"])),
            Ok(())
        );
        assert_eq!(
            check_hub_urls(&urls(&["http://hub-a", "hub-b:8443"])),
            Err("--hub-url \"hub-b:8443\": not an http or https URL".into())
        );
        assert_eq!(
            check_hub_urls(&urls(&["http://"])),
            Err("--hub-url \"http://\": empty host".into())
        );
    }
}
