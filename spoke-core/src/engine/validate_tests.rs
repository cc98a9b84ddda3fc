use super::*;

fn r(name: &str) -> ConfigMapRef {
    ConfigMapRef {
        name: name.into(),
        namespace: "openshift-adp".into(),
    }
}

fn facts(cms: &[(&str, &str)]) -> ClusterFacts {
    ClusterFacts {
        version: "4.15.0".into(),
        namespaces: ["default", "openshift-adp"].map(String::from).into(),
        api_versions: ["v1", "apps/v1", "velero.io/v1"].map(String::from).into(),
        oadp_installed: true,
        data_protection_applications: 1,
        configmaps: cms
            .iter()
            .map(|(n, text)| {
                (
                    r(n),
                    BTreeMap::from([("k.yaml".to_string(), text.to_string())]),
                )
            })
            .collect(),
        ..Default::default()
    }
}

const BACKUP: &str = "apiVersion: velero.io/v1\nkind: Backup\nmetadata:\n  name: b1\n  namespace: openshift-adp\nspec:\n  includedNamespaces: [app]\n";
const RESTORE: &str = "apiVersion: velero.io/v1\nkind: Restore\nmetadata:\n  name: r1\n  namespace: openshift-adp\nspec:\n  backupName: b1\n";

fn seed(v: &str) -> SeedImageRef {
    SeedImageRef {
        version: v.into(),
        image: format!("quay.io/seed:{v}"),
        pull_secret_ref: None,
    }
}

#[test]
fn seed_version_rules() {
    assert!(seed_version(&seed("4.16.0-rc.1"), "4.15.0").is_ok());
    assert!(seed_version(&seed("4.15.1"), "4.15.0").is_ok());
    assert!(
        seed_version(&seed("4.15.0"), "4.15.0")
            .unwrap_err()
            .contains("must be higher than current OCP version (4.15.0)")
    );
    assert!(
        seed_version(&seed("4.16"), "4.15.0")
            .unwrap_err()
            .contains("not a valid semantic version")
    );
    let mut bad = seed("4.16.0");
    bad.image = "quay.io/seed 4.16".into();
    assert!(
        seed_version(&bad, "4.15.0")
            .unwrap_err()
            .contains("without whitespace")
    );
    bad.image = String::new();
    assert!(seed_version(&bad, "4.15.0").is_err());
}

#[test]
fn oadp_accepts_paired_backup_and_restore() {
    let f = facts(&[(
        "oadp",
        &format!(
            "{BACKUP}---\n{RESTORE}---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: ignored\n"
        ),
    )]);
    let (content, warnings) = oadp(&[r("oadp")], &f).unwrap();
    assert_eq!(content.backups.len(), 1);
    assert_eq!(content.restores.len(), 1);
    assert!(warnings.is_empty());
}

#[test]
fn oadp_rules_and_messages() {
    let refs = [r("oadp")];
    let mut f = facts(&[("oadp", &format!("{BACKUP}---\n{RESTORE}"))]);
    f.oadp_installed = false;
    assert!(
        oadp(&refs, &f)
            .unwrap_err()
            .contains("OADP is not installed")
    );
    f.oadp_installed = true;
    f.data_protection_applications = 2;
    assert!(
        oadp(&refs, &f)
            .unwrap_err()
            .contains("exactly one DataProtectionApplication is required, found 2")
    );

    let f = facts(&[]);
    let err = oadp(&refs, &f).unwrap_err();
    assert!(err.contains("OADP configmap not found, error: configmap openshift-adp/oadp not found. Please create the configmap."), "{err}");

    let f = facts(&[(
        "oadp",
        &format!(
            "{BACKUP}---\n{}",
            RESTORE.replace("backupName: b1", "backupName: nope")
        ),
    )]);
    assert_eq!(
        oadp(&refs, &f).unwrap_err(),
        "failed to validate IBU spec: The backup CR nope defined in restore CR r1 not found in OADP configmaps"
    );

    for text in [
        BACKUP.to_string(),
        format!("{BACKUP}---\n{}", BACKUP.replace("b1", "b2")),
    ] {
        let f = facts(&[("oadp", &text)]);
        assert_eq!(
            oadp(&refs, &f).unwrap_err(),
            "failed to validate IBU spec: Both backup and restore CRs should be specified in OADP configmaps and each backup CR should be paired with a corresponding restore CR."
        );
    }
    // documents of other API versions do not count
    let f = facts(&[(
        "oadp",
        &format!(
            "{}---\n{RESTORE}",
            BACKUP.replace("velero.io/v1", "velero.io/v2")
        ),
    )]);
    assert!(oadp(&refs, &f).is_err());
    // no oadpContent: nothing to check
    assert!(oadp(&[], &facts(&[])).is_ok());
}

