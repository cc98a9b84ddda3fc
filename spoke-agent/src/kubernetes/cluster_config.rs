//! The cluster's configuration, read from its API before the pivot, for the seed's post-pivot
//! reconfiguration (`lca-cli post-pivot`: network, recert, kubelet): the fields of the
//! Lifecycle Agent's `SeedReconfiguration` that the API holds (`ibu-host.md` section 2,
//! `NV/opt/openshift/cluster-configuration`). The node adds its own (SSH keys, chrony,
//! network connections) when it writes them.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Secret};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams};
use serde_json::{Map, Value, json};
use spoke_core::host::{ClusterConfig, HostError};

/// The `SeedReconfiguration` format the seeds' `lca-cli` reads.
const RECONFIGURATION_VERSION: u64 = 1;

/// A read that failed: a missing object or a refusal is the stage's failure (it names what),
/// anything else is worth retrying.
fn failed(what: &str, e: kube::Error) -> HostError {
    match &e {
        kube::Error::Api(s) if s.code == 404 || s.code == 403 => HostError::Terminal(format!(
            "failed to get the cluster configuration: {what}: {}",
            s.message
        )),
        _ => HostError::Transient(format!(
            "failed to get the cluster configuration: {what}: {e}"
        )),
    }
}

fn missing(what: &str) -> HostError {
    HostError::Terminal(format!(
        "failed to get the cluster configuration: {what} is missing"
    ))
}

fn openshift(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
}

struct Reader {
    client: kube::Client,
}

impl Reader {
    async fn cluster_object(&self, r: &ApiResource, name: &str) -> Result<Value, HostError> {
        let api: Api<DynamicObject> = Api::all_with(self.client.clone(), r);
        let obj = api
            .get(name)
            .await
            .map_err(|e| failed(&format!("{} {name}", r.kind), e))?;
        Ok(serde_json::to_value(obj).unwrap_or_default())
    }

    /// A Secret's key, decoded; `None` when the Secret does not exist and that is allowed.
    async fn secret(
        &self,
        namespace: &str,
        name: &str,
        key: &str,
        optional: bool,
    ) -> Result<Option<String>, HostError> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        let what = format!("secret {namespace}/{name}");
        let secret = match api.get_opt(name).await.map_err(|e| failed(&what, e))? {
            Some(s) => s,
            None if optional => return Ok(None),
            None => return Err(missing(&what)),
        };
        let data = secret
            .data
            .and_then(|mut d| d.remove(key))
            .ok_or_else(|| missing(&format!("{what} key {key}")))?;
        String::from_utf8(data.0)
            .map(Some)
            .map_err(|_| HostError::Terminal(format!("{what} key {key} is not text")))
    }

    async fn configmap(
        &self,
        namespace: &str,
        name: &str,
        key: &str,
        optional: bool,
    ) -> Result<String, HostError> {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), namespace);
        let what = format!("configmap {namespace}/{name}");
        match api.get_opt(name).await.map_err(|e| failed(&what, e))? {
            Some(cm) => match cm.data.and_then(|mut d| d.remove(key)) {
                Some(v) => Ok(v),
                None if optional => Ok(String::new()),
                None => Err(missing(&format!("{what} key {key}"))),
            },
            None if optional => Ok(String::new()),
            None => Err(missing(&what)),
        }
    }

    /// Every object of a kind, without their server-set fields; none when the API does not
    /// serve the kind (its CRD is not installed).
    async fn list(&self, r: &ApiResource) -> Result<Vec<Value>, HostError> {
        let api: Api<DynamicObject> = Api::all_with(self.client.clone(), r);
        let list = match api.list(&ListParams::default()).await {
            Ok(list) => list,
            Err(kube::Error::Api(s)) if s.code == 404 => return Ok(Vec::new()),
            Err(e) => return Err(failed(&format!("listing {}", r.plural), e)),
        };
        Ok(list
            .items
            .into_iter()
            .map(|o| {
                json!({"apiVersion": r.api_version, "kind": r.kind,
                    "metadata": {"name": o.metadata.name, "labels": o.metadata.labels,
                        "annotations": o.metadata.annotations},
                    "spec": o.data.get("spec").cloned().unwrap_or_default()})
            })
            .collect())
    }
}

