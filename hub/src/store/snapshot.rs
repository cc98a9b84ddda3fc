//! The fleet gauges of `/metrics`, read in a few grouped queries at scrape time.

use super::*;

/// What the fleet gauges show, read from the database at scrape time.
#[derive(Debug, Default, PartialEq)]
pub struct FleetSnapshot {
    pub rollouts: std::collections::BTreeMap<String, i64>,
    /// (action, state) -> clusters.
    pub cluster_actions: std::collections::BTreeMap<(String, &'static str), i64>,
    pub steps: Vec<StepSnapshot>,
    pub registered: i64,
    pub unreachable: i64,
    /// Rollouts a rollout control holds: halted, paused, or waiting to start clusters.
    pub controls: Vec<ControlSnapshot>,
}

#[derive(Debug, Default, PartialEq, sqlx::FromRow)]
pub struct ControlSnapshot {
    pub namespace: String,
    #[sqlx(rename = "name")]
    pub rollout: String,
    pub halted: Option<String>,
    pub paused: bool,
    pub waiting: Option<String>,
}

#[derive(Debug, Default, PartialEq)]
pub struct StepSnapshot {
    pub namespace: String,
    pub rollout: String,
    /// The plan item's index (0-based, as in the history).
    pub step: i64,
    pub clusters: std::collections::BTreeMap<&'static str, i64>,
    pub batch: i64,
    pub batches: i64,
}

/// One group of clusters of a started step, as stored: which actions the step has, which
/// the clusters completed, where they are.
#[derive(Debug, Clone)]
pub struct ProgressGroup {
    pub actions: Vec<String>,
    pub completed: Vec<String>,
    pub action_index: usize,
    pub state: String,
    pub timed_out: bool,
    pub count: i64,
}

impl ProgressGroup {
    /// The state of the group as a whole (`fleet_hub_rollout_clusters`).
    pub fn cluster_state(&self) -> &'static str {
        match self.state.as_str() {
            "failed" if self.timed_out => "timed_out",
            "failed" => "failed",
            "running" => "running",
            "completed" => "completed",
            _ => "pending",
        }
    }