#[test]
fn lvms_warnings_name_the_object_and_the_field() {
    let mut f = facts(&[("oadp", &format!("{BACKUP}---\n{RESTORE}"))]);
    f.lvms_volumes = true;
    let (_, warnings) = oadp(&[r("oadp")], &f).unwrap();
    assert_eq!(
        warnings,
        vec![
            "Backup[b1] - LVM Storage volumes present: spec.includedClusterScopedResources lacks persistentVolumes",
            "Backup[b1] - LVM Storage volumes present: spec.includedClusterScopedResources lacks logicalvolumes.topolvm.io",
            "Restore[r1] - LVM Storage volumes present: spec.restorePVs is not true",
            "Restore[r1] - LVM Storage volumes present: spec.restoreStatus.includedResources lacks logicalvolumes",
        ]
    );
    let good_backup = BACKUP.replace(
        "spec:\n",
        "spec:\n  includedClusterScopedResources: [persistentVolumes, logicalvolumes.topolvm.io]\n",
    );
    let good_restore = RESTORE.replace(
        "spec:\n",
        "spec:\n  restorePVs: true\n  restoreStatus:\n    includedResources: [logicalvolumes]\n",
    );
    let mut f = facts(&[("oadp", &format!("{good_backup}---\n{good_restore}"))]);
    f.lvms_volumes = true;
    assert!(oadp(&[r("oadp")], &f).unwrap().1.is_empty());
}

#[test]
fn extra_manifest_errors_win_over_warnings() {
    let refs = [r("em")];
    let f = facts(&[(
        "em",
        "apiVersion: machineconfiguration.openshift.io/v1\nkind: MachineConfig\nmetadata:\n  name: mc1\n---\napiVersion: example.com/v1\nkind: Widget\nmetadata:\n  name: w\n",
    )]);
    assert_eq!(
        extra_manifests(&refs, &f).unwrap_err(),
        "failed to validate IBU spec: failed to validate extramanifests: MachineConfig[mc1] in extramanifests is not allowed"
    );
    for kind in ["Subscription", "InstallPlan", "ClusterServiceVersion"] {
        let text = format!(
            "apiVersion: operators.coreos.com/v1alpha1\nkind: {kind}\nmetadata:\n  name: x\n  namespace: default\n"
        );
        let f = facts(&[("em", &text)]);
        assert!(
            extra_manifests(&refs, &f)
                .unwrap_err()
                .contains(&format!("{kind}[x] in extramanifests is not allowed"))
        );
    }
    let f = facts(&[(
        "em",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  namespace: default\n",
    )]);
    assert!(
        extra_manifests(&refs, &f)
            .unwrap_err()
            .contains("ConfigMap resource name is empty")
    );
    let f = facts(&[("em", "apiVersion: v1\nkind: [unclosed\n")]);
    assert!(
        extra_manifests(&refs, &f)
            .unwrap_err()
            .contains("failed to decode manifest in configmap openshift-adp/em key k.yaml")
    );
    let f = facts(&[]);
    assert!(
        extra_manifests(&refs, &f)
            .unwrap_err()
            .contains("extramanifests configmap openshift-adp/em not found")
    );
}

