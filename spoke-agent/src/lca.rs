//! `spoke-agent serve --host lca`: the cluster already runs Red Hat's Lifecycle Agent, and the
//! agent does no node work at all. It drives the cluster's own `ImageBasedUpgrade`
//! (`lca.openshift.io/v1`, cluster-scoped, named `upgrade`) with merge patches of its spec,
//! and mirrors every change of it to the hub (`ibu-host.md` section 7).
//!
//! Across the reboot of an upgrade or a rollback the cluster's API goes away and the Lifecycle
//! Agent deletes the IBU and creates it again from `ibu.json` (a new UID, the generation
//! restarting): the mirror follows the IBU by name through a watch that re-lists, says
//! "rebooting" while the API is away, and never applies a stage on its own; only a push does.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use fleet_types::ibu::{ConfigMapRef, ImageBasedUpgrade, Stage};
use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams};
use kube::runtime::watcher;
use serde_json::Value;
use spoke_core::Error;
use spoke_core::host::RestoreInfo;
use spoke_core::spoke::{HubSession, Spoke};

use crate::kubernetes::host::{configmap_apply, restore_info, velero};
use crate::kubernetes::ibu::NAME;

/// The message the API server's CEL rule on the IBU gives for a stage it does not allow
/// (the Lifecycle Agent's CRD, `x-kubernetes-validations`).
pub const STAGE_NOT_PERMITTED: &str = "the stage transition is not permitted. Please refer to status.validNextStages for valid transitions. If status.validNextStages is not present, it indicates that no transitions are currently allowed";

/// What the cluster's API showed last.
#[derive(Clone, Debug, PartialEq)]
pub enum Seen {
    /// No IBU yet: the agent just started, or the Lifecycle Agent has not created it.
    Nothing,
    /// The IBU as last read.
    Ibu(Arc<ImageBasedUpgrade>),
    /// The IBU is gone: the Lifecycle Agent deletes it before it creates it again from
    /// `ibu.json` after a reboot.
    Recreating,
    /// The API server does not know the resource: no Lifecycle Agent on this cluster.
    NoLifecycleAgent(String),
    /// The API does not answer (the node reboots) or refuses the watch.
    Away(String),
}

impl Seen {
    /// Why the IBU cannot be shown now.
    fn unavailable(&self) -> Error {
        Error::Unavailable(match self {
            Seen::Away(why) => format!("rebooting, or the cluster's API does not answer: {why}"),
            Seen::Recreating => {
                "rebooting: the Lifecycle Agent is creating the ImageBasedUpgrade again".into()
            }
            _ => format!(
                "the cluster has no ImageBasedUpgrade {NAME:?} yet (the Lifecycle Agent creates it \
                 when it starts)"
            ),
        })
    }
}

pub struct LcaSpoke {
    name: String,
    client: kube::Client,
    session: HubSession,
    seen: RwLock<Seen>,
    /// An IBU was seen once: its absence since means it is being created again.
    ever: AtomicBool,
}

fn no_lca(detail: &str) -> String {
    format!(
        "the Lifecycle Agent is not installed on this cluster: the API server has no \
         imagebasedupgrades.lca.openshift.io ({detail})"
    )
}

/// The Kubernetes API's answer to the agent's own calls, by what the hub should do.
fn kube_error(what: &str, err: kube::Error) -> Error {
    match &err {
        kube::Error::Api(s) if s.code == 403 => Error::Invalid(format!(
            "{what}: the agent's ServiceAccount may not do this (RBAC): {}",
            s.message
        )),
        kube::Error::Api(s) if matches!(s.code, 400 | 409 | 422) => {
            Error::Invalid(format!("{what}: {}", s.message))
        }
        kube::Error::Api(s) if s.code == 404 => Error::Invalid(format!("{what}: {}", s.message)),
        _ => Error::Unavailable(format!("{what}: the cluster's API: {err}")),
    }
}

