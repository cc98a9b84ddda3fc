//! The node tools as the agent calls them, answering in the tools' own formats: JSON where
//! the real tool has it (`rpm-ostree status --json`, `podman ... --format json`, `skopeo
//! inspect`, `crictl -o json`), their text and exit codes otherwise.

use std::fs;

use serde_json::{Value, json};

use crate::node::{BLOCK, Deployment, Node, Root, STORAGE_UNIT, checksum_of};

/// What an invocation printed and its exit code.
pub struct Out {
    pub stdout: String,
    pub stderr: String,
    pub code: i32,
}

impl Out {
    fn ok(stdout: impl Into<String>) -> Out {
        Out {
            stdout: stdout.into(),
            stderr: String::new(),
            code: 0,
        }
    }

    fn err(code: i32, stderr: impl Into<String>) -> Out {
        let mut stderr = stderr.into();
        if !stderr.ends_with('\n') {
            stderr.push('\n');
        }
        Out {
            stdout: String::new(),
            stderr,
            code,
        }
    }

    fn json(v: &Value) -> Out {
        Out::ok(format!(
            "{}\n",
            serde_json::to_string_pretty(v).unwrap_or_default()
        ))
    }
}

/// Runs one tool invocation (`argv[0]` is the tool's name) on the node.
pub fn run(root: &Root, node: &mut Node, argv: &[String]) -> Out {
    if let Some(rule) = node
        .failures
        .iter()
        .find(|words| !words.is_empty() && argv.starts_with(words))
    {
        return Out::err(
            1,
            format!("fake-node: injected failure of `{}`", rule.join(" ")),
        );
    }
    let args: Vec<&str> = argv[1..].iter().map(String::as_str).collect();
    match argv[0].as_str() {
        "ostree" => ostree(root, node, &args),
        "rpm-ostree" => rpm_ostree(node, &args),
        "podman" => podman(root, node, &args),
        "skopeo" => skopeo(root, node, &args),
        "systemctl" => systemctl(root, node, &args),
        "systemd-run" => systemd_run(root, node, &args),
        "mount" => mount(&args),
        "tar" => tar(root, &args),
        "chcon" => chcon(root, &args),
        "unshare" => unshare(root, node, &args),
        "crictl" => crictl(node, &args),
        "stat" => stat(node, &args),
        "nsenter" => match args.iter().position(|a| *a == "--") {
            Some(i) if i + 1 < args.len() => {
                let inner: Vec<String> = args[i + 1..].iter().map(|s| s.to_string()).collect();
                run(root, node, &inner)
            }
            _ => Out::err(1, "nsenter: no command specified"),
        },
        other => Out::err(
            127,
            format!("fake-node: {other}: not a tool of the fake node"),
        ),
    }
}

fn index_arg(arg: Option<&&str>, node: &Node) -> Result<usize, Out> {
    let n: usize = arg
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| Out::err(1, "error: INDEX must be specified"))?;
    if n >= node.deployments.len() {
        return Err(Out::err(
            1,
            format!(
                "error: Out of range deployment index {n}, expected < {}",
                node.deployments.len()
            ),
        ));
    }
    Ok(n)
}

