//! The runner: applies the engine's decisions through the host, saves the IBU after every
//! change, and tells the reporter. It owns no rules; those are in `engine`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio::sync::{Mutex, Notify};

use crate::Error;
use crate::engine::{self, Next, Outcome, Root, SpokeState, Work};
use crate::host::{Host, HostError, RebootFor};
use crate::metrics::AgentMetrics;
use crate::spoke::HubSession;

pub use fleet_types::clock::{Clock, SystemClock};

/// One cluster's agent.
pub struct Agent<H: Host> {
    pub name: String,
    pub host: Arc<H>,
    clock: Arc<dyn Clock>,
    /// The state as last saved. Shared, never changed in place: a change builds the next
    /// state, saves it, then replaces this one, so readers (the reporter, the API) and the
    /// host's saved copy hold it without copying.
    state: Mutex<Arc<SpokeState>>,
    wake: Notify,
    /// Its link with the hub; bumped at every saved change, which the reporter follows.
    session: HubSession,
    rebooting: AtomicBool,
    unreachable: AtomicBool,
    metrics: AgentMetrics,
    /// Recent changes of the current state, for must-gather (written out when asked for).
    events: std::sync::Mutex<VecDeque<Event>>,
}

/// What the runner does next: run a step (its work and epoch), or wait, until a time or for
/// a request (`None` when nothing could be begun).
type Started = Option<Result<(Work, u64), Option<DateTime<Utc>>>>;

/// Events kept for must-gather.
const EVENTS_KEPT: usize = 200;

/// A change of the current condition: when, in which stage, to what.
struct Event {
    at: DateTime<Utc>,
    stage: fleet_types::ibu::Stage,
    condition: fleet_types::Condition,
}

impl std::fmt::Display for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = &self.condition;
        write!(
            f,
            "{} stage={} {}={:?} reason={} message={:?}",
            self.at.to_rfc3339(),
            self.stage,
            c.type_,
            c.status,
            c.reason,
            c.message
        )
    }
}

impl<H: Host> Agent<H> {
    /// Loads the IBU saved on the booted stateroot (or creates it), resumes an interrupted
    /// step, and reconciles the saved request.
    pub async fn open(
        name: String,
        host: Arc<H>,
        clock: Arc<dyn Clock>,
        metrics: AgentMetrics,
    ) -> Result<Arc<Self>, HostError> {
        let now = clock.now();
        let mut state = match host.load_state().await? {
            Some(s) => s,
            None => engine::initial(now),
        };
        engine::resume(&mut state, now);
        // Saved as the node went down for a pivot, and found in the same boot: it did not.
        let reboot_pending =
            state.run.reboot_boot_id.is_some() && host.boot_id().await == state.run.reboot_boot_id;
        if !reboot_pending {
            // A real node's agent starts afresh after the reboot of a pivot: what the state
            // saved for the new boot says is taken up as after a simulated reboot (the
            // watchdog armed, a rollback completed); after a mere restart it changes nothing.
            engine::booted(
                &mut state,
                host.rollback_availability_expiration(now).await,
                now,
            );
        }
        engine::reconcile(&mut state, now);
        let state = Arc::new(state);
        host.save_state(&Root::Booted, &state).await?;
        metrics.observe_change(None, &state);
        Ok(Arc::new(Agent {
            name,
            host,
            clock,
            state: Mutex::new(state),
            wake: Notify::new(),
            session: HubSession::default(),
            rebooting: AtomicBool::new(reboot_pending),
            unreachable: AtomicBool::new(false),
            metrics,
            events: std::sync::Mutex::new(VecDeque::new()),
        }))
    }

    pub async fn snapshot(&self) -> Arc<SpokeState> {
        self.state.lock().await.clone()
    }

