//! Leader election on a `coordination.k8s.io` Lease: one replica writes to Kubernetes at a
//! time (the engine itself is safe on every replica: Postgres locks each rollout).

use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::watch;

use super::decide::{self, LeaseStep};
use crate::engine::Clock;
use crate::error::Error;

/// A leader that stops renewing is replaced after this long: a replica's death stops the
/// Kubernetes writes (status, labels, Events) for 5 s at most with [`RETRY_EVERY`].
pub const LEASE_SECONDS: i32 = 4;
/// The leader renews this often (a quarter of the lease: three renewals may fail).
const RENEW_EVERY: Duration = Duration::from_secs(1);
/// A follower looks again this often.
const RETRY_EVERY: Duration = Duration::from_millis(500);

fn to_micro(t: DateTime<Utc>) -> MicroTime {
    MicroTime(
        k8s_openapi::jiff::Timestamp::new(t.timestamp(), t.timestamp_subsec_nanos() as i32)
            .unwrap_or_default(),
    )
}

fn from_micro(t: &MicroTime) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(t.0.as_second(), t.0.subsec_nanosecond().max(0) as u32)
}

/// One look at the Lease: take it, renew it or follow. Answers whether we lead now. A 409
/// means another replica wrote it first: we do not lead, and look again next time.
pub async fn try_lead(
    api: &Api<Lease>,
    name: &str,
    me: &str,
    now: DateTime<Utc>,
) -> Result<bool, Error> {
    let current = api.get_opt(name).await?;
    let spec = current
        .as_ref()
        .and_then(|l| l.spec.clone())
        .unwrap_or_default();
    let step = decide::lease_step(
        spec.holder_identity.as_deref(),
        spec.renew_time.as_ref().and_then(from_micro),
        i64::from(spec.lease_duration_seconds.unwrap_or(LEASE_SECONDS)),
        me,
        now,
    );
    let acquire = match step {
        LeaseStep::Follow { .. } => return Ok(false),
        LeaseStep::Acquire => true,
        LeaseStep::Renew => false,
    };
    let new_spec = LeaseSpec {
        holder_identity: Some(me.to_string()),
        lease_duration_seconds: Some(LEASE_SECONDS),
        renew_time: Some(to_micro(now)),
        acquire_time: if acquire {
            Some(to_micro(now))
        } else {
            spec.acquire_time.clone()
        },
        lease_transitions: Some(spec.lease_transitions.unwrap_or(0) + i32::from(acquire)),
        ..spec
    };
    let written = match current {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.to_string()),
                    ..Default::default()
                },
                spec: Some(new_spec),
            };
            api.create(&PostParams::default(), &lease).await
        }
        Some(mut lease) => {
            lease.spec = Some(new_spec);
            api.replace(name, &PostParams::default(), &lease).await
        }
    };
    match written {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Keeps `leading` up to date until the task is dropped.
pub async fn run(
    api: Api<Lease>,
    name: String,
    me: String,
    clock: std::sync::Arc<dyn Clock>,
    leading: watch::Sender<bool>,
) {
    loop {
        let lead = match try_lead(&api, &name, &me, clock.now()).await {
            Ok(lead) => lead,
            Err(err) => {
                tracing::warn!(%err, lease = %name, "the Lease could not be read or written");
                false
            }
        };
        leading.send_if_modified(|l| {
            let changed = *l != lead;
            if changed {
                tracing::info!(lease = %name, identity = %me, leading = lead, "leadership changed");
            }
            *l = lead;
            changed
        });
        tokio::time::sleep(if lead { RENEW_EVERY } else { RETRY_EVERY }).await;
    }
}

/// Lets go of the Lease when this replica holds it (a clean stop): another replica leads at
/// its next look rather than after the lease.
pub async fn release(api: &Api<Lease>, name: &str, me: &str) {
    let Ok(Some(mut lease)) = api.get_opt(name).await else {
        return;
    };
    let Some(spec) = lease.spec.as_mut() else {
        return;
    };
    if spec.holder_identity.as_deref() != Some(me) {
        return;
    }
    spec.holder_identity = None;
    spec.renew_time = None;
    match api.replace(name, &PostParams::default(), &lease).await {
        Ok(_) => tracing::info!(lease = %name, identity = %me, "let go of the Lease"),
        Err(err) => tracing::warn!(%err, lease = %name, "letting go of the Lease failed"),
    }
}