fn ostree(root: &Root, node: &mut Node, args: &[&str]) -> Out {
    match args {
        ["admin", "--help"] => Out::ok(
            "Usage:\n  ostree admin [OPTION...] --print-current-dir|COMMAND\n\n\
             Builtin \"admin\" Commands:\n  cleanup               Delete untagged deployments and repository objects\n  \
             config-diff           Diff current /etc configuration versus default\n  \
             deploy                Checkout revision REFSPEC as the new default deployment\n  \
             finalize-staged       Internal command to run at shutdown time\n  \
             init-fs               Initialize a root filesystem\n  \
             instutil              Deprecated commands intended for installer programs\n  \
             os-init               Initialize empty state for given operating system\n  \
             pin                   Change the \"pinning\" state of a deployment\n  \
             post-copy             Finalize a bit-by-bit copy of a filesystem\n  \
             set-default           Set a deployment as the default for the next boot\n  \
             set-origin            Set Origin and create a new origin file\n  \
             status                List deployments\n  \
             switch                Construct new tree from REFSPEC and deploy it\n  \
             undeploy              Delete deployment INDEX\n  \
             unlock                Make the current deployment mutable (as a hotfix or development)\n  \
             upgrade               Construct new tree from current origin and deploy it, if it changed\n  \
             kargs                 Change kernel arguments\n",
        ),
        ["admin", "status"] => {
            let mut out = String::new();
            for d in &node.deployments {
                let mark = if d.booted { "*" } else { " " };
                out.push_str(&format!("{mark} {} {}\n", d.osname, d.name()));
                out.push_str(&format!("    Version: {}\n", d.version));
            }
            Out::ok(out)
        }
        ["admin", "os-init", stateroot] => {
            let var = root.path(&format!("/ostree/deploy/{stateroot}/var"));
            match fs::create_dir_all(var.join("tmp")) {
                Ok(()) => Out::ok(format!(
                    "ostree/deploy/{stateroot} initialized as OSTree root\n"
                )),
                Err(e) => Out::err(1, format!("error: mkdirat: {e}")),
            }
        }
        ["admin", "deploy", rest @ ..] => deploy(root, node, rest),
        ["admin", "set-default", n] => match index_arg(Some(n), node) {
            Ok(0) => Out::ok(""),
            Ok(i) => {
                let d = node.deployments.remove(i);
                node.deployments.insert(0, d);
                Out::ok("")
            }
            Err(out) => out,
        },
        ["admin", "undeploy", n] => match index_arg(Some(n), node) {
            Ok(i) if node.deployments[i].booted => Out::err(
                1,
                format!("error: Cannot undeploy currently booted deployment {i}"),
            ),
            Ok(i) => {
                let d = node.deployments.remove(i);
                let _ = fs::remove_dir_all(root.path(&d.dir()));
                let _ = fs::remove_file(root.path(&format!("{}.origin", d.dir())));
                Out::ok(format!("Deleted deployment {}\n", d.name()))
            }
            Err(out) => out,
        },
        ["pull-local", .., repo] if !repo.starts_with('-') => {
            let objects = root.path(repo).join("objects");
            let entries = match fs::read_dir(&objects) {
                Ok(e) => e,
                Err(e) => {
                    return Out::err(1, format!("error: opening repo: opendir({repo}): {e}"));
                }
            };
            let mut count = 0;
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                if let Some(checksum) = name.strip_suffix(".commit") {
                    let version = fs::read_to_string(e.path()).unwrap_or_default();
                    node.commits
                        .insert(checksum.to_string(), version.trim().to_string());
                    count += 1;
                }
            }
            Out::ok(format!(
                "{count} metadata, 0 content objects imported; 0 bytes content written\n"
            ))
        }
        _ => Out::err(1, format!("error: Unknown command '{}'", args.join(" "))),
    }
}

