//! Registrations are written in groups (see [`crate::grouped`]): a fleet coming up registers
//! by the thousand, and each registration and its audit entry go into its group's one
//! transaction, answered once that is durable.

use sqlx::PgPool;

use crate::error::Error;
use crate::grouped::{Grouped, WriteGroup, each};
use crate::store::{Issued, Registering, cluster_register, cluster_register_group};

/// Most registrations written by one transaction.
const MAX_GROUP: usize = 500;
/// Registrations waiting for the writer before callers are slowed down.
const QUEUE: usize = 10_000;

#[derive(Clone)]
pub struct Registrations {
    writer: Grouped<Groups>,
}

impl Registrations {
    pub fn start(pool: PgPool) -> Self {
        let writer = Grouped::start(Groups { pool }, MAX_GROUP, QUEUE, "the registration writer");
        Registrations { writer }
    }

    /// Registers the cluster (see [`cluster_register`]) with its audit entry; answers once
    /// both are durable.
    pub async fn register(&self, registering: Registering) -> Result<Issued, Error> {
        self.writer.submit(registering).await
    }
}

struct Groups {
    pool: PgPool,
}

impl WriteGroup for Groups {
    type Item = Registering;
    type Outcome = Issued;

    async fn write(&mut self, group: Vec<Registering>) -> Vec<Result<Issued, Error>> {
        match cluster_register_group(&self.pool, &group).await {
            // A value Postgres refuses fails the whole group: one by one then, so that it
            // is answered to the registration that sent it, and to no other.
            Err(Error::Invalid(_)) if group.len() > 1 => {
                let mut outcomes = Vec::with_capacity(group.len());
                for registering in &group {
                    outcomes.push(cluster_register(&self.pool, registering).await);
                }
                outcomes
            }
            result => each(group.len(), result),
        }
    }
}
