//! How the whole machine spent its CPU over a stretch of time: busy, idle, or stolen by the
//! hypervisor (a virtual machine's neighbours). `fleet-bench` reports it for the baseline
//! and for the rollout, because its ratio compares the two: on a shared host the share
//! stolen moves from one minute to the next, and either figure with it.

/// Clock ticks per second in `/proc` (`USER_HZ`: 100 on every architecture Linux runs on).
pub const USER_HZ: f64 = 100.0;

/// The machine's CPU time so far, in clock ticks, from the first line of `/proc/stat`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuTicks {
    busy: u64,
    idle: u64,
    steal: u64,
}

/// Shares of the machine's CPU time between two readings, in percent, and the busy time
/// itself in CPU seconds (all CPUs together).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CpuSplit {
    pub busy: f64,
    pub idle: f64,
    pub steal: f64,
    pub busy_seconds: f64,
}

impl CpuTicks {
    /// Reads `/proc/stat`; `None` where there is none (not Linux).
    pub fn now() -> Option<CpuTicks> {
        std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| CpuTicks::parse(&s))
    }

    /// The `cpu` line (all CPUs): user nice system idle iowait irq softirq steal, then guest
    /// times already counted in user and nice. Answers `None` if it is missing or short.
    pub fn parse(proc_stat: &str) -> Option<CpuTicks> {
        let line = proc_stat
            .lines()
            .find(|l| l.split_whitespace().next() == Some("cpu"))?;
        let f: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(|v| v.parse().ok())
            .collect::<Option<_>>()?;
        let [user, nice, system, idle, iowait, irq, softirq, steal, ..] = f[..] else {
            return None;
        };
        Some(CpuTicks {
            busy: user + nice + system + irq + softirq,
            idle: idle + iowait,
            steal,
        })
    }

    /// The split of the time between `earlier` and this reading (`None` if no time passed).
    pub fn since(&self, earlier: &CpuTicks) -> Option<CpuSplit> {
        let busy = self.busy.saturating_sub(earlier.busy) as f64;
        let idle = self.idle.saturating_sub(earlier.idle) as f64;
        let steal = self.steal.saturating_sub(earlier.steal) as f64;
        let total = busy + idle + steal;
        (total > 0.0).then(|| CpuSplit {
            busy: 100.0 * busy / total,
            idle: 100.0 * idle / total,
            steal: 100.0 * steal / total,
            busy_seconds: busy / USER_HZ,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = "cpu  229294 10 25079 242711 1415 0 3823 1661 0 0\n\
                          cpu0 114622 0 12603 122163 323 0 1797 896 0 0\n\
                          intr 1 2 3\n";
    const AFTER: &str = "cpu  229594 10 25179 242811 1415 0 3823 1761 40 0\n\
                         cpu0 114772 0 12653 122213 323 0 1797 946 20 0\n";

    #[test]
    fn the_all_cpus_line_is_split_into_busy_idle_and_stolen() {
        let before = CpuTicks::parse(BEFORE).expect("parsed");
        let after = CpuTicks::parse(AFTER).expect("parsed");
        // 300 user + 100 system busy, 100 idle, 100 stolen; guest time is inside user.
        let split = after.since(&before).expect("time passed");
        assert_eq!(
            split,
            CpuSplit {
                busy: 400.0 / 6.0,
                idle: 100.0 / 6.0,
                steal: 100.0 / 6.0,
                busy_seconds: 4.0
            }
        );
    }

    #[test]
    fn no_time_or_no_cpu_line_gives_no_split() {
        let t = CpuTicks::parse(BEFORE).expect("parsed");
        assert_eq!(t.since(&t), None);
        assert_eq!(CpuTicks::parse("cpu0 1 2 3 4 5 6 7 8\n"), None);
        assert_eq!(CpuTicks::parse("cpu  1 2 3 4\n"), None);
        assert_eq!(CpuTicks::parse("cpu  1 2 x 4 5 6 7 8\n"), None);
    }

    #[test]
    fn this_machine_can_be_read() {
        // Linux everywhere this runs; the counters only move forward.
        let a = CpuTicks::now().expect("/proc/stat");
        let b = CpuTicks::now().expect("/proc/stat");
        assert!(b.busy >= a.busy && b.idle >= a.idle && b.steal >= a.steal);
    }
}
