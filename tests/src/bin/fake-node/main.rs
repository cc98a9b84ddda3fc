//! `fake-node`: one single-node OpenShift host's ostree deployments, container images and
//! reboots, for testing `spoke-agent --host ostree` without a node. Invoked by its own name
//! it manages the node; invoked through the links `install-bin` makes (`ostree`,
//! `rpm-ostree`, `podman`, `skopeo`, `systemctl`, `systemd-run`, `mount`, `tar`, `chcon`,
//! `unshare`, `crictl`, `nsenter`, `stat`) it answers as those tools do, and logs every invocation to
//! `ROOT/.fake-node/commands.log`.
//!
//! ```text
//! fake-node init --root R --version 4.15.0
//! fake-node add-seed --root R --image IMG --version V [--auth BASE64] [--fips]   (private:
//!     needs an authfile whose `auths` entry for the image's registry has that `auth`;
//!     FIPS: made from a cluster in FIPS mode)
//! fake-node install-bin --root R --bin-dir B
//! fake-node reboot --root R
//! fake-node status --root R
//! fake-node fail --root R WORD... | fake-node fail --root R --clear
//! fake-node hold --root R --at N | fake-node hold --root R --clear
//! fake-node unit-failed --root R UNIT...     (failed in this boot)
//! fake-node disk --root R --size 100G --used 10G   (container storage; used besides images)
//! fake-node add-image --root R --image IMG --size 5G [--created UNIX] [--pinned] [--in-use]
//!     (an image already pulled; pinned by CRI-O, or run by a container)
//! ```

mod node;
mod seed;
mod tools;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use node::{Node, Root, STORAGE_UNIT};

/// The tools `install-bin` links to this binary.
const TOOLS: [&str; 13] = [
    "ostree",
    "rpm-ostree",
    "podman",
    "skopeo",
    "systemctl",
    "systemd-run",
    "mount",
    "tar",
    "chcon",
    "unshare",
    "crictl",
    "nsenter",
    "stat",
];
/// Written into the directory of the links: the root they act on.
const ROOT_FILE: &str = ".fake-node-root";

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    let called = argv
        .first()
        .map(|a| {
            Path::new(a)
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .to_string()
        })
        .unwrap_or_default();
    let result = if TOOLS.contains(&called.as_str()) {
        as_tool(&argv[0], &called, &argv[1..])
    } else {
        own_command(&argv[1..]).map(|()| 0)
    };
    match result {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(msg) => {
            eprintln!("{msg}");
            ExitCode::from(2)
        }
    }
}

/// The root of the links' directory: the directory of `argv0`, or the first directory of
/// `PATH` holding a link of that name.
fn tool_root(argv0: &str, name: &str) -> Result<PathBuf, String> {
    let dir = if argv0.contains('/') {
        Path::new(argv0).parent().map(Path::to_path_buf)
    } else {
        std::env::var_os("PATH").and_then(|path| {
            std::env::split_paths(&path)
                .find(|d| d.join(name).exists() && d.join(ROOT_FILE).is_file())
        })
    };
    let file = dir.map(|d| d.join(ROOT_FILE)).ok_or_else(|| {
        format!("fake-node: {name}: no {ROOT_FILE} beside this link; use `fake-node install-bin`")
    })?;
    let root = std::fs::read_to_string(&file)
        .map_err(|e| format!("fake-node: {}: {e}", file.display()))?;
    Ok(PathBuf::from(root.trim()))
}

fn as_tool(argv0: &str, name: &str, args: &[String]) -> Result<i32, String> {
    let root = Root::new(&tool_root(argv0, name)?);
    let lock = root.lock()?;
    let mut node = root.load()?;
    let mut argv = vec![name.to_string()];
    argv.extend(args.iter().cloned());
    root.log(&argv);
    let number = root.logged();
    if node.hold_at == Some(number) {
        // Held, logged and not run (the node free meanwhile) until the hold is cleared, and
        // then never run: it ends as a command killed with the agent that ran it (in a pod
        // or a systemd service, the agent's commands die with it).
        drop(lock);
        while root.load()?.hold_at == Some(number) {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        return Ok(137);
    }
    let out = tools::run(&root, &mut node, &argv);
    root.save(&node)?;
    drop(lock);
    print!("{}", out.stdout);
    eprint!("{}", out.stderr);
    let _ = std::io::stdout().flush();
    Ok(out.code)
}

/// `--root R` and the remaining words.
fn root_arg(args: &[String]) -> Result<(Root, Vec<String>), String> {
    let mut root = None;
    let mut rest = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--root" {
            root = it.next().cloned();
        } else if let Some(r) = a.strip_prefix("--root=") {
            root = Some(r.to_string());
        } else {
            rest.push(a.clone());
        }
    }
    let root = root.ok_or("fake-node: --root R is required")?;
    let abs = std::path::absolute(&root).map_err(|e| format!("fake-node: --root {root}: {e}"))?;
    Ok((Root::new(&abs), rest))
}