    /// The state as the outside may see it: none while the node reboots. Checked after the
    /// read: the state saved just before a reboot is the old stateroot's copy (an
    /// uncontrolled rollback), and the flag is raised before it is committed.
    pub async fn visible(&self) -> Result<Arc<SpokeState>, Error> {
        let state = self.snapshot().await;
        self.check_reachable()?;
        Ok(state)
    }

    /// A JSON merge patch from the API: checked, saved, then acted on. Answers the new state.
    pub async fn patch(&self, patch: &Value) -> Result<Arc<SpokeState>, Error> {
        self.check_reachable()?;
        let mut guard = self.state.lock().await;
        let next = match engine::request(&guard, patch, self.clock.now()) {
            Ok(n) => n,
            Err(refusal) => {
                self.metrics.transition("refused");
                return Err(refusal.into());
            }
        };
        let next = Arc::new(next);
        self.host
            .save_state(&Root::Booted, &next)
            .await
            .map_err(|e| Error::internal("saving the IBU failed; nothing changed", e))?;
        // A stage asked for again (a hub that took over sends what its predecessor may have
        // sent) is no transition.
        let moved = next.ibu.spec.stage != guard.ibu.spec.stage;
        self.metrics
            .transition(if moved { "accepted" } else { "unchanged" });
        self.metrics.observe_change(Some(&guard), &next);
        self.record(&guard, &next);
        *guard = next.clone();
        drop(guard);
        self.changed();
        self.wake.notify_one();
        Ok(next)
    }

    /// Stop answering and reporting (the `unreachable` fault).
    pub fn set_unreachable(&self, on: bool) {
        self.unreachable.store(on, Ordering::SeqCst);
        self.changed();
    }

    /// The node is rebooting: from the decision to reboot until the agent is back.
    pub fn is_rebooting(&self) -> bool {
        self.rebooting.load(Ordering::SeqCst)
    }

    pub fn check_reachable(&self) -> Result<(), Error> {
        if self.unreachable.load(Ordering::SeqCst) {
            Err(Error::Unavailable("simulated fault: unreachable".into()))
        } else if self.rebooting.load(Ordering::SeqCst) {
            Err(Error::Unavailable("rebooting".into()))
        } else {
            Ok(())
        }
    }

    pub fn session(&self) -> &HubSession {
        &self.session
    }