/// `Err` with the CEL rule's message when the patch asks for a stage the IBU does not allow
/// now: the same answer the API server would give, without the round trip.
pub fn check_stage(current: &ImageBasedUpgrade, patch: &Value) -> Result<(), Error> {
    let Some(wanted) = patch.pointer("/spec/stage") else {
        return Ok(());
    };
    let wanted: Stage = serde_json::from_value(wanted.clone())
        .map_err(|e| Error::Invalid(format!("spec.stage: {e}")))?;
    if wanted == current.spec.stage {
        return Ok(());
    }
    let allowed = current
        .status
        .as_ref()
        .is_some_and(|s| s.valid_next_stages.contains(&wanted));
    if allowed {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "ImageBasedUpgrade.lca.openshift.io \"{NAME}\" is invalid: <nil>: Invalid value: \"object\": {STAGE_NOT_PERMITTED}"
        )))
    }
}

/// The spec fields the Lifecycle Agent takes only while Idle (its CEL rules refuse a change
/// of them during a stage).
const IDLE_ONLY: [&str; 4] = [
    "seedImageRef",
    "oadpContent",
    "extraManifests",
    "autoRollbackOnFailure",
];

/// The part of a push the IBU takes now: `spec.stage` and the `lca.openshift.io`
/// annotations always; the seed, the ConfigMaps and the auto-rollback settings only while it
/// is Idle (the hub sends them with every push; during a stage they could only differ by
/// the Lifecycle Agent's own defaulting, which the API would refuse as a change).
pub fn narrow(current: &ImageBasedUpgrade, patch: &Value) -> Value {
    let idle = current
        .status
        .as_ref()
        .and_then(|s| s.condition(fleet_types::ibu::condition_type::IDLE))
        .is_some_and(|c| c.status == fleet_types::ibu::ConditionStatus::True);
    let mut out = patch.clone();
    if !idle && let Some(spec) = out.get_mut("spec").and_then(Value::as_object_mut) {
        for field in IDLE_ONLY {
            spec.remove(field);
        }
    }
    if let Some(annotations) = out
        .pointer_mut("/metadata/annotations")
        .and_then(Value::as_object_mut)
    {
        annotations.retain(|k, _| k.contains("lca.openshift.io"));
    }
    out
}

impl LcaSpoke {
    pub fn new(name: String, client: kube::Client) -> Arc<LcaSpoke> {
        Arc::new(LcaSpoke {
            name,
            client,
            session: HubSession::default(),
            seen: RwLock::new(Seen::Nothing),
            ever: AtomicBool::new(false),
        })
    }

    fn api(&self) -> Api<ImageBasedUpgrade> {
        Api::all(self.client.clone())
    }

