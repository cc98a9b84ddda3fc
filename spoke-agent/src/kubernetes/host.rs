//! The host in Kubernetes mode: the node's own steps stay with the inner host, while what
//! lives in the cluster's API goes there: the ConfigMaps an IBU refers to, and the OADP
//! `Backup`/`Restore` objects (`velero.io/v1`, namespace `openshift-adp`) that Velero runs,
//! cleaned up with `DeleteBackupRequest`s.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use fleet_types::ibu::{ConfigMapRef, ImageBasedUpgradeSpec, SeedImageRef};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, ObjectMeta, PostParams,
};
use serde_json::{Value, json};

use spoke_core::engine::validate::ClusterFacts;
use spoke_core::engine::{Root, SpokeState};
use spoke_core::host::{ClusterConfig, Host, HostError, PrecacheSummary, RebootFor, RestoreInfo};

pub const OADP_NAMESPACE: &str = "openshift-adp";
/// The key of a `kubernetes.io/dockerconfigjson` Secret.
const DOCKER_CONFIG_JSON: &str = ".dockerconfigjson";
/// Put on every Backup and Restore the agent creates, so cleanup finds exactly those.
pub const CREATED_BY_LABEL: &str = "lca.openshift.io/created-by";
pub const CREATED_BY: &str = "spoke-agent";
/// How often a running Backup or Restore is looked at.
const POLL: Duration = Duration::from_millis(500);

pub fn velero(kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("velero.io", "v1", kind), plural)
}

fn transient(e: kube::Error) -> HostError {
    HostError::Transient(format!("Kubernetes API: {e}"))
}

/// What a Backup's or Restore's `status.phase` means for the stage.
#[derive(Debug, PartialEq)]
pub enum Phase {
    Done,
    Failed,
    Running,
}

pub fn phase(obj: &Value) -> Phase {
    match obj["status"]["phase"].as_str().unwrap_or_default() {
        "Completed" => Phase::Done,
        "Failed" | "PartiallyFailed" | "FailedValidation" => Phase::Failed,
        _ => Phase::Running,
    }
}

/// A Velero Restore as `oc get restores` shows it.
pub fn restore_info(r: DynamicObject) -> RestoreInfo {
    let v = serde_json::to_value(&r).unwrap_or_default();
    let text = |pointer: &str| {
        v.pointer(pointer)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    RestoreInfo {
        phase: text("/status/phase"),
        failure_reason: text("/status/failureReason"),
        name: r.metadata.name.unwrap_or_default(),
    }
}

/// Creates or replaces the ConfigMap's data (server-side apply, as the agent's field manager).
pub async fn configmap_apply(
    client: &kube::Client,
    r: &ConfigMapRef,
    data: BTreeMap<String, String>,
) -> Result<(), kube::Error> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), &r.namespace);
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some(r.name.clone()),
            namespace: Some(r.namespace.clone()),
            ..Default::default()
        },
        data: Some(data),
        ..Default::default()
    };
    let pp = kube::api::PatchParams::apply("spoke-agent").force();
    api.patch(&r.name, &pp, &kube::api::Patch::Apply(&cm))
        .await
        .map(|_| ())
}

pub struct KubeHost<H> {
    inner: H,
    client: kube::Client,
    /// The label selector of the agent's own objects, carried across the pivot.
    carry: Option<String>,
}

/// Whether the condition `type_` of an object's `status.conditions` is `"True"`.
fn condition_true(obj: &Value, type_: &str) -> Option<bool> {
    obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .map(|c| c["status"] == "True")
}

/// The cluster's health as the Lifecycle Agent checks it before a stage goes on: its API
/// answers, every node is Ready, every ClusterOperator is Available and not Degraded (a
/// cluster without ClusterOperators, not OpenShift, has none to check). `Err` says what to
/// wait for.
pub async fn cluster_health(client: &kube::Client) -> Result<(), String> {
    let nodes: Api<DynamicObject> = Api::all_with(
        client.clone(),
        &ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("", "v1", "Node"), "nodes"),
    );
    let list = nodes
        .list(&ListParams::default())
        .await
        .map_err(|e| format!("the cluster's API: listing nodes: {e}"))?;
    for node in list {
        let value = serde_json::to_value(&node).unwrap_or_default();
        if condition_true(&value, "Ready") != Some(true) {
            return Err(format!(
                "node {} is not Ready",
                node.metadata.name.unwrap_or_default()
            ));
        }
    }
    let operators: Api<DynamicObject> = Api::all_with(
        client.clone(),
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("config.openshift.io", "v1", "ClusterOperator"),
            "clusteroperators",
        ),
    );
    let list = match operators.list(&ListParams::default()).await {
        Ok(list) => list,
        Err(kube::Error::Api(e)) if e.code == 404 => return Ok(()),
        Err(e) => return Err(format!("the cluster's API: listing ClusterOperators: {e}")),
    };
    for co in list {
        let value = serde_json::to_value(&co).unwrap_or_default();
        let name = co.metadata.name.unwrap_or_default();
        if condition_true(&value, "Available") != Some(true) {
            return Err(format!("ClusterOperator {name} is not Available"));
        }
        if condition_true(&value, "Degraded") == Some(true) {
            return Err(format!("ClusterOperator {name} is Degraded"));
        }
    }
    Ok(())
}

