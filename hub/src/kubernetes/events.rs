//! Kubernetes Events for the IBGU CRs, from the history the engine writes: step and batch
//! starts, timeouts, failures. The history is the record; Events are what `oc describe`
//! shows, so a leader starts from the newest row and never replays old ones.

use std::sync::Arc;
use std::time::Duration;

use fleet_types::ibgu::ImageBasedGroupUpgrade;
use kube::Resource;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};

use super::Context;
use super::decide;
use crate::error::Error;
use crate::store;

const EVENTS: [&str; 8] = [
    "StepStarted",
    "StepCompleted",
    "StepTimedOut",
    "BatchStarted",
    "BatchTimedOut",
    "ActionFailed",
    "ActionTimedOut",
    "ClusterNotStarted",
];
/// Rows read per round; a burst (a whole batch failing) drains over a few rounds.
const BATCH: i64 = 200;
const POLL: Duration = Duration::from_secs(1);

pub async fn run(ctx: Arc<Context>, stores: Vec<Store<ImageBasedGroupUpgrade>>) {
    let recorder = Recorder::new(
        ctx.client.clone(),
        Reporter {
            controller: "fleet-hub".into(),
            instance: Some(ctx.identity.clone()),
        },
    );
    let mut cursor = loop {
        match store::history_last_id(&ctx.pool).await {
            Ok(id) => break id,
            Err(err) => {
                tracing::warn!(%err, "reading the history failed; retrying");
                tokio::time::sleep(POLL).await;
            }
        }
    };
    loop {
        match round(&ctx, &recorder, &stores, cursor).await {
            Ok(next) if next != cursor => {
                cursor = next;
                continue;
            }
            Ok(_) => {}
            Err(err) => tracing::warn!(%err, "publishing Events failed; retrying"),
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Publishes the Events of the rows after `cursor`; answers the new cursor.
async fn round(
    ctx: &Context,
    recorder: &Recorder,
    stores: &[Store<ImageBasedGroupUpgrade>],
    mut cursor: i64,
) -> Result<i64, Error> {
    for row in store::history_since(&ctx.pool, cursor, &EVENTS, BATCH).await? {
        let key = ObjectRef::new(&row.rollout).within(&row.namespace);
        let cr = stores.iter().find_map(|s| s.get(&key));
        if let (Some(cr), Some(note)) = (
            cr,
            decide::event_for(&row.event, row.cluster.as_deref(), &row.message),
        ) {
            let event = Event {
                type_: if note.warning {
                    EventType::Warning
                } else {
                    EventType::Normal
                },
                reason: note.reason,
                note: Some(note.note),
                action: "Rollout".into(),
                secondary: None,
            };
            recorder.publish(&event, &cr.object_ref(&())).await?;
        }
        cursor = row.id;
    }
    Ok(cursor)
}