/// `ostree admin deploy --os S [--no-prune] [--karg-append K]... [--karg K]... REV
/// [--not-as-default]`.
fn deploy(root: &Root, node: &mut Node, args: &[&str]) -> Out {
    let (mut os, mut rev, mut not_default, mut kargs) = (None, None, false, Vec::new());
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match *a {
            "--os" => os = it.next().map(|s| s.to_string()),
            "--karg-append" | "--karg" => kargs.extend(it.next().map(|s| s.to_string())),
            "--not-as-default" => not_default = true,
            "--no-prune" | "--retain" => {}
            a if a.starts_with("--os=") => os = Some(a["--os=".len()..].to_string()),
            a if a.starts_with("--karg-append=") || a.starts_with("--karg=") => kargs.push(
                a.split_once('=')
                    .map(|x| x.1)
                    .unwrap_or_default()
                    .to_string(),
            ),
            a if a.starts_with('-') => {
                return Out::err(1, format!("error: Unknown option {a}"));
            }
            a => rev = Some(a.to_string()),
        }
    }
    let Some(rev) = rev else {
        return Out::err(1, "error: REF/REV must be specified");
    };
    let os = os.unwrap_or_else(|| "rhcos".into());
    if !root.path(&format!("/ostree/deploy/{os}")).is_dir() {
        return Out::err(1, format!("error: No such stateroot: {os}"));
    }
    let Some(version) = node.commits.get(&rev).cloned() else {
        return Out::err(1, format!("error: Refspec '{rev}' not found"));
    };
    let serial = node
        .deployments
        .iter()
        .filter(|d| d.osname == os && d.checksum == rev)
        .count() as u32;
    let d = Deployment {
        osname: os,
        checksum: rev,
        serial,
        version,
        booted: false,
        kargs,
    };
    if let Err(e) = fs::create_dir_all(root.path(&d.dir()).join("etc/systemd/system")) {
        return Out::err(1, format!("error: Writing deployment: {e}"));
    }
    let _ = fs::create_dir_all(root.path(&d.dir()).join("usr"));
    let at = if not_default && !node.deployments.is_empty() {
        1
    } else {
        0
    };
    node.deployments.insert(at, d);
    Out::ok("")
}

fn rpm_ostree(node: &Node, args: &[&str]) -> Out {
    match args.first() {
        Some(&"status") if args.contains(&"--json") => {
            let deployments: Vec<Value> = node
                .deployments
                .iter()
                .map(|d| {
                    json!({
                        "id": format!("{}-{}", d.osname, d.name()),
                        "osname": d.osname,
                        "serial": d.serial,
                        "checksum": d.checksum,
                        "version": d.version,
                        "origin": d.checksum,
                        "booted": d.booted,
                        "staged": false,
                        "pinned": false,
                        "unlocked": "none",
                        "requested-packages": [],
                        "requested-local-packages": [],
                        "base-removals": [],
                        "requested-base-removals": [],
                        "kernel-arguments": d.kargs,
                    })
                })
                .collect();
            Out::json(&json!({
                "deployments": deployments,
                "transaction": null,
                "cached-update": null,
                "update-driver": null,
            }))
        }
        Some(&"status") => {
            let mut out = String::from("State: idle\nDeployments:\n");
            for d in &node.deployments {
                let mark = if d.booted { "●" } else { " " };
                out.push_str(&format!(
                    "{mark} {}\n                  Version: {}\n",
                    d.checksum, d.version
                ));
            }
            Out::ok(out)
        }
        Some(&"cleanup") => Out::ok(""),
        _ => Out::err(1, format!("error: Unknown command '{}'", args.join(" "))),
    }
}

/// `podman rmi REF...`: every local image a ref names (by name or ID) goes, once; refs
/// naming nothing are reported and the rest still removed, as podman does.
fn rmi(node: &mut Node, refs: &[&str]) -> Out {
    let mut out = String::new();
    let mut errors = Vec::new();
    let mut code = 0;
    let mut gone = Vec::new();
    for r in refs {
        let named: Vec<String> = node
            .local
            .iter()
            .filter(|name| {
                name.as_str() == *r || node.registry.get(*name).is_some_and(|i| i.id == *r)
            })
            .cloned()
            .collect();
        if named.is_empty() {
            if !gone
                .iter()
                .any(|(name, id): &(String, String)| name == r || id == r)
            {
                errors.push(format!("Error: {r}: image not known"));
                code = code.max(1);
            }
            continue;
        }
        for name in named {
            let img = node.registry.get(&name).cloned().unwrap_or_default();
            if node.mounts.contains_key(&name) || img.in_use {
                errors.push(format!(
                    "Error: image used by {}: image is in use by a container",
                    checksum_of(&format!("{name}-container"))
                ));
                code = 2;
                continue;
            }
            node.local.remove(&name);
            out.push_str(&format!("Untagged: {name}\nDeleted: {}\n", img.id));
            gone.push((name, img.id));
        }
    }
    Out {
        stdout: out,
        stderr: errors.join("\n") + if errors.is_empty() { "" } else { "\n" },
        code,
    }
}