    /// Adds the state of each of the step's actions for these clusters: completed ones,
    /// the current one (running, failed or timed out), and pending ones after it. Actions
    /// after a failure never run and are not counted.
    pub fn add_action_states(
        &self,
        into: &mut std::collections::BTreeMap<(String, &'static str), i64>,
    ) {
        for (i, action) in self.actions.iter().enumerate() {
            // Before the current index: completed (also when a later action failed).
            let state = if i < self.action_index || self.completed.contains(action) {
                "completed"
            } else if i == self.action_index {
                self.cluster_state()
            } else if self.state == "failed" {
                continue;
            } else {
                "pending"
            };
            *into.entry((action.clone(), state)).or_insert(0) += self.count;
        }
    }
}

/// One group of progress rows of an active rollout's step (the query of
/// [`metrics_snapshot`]).
#[derive(sqlx::FromRow)]
struct GroupRow {
    namespace: String,
    name: String,
    step: i32,
    actions: Vec<String>,
    current_batch: i32,
    completed_at: Option<DateTime<Utc>>,
    members: i32,
    max_concurrency: i32,
    /// The batches of a step the rollout controls shaped (0: chunks of max_concurrency).
    shaped_batches: i32,
    completed_actions: Vec<String>,
    action_index: i32,
    state: String,
    timed_out: bool,
    n: i64,
}

/// What the fleet gauges of `/metrics` show, in a few grouped queries (no per-cluster rows
/// leave the database), all on one snapshot of it: a scrape never shows a rollout's
/// controls without the steps a pass wrote with them.
pub async fn metrics_snapshot(pool: &PgPool) -> Result<FleetSnapshot, Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    let pool: &mut PgConnection = &mut tx;
    let by_phase: Vec<(String, i64)> =
        sqlx::query_as("SELECT phase, count(*) AS n FROM rollouts GROUP BY phase")
            .fetch_all(&mut *pool)
            .await?;
    let mut snap = FleetSnapshot {
        rollouts: by_phase.into_iter().collect(),
        ..FleetSnapshot::default()
    };
    let rows: Vec<GroupRow> = sqlx::query_as(
        "SELECT r.namespace, r.name, s.step, s.actions, s.current_batch, s.completed_at,
                cardinality(s.clusters) AS members, s.max_concurrency,
                cardinality(s.batch_ends) AS shaped_batches, rc.completed_actions, rc.action_index, rc.state, rc.timed_out, count(*) AS n
         FROM rollouts r
         JOIN rollout_steps s ON s.rollout_id = r.id
         JOIN rollout_clusters rc ON rc.rollout_id = s.rollout_id AND rc.step = s.step
         WHERE r.phase <> 'Completed'
         GROUP BY r.namespace, r.name, s.step, s.actions, s.current_batch, s.completed_at,
                  cardinality(s.clusters), s.max_concurrency, cardinality(s.batch_ends),
                  rc.completed_actions, rc.action_index, rc.state, rc.timed_out
         ORDER BY r.namespace, r.name, s.step",
    )
    .fetch_all(&mut *pool)
    .await?;
    for r in rows {
        let group = ProgressGroup {
            actions: r.actions,
            completed: r.completed_actions,
            action_index: r.action_index.max(0) as usize,
            state: r.state,
            timed_out: r.timed_out,
            count: r.n,
        };
        group.add_action_states(&mut snap.cluster_actions);
        let step = i64::from(r.step);
        let same = snap
            .steps
            .last()
            .is_some_and(|s| s.namespace == r.namespace && s.rollout == r.name && s.step == step);
        if !same {
            let members = i64::from(r.members);
            let max = i64::from(r.max_concurrency).max(1);
            let batches = match r.shaped_batches {
                0 => (members + max - 1) / max,
                n => i64::from(n),
            };
            let current = i64::from(r.current_batch);
            snap.steps.push(StepSnapshot {
                namespace: r.namespace,
                rollout: r.name,
                step,
                clusters: BTreeMap::new(),
                batch: if r.completed_at.is_some() {
                    batches
                } else {
                    current + 1
                },
                batches,
            });
        }
        if let Some(s) = snap.steps.last_mut() {
            *s.clusters.entry(group.cluster_state()).or_insert(0) += group.count;
        }
    }
    snap.registered = sqlx::query_scalar("SELECT count(*) FROM clusters")
        .fetch_one(&mut *pool)
        .await?;
    // The hub's only sign of an unreachable spoke: its last push failed (a push that works
    // resets the attempts).
    snap.unreachable = sqlx::query_scalar(
        "SELECT count(DISTINCT rc.cluster) FROM rollout_clusters rc
         JOIN rollouts r ON r.id = rc.rollout_id
         WHERE r.phase <> 'Completed' AND rc.state = 'running' AND rc.push_attempts > 0",
    )
    .fetch_one(&mut *pool)
    .await?;
    // A halted rollout stays shown (it needs a person); paused and waiting only while the
    // rollout runs.
    snap.controls = sqlx::query_as(
        "SELECT r.namespace, r.name,
                (SELECT s.halt_reason FROM rollout_steps s
                 WHERE s.rollout_id = r.id AND s.halt_reason IS NOT NULL LIMIT 1) AS halted,
                r.phase <> 'Completed' AND COALESCE((r.spec->>'paused')::boolean, false) AS paused,
                CASE WHEN r.phase <> 'Completed' THEN r.waiting END AS waiting
         FROM rollouts r
         WHERE r.waiting IS NOT NULL OR r.spec ? 'paused'
            OR EXISTS (SELECT 1 FROM rollout_steps s WHERE s.rollout_id = r.id AND s.halt_reason IS NOT NULL)
         ORDER BY r.namespace, r.name",
    )
    .fetch_all(&mut *pool)
    .await?;
    tx.commit().await?;
    Ok(snap)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(completed: &[&str], index: usize, state: &str, timed_out: bool) -> ProgressGroup {
        ProgressGroup {
            actions: vec!["Prep".into(), "Upgrade".into(), "FinalizeUpgrade".into()],
            completed: completed.iter().map(|s| s.to_string()).collect(),
            action_index: index,
            state: state.into(),
            timed_out,
            count: 3,
        }
    }

    fn states(g: &ProgressGroup) -> Vec<(String, &'static str, i64)> {
        let mut m = Default::default();
        g.add_action_states(&mut m);
        m.into_iter().map(|((a, s), n)| (a, s, n)).collect()
    }

    #[test]
    fn action_states_follow_the_progress_of_a_cluster() {
        assert_eq!(
            states(&group(&[], 0, "pending", false)),
            vec![
                ("FinalizeUpgrade".into(), "pending", 3),
                ("Prep".into(), "pending", 3),
                ("Upgrade".into(), "pending", 3)
            ]
        );
        assert_eq!(
            states(&group(&["Prep"], 1, "running", false)),
            vec![
                ("FinalizeUpgrade".into(), "pending", 3),
                ("Prep".into(), "completed", 3),
                ("Upgrade".into(), "running", 3)
            ]
        );
        // A failed Upgrade: Finalize never runs, so it is not pending.
        assert_eq!(
            states(&group(&["Prep"], 1, "failed", false)),
            vec![
                ("Prep".into(), "completed", 3),
                ("Upgrade".into(), "failed", 3)
            ]
        );
        assert_eq!(
            states(&group(&[], 0, "failed", true)),
            vec![("Prep".into(), "timed_out", 3)]
        );
        assert_eq!(
            states(&group(
                &["Prep", "Upgrade", "FinalizeUpgrade"],
                3,
                "completed",
                false
            )),
            vec![
                ("FinalizeUpgrade".into(), "completed", 3),
                ("Prep".into(), "completed", 3),
                ("Upgrade".into(), "completed", 3)
            ]
        );
    }
}