/// A size: bytes, or with a `K`, `M` or `G` suffix (binary units).
fn bytes(text: &str) -> Result<u64, String> {
    let (digits, unit) = match text.char_indices().last() {
        Some((i, 'K')) => (&text[..i], 1u64 << 10),
        Some((i, 'M')) => (&text[..i], 1 << 20),
        Some((i, 'G')) => (&text[..i], 1 << 30),
        _ => (text, 1),
    };
    digits
        .parse::<u64>()
        .map(|n| n * unit)
        .map_err(|_| format!("fake-node: {text:?} is not a size (bytes, or 10K, 5M, 2G)"))
}

/// The value of `--name V` in `rest`.
fn value(rest: &[String], name: &str) -> Result<String, String> {
    rest.iter()
        .position(|a| a == name)
        .and_then(|i| rest.get(i + 1))
        .cloned()
        .ok_or_else(|| format!("fake-node: {name} is required"))
}

fn own_command(args: &[String]) -> Result<(), String> {
    let Some((command, args)) = args.split_first() else {
        return Err(
            "usage: fake-node init|add-seed|add-image|disk|install-bin|reboot|status|fail|hold|unit-failed --root R ..."
                .into(),
        );
    };
    let (root, rest) = root_arg(args)?;
    match command.as_str() {
        "init" => root.init(&value(&rest, "--version")?),
        "add-seed" => {
            let _lock = root.lock()?;
            let mut node = root.load()?;
            seed::add(
                &root,
                &mut node,
                &value(&rest, "--image")?,
                &value(&rest, "--version")?,
                seed::SeedOptions {
                    auth: value(&rest, "--auth").ok(),
                    fips: rest.iter().any(|a| a == "--fips"),
                },
            )?;
            root.save(&node)
        }
        "install-bin" => {
            root.load()?;
            let bin = PathBuf::from(value(&rest, "--bin-dir")?);
            std::fs::create_dir_all(&bin).map_err(|e| format!("fake-node: {e}"))?;
            let me = std::env::current_exe().map_err(|e| format!("fake-node: {e}"))?;
            for tool in TOOLS {
                let link = bin.join(tool);
                let _ = std::fs::remove_file(&link);
                std::os::unix::fs::symlink(&me, &link).map_err(|e| format!("fake-node: {e}"))?;
            }
            std::fs::write(bin.join(ROOT_FILE), root.dir.to_string_lossy().as_bytes())
                .map_err(|e| format!("fake-node: {e}"))
        }
        "reboot" => {
            let _lock = root.lock()?;
            let mut node = root.load()?;
            reboot(&root, &mut node)?;
            root.save(&node)
        }
        "status" => {
            let node = root.load()?;
            let deployments: Vec<serde_json::Value> = node
                .deployments
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    serde_json::json!({"osname": d.osname, "version": d.version,
                        "booted": d.booted, "default": i == 0})
                })
                .collect();
            let status = serde_json::json!({
                "deployments": deployments,
                "rebootRequested": node.reboot_requested,
                "images": node.local,
                "mounts": node.mounts,
                "disk": {"size": node.disk.size, "used": node.disk_used()},
            });
            println!(
                "{}",
                serde_json::to_string_pretty(&status).unwrap_or_default()
            );
            Ok(())
        }
        "disk" => {
            let _lock = root.lock()?;
            let mut node = root.load()?;
            node.disk = node::Disk {
                size: bytes(&value(&rest, "--size")?)?,
                other: bytes(&value(&rest, "--used")?)?,
            };
            root.save(&node)
        }
        "add-image" => {
            let _lock = root.lock()?;
            let mut node = root.load()?;
            let image = value(&rest, "--image")?;
            let flag = |f: &str| rest.iter().any(|a| a == f);
            let created = match value(&rest, "--created") {
                Ok(t) => t
                    .parse()
                    .map_err(|_| format!("fake-node: --created {t:?} is not Unix seconds"))?,
                Err(_) => 0,
            };
            node.registry.insert(
                image.clone(),
                node::Image {
                    id: node::checksum_of(&image),
                    size: bytes(&value(&rest, "--size")?)?,
                    created,
                    pinned: flag("--pinned"),
                    in_use: flag("--in-use"),
                    ..Default::default()
                },
            );
            node.local.insert(image);
            root.save(&node)
        }
        "unit-failed" => {
            let _lock = root.lock()?;
            let mut node = root.load()?;
            for unit in &rest {
                node.active.remove(unit);
                node.failed.insert(unit.clone());
            }
            root.save(&node)
        }
        "hold" => {
            let _lock = root.lock()?;
            let mut node = root.load()?;
            node.hold_at = if rest.iter().any(|a| a == "--clear") {
                None
            } else {
                let n = value(&rest, "--at")?;
                Some(
                    n.parse()
                        .map_err(|_| format!("fake-node: --at {n:?} is not a count"))?,
                )
            };
            root.save(&node)
        }
        "fail" => {
            let _lock = root.lock()?;
            let mut node = root.load()?;
            if rest.iter().any(|a| a == "--clear") {
                node.failures.clear();
            } else if rest.is_empty() {
                return Err("fake-node: fail needs the words an invocation starts with".into());
            } else {
                node.failures.push(rest);
            }
            root.save(&node)
        }
        other => Err(format!("fake-node: unknown command {other:?}")),
    }
}