/// The image name a podman argument names (`localhost/x` and `x` are taken alike).
fn known<'a>(names: impl Iterator<Item = &'a String>, name: &str) -> Option<String> {
    names.into_iter().find(|n| *n == name).cloned()
}

fn podman(root: &Root, node: &mut Node, args: &[&str]) -> Out {
    // Global options the agent may pass anywhere.
    let mut rest = Vec::new();
    let mut it = args.iter();
    let mut format_json = false;
    let mut authfile = None;
    while let Some(a) = it.next() {
        match *a {
            "--log-level" => {
                it.next();
            }
            "--format" => format_json = it.next() == Some(&"json"),
            "--authfile" => authfile = it.next().copied(),
            a if a.starts_with("--log-level=") => {}
            a => rest.push(a),
        }
    }
    if let Some(auth) = authfile
        && !root.path(auth).is_file()
    {
        return Out::err(
            125,
            format!(
                "Error: credential file is not accessible: stat {auth}: no such file or directory"
            ),
        );
    }
    match rest.as_slice() {
        ["version"] => Out::ok(
            "Client:       Podman Engine\nVersion:      4.9.4-rhel\nAPI Version:  4.9.4-rhel\nGo Version:   go1.21.11 (Red Hat 1.21.11-1.el9_4)\nOS/Arch:      linux/amd64\n",
        ),
        ["pull", image] => match node.registry.get(*image) {
            Some(img) if !img.readable_with(root, image, authfile) => Out::err(
                125,
                format!(
                    "Trying to pull {image}...\nError: initializing source docker://{image}: {}",
                    unauthorized(image)
                ),
            ),
            Some(img)
                if !node.local.contains(*image) && node.disk_used() + img.size > node.disk.size =>
            {
                Out::err(
                    125,
                    format!(
                        "Trying to pull {image}...\nGetting image source signatures\nCopying blob sha256:{id}\nError: copying system image from manifest list: writing blob: adding layer with blob \"sha256:{id}\": processing tar file(write /usr/share/{id}: no space left on device): exit status 1",
                        id = &img.id[..12]
                    ),
                )
            }
            Some(img) => {
                node.local.insert(image.to_string());
                Out {
                    stdout: format!("{}\n", img.id),
                    stderr: format!(
                        "Trying to pull {image}...\nGetting image source signatures\nCopying blob sha256:{}\nWriting manifest to image destination\n",
                        &img.id[..12]
                    ),
                    code: 0,
                }
            }
            None => Out::err(
                125,
                format!(
                    "Trying to pull {image}...\nError: initializing source docker://{image}: reading manifest {}: manifest unknown",
                    image.rsplit(':').next().unwrap_or("latest")
                ),
            ),
        },
        ["image", "exists", image] => Out {
            stdout: String::new(),
            stderr: String::new(),
            code: if node.local.contains(*image) { 0 } else { 1 },
        },
        ["image", "mount"] if format_json => {
            let list: Vec<Value> = node
                .mounts
                .iter()
                .map(|(name, at)| {
                    let id = node
                        .registry
                        .get(name)
                        .map(|i| i.id.clone())
                        .unwrap_or_default();
                    json!({"id": id, "Names": [name], "Repositories": [name], "mountpoint": at})
                })
                .collect();
            Out::json(&Value::Array(list))
        }
        ["image", "mount", image] => {
            let Some(name) = known(node.local.iter(), image) else {
                return Out::err(125, format!("Error: {image}: image not known"));
            };
            let img = node.registry.get(&name).cloned().unwrap_or_default();
            let at = format!("/var/lib/containers/storage/overlay/{}/merged", img.id);
            if let std::collections::btree_map::Entry::Vacant(e) = node.mounts.entry(name) {
                let dest = root.path(&at);
                let copied = fs::create_dir_all(&dest).and_then(|()| match &img.files {
                    Some(files) => copy_dir(files, &dest),
                    None => Ok(()),
                });
                if let Err(err) = copied {
                    return Out::err(125, format!("Error: mounting {image}: {err}"));
                }
                e.insert(at.clone());
            }
            Out::ok(format!("{at}\n"))
        }
        ["image", "umount", image] => match node.mounts.remove(*image) {
            Some(at) => {
                let _ = fs::remove_dir_all(root.path(&at));
                let id = node
                    .registry
                    .get(*image)
                    .map(|i| i.id.clone())
                    .unwrap_or_default();
                Out::ok(format!("{id}\n"))
            }
            None if node.local.contains(*image) => Out::ok(""),
            None => Out::err(125, format!("Error: {image}: image not known")),
        },
        ["rmi", refs @ ..] if !refs.is_empty() => rmi(node, refs),
        ["images"] if format_json => {
            let list: Vec<Value> = node
                .local
                .iter()
                .filter_map(|name| node.registry.get(name).map(|i| (name, i)))
                .map(|(name, i)| {
                    let (tags, digests): (Vec<&String>, Vec<&String>) = if name.contains('@') {
                        (vec![], vec![name])
                    } else {
                        (vec![name], vec![])
                    };
                    json!({"Id": i.id, "ParentId": "", "RepoTags": tags, "RepoDigests": digests,
                        "Size": i.size, "SharedSize": 0, "VirtualSize": i.size,
                        "Labels": i.labels, "Containers": 0, "Names": [name],
                        "Digest": format!("sha256:{}", i.id), "History": [],
                        "Created": i.created, "CreatedAt": "", "Dangling": false})
                })
                .collect();
            Out::json(&Value::Array(list))
        }
        ["ps", "-a"] if format_json => Out::json(&json!([])),
        _ => Out::err(
            125,
            format!("Error: unrecognized command `podman {}`", rest.join(" ")),
        ),
    }
}

