//! The node's operating system, one method per short command sequence, each the one the
//! Lifecycle Agent runs (`ibu-host.md` sections 1 to 4). Output is parsed from the tools'
//! machine formats (`rpm-ostree status --json`, `skopeo inspect`, `podman ... --format
//! json`).

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;

use super::runner::{Exec, NodeError, Runner};

/// The cluster's pull secret, which the Lifecycle Agent pulls with.
pub const AUTH_FILE: &str = "/var/lib/kubelet/config.json";
/// The unit the Lifecycle Agent requires container storage to be mounted by.
pub const STORAGE_UNIT: &str = "var-lib-containers.mount";

/// Where container storage is mounted (its own partition, shared by the stateroots).
pub const CONTAINER_STORAGE: &str = "/var/lib/containers";

/// One image as `podman images --format json` lists it.
#[derive(Deserialize, Clone, Debug, Default)]
#[serde(rename_all = "PascalCase")]
pub struct PodmanImage {
    pub id: String,
    #[serde(default)]
    pub repo_tags: Option<Vec<String>>,
    #[serde(default)]
    pub repo_digests: Option<Vec<String>>,
    #[serde(default)]
    pub names: Option<Vec<String>>,
    /// Unix seconds.
    #[serde(default)]
    pub created: i64,
    #[serde(default)]
    pub dangling: bool,
}

impl PodmanImage {
    /// Every name it is known by: its ID, tags, digests and names.
    pub fn refs(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.id.as_str()).chain(
            [&self.repo_tags, &self.repo_digests, &self.names]
                .into_iter()
                .flatten()
                .flatten()
                .map(String::as_str),
        )
    }
}

#[derive(Deserialize)]
struct CrictlContainers {
    #[serde(default)]
    containers: Vec<CrictlContainer>,
}

#[derive(Deserialize)]
struct CrictlContainer {
    image: CrictlImageSpec,
}

#[derive(Deserialize)]
struct CrictlImageSpec {
    image: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct PodmanContainer {
    #[serde(rename = "ImageID", default)]
    image_id: String,
}

#[derive(Deserialize)]
struct CrictlImages {
    #[serde(default)]
    images: Vec<CrictlImage>,
}

#[derive(Deserialize)]
struct CrictlImage {
    id: String,
    #[serde(default)]
    pinned: bool,
}

/// An image ID without its `sha256:` prefix, as podman lists IDs.
fn bare_id(id: &str) -> &str {
    id.strip_prefix("sha256:").unwrap_or(id)
}

/// One deployment, as `rpm-ostree status --json` lists it, in boot order.
#[derive(Clone, Debug, PartialEq)]
pub struct Deployment {
    pub index: usize,
    pub osname: String,
    pub checksum: String,
    pub serial: u32,
    pub booted: bool,
}

impl Deployment {
    /// Its checkout: `/ostree/deploy/<osname>/deploy/<checksum>.<serial>`.
    pub fn dir(&self) -> String {
        format!(
            "/ostree/deploy/{}/deploy/{}.{}",
            self.osname, self.checksum, self.serial
        )
    }
}

#[derive(Deserialize)]
struct RpmOstreeStatus {
    deployments: Vec<RpmOstreeDeployment>,
}

#[derive(Deserialize)]
struct RpmOstreeDeployment {
    osname: String,
    checksum: String,
    #[serde(default)]
    serial: u32,
    #[serde(default)]
    booted: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct SkopeoInspect {
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
}

#[derive(Clone, Debug)]
pub struct NodeOs {
    pub runner: Runner,
}

impl NodeOs {
    pub fn new(runner: Runner) -> NodeOs {
        NodeOs { runner }
    }

    /// `rpm-ostree status --json`.
    pub async fn deployments(&self) -> Result<Vec<Deployment>, NodeError> {
        let status: RpmOstreeStatus = self
            .runner
            .json(&["rpm-ostree", "status", "--json"])
            .await?;
        Ok(status
            .deployments
            .into_iter()
            .enumerate()
            .map(|(index, d)| Deployment {
                index,
                osname: d.osname,
                checksum: d.checksum,
                serial: d.serial,
                booted: d.booted,
            })
            .collect())
    }

