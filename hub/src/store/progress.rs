//! Plan steps and each cluster's progress through them, as the planner keeps them.

use super::*;

pub(super) fn parse_action(s: &str) -> Result<Action, Error> {
    s.parse().map_err(Error::Internal)
}

pub(super) fn parse_phase(s: &str) -> ClusterPhase {
    match s {
        "running" => ClusterPhase::Running,
        "completed" => ClusterPhase::Completed,
        "failed" => ClusterPhase::Failed,
        _ => ClusterPhase::Pending,
    }
}

pub(super) fn phase_str(p: ClusterPhase) -> &'static str {
    match p {
        ClusterPhase::Pending => "pending",
        ClusterPhase::Running => "running",
        ClusterPhase::Completed => "completed",
        ClusterPhase::Failed => "failed",
    }
}

/// A row of `rollout_steps`.
#[derive(sqlx::FromRow)]
struct StepRow {
    step: i32,
    actions: Vec<String>,
    clusters: Vec<String>,
    max_concurrency: i32,
    timeout_minutes: i32,
    current_batch: i32,
    batch_started_at: Option<DateTime<Utc>>,
    started_at: DateTime<Utc>,
    completed_at: Option<DateTime<Utc>>,
    timed_out: bool,
    batch_ends: Vec<i32>,
    halt_reason: Option<String>,
    halt_message: Option<String>,
    paused_since: Option<DateTime<Utc>>,
    paused_ms: i64,
    batch_paused_ms: i64,
    recent_starts: Vec<DateTime<Utc>>,
}

impl TryFrom<StepRow> for StepState {
    type Error = Error;

    fn try_from(r: StepRow) -> Result<Self, Error> {
        Ok(StepState {
            step: r.step as usize,
            actions: r
                .actions
                .iter()
                .map(|a| parse_action(a))
                .collect::<Result<_, _>>()?,
            clusters: r.clusters,
            max_concurrency: r.max_concurrency as usize,
            timeout_minutes: r.timeout_minutes as i64,
            started_at: r.started_at,
            current_batch: r.current_batch as usize,
            batch_started_at: r.batch_started_at.unwrap_or(r.started_at),
            completed_at: r.completed_at,
            timed_out: r.timed_out,
            progress: BTreeMap::new(),
            batch_ends: r.batch_ends.iter().map(|e| (*e).max(0) as usize).collect(),
            halt: r.halt_reason.map(|reason| Halt {
                reason,
                message: r.halt_message.unwrap_or_default(),
            }),
            paused_since: r.paused_since,
            paused_ms: r.paused_ms,
            batch_paused_ms: r.batch_paused_ms,
            recent_starts: r.recent_starts,
        })
    }
}

/// A row of `rollout_clusters`: one cluster's progress through one step.
#[derive(sqlx::FromRow)]
struct ProgressRow {
    step: i32,
    cluster: String,
    batch: i32,
    state: String,
    action_index: i32,
    completed_actions: Vec<String>,
    failed_action: Option<String>,
    failure_message: Option<String>,
    timed_out: bool,
    pushed_stage: Option<String>,
    pushed_at: Option<DateTime<Utc>>,
    push_attempts: i32,
    push_in_flight_since: Option<DateTime<Utc>>,
    refused: Option<String>,
    started_at: Option<DateTime<Utc>>,
    action_started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
    retries: i32,
    resetting: bool,
}

impl TryFrom<ProgressRow> for ClusterProgress {
    type Error = Error;

    fn try_from(r: ProgressRow) -> Result<Self, Error> {
        Ok(ClusterProgress {
            batch: r.batch as usize,
            phase: parse_phase(&r.state),
            action_index: r.action_index as usize,
            completed: r
                .completed_actions
                .iter()
                .map(|a| parse_action(a))
                .collect::<Result<_, _>>()?,
            failed: match r.failed_action {
                Some(a) => Some((parse_action(&a)?, r.failure_message.unwrap_or_default())),
                None => None,
            },
            timed_out: r.timed_out,
            pushed_stage: r
                .pushed_stage
                .and_then(|s| serde_json::from_value::<Stage>(Value::String(s)).ok()),
            pushed_at: r.pushed_at,
            push_failures: r.push_attempts as u32,
            push_in_flight: r.push_in_flight_since,
            refused: r.refused,
            started_at: r.started_at,
            action_started_at: r.action_started_at,
            finished_at: r.finished_at,
            retries: r.retries.max(0) as u32,
            resetting: r.resetting,
        })
    }
}