/// Boots the default deployment: the node comes back with its `/var` and `/etc`, the units
/// its `/etc` enables running, and no reboot requested.
fn reboot(root: &Root, node: &mut Node) -> Result<(), String> {
    if node.deployments.is_empty() {
        return Err("fake-node: no deployment to boot".into());
    }
    for (i, d) in node.deployments.iter_mut().enumerate() {
        d.booted = i == 0;
    }
    root.point_to_booted(node)?;
    root.new_boot_id()?;
    node.reboot_requested = false;
    node.mounts.clear();
    node.failed.clear();
    node.active = [STORAGE_UNIT.to_string()].into();
    let wants = root.path("/etc/systemd/system/multi-user.target.wants");
    if let Ok(entries) = std::fs::read_dir(&wants) {
        for e in entries.flatten() {
            node.active
                .insert(e.file_name().to_string_lossy().to_string());
        }
    }
    if node.active.contains(node::POST_PIVOT_UNIT) {
        post_pivot(root, node, &wants);
    }
    Ok(())
}

/// The seed's `lca-cli post-pivot`: it waits for its cluster configuration; given one, it
/// reconfigures the node, disables itself and removes its input (`ibu-host.md` section 2).
fn post_pivot(root: &Root, node: &mut Node, wants: &Path) {
    let given = std::fs::read_to_string(root.path(node::CLUSTER_CONFIGURATION))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|c| {
            ["cluster_id", "pull_secret", "hostname", "ssh_key"]
                .iter()
                .all(|k| c[k].as_str().is_some_and(|v| !v.is_empty()))
                && c["KubeconfigCryptoRetention"]["KubeAPICrypto"]["ServingCrypto"]
                    ["localhost_signer_private_key"]
                    .as_str()
                    .is_some_and(|v| !v.is_empty())
        });
    if !given {
        // Still waiting for /opt/openshift/cluster-configuration.
        return;
    }
    if !root
        .path("/var/opt/openshift/cluster-configuration/manifests")
        .is_dir()
    {
        // `failed apply manifests: failed to read dir for extra manifests in ...`
        node.active.remove(node::POST_PIVOT_UNIT);
        node.failed.insert(node::POST_PIVOT_UNIT.to_string());
        return;
    }
    node.active.remove(node::POST_PIVOT_UNIT);
    let _ = std::fs::remove_file(wants.join(node::POST_PIVOT_UNIT));
    let _ = std::fs::remove_dir_all(root.path("/var/opt/openshift"));
    let _ = std::fs::remove_dir_all(root.path("/var/seed_data"));
}