    pub fn events(&self) -> Vec<String> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(Event::to_string)
            .collect()
    }

    fn record(&self, old: &SpokeState, new: &SpokeState) {
        fn current(s: &SpokeState) -> Option<&fleet_types::Condition> {
            s.ibu.status.as_ref().and_then(|st| st.current())
        }
        let Some(c) = current(new) else { return };
        if current(old) == Some(c) {
            return;
        }
        tracing::info!(cluster = %self.name, condition = %c.type_, reason = %c.reason, message = %c.message, "IBU state");
        let mut events = self.events.lock().unwrap_or_else(|p| p.into_inner());
        if events.len() == EVENTS_KEPT {
            events.pop_front();
        }
        events.push_back(Event {
            at: self.clock.now(),
            stage: new.ibu.spec.stage,
            condition: c.clone(),
        });
    }

    fn changed(&self) {
        self.session.changed();
    }

    /// Saves and publishes a state the engine changed.
    async fn commit(&self, guard: &mut Arc<SpokeState>, next: SpokeState) {
        if **guard == next {
            return;
        }
        let next = Arc::new(next);
        // A failed save is retried with the next change; the state in memory stays right.
        if let Err(err) = self.host.save_state(&Root::Booted, &next).await {
            tracing::error!(cluster = %self.name, %err, "saving the IBU failed");
        }
        self.metrics.observe_change(Some(guard), &next);
        self.record(guard, &next);
        *guard = next;
        self.changed();
    }

    /// Runs the engine until the task is dropped.
    pub async fn run(self: Arc<Self>) {
        if self.rebooting.load(Ordering::SeqCst) {
            tracing::warn!(cluster = %self.name, "the node did not reboot for the pivot: asking again");
            self.reboot().await;
        }
        // The step begun, under the same lock, when the last one was completed.
        let mut begun = None;
        loop {
            let started = match begun.take() {
                Some(started) => started,
                None => {
                    let mut guard = self.state.lock().await;
                    self.go_on(&mut guard, None, self.clock.now()).await
                }
            };
            match started {
                Some(Ok((work, epoch))) => begun = self.execute(work, epoch).await,
                Some(Err(until)) => self.wait(until).await,
                None => self.wait(None).await,
            }
        }
    }

    /// Goes on from the saved state, or from `completed` (the saved state with a step's
    /// outcome, not saved yet): fires a due timer, begins the next step if there is one, and
    /// saves and publishes the result once. Answers the step begun, or until when to wait.
    async fn go_on(
        &self,
        guard: &mut Arc<SpokeState>,
        completed: Option<SpokeState>,
        now: DateTime<Utc>,
    ) -> Started {
        // Copied only when something changes: a fired timer or a step begun.
        let mut next = completed;
        if engine::timer_due(next.as_ref().unwrap_or(guard), now) {
            let mut ticked = next.take().unwrap_or_else(|| SpokeState::clone(guard));
            engine::tick(&mut ticked, now);
            next = Some(ticked);
        }
        let plan = engine::next(next.as_ref().unwrap_or(guard), now);
        match plan {
            Next::Work(Work::Reboot) => {
                // What the node says before it goes away is published as it is.
                if let Some(next) = next.take() {
                    self.commit(guard, next).await;
                }
                let mut next = SpokeState::clone(guard);
                let begun = engine::begin(&mut next, now);
                next.run.reboot_boot_id = self.host.boot_id().await;
                // `next` is what the old stateroot must say if the node ever comes back
                // there (an uncontrolled rollback): saved there, never shown. The node is
                // going away; nothing leaves it from now on.
                self.rebooting.store(true, Ordering::SeqCst);
                self.changed();
                let next = Arc::new(next);
                if let Err(err) = self.host.save_state(&Root::Booted, &next).await {
                    tracing::error!(cluster = %self.name, %err, "saving the old stateroot's IBU failed");
                }
                begun.map(Ok)
            }
            Next::Work(_) => {
                let mut next = next.unwrap_or_else(|| SpokeState::clone(guard));
                let begun = engine::begin(&mut next, now);
                self.commit(guard, next).await;
                begun.map(Ok)
            }
            Next::WaitUntil(_) | Next::Nothing => {
                if let Some(next) = next {
                    self.commit(guard, next).await;
                }
                let until = if let Next::WaitUntil(t) = plan {
                    Some(t)
                } else {
                    None
                };
                Some(Err(until))
            }
        }
    }

    async fn wait(&self, until: Option<DateTime<Utc>>) {
        let sleep = match until {
            Some(t) => (t - self.clock.now()).to_std().unwrap_or_default(),
            // Nothing to do: wait for a request, but look again now and then.
            None => std::time::Duration::from_secs(60),
        };
        tokio::select! {
            _ = self.wake.notified() => {}
            _ = tokio::time::sleep(sleep) => {}
        }
    }

    /// Runs a step; its outcome and the next step's beginning are saved together (one copy
    /// of the state and one save per step, not two): answers the step begun.
    async fn execute(&self, work: Work, epoch: u64) -> Option<Started> {
        if work == Work::Reboot {
            self.reboot().await;
            return None;
        }
        let outcome = dispatch(&*self.host, work).await;
        let mut guard = self.state.lock().await;
        let mut next = SpokeState::clone(&guard);
        let now = self.clock.now();
        engine::complete(&mut next, epoch, outcome, now);
        if next
            .run
            .op
            .as_ref()
            .is_some_and(|op| matches!(op, engine::Op::AutoRollback(_)))
            && !guard
                .run
                .op
                .as_ref()
                .is_some_and(|op| matches!(op, engine::Op::AutoRollback(_)))
        {
            self.metrics.auto_rollback();
        }
        Some(self.go_on(&mut guard, Some(next), now).await)
    }

    /// The node reboots: the agent is away, then starts again from what the booted
    /// stateroot holds.
    async fn reboot(&self) {
        self.rebooting.store(true, Ordering::SeqCst);
        tracing::info!(cluster = %self.name, "rebooting");
        let boot = self.host.boot_id().await;
        let why = match self.state.lock().await.run.op {
            Some(engine::Op::UpgradePre) => RebootFor::Upgrade,
            _ => RebootFor::Rollback,
        };
        while let Err(err) = self.host.reboot(why).await {
            tracing::error!(cluster = %self.name, %err, "reboot failed");
            // Still the same boot: the node is not going anywhere. Showing what the old
            // stateroot says (an uncontrolled rollback) would be false; ask again.
            if boot.is_none() || self.host.boot_id().await != boot {
                break;
            }
        }
        let now = self.clock.now();
        let mut guard = self.state.lock().await;
        match self.host.load_state().await {
            Ok(Some(mut s)) => {
                engine::resume(&mut s, now);
                engine::booted(
                    &mut s,
                    self.host.rollback_availability_expiration(now).await,
                    now,
                );
                engine::reconcile(&mut s, now);
                let s = Arc::new(s);
                if let Err(err) = self.host.save_state(&Root::Booted, &s).await {
                    tracing::error!(cluster = %self.name, %err, "saving the IBU after the reboot failed");
                }
                self.metrics.observe_change(Some(&guard), &s);
                self.record(&guard, &s);
                *guard = s;
            }
            Ok(None) => tracing::error!(cluster = %self.name, "the booted stateroot holds no IBU"),
            Err(err) => {
                tracing::error!(cluster = %self.name, %err, "loading the IBU after the reboot failed")
            }
        }
        drop(guard);
        self.rebooting.store(false, Ordering::SeqCst);
        tracing::info!(cluster = %self.name, "back after the reboot");
        self.changed();
    }
}