pub async fn rollout_steps_in_txn(
    conn: &mut PgConnection,
    id: i64,
) -> Result<Vec<StepState>, Error> {
    let rows: Vec<StepRow> = sqlx::query_as(
        "SELECT step, actions, clusters, max_concurrency, timeout_minutes, current_batch, batch_started_at,
                started_at, completed_at, timed_out, batch_ends, halt_reason, halt_message, paused_since,
                paused_ms, batch_paused_ms, recent_starts
         FROM rollout_steps WHERE rollout_id = $1 ORDER BY step",
    )
    .bind(id)
    .fetch_all(&mut *conn)
    .await?;
    let mut steps: Vec<StepState> = rows
        .into_iter()
        .map(StepState::try_from)
        .collect::<Result<_, _>>()?;
    let rows: Vec<ProgressRow> = sqlx::query_as(
        "SELECT step, cluster, batch, state, action_index, completed_actions, failed_action, failure_message,
                timed_out, pushed_stage, pushed_at, push_attempts, push_in_flight_since, refused, started_at,
                action_started_at, finished_at, retries, resetting
         FROM rollout_clusters WHERE rollout_id = $1",
    )
    .bind(id)
    .fetch_all(&mut *conn)
    .await?;
    for r in rows {
        let (step, cluster) = (r.step as usize, r.cluster.clone());
        let progress = ClusterProgress::try_from(r)?;
        if let Some(s) = steps.get_mut(step) {
            s.progress.insert(cluster, progress);
        }
    }
    Ok(steps)
}

/// Writes what changed of the steps: heads that differ from `before` (the heads of the
/// steps as stored), steps that are new, and the progress entries `changed` names by step
/// (the planner's [`Decision::changed`](crate::planner::rollout::Decision::changed)).
/// Answers whether anything was written (the rollout's state version is then to move on:
/// [`rollout_save_pass_in_txn`]).
pub async fn rollout_save_steps_in_txn(
    conn: &mut PgConnection,
    id: i64,
    before: &[StepHead],
    after: &[StepState],
    changed: &BTreeMap<usize, Vec<String>>,
) -> Result<bool, Error> {
    let mut wrote = false;
    for s in after {
        let old = before.get(s.step);
        if old != Some(&s.head()) {
            wrote = true;
            let actions: Vec<&str> = s.actions.iter().map(|a| a.as_str()).collect();
            sqlx::query(
                "INSERT INTO rollout_steps (rollout_id, step, actions, clusters, max_concurrency, timeout_minutes,
                   current_batch, batch_started_at, started_at, completed_at, timed_out, batch_ends, halt_reason,
                   halt_message, paused_since, paused_ms, batch_paused_ms, recent_starts)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)
                 ON CONFLICT (rollout_id, step) DO UPDATE SET current_batch = EXCLUDED.current_batch,
                   batch_started_at = EXCLUDED.batch_started_at, completed_at = EXCLUDED.completed_at,
                   timed_out = EXCLUDED.timed_out, halt_reason = EXCLUDED.halt_reason,
                   halt_message = EXCLUDED.halt_message, paused_since = EXCLUDED.paused_since,
                   paused_ms = EXCLUDED.paused_ms, batch_paused_ms = EXCLUDED.batch_paused_ms,
                   recent_starts = EXCLUDED.recent_starts",
            )
            .bind(id)
            .bind(s.step as i32)
            .bind(&actions)
            .bind(&s.clusters)
            .bind(s.max_concurrency as i32)
            .bind(s.timeout_minutes as i32)
            .bind(s.current_batch as i32)
            .bind(s.batch_started_at)
            .bind(s.started_at)
            .bind(s.completed_at)
            .bind(s.timed_out)
            .bind(s.batch_ends.iter().map(|e| *e as i32).collect::<Vec<i32>>())
            .bind(s.halt.as_ref().map(|h| h.reason.as_str()))
            .bind(s.halt.as_ref().map(|h| h.message.as_str()))
            .bind(s.paused_since)
            .bind(s.paused_ms)
            .bind(s.batch_paused_ms)
            .bind(&s.recent_starts)
            .execute(&mut *conn)
            .await
            ?;
        }
        let rows: Vec<(&String, &ClusterProgress)> = changed
            .get(&s.step)
            .into_iter()
            .flatten()
            .filter_map(|c| s.progress.get_key_value(c))
            .collect();
        if rows.is_empty() {
            continue;
        }
        wrote = true;
        // A step's start writes every cluster of it (100,000 at fleet scale): in parts, so
        // that the statement's arrays are never the whole fleet's at once.
        for part in rows.chunks(PROGRESS_PART) {
            progress_upsert(&mut *conn, id, s, part).await?;
        }
    }
    Ok(wrote)
}

/// Progress rows written by one statement at most.
const PROGRESS_PART: usize = 10_000;