    /// The booted deployment.
    pub async fn booted(&self) -> Result<Deployment, NodeError> {
        self.deployments()
            .await?
            .into_iter()
            .find(|d| d.booted)
            .ok_or_else(|| NodeError::Parse {
                argv: vec!["rpm-ostree".into(), "status".into(), "--json".into()],
                why: "no deployment is booted".into(),
            })
    }

    /// Whether `ostree admin` has `set-default` (the probe the Lifecycle Agent makes).
    pub async fn supports_set_default(&self) -> Result<bool, NodeError> {
        let help = self.runner.run(&["ostree", "admin", "--help"]).await?;
        Ok(help.contains("set-default"))
    }

    /// What `var-lib-containers.mount` mounts, when it is active.
    pub async fn container_storage_target(&self) -> Result<Option<String>, NodeError> {
        let active = self
            .runner
            .output(&["systemctl", "is-active", STORAGE_UNIT])
            .await?;
        if active.code != 0 {
            return Ok(None);
        }
        let unit = self.runner.run(&["systemctl", "cat", STORAGE_UNIT]).await?;
        Ok(unit
            .lines()
            .find_map(|l| l.trim().strip_prefix("What="))
            .map(|w| w.trim().to_string()))
    }

    /// The image's labels, without pulling it.
    pub async fn inspect_labels(
        &self,
        image: &str,
        auth: &str,
    ) -> Result<BTreeMap<String, String>, NodeError> {
        let target = format!("docker://{image}");
        let argv = [
            "skopeo",
            "inspect",
            "--retry-times",
            "10",
            "--authfile",
            auth,
            &target,
        ];
        let inspect: SkopeoInspect = self.runner.json(&argv).await?;
        Ok(inspect.labels.unwrap_or_default())
    }

    /// `podman pull --authfile AUTH IMAGE` (the seed).
    pub async fn pull_seed(&self, image: &str, auth: &str) -> Result<(), NodeError> {
        self.runner
            .run(&["podman", "pull", "--authfile", auth, image])
            .await
            .map(drop)
    }

    /// `podman pull IMAGE --authfile AUTH` (a precached image, as the precache job pulls).
    pub async fn pull_image(&self, image: &str) -> Result<(), NodeError> {
        self.runner
            .run(&["podman", "pull", image, "--authfile", AUTH_FILE])
            .await
            .map(drop)
    }

    pub async fn image_exists(&self, image: &str) -> Result<bool, NodeError> {
        Ok(self
            .runner
            .output(&["podman", "image", "exists", image])
            .await?
            .code
            == 0)
    }

    /// Mounts the image in the host's namespaces; answers the mount point (a node path).
    pub async fn mount_image(&self, image: &str) -> Result<String, NodeError> {
        let argv = [
            "nsenter", "--target", "1", "--cgroup", "--mount", "--ipc", "--net", "--pid", "--",
            "podman", "image", "mount", image,
        ];
        let out = self.runner.run(&argv).await?;
        let at = out.trim();
        if !at.starts_with('/') {
            return Err(NodeError::Parse {
                argv: argv.iter().map(|s| s.to_string()).collect(),
                why: format!("not a mount point: {at:?}"),
            });
        }
        Ok(at.to_string())
    }

    /// Unmounts and removes the image, if it is there.
    pub async fn unmount_remove_image(&self, image: &str) -> Result<(), NodeError> {
        // Not mounted (a run cut short before the mount) is fine: the image goes either way.
        let _ = self
            .runner
            .output(&["podman", "image", "umount", image])
            .await?;
        if self.image_exists(image).await? {
            self.runner.run(&["podman", "rmi", image]).await?;
        }
        Ok(())
    }