/// Hands one step to the host and says how it ended, in the engine's terms.
async fn dispatch<H: Host>(host: &H, work: Work) -> Outcome {
    let done = |r: Result<(), HostError>| match r {
        Ok(()) => Outcome::Done,
        Err(HostError::Terminal(e)) => Outcome::Failed(e),
        Err(HostError::Transient(e)) => Outcome::Transient(e),
    };
    let waited = |r: Result<(), String>| match r {
        Ok(()) => Outcome::Done,
        Err(why) => Outcome::Waiting(why),
    };
    match work {
        Work::Health => waited(host.health().await),
        Work::GatherFacts(spec) => match host.cluster_facts(&spec).await {
            Ok(f) => Outcome::Facts(Box::new(f)),
            Err(e) => done(Err(e)),
        },
        Work::InspectSeed(seed) => match host.inspect_seed(&seed).await {
            Ok(labels) => Outcome::SeedLabels(labels),
            Err(e) => done(Err(e)),
        },
        Work::SetupStateroot {
            stateroot,
            seed,
            image_cleanup,
        } => {
            if let Some(threshold) = image_cleanup
                && let Err(err) = host.free_container_storage(threshold).await
            {
                // Never the stage's failure: what could not be freed shows in the pull.
                tracing::warn!(%err, "freeing container storage before the seed's pull");
            }
            done(host.setup_stateroot(&stateroot, &seed).await)
        }
        Work::Precache {
            seed,
            release_registry,
        } => match host.precache(&seed, &release_registry).await {
            Ok(p) => Outcome::Precached {
                total: p.total,
                pulled: p.pulled,
                failed: p.failed,
            },
            Err(e) => done(Err(e)),
        },
        Work::Backup(groups) => done(host.backup(&groups).await),
        Work::ClusterConfig { stateroot } => done(host.cluster_config(&stateroot).await),
        Work::Pivot { saves, default } => {
            for (root, state) in saves {
                if let Err(e) = host.save_state(&root, &Arc::new(state)).await {
                    return done(Err(e));
                }
            }
            done(host.set_default(&default).await)
        }
        Work::Reboot => Outcome::Done,
        Work::CheckDpa => done(host.check_dpa().await),
        Work::ApplyExtraManifests(groups) => done(host.apply_extra_manifests(&groups).await),
        Work::Restore(groups) => done(host.restore(&groups).await),
        Work::DeferredHealth => waited(host.deferred_health().await),
        Work::DisarmWatchdog => done(host.disarm_watchdog().await),
        Work::Cleanup { manual } => match host.cleanup(manual).await {
            Ok(()) => Outcome::Done,
            Err(errors) => Outcome::CleanupFailed(errors),
        },
    }
}