/// One statement for changed rows of a step (the engine writes in batches).
pub(super) async fn progress_upsert(
    conn: &mut PgConnection,
    id: i64,
    s: &StepState,
    rows: &[(&String, &ClusterProgress)],
) -> Result<(), Error> {
    let mut clusters = Vec::new();
    let mut batch = Vec::new();
    let mut state = Vec::new();
    let mut action_index = Vec::new();
    let mut completed = Vec::new();
    let mut failed_action = Vec::new();
    let mut failure_message = Vec::new();
    let mut timed_out = Vec::new();
    let mut pushed_stage = Vec::new();
    let mut pushed_at = Vec::new();
    let mut attempts = Vec::new();
    let mut in_flight = Vec::new();
    let mut refused = Vec::new();
    let mut started = Vec::new();
    let mut action_started = Vec::new();
    let mut finished = Vec::new();
    let mut retries = Vec::new();
    let mut resetting = Vec::new();
    for (c, p) in rows {
        clusters.push((*c).clone());
        batch.push(p.batch as i32);
        state.push(phase_str(p.phase).to_string());
        action_index.push(p.action_index as i32);
        completed.push(
            p.completed
                .iter()
                .map(|a| a.as_str())
                .collect::<Vec<_>>()
                .join(","),
        );
        failed_action.push(p.failed.as_ref().map(|(a, _)| a.as_str().to_string()));
        failure_message.push(p.failed.as_ref().map(|(_, m)| m.clone()));
        timed_out.push(p.timed_out);
        pushed_stage.push(p.pushed_stage.map(|s| s.as_str().to_string()));
        pushed_at.push(p.pushed_at);
        attempts.push(p.push_failures as i32);
        in_flight.push(p.push_in_flight);
        refused.push(p.refused.clone());
        started.push(p.started_at);
        action_started.push(p.action_started_at);
        finished.push(p.finished_at);
        retries.push(p.retries as i32);
        resetting.push(p.resetting);
    }
    sqlx::query(
        "INSERT INTO rollout_clusters (rollout_id, step, cluster, batch, state, action_index, completed_actions,
           failed_action, failure_message, timed_out, pushed_stage, pushed_at, push_attempts, push_in_flight_since,
           refused, started_at, action_started_at, finished_at, retries, resetting)
         SELECT $1, $2, u.cluster, u.batch, u.state, u.action_index,
           CASE WHEN u.completed = '' THEN '{}'::text[] ELSE string_to_array(u.completed, ',') END,
           u.failed_action, u.failure_message, u.timed_out, u.pushed_stage, u.pushed_at, u.attempts, u.in_flight,
           u.refused, u.started, u.action_started, u.finished, u.retries, u.resetting
         FROM UNNEST($3::text[], $4::int4[], $5::text[], $6::int4[], $7::text[], $8::text[], $9::text[],
                     $10::bool[], $11::text[], $12::timestamptz[], $13::int4[], $14::timestamptz[], $15::text[],
                     $16::timestamptz[], $17::timestamptz[], $18::timestamptz[], $19::int4[], $20::bool[])
           AS u(cluster, batch, state, action_index, completed, failed_action, failure_message, timed_out,
                pushed_stage, pushed_at, attempts, in_flight, refused, started, action_started, finished,
                retries, resetting)
         ON CONFLICT (rollout_id, step, cluster) DO UPDATE SET batch = EXCLUDED.batch, state = EXCLUDED.state,
           action_index = EXCLUDED.action_index, completed_actions = EXCLUDED.completed_actions,
           failed_action = EXCLUDED.failed_action, failure_message = EXCLUDED.failure_message,
           timed_out = EXCLUDED.timed_out, pushed_stage = EXCLUDED.pushed_stage, pushed_at = EXCLUDED.pushed_at,
           push_attempts = EXCLUDED.push_attempts, push_in_flight_since = EXCLUDED.push_in_flight_since,
           refused = EXCLUDED.refused, started_at = EXCLUDED.started_at,
           action_started_at = EXCLUDED.action_started_at, finished_at = EXCLUDED.finished_at,
           retries = EXCLUDED.retries, resetting = EXCLUDED.resetting",
    )
    .bind(id)
    .bind(s.step as i32)
    .bind(&clusters)
    .bind(&batch)
    .bind(&state)
    .bind(&action_index)
    .bind(&completed)
    .bind(&failed_action)
    .bind(&failure_message)
    .bind(&timed_out)
    .bind(&pushed_stage)
    .bind(&pushed_at)
    .bind(&attempts)
    .bind(&in_flight)
    .bind(&refused)
    .bind(&started)
    .bind(&action_started)
    .bind(&finished)
    .bind(&retries)
    .bind(&resetting)
    .execute(conn)
    .await
    ?;
    Ok(())
}
