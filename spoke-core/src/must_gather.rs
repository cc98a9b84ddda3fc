//! The troubleshooting bundle (`ibu-spoke.md` section 8): the IBU, its history, the host's
//! view of the stateroots, the OADP restores and the agent's recent events, as a gzip'd tar.

use flate2::Compression;
use flate2::write::GzEncoder;

use crate::host::Host;
use crate::runner::Agent;

/// The files an agent that runs the upgrade itself gathers.
pub async fn agent_files<H: Host>(agent: &Agent<H>) -> std::io::Result<Vec<(String, Vec<u8>)>> {
    let state = agent.snapshot().await;
    let history = state
        .ibu
        .status
        .as_ref()
        .map(|s| s.history.clone())
        .unwrap_or_default();
    let files: Vec<(&str, Vec<u8>)> = vec![
        (
            "ibu.yaml",
            serde_yaml::to_string(&state.ibu)
                .map_err(std::io::Error::other)?
                .into_bytes(),
        ),
        ("ibu.json", serde_json::to_vec_pretty(&state.ibu)?),
        ("history.json", serde_json::to_vec_pretty(&history)?),
        ("agent-state.json", serde_json::to_vec_pretty(&state.run)?),
        (
            "ostree-admin-status.txt",
            agent.host.describe().await.into_bytes(),
        ),
        (
            "restores.json",
            serde_json::to_vec_pretty(&agent.host.restores().await)?,
        ),
        ("events.log", agent.events().join("\n").into_bytes()),
    ];
    Ok(files.into_iter().map(|(n, b)| (n.to_string(), b)).collect())
}

/// The bundle: the files under `must-gather-<cluster>/`, as a gzip'd tar.
pub fn pack(cluster: &str, files: Vec<(String, Vec<u8>)>) -> std::io::Result<Vec<u8>> {
    let mut tar = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::default()));
    let dir = format!("must-gather-{cluster}");
    for (name, bytes) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(chrono::Utc::now().timestamp().max(0) as u64);
        header.set_cksum();
        tar.append_data(&mut header, format!("{dir}/{name}"), bytes.as_slice())?;
    }
    tar.into_inner()?.finish()
}