    pub fn seen(&self) -> Seen {
        self.seen.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn show(&self, next: Seen) {
        if matches!(next, Seen::Ibu(_)) {
            self.ever.store(true, Ordering::SeqCst);
        }
        let mut seen = self.seen.write().unwrap_or_else(|p| p.into_inner());
        if *seen != next {
            match &next {
                Seen::Ibu(ibu) => {
                    let c = ibu.status.as_ref().and_then(|s| s.current());
                    tracing::debug!(stage = %ibu.spec.stage, condition = ?c.map(|c| (&c.type_, &c.reason)), "IBU changed");
                }
                other => tracing::info!(?other, "the cluster's IBU"),
            }
            *seen = next;
            drop(seen);
            self.session.changed();
        }
    }

    /// Follows the IBU until the task is dropped: every change is shown to the hub.
    pub async fn run(self: Arc<Self>) {
        let config = watcher::Config::default().fields(&format!("metadata.name={NAME}"));
        let mut backoff = Duration::from_millis(200);
        loop {
            let mut events = watcher(self.api(), config.clone()).boxed();
            while let Some(event) = events.next().await {
                match event {
                    Ok(watcher::Event::Apply(ibu) | watcher::Event::InitApply(ibu)) => {
                        backoff = Duration::from_millis(200);
                        self.show(Seen::Ibu(Arc::new(ibu)));
                    }
                    Ok(watcher::Event::Delete(_)) => self.show(Seen::Recreating),
                    Ok(watcher::Event::Init) => {}
                    Ok(watcher::Event::InitDone) => {
                        // A list that found no IBU: being created again after a reboot, or
                        // not created yet (the Lifecycle Agent has not started).
                        if !matches!(self.seen(), Seen::Ibu(_)) {
                            self.show(if self.ever.load(Ordering::SeqCst) {
                                Seen::Recreating
                            } else {
                                Seen::Nothing
                            });
                        }
                    }
                    Err(err) => {
                        match &err {
                            watcher::Error::InitialListFailed(kube::Error::Api(s))
                            | watcher::Error::WatchStartFailed(kube::Error::Api(s))
                                if s.code == 404 =>
                            {
                                self.show(Seen::NoLifecycleAgent(no_lca(&s.message)))
                            }
                            _ => self.show(Seen::Away(err.to_string())),
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
        }
    }

    /// The IBU as now stored (read again before a patch: the mirror may lag).
    async fn current(&self) -> Result<ImageBasedUpgrade, Error> {
        match self.api().get_opt(NAME).await {
            Ok(Some(ibu)) => Ok(ibu),
            Ok(None) => Err(Error::Unavailable(format!(
                "the cluster has no ImageBasedUpgrade {NAME:?} yet (the Lifecycle Agent creates it)"
            ))),
            Err(kube::Error::Api(s)) if s.code == 404 => Err(Error::Invalid(no_lca(&s.message))),
            Err(err) => Err(kube_error("reading the ImageBasedUpgrade", err)),
        }
    }
}

impl Spoke for LcaSpoke {
    type Ibu = Arc<ImageBasedUpgrade>;

    fn name(&self) -> &str {
        &self.name
    }

    fn session(&self) -> &HubSession {
        &self.session
    }

    fn check_reachable(&self) -> Result<(), Error> {
        match self.seen() {
            seen @ (Seen::Away(_) | Seen::Recreating) => Err(seen.unavailable()),
            _ => Ok(()),
        }
    }

    async fn ibu(&self) -> Result<Arc<ImageBasedUpgrade>, Error> {
        match self.seen() {
            Seen::Ibu(ibu) => Ok(ibu),
            Seen::NoLifecycleAgent(why) => Err(Error::Invalid(why)),
            seen => Err(seen.unavailable()),
        }
    }

    async fn patch(&self, patch: &Value) -> Result<Arc<ImageBasedUpgrade>, Error> {
        if let Seen::NoLifecycleAgent(why) = self.seen() {
            return Err(Error::Invalid(why));
        }
        self.check_reachable()?;
        let current = self.current().await?;
        check_stage(&current, patch)?;
        let patch = narrow(&current, patch);
        let patched = self
            .api()
            .patch(NAME, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|e| kube_error("patching the ImageBasedUpgrade", e))?;
        let patched = Arc::new(patched);
        self.show(Seen::Ibu(patched.clone()));
        Ok(patched)
    }

    async fn restores(&self) -> Result<Vec<RestoreInfo>, Error> {
        self.check_reachable()?;
        let api: Api<DynamicObject> = Api::namespaced_with(
            self.client.clone(),
            "openshift-adp",
            &velero("Restore", "restores"),
        );
        match api.list(&ListParams::default()).await {
            Ok(list) => Ok(list.items.into_iter().map(restore_info).collect()),
            // No OADP on the cluster: no restores.
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(Vec::new()),
            Err(err) => Err(kube_error("listing OADP restores", err)),
        }
    }

    async fn configmap_get(
        &self,
        r: &ConfigMapRef,
    ) -> Result<Option<BTreeMap<String, String>>, Error> {
        self.check_reachable()?;
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &r.namespace);
        api.get_opt(&r.name)
            .await
            .map(|cm| cm.map(|c| c.data.unwrap_or_default()))
            .map_err(|e| kube_error("reading a ConfigMap", e))
    }

    async fn configmap_put(
        &self,
        r: &ConfigMapRef,
        data: BTreeMap<String, String>,
    ) -> Result<(), Error> {
        self.check_reachable()?;
        configmap_apply(&self.client, r, data)
            .await
            .map_err(|e| kube_error("writing a ConfigMap", e))
    }

    async fn configmap_delete(&self, r: &ConfigMapRef) -> Result<bool, Error> {
        self.check_reachable()?;
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &r.namespace);
        match api.delete(&r.name, &Default::default()).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
            Err(err) => Err(kube_error("deleting a ConfigMap", err)),
        }
    }

    async fn gather(&self) -> Result<Vec<(String, Vec<u8>)>, Error> {
        let ibu = self.ibu().await?;
        let restores = self.restores().await.unwrap_or_default();
        let history = ibu
            .status
            .as_ref()
            .map(|s| s.history.clone())
            .unwrap_or_default();
        let yaml = serde_yaml::to_string(&*ibu).map_err(|e| Error::internal("ibu.yaml", e))?;
        Ok(vec![
            ("ibu.yaml".into(), yaml.into_bytes()),
            ("ibu.json".into(), pretty(&*ibu)),
            ("history.json".into(), pretty(&history)),
            ("restores.json".into(), pretty(&restores)),
            (
                "lifecycle-agent.txt".into(),
                b"driven through the cluster's own Lifecycle Agent (--host lca); its must-gather \
                  holds the node's side: oc adm must-gather with the lifecycle-agent image"
                    .to_vec(),
            ),
        ])
    }
}

fn pretty<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec_pretty(value).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use fleet_types::ibu::{ImageBasedUpgradeSpec, ImageBasedUpgradeStatus};
    use serde_json::json;

    use super::*;

    fn ibu(stage: Stage, valid: &[Stage]) -> ImageBasedUpgrade {
        let mut ibu = ImageBasedUpgrade::new(
            NAME,
            ImageBasedUpgradeSpec {
                stage,
                ..Default::default()
            },
        );
        ibu.status = Some(ImageBasedUpgradeStatus {
            valid_next_stages: valid.to_vec(),
            ..Default::default()
        });
        ibu
    }

    #[test]
    fn a_stage_outside_valid_next_stages_is_refused_as_the_api_server_words_it() {
        let idle = ibu(Stage::Idle, &[Stage::Prep]);
        assert!(check_stage(&idle, &json!({"spec": {"stage": "Prep"}})).is_ok());
        assert!(
            check_stage(&idle, &json!({"spec": {"stage": "Idle"}})).is_ok(),
            "no change"
        );
        assert!(
            check_stage(&idle, &json!({"metadata": {}})).is_ok(),
            "no stage"
        );
        let Err(Error::Invalid(why)) = check_stage(&idle, &json!({"spec": {"stage": "Upgrade"}}))
        else {
            panic!("Upgrade from Idle must be refused");
        };
        assert_eq!(
            why,
            format!(
                "ImageBasedUpgrade.lca.openshift.io \"upgrade\" is invalid: <nil>: Invalid value: \"object\": {STAGE_NOT_PERMITTED}"
            )
        );
        assert!(matches!(
            check_stage(&idle, &json!({"spec": {"stage": "Sideways"}})),
            Err(Error::Invalid(_))
        ));
    }

    #[test]
    fn seed_and_configmaps_go_only_to_an_idle_ibu() {
        use fleet_types::ibu::{Condition, ConditionStatus};
        let push = json!({"spec": {"stage": "Upgrade", "seedImageRef": {"version": "4.16.0"},
            "oadpContent": [], "extraManifests": [], "autoRollbackOnFailure": {}},
            "metadata": {"annotations": {"lca.openshift.io/x": "1", "other.io/y": "2"}}});
        let mut prepped = ibu(Stage::Prep, &[Stage::Idle, Stage::Upgrade]);
        assert_eq!(
            narrow(&prepped, &push),
            json!({"spec": {"stage": "Upgrade"},
                   "metadata": {"annotations": {"lca.openshift.io/x": "1"}}})
        );
        prepped.status.as_mut().unwrap().conditions = vec![Condition {
            type_: "Idle".into(),
            status: ConditionStatus::True,
            reason: "Idle".into(),
            message: "Idle".into(),
            last_transition_time: None,
            observed_generation: None,
        }];
        assert_eq!(
            narrow(&prepped, &push)["spec"],
            push["spec"],
            "Idle takes all"
        );
    }

    #[test]
    fn the_apis_answers_become_what_the_hub_should_do() {
        let api = |code: u16| {
            kube_error(
                "patching",
                kube::Error::Api(Box::new(kube::core::Status {
                    code,
                    message: "m".into(),
                    ..Default::default()
                })),
            )
        };
        assert!(matches!(api(403), Error::Invalid(m) if m.contains("(RBAC)")));
        assert!(matches!(api(422), Error::Invalid(m) if m == "patching: m"));
        assert!(matches!(api(503), Error::Unavailable(_)));
    }
}
