//! A seed image in the fake registry, with the files the Lifecycle Agent reads from it
//! (`ibu-host.md` section 1) and its labels, and the release images its `containers.list`
//! names (pullable, for precaching).

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use serde_json::json;

use crate::node::{Image, Node, Root, checksum_of};

/// Release images each seed lists for precaching.
pub const RELEASE_IMAGES: usize = 3;
/// What a seed image and a release image take in container storage once pulled.
pub const SEED_SIZE: u64 = 2 * crate::node::GIB;
pub const RELEASE_IMAGE_SIZE: u64 = crate::node::GIB / 2;
/// When the seed images were built (2026-11-30, Unix seconds).
pub const SEED_CREATED: i64 = 1_764_460_800;

/// A `.tgz` of `files` (path inside the archive, contents).
fn tgz(path: &Path, files: &[(&str, &str)]) -> Result<(), String> {
    let file = fs::File::create(path).map_err(|e| e.to_string())?;
    let mut b = tar::Builder::new(flate2::write::GzEncoder::new(
        file,
        flate2::Compression::fast(),
    ));
    for (name, text) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(text.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, text.as_bytes())
            .map_err(|e| e.to_string())?;
    }
    b.into_inner()
        .and_then(|gz| gz.finish())
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// How a seed was made: in a private registry that needs `auth`, from a FIPS cluster.
#[derive(Default)]
pub struct SeedOptions {
    pub auth: Option<String>,
    pub fips: bool,
}

/// Adds the seed `image` of `version`.
pub fn add(
    root: &Root,
    node: &mut Node,
    image: &str,
    version: &str,
    options: SeedOptions,
) -> Result<(), String> {
    let id = checksum_of(image);
    let checksum = checksum_of(&format!("rhcos-{version}"));
    let dir = root.images_dir().join(&id);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).map_err(|e| format!("fake-node: {e}"))?;
    let release: Vec<String> = (0..RELEASE_IMAGES)
        .map(|i| {
            format!(
                "quay.io/openshift-release-dev/ocp-v4.0-art-dev@sha256:{}",
                checksum_of(&format!("{version}-{i}"))
            )
        })
        .collect();
    let write = |name: &str, text: String| {
        fs::write(dir.join(name), text).map_err(|e| format!("fake-node: {name}: {e}"))
    };
    tgz(
        &dir.join("ostree.tgz"),
        &[(&format!("objects/{checksum}.commit"), version)],
    )?;
    let rpm_ostree = json!({"deployments": [{"id": format!("rhcos-{checksum}.0"), "osname": "rhcos",
        "serial": 0, "checksum": checksum, "version": version, "booted": true}]});
    write("rpm-ostree.json", rpm_ostree.to_string())?;
    let manifest = json!({"seed_cluster_ocp_version": version, "seed_cluster_os_version": version,
        "recert_image_pull_spec": "quay.io/edge-infrastructure/recert:v0"});
    write("manifest.json", manifest.to_string())?;
    let mco = json!({"spec": {"kernelArguments": ["systemd.unified_cgroup_hierarchy=1", "rcupdate.rcu_normal_after_boot=0"],
        "fips": options.fips}});
    write("mco-currentconfig.json", mco.to_string())?;
    tgz(
        &dir.join("var.tgz"),
        &[
            ("var/seed_data/manifest.json", &manifest.to_string()),
            ("var/lib/kubelet/config.json", "{\"auths\":{}}"),
        ],
    )?;
    tgz(
        &dir.join("etc.tgz"),
        &[
            ("etc/hostname", "seed\n"),
            ("etc/seed-only.conf", "from the seed\n"),
            // The seed's post-pivot reconfiguration, enabled (a file stands for the link).
            (
                "etc/systemd/system/installation-configuration.service",
                "[Unit]\nDescription=Reconfiguration of SNO\n[Service]\nType=oneshot\nExecStart=/usr/local/bin/lca-cli post-pivot\nRestart=on-failure\n[Install]\nWantedBy=multi-user.target\n",
            ),
            (
                "etc/systemd/system/multi-user.target.wants/installation-configuration.service",
                "",
            ),
        ],
    )?;
    write("etc.deletions", "/etc/seed-only.conf\n".into())?;
    write("containers.list", release.join("\n") + "\n")?;
    write(
        &format!("ostree-{checksum}.0.origin"),
        format!("[origin]\nrefspec={checksum}\n"),
    )?;
    let info = json!({
        "seed_cluster_ocp_version": version,
        "release_registry": "quay.io",
        "has_proxy": false,
        "has_fips": options.fips,
        "container_storage_mountpoint_target": "/dev/disk/by-partlabel/varlibcontainers",
    });
    let labels = BTreeMap::from([
        (
            "com.openshift.lifecycle-agent.seed_format_version".to_string(),
            "4".to_string(),
        ),
        (
            "com.openshift.lifecycle-agent.seed_cluster_info".to_string(),
            info.to_string(),
        ),
    ]);
    node.registry.insert(
        image.to_string(),
        Image {
            id,
            labels,
            files: Some(dir),
            auth: options.auth,
            size: SEED_SIZE,
            created: SEED_CREATED,
            ..Default::default()
        },
    );
    for r in release {
        let id = checksum_of(&r);
        node.registry.insert(
            r,
            Image {
                id,
                size: RELEASE_IMAGE_SIZE,
                created: SEED_CREATED,
                ..Default::default()
            },
        );
    }
    Ok(())
}