/// The subject's common name of the first certificate in a PEM text.
fn common_name(pem: &str) -> Result<String, String> {
    crate::ostree::first_certificate(pem.as_bytes(), |cert| {
        cert.subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok().map(str::to_string))
            .ok_or_else(|| "the certificate has no common name".to_string())
    })
}

/// Reads everything the seed's reconfiguration needs from the cluster's API.
pub async fn gather(client: &kube::Client) -> Result<ClusterConfig, HostError> {
    let r = Reader {
        client: client.clone(),
    };
    let version = r
        .cluster_object(
            &openshift(
                "config.openshift.io",
                "v1",
                "ClusterVersion",
                "clusterversions",
            ),
            "version",
        )
        .await?;
    let infrastructure = r
        .cluster_object(
            &openshift(
                "config.openshift.io",
                "v1",
                "Infrastructure",
                "infrastructures",
            ),
            "cluster",
        )
        .await?;
    let proxy = r
        .cluster_object(
            &openshift("config.openshift.io", "v1", "Proxy", "proxies"),
            "cluster",
        )
        .await?;
    let install_config = r
        .configmap("kube-system", "cluster-config-v1", "install-config", false)
        .await?;
    let install: Value = serde_yaml::from_str(&install_config).map_err(|e| {
        HostError::Terminal(format!(
            "failed to get the cluster configuration: the install-config of configmap kube-system/cluster-config-v1: {e}"
        ))
    })?;
    let machine_networks: Vec<Value> = install["networking"]["machineNetwork"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n["cidr"].as_str().map(|c| json!(c)))
        .collect();

    // The single node: its addresses, name and labels.
    let nodes: Api<Node> = Api::all(client.clone());
    let nodes = nodes
        .list(&ListParams::default())
        .await
        .map_err(|e| failed("listing nodes", e))?
        .items;
    let [node] = &nodes[..] else {
        return Err(HostError::Terminal(format!(
            "failed to get the cluster configuration: a single-node cluster has one node, this one {}",
            nodes.len()
        )));
    };
    let addresses = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.clone())
        .unwrap_or_default();
    let of_type = |t: &str| -> Vec<String> {
        addresses
            .iter()
            .filter(|a| a.type_ == t)
            .map(|a| a.address.clone())
            .collect()
    };
    let node_ips = of_type("InternalIP");
    if node_ips.is_empty() {
        return Err(missing("the node's InternalIP address"));
    }
    let hostname = of_type("Hostname")
        .into_iter()
        .next()
        .ok_or_else(|| missing("the node's Hostname address"))?;

    let cvo: Api<Deployment> = Api::namespaced(client.clone(), "openshift-cluster-version");
    let cvo = cvo.get("cluster-version-operator").await.map_err(|e| {
        failed(
            "deployment openshift-cluster-version/cluster-version-operator",
            e,
        )
    })?;
    let release_image = cvo
        .spec
        .and_then(|s| s.template.spec)
        .and_then(|s| s.containers.into_iter().next())
        .and_then(|c| c.image)
        .ok_or_else(|| missing("the cluster-version-operator's image"))?;
    let release_registry = release_image.split('/').next().unwrap_or_default();

    let pull_secret = r
        .secret(
            "openshift-config",
            "pull-secret",
            ".dockerconfigjson",
            false,
        )
        .await?
        .unwrap_or_default();
    let kubeadmin = r
        .secret("kube-system", "kubeadmin", "kubeadmin", true)
        .await?
        .unwrap_or_default();
    let signer =
        |name: &'static str| r.secret("openshift-kube-apiserver-operator", name, "tls.key", false);
    let localhost_signer = signer("localhost-serving-signer").await?;
    let service_network_signer = signer("service-network-serving-signer").await?;
    let loadbalancer_signer = signer("loadbalancer-serving-signer").await?;
    let admin_ca = r
        .configmap(
            "openshift-config",
            "admin-kubeconfig-client-ca",
            "ca-bundle.crt",
            false,
        )
        .await?;
    let ingress_key = r
        .secret("openshift-ingress-operator", "router-ca", "tls.key", false)
        .await?;
    let ingress_crt = r
        .secret("openshift-ingress-operator", "router-ca", "tls.crt", false)
        .await?
        .unwrap_or_default();
    let ingress_cn = common_name(&ingress_crt).map_err(|why| {
        HostError::Terminal(format!(
            "failed to get the cluster configuration: secret openshift-ingress-operator/router-ca key tls.crt: {why}"
        ))
    })?;

    // The proxy, and the trust bundles the cluster and its proxy use.
    let user_ca_bundle = r
        .configmap("openshift-config", "user-ca-bundle", "ca-bundle.crt", true)
        .await?;
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    let trusted_ca = text(&proxy["spec"]["trustedCA"]["name"]);
    let proxy_bundle = match trusted_ca.as_str() {
        "" => String::new(),
        "user-ca-bundle" => user_ca_bundle.clone(),
        other => {
            let bundle = r
                .configmap("openshift-config", other, "ca-bundle.crt", false)
                .await?;
            if bundle.is_empty() {
                return Err(HostError::Terminal(format!(
                    "failed to get the cluster configuration: proxy trustedCA configmap openshift-config/{other} exists but is empty"
                )));
            }
            bundle
        }
    };
    let proxy_of = |part: &Value| {
        json!({"httpProxy": text(&part["httpProxy"]), "httpsProxy": text(&part["httpsProxy"]),
            "noProxy": text(&part["noProxy"])})
    };
    let has_proxy = ["httpProxy", "httpsProxy", "noProxy"]
        .iter()
        .any(|k| !text(&proxy["spec"][k]).is_empty());

    let mut c = Map::new();
    c.insert("api_version".into(), json!(RECONFIGURATION_VERSION));
    c.insert("base_domain".into(), install["baseDomain"].clone());
    c.insert("cluster_name".into(), install["metadata"]["name"].clone());
    c.insert("cluster_id".into(), version["spec"]["clusterID"].clone());
    c.insert(
        "infra_id".into(),
        infrastructure["status"]["infrastructureName"].clone(),
    );
    c.insert("node_ips".into(), json!(node_ips));
    c.insert("release_registry".into(), json!(release_registry));
    c.insert("hostname".into(), json!(hostname));
    c.insert(
        "KubeconfigCryptoRetention".into(),
        json!({
            "KubeAPICrypto": {
                "ServingCrypto": {
                    "localhost_signer_private_key": localhost_signer,
                    "service_network_signer_private_key": service_network_signer,
                    "loadbalancer_external_signer_private_key": loadbalancer_signer,
                },
                "ClientAuthCrypto": {"admin_ca_certificate": admin_ca},
            },
            "IngresssCrypto": {"ingress_ca": ingress_key, "ingress_certificate_cn": ingress_cn},
        }),
    );
    c.insert("pull_secret".into(), json!(pull_secret));
    if !kubeadmin.is_empty() {
        c.insert("kubeadmin_password_hash".into(), json!(kubeadmin));
    }
    if has_proxy {
        c.insert("proxy".into(), proxy_of(&proxy["spec"]));
        c.insert("status_proxy".into(), proxy_of(&proxy["status"]));
    }
    c.insert("install_config".into(), json!(install_config));
    if !machine_networks.is_empty() {
        c.insert("machine_networks".into(), Value::Array(machine_networks));
    }
    c.insert(
        "additionalTrustBundle".into(),
        json!({"userCaBundle": user_ca_bundle, "proxyConfigmapName": trusted_ca,
            "proxyConfigmapBundle": proxy_bundle}),
    );
    let labels: BTreeMap<String, String> = node.metadata.labels.clone().unwrap_or_default();
    if !labels.is_empty() {
        c.insert("node_labels".into(), json!(labels));
    }

    // The mirror configuration, applied again after the pivot.
    let mut manifests = Vec::new();
    for (file, resource, list_kind) in [
        (
            "image-digest-mirror-set.json",
            openshift(
                "config.openshift.io",
                "v1",
                "ImageDigestMirrorSet",
                "imagedigestmirrorsets",
            ),
            "ImageDigestMirrorSetList",
        ),
        (
            "image-content-source-policy-list.json",
            openshift(
                "operator.openshift.io",
                "v1alpha1",
                "ImageContentSourcePolicy",
                "imagecontentsourcepolicies",
            ),
            "ImageContentSourcePolicyList",
        ),
    ] {
        let items = r.list(&resource).await?;
        if !items.is_empty() {
            manifests.push((
                file.to_string(),
                json!({"apiVersion": resource.api_version, "kind": list_kind, "items": items}),
            ));
        }
    }
    Ok(ClusterConfig {
        reconfiguration: c,
        manifests,
    })
}