/// The registry's answer to a read without the right credentials.
fn unauthorized(image: &str) -> String {
    let (repo, tag) = image.rsplit_once(':').unwrap_or((image, "latest"));
    format!(
        "reading manifest {tag} in {repo}: unauthorized: access to the requested resource is not authorized"
    )
}

fn skopeo(root: &Root, node: &Node, args: &[&str]) -> Out {
    let ["inspect", rest @ ..] = args else {
        return Out::err(
            1,
            format!(
                "Error: unknown command \"{}\" for \"skopeo\"",
                args.join(" ")
            ),
        );
    };
    let mut it = rest.iter();
    let mut target = None;
    let mut authfile = None;
    while let Some(a) = it.next() {
        match *a {
            "--authfile" => authfile = it.next().copied(),
            "--retry-times" | "--format" => {
                it.next();
            }
            a if a.starts_with("docker://") => target = Some(&a["docker://".len()..]),
            a => return Out::err(1, format!("Error: unknown flag: {a}")),
        }
    }
    let Some(image) = target else {
        return Out::err(1, "Error: Exactly one argument expected");
    };
    if let Some(auth) = authfile
        && !root.path(auth).is_file()
    {
        return Out::err(
            1,
            format!(
                "time=\"2026-12-04T00:00:00Z\" level=fatal msg=\"credential file is not accessible: stat {auth}: no such file or directory\""
            ),
        );
    }
    match node.registry.get(image) {
        Some(img) if !img.readable_with(root, image, authfile) => Out::err(
            1,
            format!(
                "time=\"2026-12-04T00:00:00Z\" level=fatal msg=\"Error parsing image name \\\"docker://{image}\\\": {}\"",
                unauthorized(image)
            ),
        ),
        Some(img) => Out::json(&json!({
            "Name": image.split(['@', ':']).next().unwrap_or(image),
            "Digest": format!("sha256:{}", img.id),
            "RepoTags": [],
            "Created": "2026-11-30T10:00:00Z",
            "DockerVersion": "",
            "Labels": img.labels,
            "Architecture": "amd64",
            "Os": "linux",
            "Layers": [format!("sha256:{}", img.id)],
            "LayersData": null,
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        })),
        None => Out::err(
            1,
            format!(
                "time=\"2026-12-04T00:00:00Z\" level=fatal msg=\"Error parsing image name \\\"docker://{image}\\\": reading manifest in {image}: manifest unknown\""
            ),
        ),
    }
}

