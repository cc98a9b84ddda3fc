//! The node the fake tools act on: its ostree deployments, container images (pulled, in
//! the registry, mounted), systemd units and reboot request, kept as JSON in
//! `ROOT/.fake-node/state.json`. Files live where the real node has them, under ROOT: the
//! stateroots in `ROOT/ostree/deploy/`, and `ROOT/var` and `ROOT/etc` point to the booted
//! deployment's, as ostree's bind mounts do.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The node's authorized SSH key, as Ignition writes it.
pub const SSH_AUTHORIZED_KEY: &str = "/home/core/.ssh/authorized_keys.d/ignition";
/// The seed's post-pivot reconfiguration, and where it finds its input.
pub const POST_PIVOT_UNIT: &str = "installation-configuration.service";
pub const CLUSTER_CONFIGURATION: &str = "/var/opt/openshift/cluster-configuration/manifest.json";
/// The mount unit the Lifecycle Agent requires for container storage.
pub const STORAGE_UNIT: &str = "var-lib-containers.mount";

#[derive(Serialize, Deserialize, Clone, Debug)]
#[serde(rename_all = "camelCase")]
pub struct Deployment {
    pub osname: String,
    pub checksum: String,
    pub serial: u32,
    pub version: String,
    pub booted: bool,
    #[serde(default)]
    pub kargs: Vec<String>,
}

impl Deployment {
    /// `<checksum>.<serial>`, the name of its directory under `deploy/`.
    pub fn name(&self) -> String {
        format!("{}.{}", self.checksum, self.serial)
    }

    /// Its checkout, as a node path.
    pub fn dir(&self) -> String {
        format!("/ostree/deploy/{}/deploy/{}", self.osname, self.name())
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, Default)]
#[serde(rename_all = "camelCase")]
pub struct Image {
    pub id: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Where its files are kept (a directory under `.fake-node/images`), for images that
    /// have any.
    #[serde(default)]
    pub files: Option<PathBuf>,
    /// In a private registry: the `auth` an authfile's entry for its registry must hold
    /// (`base64(user:password)`, as in a `.dockerconfigjson`).
    #[serde(default)]
    pub auth: Option<String>,
    /// Bytes it takes in container storage once pulled.
    #[serde(default)]
    pub size: u64,
    /// When it was built, Unix seconds.
    #[serde(default)]
    pub created: i64,
    /// CRI-O keeps it (`crictl images` says `pinned`).
    #[serde(default)]
    pub pinned: bool,
    /// A CRI-O container runs it (`crictl ps -a` lists it).
    #[serde(default)]
    pub in_use: bool,
}

impl Image {
    /// Whether `authfile` (a node path, as `--authfile` names it) lets one read the image
    /// `name`: its `auths` entry for the image's registry holds the image's `auth`.
    pub fn readable_with(&self, root: &Root, name: &str, authfile: Option<&str>) -> bool {
        let Some(want) = &self.auth else {
            return true;
        };
        let registry = name.split('/').next().unwrap_or_default();
        authfile
            .and_then(|f| fs::read_to_string(root.path(f)).ok())
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
            .is_some_and(|auths| auths["auths"][registry]["auth"] == want.as_str())
    }
}

#[derive(Serialize, Deserialize, Debug, Default)]
#[serde(rename_all = "camelCase")]
pub struct Node {
    /// In boot order: the first is the default for the next boot.
    pub deployments: Vec<Deployment>,
    /// Commits in the ostree repository, by checksum, with their version.
    pub commits: BTreeMap<String, String>,
    /// What `podman pull` and `skopeo inspect` can reach.
    pub registry: BTreeMap<String, Image>,
    /// Pulled images.
    pub local: BTreeSet<String>,
    /// Mounted images and their mount points (node paths).
    pub mounts: BTreeMap<String, String>,
    pub reboot_requested: bool,
    /// Units running now (files of units are in the booted `/etc`).
    pub active: BTreeSet<String>,
    /// Units that failed in this boot.
    #[serde(default)]
    pub failed: BTreeSet<String>,
    /// `fake-node fail`: invocations starting with these words fail.
    pub failures: Vec<Vec<String>>,
    /// `fake-node hold --at N`: the N-th invocation (counted in the log, from 1) waits,
    /// logged and not run, until the hold is cleared, then exits 137 without running.
    #[serde(default)]
    pub hold_at: Option<usize>,
    /// Container storage, its own partition.
    #[serde(default)]
    pub disk: Disk,
}