    /// How full container storage is, in percent, reckoned as the Lifecycle Agent does from
    /// `statfs`: `(blocks - available) * 100 / blocks` (`stat --file-system`).
    pub async fn container_storage_used_percent(&self) -> Result<u64, NodeError> {
        let argv = ["stat", "--file-system", "--format=%b %a", CONTAINER_STORAGE];
        let out = self.runner.run(&argv).await?;
        let parsed: Vec<u64> = out
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect();
        match parsed[..] {
            [blocks, available] if blocks > 0 => {
                Ok(blocks.saturating_sub(available) * 100 / blocks)
            }
            _ => Err(NodeError::Parse {
                argv: argv.iter().map(|s| s.to_string()).collect(),
                why: format!("not \"<blocks> <available>\": {:?}", out.trim()),
            }),
        }
    }

    /// The images containers use (CRI-O's, then podman's): IDs or names.
    pub async fn images_in_use(&self) -> Result<BTreeSet<String>, NodeError> {
        let cri: CrictlContainers = self
            .runner
            .json(&["crictl", "ps", "-a", "-o", "json"])
            .await?;
        let podman: Vec<PodmanContainer> = self
            .runner
            .json(&[
                "podman",
                "ps",
                "-a",
                "--format",
                "json",
                "--log-level",
                "error",
            ])
            .await?;
        Ok(cri
            .containers
            .into_iter()
            .map(|c| c.image.image)
            .chain(podman.into_iter().map(|c| c.image_id))
            .map(|i| bare_id(&i).to_string())
            .collect())
    }

    /// The IDs of the images CRI-O keeps pinned.
    pub async fn pinned_images(&self) -> Result<BTreeSet<String>, NodeError> {
        let images: CrictlImages = self
            .runner
            .json(&["crictl", "images", "-o", "json"])
            .await?;
        Ok(images
            .images
            .into_iter()
            .filter(|i| i.pinned)
            .map(|i| bare_id(&i.id).to_string())
            .collect())
    }

    /// `podman images`.
    pub async fn images(&self) -> Result<Vec<PodmanImage>, NodeError> {
        self.runner
            .json(&[
                "podman",
                "images",
                "--format",
                "json",
                "--log-level",
                "error",
            ])
            .await
    }

    /// `podman rmi REF...`; some refs naming an image already gone is no failure here
    /// (answers what podman said).
    pub async fn remove_images(&self, refs: &[&str]) -> Result<String, NodeError> {
        let mut argv = vec!["podman", "rmi"];
        argv.extend_from_slice(refs);
        let out = self.runner.output(&argv).await?;
        Ok(format!("{}{}", out.stdout, out.stderr))
    }

    pub async fn remount_sysroot_rw(&self) -> Result<(), NodeError> {
        self.runner
            .run(&["mount", "/sysroot", "-o", "remount,rw"])
            .await
            .map(drop)
    }

    /// Extracts a `.tgz` keeping SELinux labels, extended attributes and ACLs. In a pod, as
    /// the Lifecycle Agent does, through a copy of `tar` labelled `install_exec_t` (the only
    /// type allowed to set any label).
    pub async fn untar(&self, tgz: &str, dest: &str) -> Result<(), NodeError> {
        let flags = ["--selinux", "--xattrs", "--xattrs-include=*", "--acls"];
        match self.runner.exec() {
            Exec::Direct => {
                let mut argv = vec!["tar", "xzf", tgz, "-C", dest];
                argv.extend(flags);
                self.runner.run(&argv).await.map(drop)
            }
            Exec::Chroot => {
                let copy = format!("/var/tmp/tar-{}", std::process::id());
                tokio::fs::copy(self.runner.path("/usr/bin/tar"), self.runner.path(&copy))
                    .await
                    .map_err(|e| super::runner::file_error(&copy, e))?;
                let result = async {
                    self.runner
                        .run(&["chcon", "-t", "install_exec_t", &copy])
                        .await?;
                    let mut argv = vec![copy.as_str(), "xzf", tgz, "-C", dest];
                    argv.extend(flags);
                    self.runner.run(&argv).await.map(drop)
                }
                .await;
                let _ = tokio::fs::remove_file(self.runner.path(&copy)).await;
                result
            }
        }
    }

