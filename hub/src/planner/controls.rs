//! The rollout controls of `ibgu-hub.md` section 5 that shape a plan step before it runs
//! (canary batch, growing batches, disruption budget) and the clock rules that gate its
//! starts (maintenance window, start rate): pure functions of the spec, the labels and the
//! time they are given.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Duration, NaiveTime, TimeZone, Utc};
use chrono_tz::Tz;
use fleet_types::ibgu::{MaintenanceWindow, RolloutStrategy};
use fleet_types::labels::CANARY_LABEL;

/// The clusters of a plan step in batches, in the order they run: the canary batch first
/// (`canaryClusters`, clusters labelled [`CANARY_LABEL`] first, each part by name), then
/// batches of `maxConcurrency` clusters, growing by `batchGrowthFactor`, none holding more
/// than `disruptionBudget.maxUnavailable` clusters of one group (a cluster that would goes
/// to the next batch with room). Without those fields: chunks of `maxConcurrency` in name
/// order, as TALM forms them. `selected` is in name order.
pub fn batches<'a>(
    selected: &[String],
    labels: impl Fn(&str) -> Option<&'a BTreeMap<String, String>>,
    strategy: &RolloutStrategy,
) -> Vec<Vec<String>> {
    let max = strategy.max_concurrency.max(1) as usize;
    let canaries = strategy.canary_clusters.unwrap_or(0).max(0) as usize;
    let canaries = canaries.min(selected.len());
    let factor = strategy
        .batch_growth_factor
        .filter(|f| f.is_finite() && *f >= 1.0)
        .unwrap_or(1.0);
    let budget = strategy
        .disruption_budget
        .as_ref()
        .filter(|b| b.max_unavailable >= 1 && !b.group_by.is_empty());
    let group_of = |c: &str| -> Vec<String> {
        let Some(b) = budget else { return vec![] };
        let l = labels(c);
        b.group_by
            .iter()
            .map(|k| l.and_then(|l| l.get(k)).cloned().unwrap_or_default())
            .collect()
    };
    let limit = budget.map_or(usize::MAX, |b| b.max_unavailable as usize);

    // The canary batch: its clusters are taken out of the name order first.
    let mut order: Vec<&String> = Vec::with_capacity(selected.len());
    let mut caps: Vec<usize> = Vec::new();
    if canaries > 0 {
        let labelled = selected
            .iter()
            .filter(|c| labels(c).is_some_and(|l| l.contains_key(CANARY_LABEL)));
        let others = selected
            .iter()
            .filter(|c| !labels(c).is_some_and(|l| l.contains_key(CANARY_LABEL)));
        let first: Vec<&String> = labelled.chain(others).take(canaries).collect();
        order.extend(first.iter().copied());
        let chosen: std::collections::HashSet<&String> = first.into_iter().collect();
        order.extend(selected.iter().filter(|c| !chosen.contains(c)));
        caps.push(canaries);
    } else {
        order.extend(selected.iter());
    }
    let mut next_cap = if factor > 1.0 {
        max.min(canaries.max(1))
    } else {
        max
    };
    let mut cap = |caps: &mut Vec<usize>, b: usize| {
        while caps.len() <= b {
            caps.push(next_cap);
            next_cap = max.min(((next_cap as f64) * factor).ceil() as usize).max(1);
        }
        caps[b]
    };

    // First fit in order: each cluster joins the earliest batch with room for it and for
    // its group (the canary batch only takes the canaries).
    let mut out: Vec<Vec<String>> = Vec::new();
    let mut per_group: Vec<HashMap<Vec<String>, usize>> = Vec::new();
    let mut first_open = 0usize;
    // By group, the first batch that may have room for it (those before have none).
    let mut group_from: HashMap<Vec<String>, usize> = HashMap::new();
    for (i, c) in order.into_iter().enumerate() {
        let canary = i < canaries;
        let group = group_of(c);
        let from = group_from.get(&group).copied().unwrap_or(0);
        let mut b = if canary {
            0
        } else {
            first_open.max(usize::from(canaries > 0)).max(from)
        };
        loop {
            let size = cap(&mut caps, b);
            while out.len() <= b {
                out.push(Vec::new());
                per_group.push(HashMap::new());
            }
            let in_group = per_group[b].get(&group).copied().unwrap_or(0);
            if out[b].len() < size && in_group < limit {
                break;
            }
            if canary && b == 0 && out[b].len() < size {
                // A canary its group's limit keeps out goes to the first later batch.
                b = first_open.max(1);
                continue;
            }
            b += 1;
        }
        out[b].push(c.clone());
        let n = per_group[b].entry(group.clone()).or_insert(0);
        *n += 1;
        if !canary {
            group_from.insert(group, if *n >= limit { b + 1 } else { b });
        }
        while first_open < out.len() && out[first_open].len() >= cap(&mut caps, first_open) {
            first_open += 1;
        }
    }
    out.retain(|b| !b.is_empty());
    for b in &mut out {
        b.sort();
    }
    out
}