/// `/var/lib/containers`: its size, and what is used on it besides the images, in bytes.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Disk {
    pub size: u64,
    pub other: u64,
}

pub const GIB: u64 = 1 << 30;
/// The block size `stat --file-system` reports.
pub const BLOCK: u64 = 4096;

impl Default for Disk {
    fn default() -> Disk {
        Disk {
            size: 100 * GIB,
            other: 10 * GIB,
        }
    }
}

impl Node {
    /// Bytes used on container storage: the pulled images and the rest.
    pub fn disk_used(&self) -> u64 {
        self.disk.other
            + self
                .local
                .iter()
                .filter_map(|name| self.registry.get(name))
                .map(|i| i.size)
                .sum::<u64>()
    }
}

/// A node root: ROOT and what is kept of it.
pub struct Root {
    pub dir: PathBuf,
}

impl Root {
    pub fn new(dir: &Path) -> Root {
        Root {
            dir: dir.to_path_buf(),
        }
    }

    fn own(&self) -> PathBuf {
        self.dir.join(".fake-node")
    }

    /// A node path (absolute, as the tools see it inside the node) under ROOT.
    pub fn path(&self, node_path: &str) -> PathBuf {
        self.dir.join(node_path.trim_start_matches('/'))
    }

    pub fn load(&self) -> Result<Node, String> {
        let text = fs::read_to_string(self.own().join("state.json")).map_err(|e| {
            format!(
                "fake-node: {} is not a fake node ({e}); run `fake-node init` first",
                self.dir.display()
            )
        })?;
        serde_json::from_str(&text).map_err(|e| format!("fake-node: state.json: {e}"))
    }

    pub fn save(&self, node: &Node) -> Result<(), String> {
        let tmp = self.own().join("state.json.tmp");
        let text = serde_json::to_string_pretty(node).map_err(|e| e.to_string())?;
        fs::write(&tmp, text).map_err(|e| format!("fake-node: {e}"))?;
        fs::rename(&tmp, self.own().join("state.json")).map_err(|e| format!("fake-node: {e}"))
    }