#[test]
fn extra_manifest_warnings() {
    let refs = [r("em")];
    let mut f = facts(&[(
        "em",
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: app\n---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: ok\n  namespace: app\n---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: lost\n  namespace: nowhere\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: d\n  namespace: default\n",
    )]);
    f.dry_run_errors.insert(
        "Deployment/default/d".into(),
        "spec.replicas: Invalid value".into(),
    );
    assert_eq!(
        extra_manifests(&refs, &f).unwrap(),
        vec![
            "ConfigMap[lost] - namespace nowhere not found on cluster or not added in configmap in right order",
            "Deployment[d] - dryrun failed in namespace default: spec.replicas: Invalid value",
        ]
    );
    // a namespace created later in the stream does not count
    let f = facts(&[(
        "em",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: early\n  namespace: app\n---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: app\n",
    )]);
    assert_eq!(extra_manifests(&refs, &f).unwrap().len(), 1);
    // an installed CRD is known
    let mut f = facts(&[(
        "em",
        "apiVersion: example.com/v1\nkind: Widget\nmetadata:\n  name: w\n",
    )]);
    assert_eq!(
        extra_manifests(&refs, &f).unwrap(),
        vec!["Widget[w] - CRD not deployed on cluster"]
    );
    f.crds.insert("example.com/v1/Widget".into());
    assert!(extra_manifests(&refs, &f).unwrap().is_empty());
}

#[test]
fn seed_label_rules() {
    let compat = SeedCompat {
        has_proxy: false,
        fips: false,
        container_storage_mount: "/var/lib/containers".into(),
    };
    let labels = |format: &str, info: Option<&str>| {
        let mut m = BTreeMap::from([(SEED_FORMAT_LABEL.to_string(), format.to_string())]);
        if let Some(i) = info {
            m.insert(SEED_CLUSTER_INFO_LABEL.to_string(), i.to_string());
        }
        m
    };
    assert!(seed_labels(&labels("4", None), &compat).is_ok());
    assert!(
        seed_labels(&labels("3", None), &compat)
            .unwrap_err()
            .contains("seed format version 3 is not supported")
    );
    assert!(
        seed_labels(&BTreeMap::new(), &compat)
            .unwrap_err()
            .contains("not a seed image")
    );
    let info = seed_labels(
        &labels(
            "4",
            Some(r#"{"release_registry":"quay.io","has_proxy":false}"#),
        ),
        &compat,
    )
    .unwrap();
    assert_eq!(info.release_registry, "quay.io");
    assert!(
        seed_labels(&labels("4", Some(r#"{"has_proxy":true}"#)), &compat)
            .unwrap_err()
            .contains("proxy")
    );
    assert!(
        seed_labels(&labels("4", Some(r#"{"has_fips":true}"#)), &compat)
            .unwrap_err()
            .contains("FIPS")
    );
    assert!(
        seed_labels(
            &labels(
                "4",
                Some(r#"{"container_storage_mountpoint_target":"/mnt"}"#)
            ),
            &compat
        )
        .unwrap_err()
        .contains("container storage")
    );
    assert!(
        seed_labels(&labels("4", Some("not json")), &compat)
            .unwrap_err()
            .contains("not valid JSON")
    );
}

#[test]
fn apply_waves_group_in_order_absent_last() {
    let doc = |name: &str, wave: Option<&str>| {
        let mut body = serde_json::json!({"metadata": {"name": name}});
        if let Some(w) = wave {
            body["metadata"]["annotations"] = serde_json::json!({"lca.openshift.io/apply-wave": w});
        }
        Manifest {
            api_version: String::new(),
            kind: String::new(),
            name: name.into(),
            namespace: String::new(),
            body,
        }
    };
    let groups = wave_groups(&[
        doc("none", None),
        doc("ten", Some("10")),
        doc("one", Some("1")),
        doc("one-b", Some("1")),
    ]);
    let names: Vec<Vec<&str>> = groups
        .iter()
        .map(|g| g.iter().map(|m| m.name.as_str()).collect())
        .collect();
    assert_eq!(names, vec![vec!["one", "one-b"], vec!["ten"], vec!["none"]]);
}