/// Whether starts are allowed now under the window, and when the window next opens (now,
/// when it is open).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowState {
    pub open: bool,
    pub next_open: DateTime<Utc>,
    /// When the window that is open now closes.
    pub closes: Option<DateTime<Utc>>,
}

/// `HH:MM`, 00:00 to 23:59.
pub fn parse_start(s: &str) -> Option<NaiveTime> {
    let (h, m) = s.split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    NaiveTime::from_hms_opt(h.parse().ok()?, m.parse().ok()?, 0)
}

pub fn parse_time_zone(s: &str) -> Option<Tz> {
    s.parse().ok()
}

/// When the window opens on a local date: the local start time, or, when a daylight
/// saving change skips it, the first instant after the gap.
fn opening(tz: Tz, date: chrono::NaiveDate, start: NaiveTime) -> Option<DateTime<Utc>> {
    let local = date.and_time(start);
    for shift in 0..=180 {
        let t = local + Duration::minutes(shift);
        if let Some(at) = tz.from_local_datetime(&t).earliest() {
            return Some(at.with_timezone(&Utc));
        }
    }
    None
}

/// The window's state at `now`; `None` when the window does not parse (validation refuses
/// such a spec before it is stored).
pub fn window(w: &MaintenanceWindow, now: DateTime<Utc>) -> Option<WindowState> {
    let start = parse_start(&w.start)?;
    let tz = parse_time_zone(w.time_zone())?;
    let minutes = w.duration_minutes.clamp(1, 1440);
    let today = now.with_timezone(&tz).date_naive();
    let mut next = None;
    for days in -2..=2 {
        let date = today + Duration::days(days);
        let Some(opens) = opening(tz, date, start) else {
            continue;
        };
        let closes = opens + Duration::minutes(minutes);
        if opens <= now && now < closes {
            return Some(WindowState {
                open: true,
                next_open: now,
                closes: Some(closes),
            });
        }
        if opens > now && next.is_none() {
            next = Some(opens);
        }
    }
    Some(WindowState {
        open: false,
        next_open: next?,
        closes: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_types::ibgu::DisruptionBudget;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("c{i:02}")).collect()
    }

    fn strategy(max: i64) -> RolloutStrategy {
        RolloutStrategy {
            max_concurrency: max,
            ..Default::default()
        }
    }

    fn sizes(b: &[Vec<String>]) -> Vec<usize> {
        b.iter().map(Vec::len).collect()
    }

    #[test]
    fn without_controls_batches_are_chunks_in_name_order() {
        let none = |_: &str| None;
        let b = batches(&names(7), none, &strategy(3));
        assert_eq!(sizes(&b), [3, 3, 1]);
        assert_eq!(b[0], ["c00", "c01", "c02"]);
    }

    #[test]
    fn canaries_come_first_labelled_ones_before_the_others() {
        let mut labels: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        labels.insert(
            "c05".into(),
            [(CANARY_LABEL.to_string(), String::new())].into(),
        );
        let get = |c: &str| labels.get(c);
        let mut s = strategy(4);
        s.canary_clusters = Some(2);
        let b = batches(&names(9), get, &s);
        assert_eq!(b[0], ["c00", "c05"]);
        assert_eq!(b[1], ["c01", "c02", "c03", "c04"]);
        assert_eq!(b[2], ["c06", "c07", "c08"]);
        // More canaries than maxConcurrency: the canary batch holds them all.
        s.canary_clusters = Some(6);
        assert_eq!(sizes(&batches(&names(9), get, &s)), [6, 3]);
    }

    #[test]
    fn batches_grow_by_the_factor_up_to_max_concurrency() {
        let none = |_: &str| None;
        let mut s = strategy(10);
        s.batch_growth_factor = Some(2.0);
        assert_eq!(
            sizes(&batches(&names(40), none, &s)),
            [1, 2, 4, 8, 10, 10, 5]
        );
        s.canary_clusters = Some(2);
        assert_eq!(
            sizes(&batches(&names(40), none, &s)),
            [2, 2, 4, 8, 10, 10, 4]
        );
        s.batch_growth_factor = Some(1.5);
        s.canary_clusters = None;
        assert_eq!(sizes(&batches(&names(12), none, &s)), [1, 2, 3, 5, 1]);
    }

    #[test]
    fn a_group_never_has_more_than_max_unavailable_in_a_batch() {
        // c00..c05 in market a, c06..c09 in market b.
        let labels: BTreeMap<String, BTreeMap<String, String>> = names(10)
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                let m = if i < 6 { "a" } else { "b" };
                (c, [("market".to_string(), m.to_string())].into())
            })
            .collect();
        let get = |c: &str| labels.get(c);
        let mut s = strategy(4);
        s.disruption_budget = Some(DisruptionBudget {
            group_by: vec!["market".into()],
            max_unavailable: 2,
        });
        let b = batches(&names(10), get, &s);
        assert_eq!(b[0], ["c00", "c01", "c06", "c07"]);
        assert_eq!(b[1], ["c02", "c03", "c08", "c09"]);
        assert_eq!(b[2], ["c04", "c05"]);
    }

    fn w(start: &str, minutes: i64, tz: &str) -> MaintenanceWindow {
        MaintenanceWindow {
            start: start.into(),
            duration_minutes: minutes,
            time_zone: Some(tz.into()),
        }
    }

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn a_window_follows_daylight_saving_in_its_time_zone() {
        // Paris moves from UTC+1 to UTC+2 on 2026-03-29 at 02:00 local.
        let win = w("01:00", 120, "Europe/Paris");
        // Saturday 01:00 local is 00:00 UTC.
        let sat = window(&win, t("2026-03-28T00:30:00Z")).unwrap();
        assert!(sat.open);
        assert_eq!(sat.closes, Some(t("2026-03-28T02:00:00Z")));
        // After it closed, it next opens Sunday 01:00 local, still UTC+1: 00:00 UTC.
        let after = window(&win, t("2026-03-28T02:00:00Z")).unwrap();
        assert!(!after.open);
        assert_eq!(after.next_open, t("2026-03-29T00:00:00Z"));
        // Monday 01:00 local is UTC+2: 23:00 UTC on Sunday.
        let sunday_evening = window(&win, t("2026-03-29T22:59:00Z")).unwrap();
        assert!(!sunday_evening.open);
        assert_eq!(sunday_evening.next_open, t("2026-03-29T23:00:00Z"));
        assert!(window(&win, t("2026-03-29T23:00:00Z")).unwrap().open);
    }

    #[test]
    fn a_start_the_clock_skips_opens_right_after_the_gap() {
        // 02:30 does not exist in Paris on 2026-03-29: the window opens at 03:00 local.
        let win = w("02:30", 60, "Europe/Paris");
        let st = window(&win, t("2026-03-29T00:10:00Z")).unwrap();
        assert_eq!(st.next_open, t("2026-03-29T01:00:00Z"));
    }

    #[test]
    fn a_window_past_midnight_is_open_after_midnight() {
        let win = w("23:00", 180, "UTC");
        assert!(window(&win, t("2026-06-02T01:59:00Z")).unwrap().open);
        let closed = window(&win, t("2026-06-02T02:00:00Z")).unwrap();
        assert!(!closed.open);
        assert_eq!(closed.next_open, t("2026-06-02T23:00:00Z"));
    }

    #[test]
    fn start_times_and_zones_parse_strictly() {
        assert!(parse_start("07:05").is_some());
        for bad in ["7:05", "24:00", "07:60", "0705", "ab:cd", ""] {
            assert!(parse_start(bad).is_none(), "{bad}");
        }
        assert!(parse_time_zone("America/New_York").is_some());
        assert!(parse_time_zone("Mars/Olympus").is_none());
    }
}