    pub async fn pull_local(&self, repo: &str) -> Result<(), NodeError> {
        self.runner
            .run(&["ostree", "pull-local", repo])
            .await
            .map(drop)
    }

    pub async fn os_init(&self, stateroot: &str) -> Result<(), NodeError> {
        self.runner
            .run(&["ostree", "admin", "os-init", stateroot])
            .await
            .map(drop)
    }

    /// Deploys `commit` in the stateroot (not as the default when `not_as_default`), frees
    /// what `--no-prune` kept, and answers the new deployment.
    pub async fn deploy(
        &self,
        stateroot: &str,
        commit: &str,
        append: &[String],
        set: &[String],
        not_as_default: bool,
    ) -> Result<Deployment, NodeError> {
        let mut argv = vec!["ostree", "admin", "deploy", "--os", stateroot, "--no-prune"];
        for k in append {
            argv.extend(["--karg-append", k.as_str()]);
        }
        for k in set {
            argv.extend(["--karg", k.as_str()]);
        }
        argv.push(commit);
        if not_as_default {
            argv.push("--not-as-default");
        }
        self.runner.run(&argv).await?;
        self.runner.run(&["rpm-ostree", "cleanup", "-b"]).await?;
        self.deployments()
            .await?
            .into_iter()
            .filter(|d| d.osname == stateroot && d.checksum == commit)
            .max_by_key(|d| d.serial)
            .ok_or_else(|| NodeError::Parse {
                argv: vec!["rpm-ostree".into(), "status".into(), "--json".into()],
                why: format!("no deployment of {commit} in {stateroot} after deploying it"),
            })
    }

    /// Makes deployment `index` the default for the next boot (nothing to do for 0).
    pub async fn set_default(&self, index: usize) -> Result<(), NodeError> {
        if index == 0 {
            return Ok(());
        }
        let n = index.to_string();
        self.runner
            .run(&["ostree", "admin", "set-default", &n])
            .await
            .map(drop)
    }

    pub async fn undeploy(&self, index: usize) -> Result<(), NodeError> {
        let n = index.to_string();
        self.runner
            .run(&["ostree", "admin", "undeploy", &n])
            .await
            .map(drop)
    }

    /// Removes a stateroot's directory; refused for the booted one.
    pub async fn remove_stateroot(&self, stateroot: &str) -> Result<(), NodeError> {
        if self.booted().await?.osname == stateroot {
            return Err(NodeError::Refused(format!(
                "stateroot {stateroot} is booted: it cannot be removed"
            )));
        }
        let script = format!("mount -o remount,rw /sysroot && rm -rf /ostree/deploy/{stateroot}");
        self.runner
            .run(&["unshare", "-m", "/bin/sh", "-c", &script])
            .await
            .map(drop)
    }

    pub async fn rpm_ostree_cleanup(&self) -> Result<(), NodeError> {
        self.runner
            .run(&["rpm-ostree", "cleanup", "-b"])
            .await
            .map(drop)
    }

    /// Asks systemd to reboot the node, as the Lifecycle Agent does (the quotes are part of
    /// the arguments).
    pub async fn reboot(&self, description: &str) -> Result<(), NodeError> {
        let description = format!("\"lifecycle-agent: {description}\"");
        self.runner
            .run(&[
                "systemd-run",
                "--unit",
                "lifecycle-agent-reboot",
                "--description",
                &description,
                "systemctl",
                "--message=\"Image Based Upgrade\"",
                "reboot",
            ])
            .await
            .map(drop)
    }

    /// Whether a unit is running (`systemctl is-active`: `active` or `activating`).
    pub async fn unit_active(&self, unit: &str) -> Result<bool, NodeError> {
        let out = self
            .runner
            .output(&["systemctl", "is-active", unit])
            .await?;
        Ok(matches!(out.stdout.trim(), "active" | "activating"))
    }
}