fn unit_file(root: &Root, unit: &str) -> std::path::PathBuf {
    root.path(&format!("/etc/systemd/system/{unit}"))
}

fn wants_link(root: &Root, unit: &str) -> std::path::PathBuf {
    root.path(&format!(
        "/etc/systemd/system/multi-user.target.wants/{unit}"
    ))
}

fn systemctl(root: &Root, node: &mut Node, args: &[&str]) -> Out {
    let exists = |unit: &str| unit == STORAGE_UNIT || unit_file(root, unit).is_file();
    let args: Vec<&str> = args
        .iter()
        .copied()
        .filter(|a| !a.starts_with("--message="))
        .collect();
    match args.as_slice() {
        ["is-active", unit] => {
            if node.active.contains(*unit) {
                Out::ok("active\n")
            } else if node.failed.contains(*unit) {
                Out {
                    stdout: "failed\n".into(),
                    stderr: String::new(),
                    code: 3,
                }
            } else {
                Out {
                    stdout: "inactive\n".into(),
                    stderr: String::new(),
                    code: 3,
                }
            }
        }
        ["is-failed", unit] => {
            if node.failed.contains(*unit) {
                Out::ok("failed\n")
            } else {
                let state = if node.active.contains(*unit) {
                    "active"
                } else {
                    "inactive"
                };
                Out {
                    stdout: format!("{state}\n"),
                    stderr: String::new(),
                    code: 1,
                }
            }
        }
        ["is-enabled", unit] => {
            if !exists(unit) {
                Out::err(
                    1,
                    format!("Failed to get unit file state for {unit}: No such file or directory"),
                )
            } else if *unit == STORAGE_UNIT {
                Out::ok("generated\n")
            } else if wants_link(root, unit).is_symlink() || wants_link(root, unit).exists() {
                Out::ok("enabled\n")
            } else {
                Out {
                    stdout: "disabled\n".into(),
                    stderr: String::new(),
                    code: 1,
                }
            }
        }
        ["cat", unit] if *unit == STORAGE_UNIT => Out::ok(
            "# /run/systemd/generator/var-lib-containers.mount\n[Unit]\nBefore=local-fs.target\n\n[Mount]\nWhere=/var/lib/containers\nWhat=/dev/disk/by-partlabel/varlibcontainers\nType=xfs\n",
        ),
        ["cat", unit] => match fs::read_to_string(unit_file(root, unit)) {
            Ok(text) => Out::ok(format!("# /etc/systemd/system/{unit}\n{text}")),
            Err(_) => Out::err(1, format!("No files found for {unit}.")),
        },
        ["stop", unit] => {
            node.active.remove(*unit);
            Out::ok("")
        }
        ["disable", unit] => {
            let link = wants_link(root, unit);
            if link.is_symlink() || link.exists() {
                let _ = fs::remove_file(&link);
                Out {
                    stdout: String::new(),
                    stderr: format!(
                        "Removed \"/etc/systemd/system/multi-user.target.wants/{unit}\".\n"
                    ),
                    code: 0,
                }
            } else if exists(unit) {
                Out::ok("")
            } else {
                Out::err(
                    1,
                    format!("Failed to disable unit: Unit file {unit} does not exist."),
                )
            }
        }
        ["daemon-reload"] => Out::ok(""),
        ["reboot"] => {
            node.reboot_requested = true;
            Out::ok("")
        }
        _ => Out::err(1, format!("Unknown command verb '{}'.", args.join(" "))),
    }
}