/// What of an object is carried: what its owner wrote, none of what the server set.
fn carried(r: &ApiResource, o: DynamicObject) -> Value {
    let mut annotations = o.metadata.annotations.unwrap_or_default();
    annotations.retain(|k, _| {
        k != "kubectl.kubernetes.io/last-applied-configuration"
            && k != "deployment.kubernetes.io/revision"
    });
    let mut obj = json!({"apiVersion": r.api_version, "kind": r.kind,
        "metadata": {"name": o.metadata.name}});
    if let Some(labels) = o.metadata.labels {
        obj["metadata"]["labels"] = json!(labels);
    }
    if let Some(ns) = o.metadata.namespace {
        obj["metadata"]["namespace"] = json!(ns);
    }
    if !annotations.is_empty() {
        obj["metadata"]["annotations"] = json!(annotations);
    }
    for (k, v) in o.data.as_object().into_iter().flatten() {
        if k == "status" || k == "secrets" {
            continue;
        }
        obj[k] = v.clone();
    }
    // A Service gets its addresses on the cluster it is created on.
    if r.kind == "Service"
        && let Some(spec) = obj["spec"].as_object_mut()
    {
        spec.remove("clusterIP");
        spec.remove("clusterIPs");
    }
    obj
}

/// The agent's own objects (labelled `selector`: its namespace's ServiceAccount, Secrets,
/// Service and Deployment, its RBAC wherever it is, the namespace and the IBU CRD), as a List
/// the seed's reconfiguration applies on the upgraded cluster, in an order that works.
pub async fn own_objects(
    client: &kube::Client,
    selector: &str,
) -> Result<(String, Value), HostError> {
    let namespace = client.default_namespace().to_string();
    let params = ListParams::default().labels(selector);
    let core = |kind: &str, plural: &str| openshift("", "v1", kind, plural);
    let rbac =
        |kind: &str, plural: &str| openshift("rbac.authorization.k8s.io", "v1", kind, plural);
    let mut items = vec![json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": namespace}})];
    let crds = openshift(
        "apiextensions.k8s.io",
        "v1",
        "CustomResourceDefinition",
        "customresourcedefinitions",
    );
    let crd_api: Api<DynamicObject> = Api::all_with(client.clone(), &crds);
    if let Some(crd) = crd_api
        .get_opt("imagebasedupgrades.lca.openshift.io")
        .await
        .map_err(|e| failed("the ImageBasedUpgrade CRD", e))?
    {
        items.push(carried(&crds, crd));
    }
    // (resource, in the agent's namespace only)
    let kinds = [
        (core("ServiceAccount", "serviceaccounts"), true),
        (rbac("ClusterRole", "clusterroles"), false),
        (rbac("ClusterRoleBinding", "clusterrolebindings"), false),
        (rbac("Role", "roles"), false),
        (rbac("RoleBinding", "rolebindings"), false),
        (core("Secret", "secrets"), true),
        (core("Service", "services"), true),
        (openshift("apps", "v1", "Deployment", "deployments"), true),
    ];
    for (r, own_namespace) in kinds {
        let api: Api<DynamicObject> = if own_namespace {
            Api::namespaced_with(client.clone(), &namespace, &r)
        } else {
            Api::all_with(client.clone(), &r)
        };
        let list = api
            .list(&params)
            .await
            .map_err(|e| failed(&format!("the agent's own {}", r.plural), e))?;
        items.extend(list.items.into_iter().map(|o| carried(&r, o)));
    }
    Ok((
        "spoke-agent.json".to_string(),
        json!({"apiVersion": "v1", "kind": "List", "items": items}),
    ))
}
