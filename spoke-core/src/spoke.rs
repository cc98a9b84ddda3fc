//! What the agent's HTTP API and its hub reporting talk to: one cluster's IBU, wherever it
//! is decided. [`crate::runner::Agent`] decides it itself (the engine, on a host); the
//! Lifecycle Agent delegate (`spoke-agent --host lca`) mirrors the cluster's own
//! `ImageBasedUpgrade`. The hub cannot tell them apart.

use std::collections::BTreeMap;
use std::future::Future;
use std::ops::Deref;
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};

use fleet_types::ibu::{ConfigMapRef, ImageBasedUpgrade};
use serde_json::Value;
use tokio::sync::watch;

use crate::Error;
use crate::host::RestoreInfo;

pub trait Spoke: Send + Sync + 'static {
    /// The IBU as shared by the spoke (not copied for every report).
    type Ibu: Deref<Target = ImageBasedUpgrade> + Send + Sync;

    fn name(&self) -> &str;
    fn session(&self) -> &HubSession;
    /// `Err(Unavailable)` while nothing may leave the cluster (it reboots, say).
    fn check_reachable(&self) -> Result<(), Error>;
    /// The IBU as the outside may see it.
    fn ibu(&self) -> impl Future<Output = Result<Self::Ibu, Error>> + Send;
    /// A JSON merge patch of the IBU (a stage push, `oc patch`): checked, then applied.
    fn patch(&self, patch: &Value) -> impl Future<Output = Result<Self::Ibu, Error>> + Send;
    fn restores(&self) -> impl Future<Output = Result<Vec<RestoreInfo>, Error>> + Send;
    fn configmap_get(
        &self,
        r: &ConfigMapRef,
    ) -> impl Future<Output = Result<Option<BTreeMap<String, String>>, Error>> + Send;
    fn configmap_put(
        &self,
        r: &ConfigMapRef,
        data: BTreeMap<String, String>,
    ) -> impl Future<Output = Result<(), Error>> + Send;
    /// Answers whether there was one to delete.
    fn configmap_delete(
        &self,
        r: &ConfigMapRef,
    ) -> impl Future<Output = Result<bool, Error>> + Send;
    /// The files of the troubleshooting bundle (`ibu-spoke.md` section 8), by name.
    fn gather(&self) -> impl Future<Output = Result<Vec<(String, Vec<u8>)>, Error>> + Send;
}

/// How long the local API still accepts a credential after the hub renewed it: longer than
/// a push takes (10 s at most), so no push decided before the renewal is refused.
pub const PREVIOUS_GRACE: std::time::Duration = std::time::Duration::from_secs(60);

/// The agent's side of its link with the hub: the credential the hub issued (also accepted
/// on the local API), the sequence of its reports, and the signal that something changed
/// the hub should hear of.
pub struct HubSession {
    credential: RwLock<Option<String>>,
    /// The credential a renewal replaced, and when: the hub may still push with it for a
    /// moment (a round that read it before the renewal).
    previous: RwLock<Option<(String, std::time::Instant)>>,
    seq: AtomicU64,
    changes: watch::Sender<u64>,
}

impl Default for HubSession {
    fn default() -> Self {
        HubSession {
            credential: RwLock::new(None),
            previous: RwLock::new(None),
            seq: AtomicU64::new(0),
            changes: watch::channel(0).0,
        }
    }
}

impl HubSession {
    pub fn credential(&self) -> Option<String> {
        self.credential
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn set_credential(&self, credential: String) {
        *self.credential.write().unwrap_or_else(|p| p.into_inner()) = Some(credential);
    }

    pub fn clear_credential(&self) {
        *self.credential.write().unwrap_or_else(|p| p.into_inner()) = None;
        *self.previous.write().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// The hub renewed the credential: the new one from now on, the old one still accepted
    /// from the hub for `PREVIOUS_GRACE`.
    pub fn renew_credential(&self, credential: String) {
        let old = self
            .credential
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .replace(credential);
        *self.previous.write().unwrap_or_else(|p| p.into_inner()) =
            old.map(|c| (c, std::time::Instant::now()));
    }

    /// The credentials the local API accepts from the hub: the current one, and the one a
    /// renewal replaced less than `PREVIOUS_GRACE` ago.
    pub fn accepted_credentials(&self) -> Vec<String> {
        let mut accepted: Vec<String> = self.credential().into_iter().collect();
        if let Some((old, since)) = &*self.previous.read().unwrap_or_else(|p| p.into_inner())
            && since.elapsed() < PREVIOUS_GRACE
        {
            accepted.push(old.clone());
        }
        accepted
    }

    /// The next report sequence number.
    pub fn next_sequence(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::SeqCst) + 1
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Something the hub should hear of changed.
    pub fn changed(&self) {
        self.changes.send_modify(|v| *v += 1);
    }
}