impl<H: Host> KubeHost<H> {
    pub fn new(inner: H, client: kube::Client) -> Self {
        KubeHost {
            inner,
            client,
            carry: None,
        }
    }

    /// Carries the agent's own objects (this label selector) across the pivot.
    pub fn carrying(mut self, selector: Option<String>) -> Self {
        self.carry = selector;
        self
    }

    /// Hands the node the seed's registry credentials, when the IBU names a Secret (in the
    /// agent's namespace) for them, as the Lifecycle Agent does for each inspect and pull.
    async fn lend_seed_pull_secret(&self, seed: &SeedImageRef) -> Result<(), HostError> {
        let Some(r) = &seed.pull_secret_ref else {
            return Ok(());
        };
        let namespace = self.client.default_namespace();
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        let refused = |why: String| {
            HostError::Terminal(format!(
                "failed to retrieve pull-secret from secret {}, err: {why}",
                r.name
            ))
        };
        let secret = match secrets.get_opt(&r.name).await {
            Ok(Some(secret)) => secret,
            Ok(None) => {
                return Err(refused(format!(
                    "secrets \"{}\" not found in namespace {namespace}",
                    r.name
                )));
            }
            Err(kube::Error::Api(e)) if e.code == 403 => return Err(refused(e.message)),
            Err(e) => return Err(transient(e)),
        };
        let auth = secret
            .data
            .as_ref()
            .and_then(|d| d.get(DOCKER_CONFIG_JSON))
            .ok_or_else(|| refused(format!("the secret has no {DOCKER_CONFIG_JSON}")))?;
        self.inner.seed_pull_secret(Some(&auth.0)).await
    }

    /// The node forgets the seed's credentials once they were used (failures are logged: the
    /// file is in the workspace, which cleanup removes).
    async fn take_back_seed_pull_secret(&self, seed: &SeedImageRef) {
        if seed.pull_secret_ref.is_some()
            && let Err(err) = self.inner.seed_pull_secret(None).await
        {
            tracing::warn!(%err, "removing the seed's pull secret from the node");
        }
    }

    fn configmaps(&self, namespace: &str) -> Api<ConfigMap> {
        Api::namespaced(self.client.clone(), namespace)
    }

