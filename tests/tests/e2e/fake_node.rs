//! The fake node answers as the real tools do: the sequences the Lifecycle Agent runs
//! (`ibu-host.md`), through the links `install-bin` makes, found on `PATH`.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// A fake node in a temporary directory, with its tools linked in `bin`.
pub struct FakeNode {
    pub root: PathBuf,
    pub bin: PathBuf,
    _dir: tempfile::TempDir,
}

impl FakeNode {
    pub fn new(version: &str, seeds: &[(&str, &str)]) -> FakeNode {
        let dir = tempfile::tempdir().unwrap();
        let (root, bin) = (dir.path().join("root"), dir.path().join("bin"));
        let node = FakeNode {
            root,
            bin,
            _dir: dir,
        };
        node.admin(&["init", "--version", version]);
        for (image, v) in seeds {
            node.admin(&["add-seed", "--image", image, "--version", v]);
        }
        let bin = node.bin.to_string_lossy().to_string();
        node.admin(&["install-bin", "--bin-dir", &bin]);
        node
    }

    /// Runs `fake-node COMMAND --root ROOT ARGS`, which must succeed; answers its stdout.
    pub fn admin(&self, args: &[&str]) -> String {
        let out = Command::new(fleet_e2e::binary("fake-node"))
            .arg(args[0])
            .arg("--root")
            .arg(&self.root)
            .args(&args[1..])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "fake-node {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// `PATH` with the node's tools first.
    pub fn path(&self) -> std::ffi::OsString {
        let mut dirs = vec![self.bin.clone()];
        dirs.extend(std::env::split_paths(
            &std::env::var_os("PATH").unwrap_or_default(),
        ));
        std::env::join_paths(dirs).unwrap()
    }

    /// Runs a tool as the agent does (by name, from `PATH`): exit code, stdout, stderr.
    pub fn tool(&self, argv: &[&str]) -> (i32, String, String) {
        let out = Command::new(argv[0])
            .args(&argv[1..])
            .env("PATH", self.path())
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    }

    pub fn ok(&self, argv: &[&str]) -> String {
        let (code, out, err) = self.tool(argv);
        assert_eq!(code, 0, "{argv:?}: {err}");
        out
    }

    pub fn status(&self) -> Value {
        serde_json::from_str(&self.admin(&["status"])).unwrap()
    }

    /// Whether the agent has asked the node to reboot (and it has not yet).
    pub fn reboot_requested(&self) -> bool {
        self.status()["rebootRequested"] == true
    }

    /// Every tool invocation so far, in order.
    pub fn log(&self) -> Vec<Vec<String>> {
        std::fs::read_to_string(self.root.join(".fake-node/commands.log"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// A node path under the root.
    pub fn file(&self, node_path: &str) -> PathBuf {
        self.root.join(node_path.trim_start_matches('/'))
    }
}

fn deployments(node: &FakeNode) -> Vec<(String, bool)> {
    let v: Value = serde_json::from_str(&node.ok(&["rpm-ostree", "status", "--json"])).unwrap();
    v["deployments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["osname"].as_str().unwrap().to_string(),
                d["booted"].as_bool().unwrap(),
            )
        })
        .collect()
}

#[test]
fn the_lifecycle_agents_prep_pivot_and_cleanup_sequences_on_the_fake_node() {
    let seed = "quay.io/seed:4.16.0";
    let node = FakeNode::new("4.15.0", &[(seed, "4.16.0")]);
    let auth = "/var/lib/kubelet/config.json";
    assert_eq!(deployments(&node), [("rhcos".to_string(), true)]);
    assert_eq!(
        node.ok(&["systemctl", "is-active", "var-lib-containers.mount"]),
        "active\n"
    );
    assert!(
        node.ok(&["systemctl", "cat", "var-lib-containers.mount"])
            .contains("What=/dev/disk/by-partlabel/varlibcontainers")
    );
    let inspect: Value = serde_json::from_str(&node.ok(&[
        "skopeo",
        "inspect",
        "--retry-times",
        "10",
        "--authfile",
        auth,
        &format!("docker://{seed}"),
    ]))
    .unwrap();
    assert_eq!(
        inspect["Labels"]["com.openshift.lifecycle-agent.seed_format_version"],
        "4"
    );
    let (code, _, err) = node.tool(&["skopeo", "inspect", "docker://quay.io/none:1"]);
    assert_eq!(code, 1);
    assert!(err.contains("manifest unknown"), "{err}");

    // Prep's stateroot setup (ibu-host.md section 1)
    node.ok(&["podman", "pull", "--authfile", auth, seed]);
    assert_eq!(node.tool(&["podman", "image", "exists", seed]).0, 0);
    node.ok(&["mount", "/sysroot", "-o", "remount,rw"]);
    let at = node.ok(&[
        "nsenter", "--target", "1", "--cgroup", "--mount", "--ipc", "--net", "--pid", "--",
        "podman", "image", "mount", seed,
    ]);
    let at = at.trim();
    let rpm: Value = serde_json::from_str(
        &std::fs::read_to_string(node.file(&format!("{at}/rpm-ostree.json"))).unwrap(),
    )
    .unwrap();
    let checksum = rpm["deployments"][0]["checksum"]
        .as_str()
        .unwrap()
        .to_string();
    std::fs::create_dir_all(node.file("/var/tmp/ws/ostree")).unwrap();
    node.ok(&[
        "tar",
        "xzf",
        &format!("{at}/ostree.tgz"),
        "-C",
        "/var/tmp/ws/ostree",
        "--selinux",
        "--xattrs",
        "--xattrs-include=*",
        "--acls",
    ]);
    node.ok(&["ostree", "pull-local", "/var/tmp/ws/ostree"]);
    node.ok(&["ostree", "admin", "os-init", "rhcos_4.16.0"]);
    assert!(
        node.ok(&["ostree", "admin", "--help"])
            .contains("set-default")
    );
    node.admin(&["fail", "ostree", "admin", "deploy"]);
    let deploy = [
        "ostree",
        "admin",
        "deploy",
        "--os",
        "rhcos_4.16.0",
        "--no-prune",
        "--karg-append",
        "ip=dhcp",
        &checksum,
        "--not-as-default",
    ];
    let (code, _, err) = node.tool(&deploy);
    assert_eq!(
        (code, err.trim()),
        (1, "fake-node: injected failure of `ostree admin deploy`")
    );
    node.admin(&["fail", "--clear"]);
    node.ok(&deploy);
    assert_eq!(
        deployments(&node),
        [
            ("rhcos".to_string(), true),
            ("rhcos_4.16.0".to_string(), false)
        ]
    );
    let (code, _, err) = node.tool(&["ostree", "admin", "deploy", "--os", "rhcos_4.16.0", "0000"]);
    assert_eq!((code, err.trim()), (1, "error: Refspec '0000' not found"));
    let dd = format!("/ostree/deploy/rhcos_4.16.0/deploy/{checksum}.0");
    assert!(node.file(&dd).join("etc").is_dir());
    node.ok(&["tar", "xzf", &format!("{at}/etc.tgz"), "-C", &dd]);
    assert_eq!(
        std::fs::read_to_string(node.file(&format!("{dd}/etc/hostname"))).unwrap(),
        "seed\n"
    );
    node.ok(&["podman", "image", "umount", seed]);
    node.ok(&["podman", "rmi", seed]);
    assert_eq!(node.tool(&["podman", "image", "exists", seed]).0, 1);

    // Precache: pulls in parallel land, each once.
    let secret =
        std::fs::read_to_string(node.file("/ostree/deploy/rhcos/var/lib/kubelet/config.json"))
            .unwrap();
    assert_eq!(secret, "{\"auths\":{}}");
    let images: Vec<String> = std::fs::read_dir(node.root.join(".fake-node/images"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("containers.list")).ok())
        .flat_map(|l| l.lines().map(String::from).collect::<Vec<_>>())
        .collect();
    assert_eq!(images.len(), 3);
    std::thread::scope(|s| {
        for image in &images {
            let node = &node;
            s.spawn(move || node.ok(&["podman", "pull", image, "--authfile", auth]));
        }
    });
    let pulled: Vec<String> = serde_json::from_value(node.status()["images"].clone()).unwrap();
    assert_eq!(pulled.len(), 3);

    // The pivot: the new deployment becomes the default, the node reboots into it.
    node.ok(&["ostree", "admin", "set-default", "1"]);
    let (_, _, err) = node.tool(&[
        "systemd-run",
        "--unit",
        "lifecycle-agent-reboot",
        "--description",
        "\"lifecycle-agent: upgrade\"",
        "systemctl",
        "--message=\"Image Based Upgrade\"",
        "reboot",
    ]);
    assert!(
        err.contains("Running as unit: lifecycle-agent-reboot.service"),
        "{err}"
    );
    assert_eq!(node.status()["rebootRequested"], true);
    node.admin(&["reboot"]);
    assert_eq!(node.status()["rebootRequested"], false);
    assert_eq!(
        deployments(&node),
        [
            ("rhcos_4.16.0".to_string(), true),
            ("rhcos".to_string(), false)
        ]
    );
    assert!(
        std::fs::canonicalize(node.file("/var"))
            .unwrap()
            .ends_with("ostree/deploy/rhcos_4.16.0/var")
    );

    // Cleanup of the old stateroot (section 4)
    let (code, _, err) = node.tool(&["ostree", "admin", "undeploy", "0"]);
    assert_eq!(
        (code, err.trim()),
        (1, "error: Cannot undeploy currently booted deployment 0")
    );
    node.ok(&["ostree", "admin", "undeploy", "1"]);
    node.ok(&[
        "unshare",
        "-m",
        "/bin/sh",
        "-c",
        "mount -o remount,rw /sysroot && rm -rf /ostree/deploy/rhcos",
    ]);
    node.ok(&["rpm-ostree", "cleanup", "-b"]);
    assert!(!node.file("/ostree/deploy/rhcos").exists());
    assert_eq!(deployments(&node), [("rhcos_4.16.0".to_string(), true)]);

    let log = node.log();
    let words = |i: usize| log[i].join(" ");
    assert_eq!(words(0), "rpm-ostree status --json");
    assert_eq!(words(1), "systemctl is-active var-lib-containers.mount");
    assert!(log.iter().any(|l| l.join(" ")
        == format!(
            "nsenter --target 1 --cgroup --mount --ipc --net --pid -- podman image mount {seed}"
        )));
    assert_eq!(
        log.iter()
            .filter(|l| l[0] == "podman" && l[1] == "pull")
            .count(),
        4
    );
}

#[test]
fn the_tools_find_their_node_from_path_alone() {
    let node = FakeNode::new("4.14.7", &[]);
    let out = Command::new(node.bin.join("rpm-ostree"))
        .args(["status", "--json"])
        .env_remove("PATH")
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["deployments"][0]["version"], "4.14.7");
    assert!(Path::new(&node.bin).join(".fake-node-root").is_file());
}

#[test]
fn container_storage_fills_with_pulls_and_empties_with_rmi_as_statfs_shows() {
    let node = FakeNode::new("4.15.0", &[("quay.io/seed:4.16.0", "4.16.0")]);
    node.admin(&["disk", "--size", "10G", "--used", "6G"]);
    node.admin(&[
        "add-image",
        "--image",
        "quay.io/old:1",
        "--size",
        "1G",
        "--created",
        "100",
    ]);
    node.admin(&[
        "add-image",
        "--image",
        "quay.io/app:1",
        "--size",
        "1G",
        "--in-use",
    ]);
    node.admin(&[
        "add-image",
        "--image",
        "quay.io/infra:1",
        "--size",
        "1G",
        "--pinned",
    ]);
    let used = |node: &FakeNode| {
        let out = node.ok(&[
            "stat",
            "--file-system",
            "--format=%b %a",
            "/var/lib/containers",
        ]);
        let n: Vec<u64> = out.split_whitespace().map(|w| w.parse().unwrap()).collect();
        (n[0] - n[1]) * 100 / n[0]
    };
    assert_eq!(used(&node), 90);
    // The seed (2 GiB) does not fit: the pull fails as podman's does on a full disk.
    let (code, _, err) = node.tool(&[
        "podman",
        "pull",
        "--authfile",
        "/var/lib/kubelet/config.json",
        "quay.io/seed:4.16.0",
    ]);
    assert_eq!(code, 125);
    assert!(err.contains("no space left on device"), "{err}");
    // What CRI-O and podman say of the images, in their JSON.
    let cri: Value = serde_json::from_str(&node.ok(&["crictl", "images", "-o", "json"])).unwrap();
    let pinned: Vec<&Value> = cri["images"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["pinned"] == true)
        .collect();
    assert_eq!(pinned.len(), 1);
    let ps: Value = serde_json::from_str(&node.ok(&["crictl", "ps", "-a", "-o", "json"])).unwrap();
    assert_eq!(ps["containers"].as_array().unwrap().len(), 1);
    let images: Value = serde_json::from_str(&node.ok(&[
        "podman",
        "images",
        "--format",
        "json",
        "--log-level",
        "error",
    ]))
    .unwrap();
    let old = images
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["RepoTags"][0] == "quay.io/old:1")
        .unwrap();
    assert_eq!(old["Created"], 100);
    // rmi by ID and name at once removes the image once; an image in use stays.
    let id = old["Id"].as_str().unwrap();
    node.ok(&["podman", "rmi", id, "quay.io/old:1"]);
    let (code, _, err) = node.tool(&["podman", "rmi", "quay.io/app:1"]);
    assert_eq!(code, 2);
    assert!(err.contains("image is in use by a container"), "{err}");
    assert_eq!(used(&node), 80);
    node.ok(&[
        "podman",
        "pull",
        "--authfile",
        "/var/lib/kubelet/config.json",
        "quay.io/seed:4.16.0",
    ]);
    assert_eq!(used(&node), 100);
}
