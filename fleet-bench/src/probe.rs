//! What the bench reads off the processes it runs: the hub's `/metrics`, and `/proc` for
//! memory and CPU time.

use std::time::{Duration, Instant};

use crate::machine::USER_HZ;
use crate::watch::Watch;

/// Every request of the bench has a deadline: a hub that stops answering ends the run.
pub const HTTP_DEADLINE: Duration = Duration::from_secs(30);

/// A GET with [`HTTP_DEADLINE`].
pub async fn get(url: &str) -> reqwest::Result<reqwest::Response> {
    reqwest::Client::builder()
        .timeout(HTTP_DEADLINE)
        .build()?
        .get(url)
        .send()
        .await
}

/// Waits until `url` answers a success, or a watched child fails, or `limit` passes.
pub async fn wait_http(watch: &Watch, url: &str, limit: Duration) -> Result<(), String> {
    let t = Instant::now();
    while t.elapsed() < limit {
        watch.check()?;
        if let Ok(r) = get(url).await
            && r.status().is_success()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!("{url} did not answer within {limit:?}"))
}

pub async fn hub_counter(hub_url: &str, name: &str) -> f64 {
    let text = match get(&format!("{hub_url}/metrics")).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => return 0.0,
    };
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub fn gauge(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(&format!("{name} ")))?
        .rsplit(' ')
        .next()?
        .parse()
        .ok()
}

pub use fleet_e2e::prom::quantile;

fn proc_status(pid: i32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

pub fn rss_kib(pid: i32) -> u64 {
    proc_status(pid, "VmRSS:")
}

pub fn hwm_kib(pid: i32) -> u64 {
    proc_status(pid, "VmHWM:")
}

/// CPU time of every `postgres` process on this machine (0 when the server is elsewhere).
pub fn postgres_cpu_seconds() -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "postgres")
        })
        .map(cpu_seconds)
        .sum()
}

pub fn cpu_seconds(pid: i32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    (ticks(11) + ticks(12)) / USER_HZ
}
