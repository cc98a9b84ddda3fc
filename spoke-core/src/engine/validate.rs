//! Prep validations (`ibu-spoke.md` section 4, Prep steps 2 to 5): pure functions of the spec
//! and of what the host reported about the cluster and the seed image.

use std::collections::{BTreeMap, BTreeSet};

use fleet_types::ibu::{ConfigMapRef, SeedImageRef};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What the host knows about the cluster, gathered once per Prep.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct ClusterFacts {
    pub version: String,
    pub namespaces: BTreeSet<String>,
    /// `group/version` of every built-in API (core is `v1`).
    pub api_versions: BTreeSet<String>,
    /// `group/version/kind` of every installed CRD.
    pub crds: BTreeSet<String>,
    pub oadp_installed: bool,
    pub data_protection_applications: u32,
    pub lvms_volumes: bool,
    /// The ConfigMaps the spec refers to that exist (absent = not found).
    pub configmaps: BTreeMap<ConfigMapRef, BTreeMap<String, String>>,
    /// Server dry-run refusals, keyed `Kind/namespace/name`.
    pub dry_run_errors: BTreeMap<String, String>,
    pub has_proxy: bool,
    pub fips: bool,
    pub container_storage_mount: String,
}

pub const SEED_FORMAT_LABEL: &str = "com.openshift.lifecycle-agent.seed_format_version";
pub const SEED_CLUSTER_INFO_LABEL: &str = "com.openshift.lifecycle-agent.seed_cluster_info";
pub const SEED_FORMAT_VERSION: &str = "4";

/// The parts of the cluster a seed must agree with.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SeedCompat {
    pub has_proxy: bool,
    pub fips: bool,
    pub container_storage_mount: String,
}

/// `seed_cluster_info`, as the seed image's label carries it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct SeedClusterInfo {
    #[serde(default)]
    pub seed_cluster_ocp_version: String,
    #[serde(default)]
    pub release_registry: String,
    #[serde(default)]
    pub has_proxy: bool,
    #[serde(default)]
    pub has_fips: bool,
    #[serde(default)]
    pub container_storage_mountpoint_target: String,
}

fn spec_error(msg: impl std::fmt::Display) -> String {
    format!("failed to validate IBU spec: {msg}")
}

/// Step 2: the seed version is semver and strictly greater than the cluster's.
pub fn seed_version(seed: &SeedImageRef, current: &str) -> Result<(), String> {
    let prefix = "failed to validate seed image OCP version";
    if seed.image.trim().is_empty() || seed.image.chars().any(char::is_whitespace) {
        return Err(spec_error(
            "seedImageRef.image must be a non-empty image pull spec without whitespace",
        ));
    }
    let target = semver::Version::parse(&seed.version).map_err(|e| {
        spec_error(format!(
            "{prefix}: seed OCP version ({}) is not a valid semantic version: {e}",
            seed.version
        ))
    })?;
    let cur = semver::Version::parse(current).map_err(|e| {
        spec_error(format!(
            "{prefix}: current OCP version ({current}) is not a valid semantic version: {e}"
        ))
    })?;
    if target <= cur {
        return Err(spec_error(format!(
            "{prefix}: seed OCP version ({}) must be higher than current OCP version ({current})",
            seed.version
        )));
    }
    Ok(())
}

/// One document of a ConfigMap value.
#[derive(Clone, Debug)]
pub struct Manifest {
    pub api_version: String,
    pub kind: String,
    pub name: String,
    pub namespace: String,
    pub body: Value,
}

