//! Which replica drives each rollout. Any number of hubs may run on one database; each active
//! rollout is driven by one of them at a time, named on its row (`rollouts.driver`) with a
//! term that its driver moves on at least every [`DRIVE_RENEW`]. A replica that sees the same
//! term for [`DRIVE_LEASE`] on its own clock takes the rollout over, so clocks need not agree
//! across machines. A replica that stops cleanly lets its rollouts go at once.
//!
//! This decides only who plans; the pass lock (an advisory lock per transaction) still makes
//! every pass the only one at its time, whatever a slow replica believes.

use chrono::{DateTime, Duration, Utc};

/// A driver whose term has not moved for this long (by the observer's clock) is gone.
pub const DRIVE_LEASE: Duration = Duration::seconds(3);
/// The driver moves its term on at a pass this long after the last time, at the most often.
pub const DRIVE_RENEW: Duration = Duration::seconds(1);
/// A replica that follows some rollouts looks at their terms at least this often, so that it
/// sees the last term of a driver that dies soon after it was written.
pub const FOLLOW_POLL: std::time::Duration = std::time::Duration::from_millis(500);

/// A rollout's driver as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Driver {
    pub name: Option<String>,
    pub term: i64,
}

/// What this replica saw of another's term, and since when (its own clock).
#[derive(Clone, Debug, PartialEq)]
pub struct Seen {
    pub driver: Driver,
    pub since: DateTime<Utc>,
}

/// What this replica does with a rollout.
#[derive(Clone, Debug, PartialEq)]
pub enum DriveStep {
    /// It drives it; `renew` moves the term on with this pass.
    Drive { renew: bool },
    /// Nobody drives it (new, or let go): take it.
    Claim,
    /// Its driver's term has not moved for `silent`: take it from `from` (that driver at
    /// that term, not one that wrote since).
    TakeOver { from: Driver, silent: Duration },
    /// Another replica drives it; look again at `until` at the latest.
    Follow { until: DateTime<Utc> },
}

impl DriveStep {
    /// The stored driver a pass expects to find under its lock for this step (anything else
    /// means another replica moved first: the pass does nothing).
    pub fn expects(&self, stored: &Driver, me: &str) -> bool {
        match self {
            DriveStep::Drive { .. } => stored.name.as_deref() == Some(me),
            DriveStep::Claim => stored.name.is_none(),
            DriveStep::TakeOver { from, .. } => stored == from,
            DriveStep::Follow { .. } => false,
        }
    }

    /// Whether the pass writes the driver: its term, or itself as the new driver.
    pub fn writes(&self) -> bool {
        !matches!(
            self,
            DriveStep::Drive { renew: false } | DriveStep::Follow { .. }
        )
    }

    /// Whether the replica starts driving with this step: what the last driver left on its
    /// way is void (its pushes' outcomes will never be recorded).
    pub fn starts(&self) -> bool {
        matches!(self, DriveStep::Claim | DriveStep::TakeOver { .. })
    }
}

/// Decides for one rollout, from its stored driver, what this replica saw of it before
/// (updated here), when this replica last wrote its term, and the time.
pub fn drive_step(
    stored: &Driver,
    me: &str,
    seen: &mut Option<Seen>,
    renewed_at: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> DriveStep {
    let Some(name) = &stored.name else {
        *seen = None;
        return DriveStep::Claim;
    };
    if name == me {
        *seen = None;
        return DriveStep::Drive {
            renew: renewed_at.is_none_or(|at| now - at >= DRIVE_RENEW),
        };
    }
    let since = match seen {
        Some(s) if s.driver == *stored => s.since,
        _ => {
            *seen = Some(Seen {
                driver: stored.clone(),
                since: now,
            });
            now
        }
    };
    let silent = now - since;
    if silent >= DRIVE_LEASE {
        DriveStep::TakeOver {
            from: stored.clone(),
            silent,
        }
    } else {
        DriveStep::Follow {
            until: since + DRIVE_LEASE,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn driver(name: Option<&str>, term: i64) -> Driver {
        Driver {
            name: name.map(str::to_string),
            term,
        }
    }

    #[test]
    fn a_free_rollout_is_claimed_and_its_driver_renews_once_a_second() {
        let t = Utc::now();
        let mut seen = None;
        assert_eq!(
            drive_step(&driver(None, 4), "a", &mut seen, None, t),
            DriveStep::Claim
        );
        let mine = driver(Some("a"), 5);
        assert_eq!(
            drive_step(&mine, "a", &mut seen, None, t),
            DriveStep::Drive { renew: true }
        );
        let soon = t + Duration::milliseconds(999);
        assert_eq!(
            drive_step(&mine, "a", &mut seen, Some(t), soon),
            DriveStep::Drive { renew: false }
        );
        assert_eq!(
            drive_step(&mine, "a", &mut seen, Some(t), t + DRIVE_RENEW),
            DriveStep::Drive { renew: true }
        );
    }

    #[test]
    fn another_drivers_rollout_is_taken_over_once_its_term_stood_still_for_the_lease() {
        let t = Utc::now();
        let mut seen = None;
        let theirs = driver(Some("b"), 7);
        assert_eq!(
            drive_step(&theirs, "a", &mut seen, None, t),
            DriveStep::Follow {
                until: t + DRIVE_LEASE
            }
        );
        // The term moves: the lease counts from when it was seen moving.
        let later = t + Duration::seconds(2);
        let renewed = driver(Some("b"), 8);
        assert_eq!(
            drive_step(&renewed, "a", &mut seen, None, later),
            DriveStep::Follow {
                until: later + DRIVE_LEASE
            }
        );
        let almost = later + DRIVE_LEASE - Duration::milliseconds(1);
        assert!(matches!(
            drive_step(&renewed, "a", &mut seen, None, almost),
            DriveStep::Follow { .. }
        ));
        assert_eq!(
            drive_step(&renewed, "a", &mut seen, None, later + DRIVE_LEASE),
            DriveStep::TakeOver {
                from: renewed.clone(),
                silent: DRIVE_LEASE
            }
        );
        // Another driver with the same term is a change too.
        let other = driver(Some("c"), 8);
        assert!(matches!(
            drive_step(&other, "a", &mut seen, None, later + DRIVE_LEASE),
            DriveStep::Follow { .. }
        ));
    }

    #[test]
    fn a_pass_goes_on_only_when_the_driver_is_still_the_one_it_decided_on() {
        let b = driver(Some("b"), 3);
        let take = DriveStep::TakeOver {
            from: b.clone(),
            silent: DRIVE_LEASE,
        };
        assert!(take.expects(&b, "a") && take.starts() && take.writes());
        assert!(!take.expects(&driver(Some("c"), 3), "a"));
        assert!(
            !take.expects(&driver(Some("b"), 4), "a"),
            "b renewed meanwhile"
        );
        assert!(!DriveStep::Claim.expects(&b, "a"));
        assert!(DriveStep::Claim.expects(&driver(None, 3), "a"));
        let drive = DriveStep::Drive { renew: false };
        assert!(drive.expects(&driver(Some("a"), 9), "a") && !drive.writes() && !drive.starts());
        assert!(!drive.expects(&b, "a"));
    }
}
