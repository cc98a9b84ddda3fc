//! Where the engines get the time. Both take it as an argument everywhere; the programs use
//! [`SystemClock`], tests supply their own.

use chrono::{DateTime, SubsecRound, Utc};

pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> DateTime<Utc>;
}

/// The system's time, in whole seconds as Kubernetes writes times.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now().trunc_subsecs(0)
    }
}
