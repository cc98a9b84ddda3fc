//! How node commands run: inside `chroot ROOT` (the agent in a privileged pod with the host's
//! `/` at `/host`, as the Lifecycle Agent runs), or straight from `PATH` (a systemd service on
//! the node, and tests on the fake node). Node files are read and written under ROOT either
//! way.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::Command;

/// How commands reach the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Exec {
    /// `chroot ROOT /usr/bin/env -- CMD ARGS`.
    Chroot,
    /// `CMD ARGS` from the agent's own `PATH`.
    Direct,
}

/// A node command that did not do what it should.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum NodeError {
    /// It ran and failed: its arguments, exit code and what it printed.
    #[error("`{}` exited with {code}: {}", argv.join(" "), output.trim())]
    Command {
        argv: Vec<String>,
        code: i32,
        output: String,
    },
    /// It could not be started at all.
    #[error("`{}` could not be run: {why}", argv.join(" "))]
    Spawn { argv: Vec<String>, why: String },
    /// Its output is not what the tool documents.
    #[error("`{}` answered what it does not document: {why}", argv.join(" "))]
    Parse { argv: Vec<String>, why: String },
    /// The node refuses what was asked (removing the booted stateroot, say).
    #[error("{0}")]
    Refused(String),
    /// A file of the node.
    #[error("{path}: {why}")]
    File { path: String, why: String },
}

/// What a command printed, and its exit code.
#[derive(Debug, Clone)]
pub struct Output {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs node commands and resolves node paths.
#[derive(Clone, Debug)]
pub struct Runner {
    root: PathBuf,
    exec: Exec,
}

impl Runner {
    pub fn new(root: PathBuf, exec: Exec) -> Runner {
        Runner { root, exec }
    }

    pub fn exec(&self) -> Exec {
        self.exec
    }

    /// A node path (`/var/lib/lca/ibu.json`) as the agent reaches it.
    pub fn path(&self, node_path: &str) -> PathBuf {
        self.root.join(node_path.trim_start_matches('/'))
    }

    /// Runs `argv` and answers its output whatever its exit code.
    pub async fn output(&self, argv: &[&str]) -> Result<Output, NodeError> {
        let owned = || argv.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let mut cmd = match self.exec {
            Exec::Direct => {
                let mut c = Command::new(argv[0]);
                c.args(&argv[1..]);
                c
            }
            Exec::Chroot => {
                let mut c = Command::new("chroot");
                c.arg(&self.root).args(["/usr/bin/env", "--"]).args(argv);
                c
            }
        };
        cmd.stdin(Stdio::null()).kill_on_drop(true);
        tracing::debug!(argv = ?argv, "node command");
        let out = cmd.output().await.map_err(|e| NodeError::Spawn {
            argv: owned(),
            why: e.to_string(),
        })?;
        Ok(Output {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// Runs `argv`, which must exit 0; answers its standard output.
    pub async fn run(&self, argv: &[&str]) -> Result<String, NodeError> {
        let out = self.output(argv).await?;
        if out.code != 0 {
            let output = if out.stderr.trim().is_empty() {
                out.stdout
            } else {
                out.stderr
            };
            return Err(NodeError::Command {
                argv: argv.iter().map(|s| s.to_string()).collect(),
                code: out.code,
                output,
            });
        }
        Ok(out.stdout)
    }

    /// Runs `argv` and parses its standard output as JSON of type `T`.
    pub async fn json<T: serde::de::DeserializeOwned>(
        &self,
        argv: &[&str],
    ) -> Result<T, NodeError> {
        let text = self.run(argv).await?;
        serde_json::from_str(&text).map_err(|e| NodeError::Parse {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            why: e.to_string(),
        })
    }

    pub async fn read(&self, node_path: &str) -> Result<Option<String>, NodeError> {
        match tokio::fs::read_to_string(self.path(node_path)).await {
            Ok(text) => Ok(Some(text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(file_error(node_path, e)),
        }
    }

    /// Writes a node file whole: a reader sees the old or the new contents, never a part.
    pub async fn write(&self, node_path: &str, contents: &[u8]) -> Result<(), NodeError> {
        let path = self.path(node_path);
        if let Some(dir) = path.parent() {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(|e| file_error(node_path, e))?;
        }
        let tmp = tmp_beside(&path);
        tokio::fs::write(&tmp, contents)
            .await
            .map_err(|e| file_error(node_path, e))?;
        tokio::fs::rename(&tmp, &path)
            .await
            .map_err(|e| file_error(node_path, e))
    }
}

impl Runner {
    /// Writes a file only root may read (0600, in a directory only root may enter, 0700 when
    /// created here), atomically: credentials.
    pub async fn write_private(&self, node_path: &str, contents: &[u8]) -> Result<(), NodeError> {
        use tokio::io::AsyncWriteExt;
        let path = self.path(node_path);
        let fail = |e| file_error(node_path, e);
        if let Some(dir) = path.parent()
            && !dir.is_dir()
        {
            tokio::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .await
                .map_err(fail)?;
        }
        let tmp = tmp_beside(&path);
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .await
            .map_err(fail)?;
        file.write_all(contents).await.map_err(fail)?;
        file.sync_all().await.map_err(fail)?;
        drop(file);
        tokio::fs::rename(&tmp, &path).await.map_err(fail)
    }
}

pub fn file_error(node_path: &str, e: std::io::Error) -> NodeError {
    NodeError::File {
        path: node_path.to_string(),
        why: e.to_string(),
    }
}

fn tmp_beside(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[tokio::test]
    async fn credentials_are_written_for_root_only_and_replaced_whole() {
        let root = tempfile::tempdir().unwrap();
        let runner = Runner::new(root.path().to_path_buf(), Exec::Direct);
        let file = "/var/lib/lca/workspace/seed-pull-secret";
        runner.write_private(file, b"first, longer").await.unwrap();
        runner.write_private(file, b"second").await.unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let path = runner.path(file);
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        // Nothing else is left beside it.
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["seed-pull-secret"]);
    }
}