    /// Creates the group's objects (an existing one is the same object from a run that was
    /// interrupted) and waits until Velero ends all of them.
    async fn run_groups(
        &self,
        kind: &str,
        plural: &str,
        groups: &[Vec<Value>],
    ) -> Result<(), HostError> {
        let resource = velero(kind, plural);
        for group in groups {
            let mut names = Vec::new();
            for doc in group {
                let name = doc["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                let ns = doc["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or(OADP_NAMESPACE)
                    .to_string();
                let mut obj: DynamicObject = serde_json::from_value(doc.clone())
                    .map_err(|e| HostError::Terminal(format!("{kind} {name}: {e}")))?;
                obj.metadata.namespace = Some(ns.clone());
                obj.metadata
                    .labels
                    .get_or_insert_with(Default::default)
                    .insert(CREATED_BY_LABEL.into(), CREATED_BY.into());
                let api: Api<DynamicObject> =
                    Api::namespaced_with(self.client.clone(), &ns, &resource);
                match api.create(&PostParams::default(), &obj).await {
                    Ok(_) => tracing::info!(kind, %name, "created"),
                    Err(kube::Error::Api(e)) if e.code == 409 => {}
                    Err(e) => return Err(transient(e)),
                }
                names.push((api, name));
            }
            loop {
                let mut failed = Vec::new();
                let mut running = false;
                for (api, name) in &names {
                    let obj = api.get(name).await.map_err(transient)?;
                    match phase(&serde_json::to_value(&obj).unwrap_or_default()) {
                        Phase::Done => {}
                        Phase::Failed => failed.push(name.clone()),
                        Phase::Running => running = true,
                    }
                }
                if !failed.is_empty() {
                    return Err(HostError::Terminal(format!(
                        "Failed {} CRs: {}",
                        kind.to_lowercase(),
                        failed.join(", ")
                    )));
                }
                if !running {
                    break;
                }
                tokio::time::sleep(POLL).await;
            }
        }
        Ok(())
    }

    /// Every Backup this agent created gets a DeleteBackupRequest (Velero removes the backup
    /// and its data); its Restores are deleted.
    async fn delete_oadp_objects(&self) -> Result<(), String> {
        let selector = ListParams::default().labels(&format!("{CREATED_BY_LABEL}={CREATED_BY}"));
        let backups: Api<DynamicObject> = Api::namespaced_with(
            self.client.clone(),
            OADP_NAMESPACE,
            &velero("Backup", "backups"),
        );
        let requests: Api<DynamicObject> = Api::namespaced_with(
            self.client.clone(),
            OADP_NAMESPACE,
            &velero("DeleteBackupRequest", "deletebackuprequests"),
        );
        let list = backups
            .list(&selector)
            .await
            .map_err(|e| format!("failed to list backups: {e}"))?;
        for b in list.items {
            let name = b.metadata.name.clone().unwrap_or_default();
            let mut request = DynamicObject::new(
                &name,
                &velero("DeleteBackupRequest", "deletebackuprequests"),
            );
            request.metadata = ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(OADP_NAMESPACE.into()),
                ..Default::default()
            };
            request.data = json!({"spec": {"backupName": name}});
            match requests.create(&PostParams::default(), &request).await {
                Ok(_) | Err(kube::Error::Api(_)) => {}
                Err(e) => return Err(format!("failed to delete backup {name}: {e}")),
            }
        }
        let restores: Api<DynamicObject> = Api::namespaced_with(
            self.client.clone(),
            OADP_NAMESPACE,
            &velero("Restore", "restores"),
        );
        let list = restores
            .list(&selector)
            .await
            .map_err(|e| format!("failed to list restores: {e}"))?;
        for r in list.items {
            let name = r.metadata.name.clone().unwrap_or_default();
            if let Err(e) = restores.delete(&name, &Default::default()).await {
                return Err(format!("failed to delete restore {name}: {e}"));
            }
        }
        Ok(())
    }
}

impl<H: Host> Host for KubeHost<H> {
    async fn load_state(&self) -> Result<Option<SpokeState>, HostError> {
        self.inner.load_state().await
    }

    async fn save_state(&self, root: &Root, state: &Arc<SpokeState>) -> Result<(), HostError> {
        self.inner.save_state(root, state).await
    }

    async fn health(&self) -> Result<(), String> {
        self.inner.health().await?;
        cluster_health(&self.client).await
    }

    async fn cluster_facts(&self, spec: &ImageBasedUpgradeSpec) -> Result<ClusterFacts, HostError> {
        let mut facts = self.inner.cluster_facts(spec).await?;
        facts.configmaps.clear();
        for r in spec.oadp_content.iter().chain(&spec.extra_manifests) {
            if let Some(data) = self.configmap_get(r).await {
                facts.configmaps.insert(r.clone(), data);
            }
        }
        Ok(facts)
    }

    async fn inspect_seed(
        &self,
        seed: &SeedImageRef,
    ) -> Result<BTreeMap<String, String>, HostError> {
        self.lend_seed_pull_secret(seed).await?;
        let labels = self.inner.inspect_seed(seed).await;
        self.take_back_seed_pull_secret(seed).await;
        labels
    }

    async fn free_container_storage(&self, threshold_percent: u8) -> Result<(), HostError> {
        self.inner.free_container_storage(threshold_percent).await
    }

    async fn setup_stateroot(&self, stateroot: &str, seed: &SeedImageRef) -> Result<(), HostError> {
        self.lend_seed_pull_secret(seed).await?;
        let done = self.inner.setup_stateroot(stateroot, seed).await;
        self.take_back_seed_pull_secret(seed).await;
        done
    }

    async fn precache(
        &self,
        seed: &SeedImageRef,
        registry: &str,
    ) -> Result<PrecacheSummary, HostError> {
        self.inner.precache(seed, registry).await
    }