fn systemd_run(root: &Root, node: &mut Node, args: &[&str]) -> Out {
    let mut it = args.iter().enumerate();
    let mut unit = "run-u1".to_string();
    let mut start = args.len();
    while let Some((i, a)) = it.next() {
        match *a {
            "--unit" => unit = it.next().map(|(_, u)| u.to_string()).unwrap_or_default(),
            "--description" => {
                it.next();
            }
            a if a.starts_with("--") => {}
            _ => {
                start = i;
                break;
            }
        }
    }
    if start >= args.len() {
        return Out::err(1, "Command line to execute required.");
    }
    let inner: Vec<String> = args[start..].iter().map(|s| s.to_string()).collect();
    let out = run(root, node, &inner);
    if out.code != 0 {
        return out;
    }
    Out {
        stdout: String::new(),
        stderr: format!("Running as unit: {unit}.service\n"),
        code: 0,
    }
}

fn mount(args: &[&str]) -> Out {
    match args {
        ["/sysroot", "-o", "remount,rw"] | ["-o", "remount,rw", "/sysroot"] => Out::ok(""),
        _ => Out::err(
            32,
            format!("mount: {}: not supported by the fake node", args.join(" ")),
        ),
    }
}

fn tar(root: &Root, args: &[&str]) -> Out {
    let mut it = args.iter();
    let (mut src, mut dest, mut extract) = (None, None, false);
    while let Some(a) = it.next() {
        match *a {
            "-C" => dest = it.next().copied(),
            "--selinux" | "--xattrs" | "--acls" => {}
            a if a.starts_with("--xattrs-include=") => {}
            a if !a.starts_with("--") && a.trim_start_matches('-').starts_with('x') => {
                extract = true;
                if a.ends_with('f') {
                    src = it.next().copied();
                }
            }
            a => {
                return Out::err(
                    2,
                    format!(
                        "tar: unrecognized option '{a}'\nTry 'tar --help' or 'tar --usage' for more information."
                    ),
                );
            }
        }
    }
    let (true, Some(src), Some(dest)) = (extract, src, dest) else {
        return Out::err(
            2,
            "tar: You must specify one of the '-Acdtrux', '--delete' or '--test-label' options",
        );
    };
    let file = match fs::File::open(root.path(src)) {
        Ok(f) => f,
        Err(_) => {
            return Out::err(
                2,
                format!(
                    "tar: {src}: Cannot open: No such file or directory\ntar: Error is not recoverable: exiting now"
                ),
            );
        }
    };
    let dest_dir = root.path(dest);
    if !dest_dir.is_dir() {
        return Out::err(
            2,
            format!(
                "tar: {dest}: Cannot open: No such file or directory\ntar: Error is not recoverable: exiting now"
            ),
        );
    }
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
    match archive.unpack(&dest_dir) {
        Ok(()) => Out::ok(""),
        Err(e) => Out::err(
            2,
            format!("tar: {src}: {e}\ntar: Exiting with failure status due to previous errors"),
        ),
    }
}

fn chcon(root: &Root, args: &[&str]) -> Out {
    match args {
        ["-t", _type, path] if root.path(path).exists() => Out::ok(""),
        ["-t", _type, path] => Out::err(
            1,
            format!("chcon: cannot access '{path}': No such file or directory"),
        ),
        _ => Out::err(1, "chcon: missing operand"),
    }
}