/// Opens an agent on a host and runs it, reporting to the hub when linked (the start of
/// `spoke-agent serve` on every host, and of each agent of a simulated fleet).
pub async fn start<H: Host>(
    name: String,
    host: H,
    metrics: &AgentMetrics,
    link: Option<crate::report::HubLink>,
    unreachable: bool,
) -> Result<Arc<Agent<H>>, Error> {
    let agent = Agent::open(
        name.clone(),
        Arc::new(host),
        Arc::new(SystemClock),
        metrics.clone(),
    )
    .await
    .map_err(|e| Error::internal(format!("cluster {name}: opening its IBU"), e))?;
    agent.set_unreachable(unreachable);
    tokio::spawn(agent.clone().run());
    if let Some(link) = link {
        tokio::spawn(crate::report::run(agent.clone(), link, metrics.clone()));
    }
    Ok(agent)
}

/// The IBU of an agent's state, shared with it.
pub struct StateIbu(pub Arc<SpokeState>);

impl std::ops::Deref for StateIbu {
    type Target = fleet_types::ImageBasedUpgrade;

    fn deref(&self) -> &Self::Target {
        &self.0.ibu
    }
}

fn host_failed(e: HostError) -> Error {
    Error::internal("the host", e)
}

impl<H: Host> crate::spoke::Spoke for Agent<H> {
    type Ibu = StateIbu;

    fn name(&self) -> &str {
        &self.name
    }

    fn session(&self) -> &HubSession {
        &self.session
    }

    fn check_reachable(&self) -> Result<(), Error> {
        Agent::check_reachable(self)
    }

    async fn ibu(&self) -> Result<StateIbu, Error> {
        self.visible().await.map(StateIbu)
    }

    async fn patch(&self, patch: &Value) -> Result<StateIbu, Error> {
        Agent::patch(self, patch).await.map(StateIbu)
    }

    async fn restores(&self) -> Result<Vec<crate::host::RestoreInfo>, Error> {
        self.check_reachable()?;
        Ok(self.host.restores().await)
    }

    async fn configmap_get(
        &self,
        r: &fleet_types::ibu::ConfigMapRef,
    ) -> Result<Option<std::collections::BTreeMap<String, String>>, Error> {
        self.check_reachable()?;
        Ok(self.host.configmap_get(r).await)
    }

    async fn configmap_put(
        &self,
        r: &fleet_types::ibu::ConfigMapRef,
        data: std::collections::BTreeMap<String, String>,
    ) -> Result<(), Error> {
        self.check_reachable()?;
        self.host.configmap_put(r, data).await.map_err(host_failed)
    }

    async fn configmap_delete(&self, r: &fleet_types::ibu::ConfigMapRef) -> Result<bool, Error> {
        self.check_reachable()?;
        self.host.configmap_delete(r).await.map_err(host_failed)
    }

    async fn gather(&self) -> Result<Vec<(String, Vec<u8>)>, Error> {
        self.check_reachable()?;
        crate::must_gather::agent_files(self)
            .await
            .map_err(|e| Error::internal("building the bundle", e))
    }
}