    async fn backup(&self, groups: &[Vec<Value>]) -> Result<(), HostError> {
        self.inner.backup(groups).await?;
        self.run_groups("Backup", "backups", groups).await
    }

    async fn cluster_config(&self, stateroot: &str) -> Result<(), HostError> {
        if !self.inner.needs_cluster_config() {
            return self.inner.cluster_config(stateroot).await;
        }
        let mut from_api = super::cluster_config::gather(&self.client).await?;
        if let Some(selector) = &self.carry {
            let own = super::cluster_config::own_objects(&self.client, selector).await?;
            from_api.manifests.push(own);
        }
        self.inner.write_cluster_config(stateroot, from_api).await
    }

    fn needs_cluster_config(&self) -> bool {
        self.inner.needs_cluster_config()
    }

    async fn write_cluster_config(
        &self,
        stateroot: &str,
        from_api: ClusterConfig,
    ) -> Result<(), HostError> {
        self.inner.write_cluster_config(stateroot, from_api).await
    }

    async fn set_default(&self, root: &Root) -> Result<(), HostError> {
        self.inner.set_default(root).await
    }

    async fn seed_pull_secret(&self, auth: Option<&[u8]>) -> Result<(), HostError> {
        self.inner.seed_pull_secret(auth).await
    }

    async fn boot_id(&self) -> Option<String> {
        self.inner.boot_id().await
    }

    async fn reboot(&self, why: RebootFor) -> Result<(), HostError> {
        self.inner.reboot(why).await
    }

    async fn check_dpa(&self) -> Result<(), HostError> {
        self.inner.check_dpa().await
    }

    async fn apply_extra_manifests(&self, groups: &[Vec<Value>]) -> Result<(), HostError> {
        self.inner.apply_extra_manifests(groups).await
    }

    async fn restore(&self, groups: &[Vec<Value>]) -> Result<(), HostError> {
        self.inner.restore(groups).await?;
        self.run_groups("Restore", "restores", groups).await
    }

    async fn deferred_health(&self) -> Result<(), String> {
        cluster_health(&self.client).await?;
        self.inner.deferred_health().await
    }

    async fn disarm_watchdog(&self) -> Result<(), HostError> {
        self.inner.disarm_watchdog().await
    }

    async fn cleanup(&self, manual: bool) -> Result<(), Vec<String>> {
        let mut errors = Vec::new();
        if let Err(e) = self.delete_oadp_objects().await {
            errors.push(e);
        }
        if let Err(mut e) = self.inner.cleanup(manual).await {
            errors.append(&mut e);
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    async fn rollback_availability_expiration(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.inner.rollback_availability_expiration(now).await
    }

    async fn restores(&self) -> Vec<RestoreInfo> {
        let api: Api<DynamicObject> = Api::namespaced_with(
            self.client.clone(),
            OADP_NAMESPACE,
            &velero("Restore", "restores"),
        );
        let selector = ListParams::default().labels(&format!("{CREATED_BY_LABEL}={CREATED_BY}"));
        match api.list(&selector).await {
            Ok(list) => list.items.into_iter().map(restore_info).collect(),
            Err(err) => {
                tracing::warn!(%err, "listing OADP restores failed");
                Vec::new()
            }
        }
    }

    async fn configmap_get(&self, r: &ConfigMapRef) -> Option<BTreeMap<String, String>> {
        match self.configmaps(&r.namespace).get_opt(&r.name).await {
            Ok(cm) => cm.map(|c| c.data.unwrap_or_default()),
            Err(err) => {
                tracing::warn!(%err, configmap = %format!("{}/{}", r.namespace, r.name), "reading a ConfigMap failed");
                None
            }
        }
    }

    async fn configmap_put(
        &self,
        r: &ConfigMapRef,
        data: BTreeMap<String, String>,
    ) -> Result<(), HostError> {
        configmap_apply(&self.client, r, data)
            .await
            .map_err(transient)
    }

    async fn configmap_delete(&self, r: &ConfigMapRef) -> Result<bool, HostError> {
        match self
            .configmaps(&r.namespace)
            .delete(&r.name, &Default::default())
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(false),
            Err(e) => Err(transient(e)),
        }
    }

    async fn describe(&self) -> String {
        let restores = self.restores().await;
        format!(
            "{}\nOADP restores (openshift-adp): {}\n",
            self.inner.describe().await,
            serde_json::to_string(&restores).unwrap_or_default()
        )
    }
}
