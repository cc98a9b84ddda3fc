//! Writes made in groups. Callers hand their item to one writer task; every item waiting
//! when the writer is free goes into one transaction, and each caller gets its own answer
//! only once that commit is durable. At fleet scale this is the difference between one
//! commit (an fsync, a round trip, a statement) per request and one per group, with nothing
//! acknowledged that could be lost. Spoke reports and registrations are written so.

use std::future::Future;

use tokio::sync::{mpsc, oneshot};

use crate::error::Error;

/// What a grouped writer does with one group.
pub trait WriteGroup: Send + 'static {
    type Item: Send + 'static;
    type Outcome: Send + 'static;

    /// Writes the group in one transaction (or fails it whole) and answers each item, in
    /// the group's order.
    fn write(
        &mut self,
        group: Vec<Self::Item>,
    ) -> impl Future<Output = Vec<Result<Self::Outcome, Error>>> + Send;
}

type Pending<W> = (
    <W as WriteGroup>::Item,
    oneshot::Sender<Result<<W as WriteGroup>::Outcome, Error>>,
);

/// The callers' end of a grouped writer: cheap to clone.
pub struct Grouped<W: WriteGroup> {
    tx: mpsc::Sender<Pending<W>>,
    what: &'static str,
}

impl<W: WriteGroup> Clone for Grouped<W> {
    fn clone(&self) -> Self {
        Grouped {
            tx: self.tx.clone(),
            what: self.what,
        }
    }
}

impl<W: WriteGroup> Grouped<W> {
    /// Starts the writer task: groups of `max_group` items at most; beyond `queue` items
    /// waiting, callers wait for room (the writer is behind: they are slowed down, not
    /// refused). `what` names the writer in errors ("the report writer").
    pub fn start(writer: W, max_group: usize, queue: usize, what: &'static str) -> Self {
        let (tx, rx) = mpsc::channel(queue);
        tokio::spawn(write_loop(writer, rx, max_group));
        Grouped { tx, what }
    }

    /// Writes `item` with whatever else is waiting; answers once that is durable.
    pub async fn submit(&self, item: W::Item) -> Result<W::Outcome, Error> {
        let (reply, answer) = oneshot::channel();
        let stopped = || Error::Internal(format!("{} stopped", self.what));
        self.tx.send((item, reply)).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

async fn write_loop<W: WriteGroup>(
    mut writer: W,
    mut rx: mpsc::Receiver<Pending<W>>,
    max_group: usize,
) {
    let mut group = Vec::with_capacity(max_group);
    while rx.recv_many(&mut group, max_group).await > 0 {
        let (items, replies): (Vec<_>, Vec<_>) = group.drain(..).unzip();
        let mut outcomes = writer.write(items).await.into_iter();
        for reply in replies {
            let outcome = outcomes
                .next()
                .unwrap_or_else(|| Err(Error::Internal("a grouped write gave no answer".into())));
            let _ = reply.send(outcome);
        }
    }
}

/// Every item of a group answered alike: its outcome in order, or the group's one error.
pub fn each<R>(len: usize, result: Result<Vec<R>, Error>) -> Vec<Result<R, Error>> {
    match result {
        Ok(outcomes) => outcomes.into_iter().map(Ok).collect(),
        Err(e) => (0..len).map(|_| Err(e.clone())).collect(),
    }
}