/// Splits every value of the ConfigMaps (in spec order, keys sorted) into documents.
fn documents(
    refs: &[ConfigMapRef],
    facts: &ClusterFacts,
    what: &str,
) -> Result<Vec<Manifest>, Vec<String>> {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for r in refs {
        let Some(data) = facts.configmaps.get(r) else {
            errors.push(format!(
                "{what} configmap {}/{} not found",
                r.namespace, r.name
            ));
            continue;
        };
        for (key, text) in data {
            for doc in serde_yaml::Deserializer::from_str(text) {
                match Value::deserialize(doc) {
                    Ok(Value::Null) => {}
                    Ok(body) => out.push(Manifest {
                        api_version: str_at(&body, &["apiVersion"]),
                        kind: str_at(&body, &["kind"]),
                        name: str_at(&body, &["metadata", "name"]),
                        namespace: str_at(&body, &["metadata", "namespace"]),
                        body,
                    }),
                    Err(e) => {
                        errors.push(format!(
                            "failed to decode manifest in configmap {}/{} key {key}: {e}",
                            r.namespace, r.name
                        ));
                        // The stream cannot be resynchronized after a syntax error.
                        break;
                    }
                }
            }
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

fn str_at(v: &Value, path: &[&str]) -> String {
    path.iter()
        .try_fold(v, |v, k| v.get(k))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

/// Kinds that must never be applied from extra manifests, by apiVersion.
const DISALLOWED: &[(&str, &str)] = &[
    ("machineconfiguration.openshift.io/v1", "MachineConfig"),
    ("operators.coreos.com/v1alpha1", "Subscription"),
    ("operators.coreos.com/v1alpha1", "InstallPlan"),
    ("operators.coreos.com/v1alpha1", "ClusterServiceVersion"),
];

/// Step 4: extra manifests. `Ok(warnings)` lets Prep go on; errors win over warnings.
pub fn extra_manifests(refs: &[ConfigMapRef], facts: &ClusterFacts) -> Result<Vec<String>, String> {
    let fail = |errors: Vec<String>| {
        spec_error(format!(
            "failed to validate extramanifests: {}",
            errors.join("; ")
        ))
    };
    let docs = documents(refs, facts, "extramanifests").map_err(fail)?;
    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    let mut created_namespaces = BTreeSet::new();
    for m in &docs {
        let id = format!("{}[{}]", m.kind, m.name);
        if m.name.is_empty() {
            errors.push(format!("{} resource name is empty", m.kind));
            continue;
        }
        if DISALLOWED.contains(&(m.api_version.as_str(), m.kind.as_str())) {
            errors.push(format!("{id} in extramanifests is not allowed"));
            continue;
        }
        let gvk = format!("{}/{}", m.api_version, m.kind);
        if !facts.api_versions.contains(&m.api_version) && !facts.crds.contains(&gvk) {
            warnings.push(format!("{id} - CRD not deployed on cluster"));
            continue;
        }
        if m.kind == "Namespace" && m.api_version == "v1" {
            created_namespaces.insert(m.name.clone());
        }
        if !m.namespace.is_empty()
            && !facts.namespaces.contains(&m.namespace)
            && !created_namespaces.contains(&m.namespace)
        {
            warnings.push(format!(
                "{id} - namespace {} not found on cluster or not added in configmap in right order",
                m.namespace
            ));
            continue;
        }
        let key = format!("{}/{}/{}", m.kind, m.namespace, m.name);
        if let Some(err) = facts.dry_run_errors.get(&key) {
            warnings.push(format!(
                "{id} - dryrun failed in namespace {}: {err}",
                m.namespace
            ));
        }
    }
    if errors.is_empty() {
        Ok(warnings)
    } else {
        Err(fail(errors))
    }
}

/// The Backups and Restores of the OADP ConfigMaps, in document order.
#[derive(Clone, Debug, Default)]
pub struct OadpContent {
    pub backups: Vec<Manifest>,
    pub restores: Vec<Manifest>,
}

/// Step 3: OADP content. `Ok` carries the documents and the LVM Storage warnings
/// (improvement: a Backup or Restore that would lose topolvm volumes is named before the
/// reboot).
pub fn oadp(
    refs: &[ConfigMapRef],
    facts: &ClusterFacts,
) -> Result<(OadpContent, Vec<String>), String> {
    if refs.is_empty() {
        return Ok((OadpContent::default(), Vec::new()));
    }
    if !facts.oadp_installed {
        return Err(spec_error(
            "OADP is not installed: install the OADP operator and create a DataProtectionApplication",
        ));
    }
    if facts.data_protection_applications != 1 {
        return Err(spec_error(format!(
            "exactly one DataProtectionApplication is required, found {}",
            facts.data_protection_applications
        )));
    }
    let missing: Vec<String> = refs
        .iter()
        .filter(|r| !facts.configmaps.contains_key(r))
        .map(|r| format!("configmap {}/{} not found", r.namespace, r.name))
        .collect();
    if !missing.is_empty() {
        return Err(spec_error(format!(
            "OADP configmap not found, error: {}. Please create the configmap.",
            missing.join(", ")
        )));
    }
    let docs = documents(refs, facts, "OADP").map_err(|e| spec_error(e.join("; ")))?;
    let mut content = OadpContent::default();
    for m in docs {
        if m.api_version != "velero.io/v1" {
            continue;
        }
        match m.kind.as_str() {
            "Backup" => content.backups.push(m),
            "Restore" => content.restores.push(m),
            _ => {}
        }
    }
    let backup_names: BTreeSet<&str> = content.backups.iter().map(|b| b.name.as_str()).collect();
    for r in &content.restores {
        let b = str_at(&r.body, &["spec", "backupName"]);
        if !backup_names.contains(b.as_str()) {
            return Err(spec_error(format!(
                "The backup CR {b} defined in restore CR {} not found in OADP configmaps",
                r.name
            )));
        }
    }
    if content.backups.is_empty() || content.backups.len() != content.restores.len() {
        return Err(spec_error(
            "Both backup and restore CRs should be specified in OADP configmaps and each backup CR should be paired with a corresponding restore CR.",
        ));
    }
    let warnings = if facts.lvms_volumes {
        lvms_warnings(&content)
    } else {
        Vec::new()
    };
    Ok((content, warnings))
}

fn list_at(v: &Value, path: &[&str]) -> Vec<String> {
    path.iter()
        .try_fold(v, |v, k| v.get(k))
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// LVM Storage keeps volume contents only if Backups include `persistentVolumes` and
/// `logicalvolumes.topolvm.io`, and Restores set `restorePVs: true` and restore the status
/// of `logicalvolumes`.
fn lvms_warnings(content: &OadpContent) -> Vec<String> {
    let mut out = Vec::new();
    for b in &content.backups {
        let mut included = list_at(&b.body, &["spec", "includedClusterScopedResources"]);
        included.extend(list_at(&b.body, &["spec", "includedResources"]));
        for needed in ["persistentVolumes", "logicalvolumes.topolvm.io"] {
            if !included.iter().any(|r| r == needed) {
                out.push(format!(
                    "Backup[{}] - LVM Storage volumes present: spec.includedClusterScopedResources lacks {needed}",
                    b.name
                ));
            }
        }
    }
    for r in &content.restores {
        if r.body.pointer("/spec/restorePVs") != Some(&Value::Bool(true)) {
            out.push(format!(
                "Restore[{}] - LVM Storage volumes present: spec.restorePVs is not true",
                r.name
            ));
        }
        let status = list_at(&r.body, &["spec", "restoreStatus", "includedResources"]);
        if !status.iter().any(|x| x == "logicalvolumes") {
            out.push(format!(
                "Restore[{}] - LVM Storage volumes present: spec.restoreStatus.includedResources lacks logicalvolumes",
                r.name
            ));
        }
    }
    out
}

/// Step 5: the seed image's labels, read without pulling it.
pub fn seed_labels(
    labels: &BTreeMap<String, String>,
    facts: &SeedCompat,
) -> Result<SeedClusterInfo, String> {
    let fail = |m: String| format!("failed to validate seed image: {m}");
    match labels.get(SEED_FORMAT_LABEL) {
        Some(v) if v == SEED_FORMAT_VERSION => {}
        Some(v) => {
            return Err(fail(format!(
                "seed format version {v} is not supported, this agent needs {SEED_FORMAT_VERSION}"
            )));
        }
        None => {
            return Err(fail(format!(
                "label {SEED_FORMAT_LABEL} missing: not a seed image"
            )));
        }
    }
    let Some(raw) = labels.get(SEED_CLUSTER_INFO_LABEL) else {
        return Ok(SeedClusterInfo::default());
    };
    let info: SeedClusterInfo = serde_json::from_str(raw).map_err(|e| {
        fail(format!(
            "label {SEED_CLUSTER_INFO_LABEL} is not valid JSON: {e}"
        ))
    })?;
    if info.has_proxy != facts.has_proxy {
        return Err(fail(format!(
            "seed cluster proxy configuration (has_proxy={}) does not match this cluster (has_proxy={})",
            info.has_proxy, facts.has_proxy
        )));
    }
    if info.has_fips != facts.fips {
        return Err(fail(format!(
            "seed cluster FIPS mode (has_fips={}) does not match this cluster (fips={})",
            info.has_fips, facts.fips
        )));
    }
    if !info.container_storage_mountpoint_target.is_empty()
        && info.container_storage_mountpoint_target != facts.container_storage_mount
    {
        return Err(fail(format!(
            "seed container storage mount ({}) does not match this cluster ({})",
            info.container_storage_mountpoint_target, facts.container_storage_mount
        )));
    }
    Ok(info)
}

/// `lca.openshift.io/apply-wave` groups, in ascending wave order; absent waves run last.
pub fn wave_groups(docs: &[Manifest]) -> Vec<Vec<Manifest>> {
    let mut groups: BTreeMap<(bool, i64), Vec<Manifest>> = BTreeMap::new();
    for d in docs {
        let wave = d
            .body
            .pointer("/metadata/annotations/lca.openshift.io~1apply-wave")
            .and_then(|v| {
                v.as_str()
                    .and_then(|s| s.parse::<i64>().ok())
                    .or(v.as_i64())
            });
        let key = match wave {
            Some(w) => (false, w),
            None => (true, 0),
        };
        groups.entry(key).or_default().push(d.clone());
    }
    groups.into_values().collect()
}

#[cfg(test)]
#[path = "validate_tests.rs"]
mod tests;