    /// Holds the node for one invocation: tools run in parallel (precache pulls do).
    pub fn lock(&self) -> Result<nix::fcntl::Flock<fs::File>, String> {
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.own().join("lock"))
            .map_err(|e| format!("fake-node: lock: {e}"))?;
        nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| format!("fake-node: lock: {e}"))
    }

    /// How many invocations the log holds.
    pub fn logged(&self) -> usize {
        fs::read_to_string(self.own().join("commands.log"))
            .map(|t| t.lines().count())
            .unwrap_or(0)
    }

    /// Appends an invocation to `.fake-node/commands.log`, one JSON array a line.
    pub fn log(&self, argv: &[String]) {
        let line = serde_json::to_string(argv).unwrap_or_default();
        if let Ok(mut f) = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.own().join("commands.log"))
        {
            let _ = writeln!(f, "{line}");
        }
    }

    pub fn images_dir(&self) -> PathBuf {
        self.own().join("images")
    }

    /// Creates a fresh node booted into one deployment of `version`.
    pub fn init(&self, version: &str) -> Result<(), String> {
        fs::create_dir_all(self.own()).map_err(|e| e.to_string())?;
        let checksum = checksum_of(version);
        let booted = Deployment {
            osname: "rhcos".into(),
            checksum: checksum.clone(),
            serial: 0,
            version: version.into(),
            booted: true,
            kargs: vec![],
        };
        let var = self.path("/ostree/deploy/rhcos/var");
        fs::create_dir_all(var.join("lib/kubelet")).map_err(|e| e.to_string())?;
        // The cluster's pull secret, which pulls use as their auth file.
        fs::write(var.join("lib/kubelet/config.json"), "{\"auths\":{}}")
            .map_err(|e| e.to_string())?;
        fs::create_dir_all(var.join("tmp")).map_err(|e| e.to_string())?;
        fs::create_dir_all(self.path(&booted.dir()).join("etc/systemd/system"))
            .map_err(|e| e.to_string())?;
        let node = Node {
            deployments: vec![booted],
            commits: BTreeMap::from([(checksum, version.to_string())]),
            active: BTreeSet::from([STORAGE_UNIT.to_string()]),
            ..Default::default()
        };
        self.point_to_booted(&node)?;
        // What the node holds of its own configuration: the SSH keys Ignition and sshd
        // wrote, chrony's and NetworkManager's configuration.
        for (path, text) in [
            (
                SSH_AUTHORIZED_KEY,
                "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeNodeKey core@sno1\n",
            ),
            (
                "/etc/ssh/ssh_host_ed25519_key",
                "-----BEGIN OPENSSH PRIVATE KEY-----\nfake\n-----END OPENSSH PRIVATE KEY-----\n",
            ),
            (
                "/etc/ssh/ssh_host_ed25519_key.pub",
                "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeHostKey root@sno1\n",
            ),
            ("/etc/chrony.conf", "pool 2.rhel.pool.ntp.org iburst\n"),
            (
                "/etc/NetworkManager/system-connections/ens3.nmconnection",
                "[connection]\nid=ens3\ntype=ethernet\ninterface-name=ens3\n",
            ),
        ] {
            let file = self.path(path);
            fs::create_dir_all(file.parent().unwrap_or(&self.dir)).map_err(|e| e.to_string())?;
            fs::write(file, text).map_err(|e| e.to_string())?;
        }
        self.new_boot_id()?;
        fs::create_dir_all(self.path("/sysroot")).map_err(|e| e.to_string())?;
        fs::create_dir_all(self.path("/usr/bin")).map_err(|e| e.to_string())?;
        self.save(&node)
    }

    /// A boot of its own: `/proc/sys/kernel/random/boot_id` changes.
    pub fn new_boot_id(&self) -> Result<(), String> {
        let path = self.path("/proc/sys/kernel/random/boot_id");
        let previous = fs::read_to_string(&path).unwrap_or_default();
        fs::create_dir_all(path.parent().unwrap_or(&self.dir)).map_err(|e| e.to_string())?;
        let id = checksum_of(&format!("{previous}{:?}", std::time::SystemTime::now()));
        let id = format!(
            "{}-{}-{}-{}-{}",
            &id[..8],
            &id[8..12],
            &id[12..16],
            &id[16..20],
            &id[20..32]
        );
        fs::write(&path, format!("{id}\n")).map_err(|e| format!("fake-node: {e}"))
    }

    /// Points `ROOT/var` and `ROOT/etc` to the booted deployment's.
    pub fn point_to_booted(&self, node: &Node) -> Result<(), String> {
        let Some(b) = node.deployments.iter().find(|d| d.booted) else {
            return Err("fake-node: no booted deployment".into());
        };
        for (link, target) in [
            ("var", format!("ostree/deploy/{}/var", b.osname)),
            ("etc", format!("{}/etc", b.dir().trim_start_matches('/'))),
        ] {
            let link = self.dir.join(link);
            if link.is_symlink() || link.exists() {
                fs::remove_file(&link).map_err(|e| format!("fake-node: {e}"))?;
            }
            std::os::unix::fs::symlink(target, &link).map_err(|e| format!("fake-node: {e}"))?;
        }
        Ok(())
    }
}

/// A stable stand-in for an ostree commit checksum (64 hex digits).
pub fn checksum_of(what: &str) -> String {
    use std::hash::{Hash, Hasher};
    let mut out = String::new();
    for round in 0u8..4 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (what, round).hash(&mut h);
        out.push_str(&format!("{:016x}", h.finish()));
    }
    out
}