/// `unshare -m /bin/sh -c "mount -o remount,rw /sysroot && rm -rf DIR"`: the script's
/// commands, each one a fake tool or `rm -rf`.
fn unshare(root: &Root, node: &mut Node, args: &[&str]) -> Out {
    let ["-m", "/bin/sh", "-c", script] = args else {
        return Out::err(
            1,
            format!(
                "unshare: not supported by the fake node: {}",
                args.join(" ")
            ),
        );
    };
    for part in script.split("&&") {
        let words: Vec<String> = part
            .split_whitespace()
            .map(|w| w.trim_matches('"').to_string())
            .collect();
        let out = match words
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .as_slice()
        {
            ["rm", "-rf", path] => match fs::remove_dir_all(root.path(path)) {
                Ok(()) => Out::ok(""),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Out::ok(""),
                Err(e) => Out::err(1, format!("rm: cannot remove '{path}': {e}")),
            },
            [] => Out::ok(""),
            _ => run(root, node, &words),
        };
        if out.code != 0 {
            return out;
        }
    }
    Out::ok("")
}

/// `stat --file-system --format=FORMAT PATH` (also `-f`, `-c FORMAT`): every path is on
/// container storage's partition, the only one the node models.
fn stat(node: &Node, args: &[&str]) -> Out {
    let mut file_system = false;
    let mut format = None;
    let mut paths = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match *a {
            "-f" | "--file-system" => file_system = true,
            "-c" | "--format" => format = it.next().copied(),
            a if a.starts_with("--format=") => format = Some(&a["--format=".len()..]),
            a if a.starts_with('-') => {
                return Out::err(
                    1,
                    format!(
                        "stat: unrecognized option '{a}'\nTry 'stat --help' for more information."
                    ),
                );
            }
            a => paths.push(a),
        }
    }
    if !file_system || paths.is_empty() {
        return Out::err(
            1,
            "fake-node: stat: only `stat --file-system --format=... PATH`",
        );
    }
    let blocks = node.disk.size / BLOCK;
    let available = node.disk.size.saturating_sub(node.disk_used()) / BLOCK;
    let format = format.unwrap_or("%b %a");
    let line = format
        .replace("%b", &blocks.to_string())
        .replace("%a", &available.to_string())
        .replace("%f", &available.to_string())
        .replace("%S", &BLOCK.to_string())
        .replace("%s", &BLOCK.to_string());
    Out::ok(
        paths
            .iter()
            .map(|_| format!("{line}\n"))
            .collect::<String>(),
    )
}

fn crictl(node: &Node, args: &[&str]) -> Out {
    let local = || {
        node.local
            .iter()
            .filter_map(|name| node.registry.get(name).map(|i| (name, i)))
    };
    match args {
        ["ps", "-a", "-o", "json"] => {
            let containers: Vec<Value> = local()
                .filter(|(_, i)| i.in_use)
                .map(|(name, i)| {
                    json!({"id": checksum_of(&format!("{name}-container")),
                        "podSandboxId": checksum_of(&format!("{name}-pod")),
                        "metadata": {"name": "workload", "attempt": 0},
                        "image": {"image": i.id, "annotations": {}}, "imageRef": i.id,
                        "state": "CONTAINER_RUNNING", "createdAt": "1764460800000000000",
                        "labels": {}, "annotations": {}})
                })
                .collect();
            Out::json(&json!({ "containers": containers }))
        }
        ["images", "-o", "json"] => {
            let images: Vec<Value> = local()
                .map(|(name, i)| {
                    json!({"id": i.id, "repoTags": [name], "repoDigests": [],
                        "size": i.size.to_string(), "uid": null, "username": "",
                        "spec": null, "pinned": i.pinned})
                })
                .collect();
            Out::json(&json!({"images": images}))
        }
        _ => Out::err(
            1,
            format!("crictl: not supported by the fake node: {}", args.join(" ")),
        ),
    }
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) -> std::io::Result<()> {
    fs::create_dir_all(to)?;
    for e in fs::read_dir(from)? {
        let e = e?;
        let target = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &target)?;
        } else {
            fs::copy(e.path(), target)?;
        }
    }
    Ok(())
}
