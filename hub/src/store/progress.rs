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

pub async fn rollout_steps_in_txn(
    conn: &mut PgConnection,
    id: i64,
) -> Result<Vec<StepState>, Error> {
    let rows = sqlx::query(
        "SELECT step, actions, clusters, max_concurrency, timeout_minutes, current_batch, batch_started_at,
                started_at, completed_at, timed_out
         FROM rollout_steps WHERE rollout_id = $1 ORDER BY step",
    )
    .bind(id)
    .fetch_all(&mut *conn)
    .await
    ?;
    let mut steps = Vec::with_capacity(rows.len());
    for r in rows {
        let actions: Vec<String> = r.try_get("actions")?;
        let started_at: DateTime<Utc> = r.try_get("started_at")?;
        steps.push(StepState {
            step: r.try_get::<i32, _>("step")? as usize,
            actions: actions
                .iter()
                .map(|a| parse_action(a))
                .collect::<Result<_, _>>()?,
            clusters: r.try_get("clusters")?,
            max_concurrency: r.try_get::<i32, _>("max_concurrency")? as usize,
            timeout_minutes: r.try_get::<i32, _>("timeout_minutes")? as i64,
            started_at,
            current_batch: r.try_get::<i32, _>("current_batch")? as usize,
            batch_started_at: r
                .try_get::<Option<DateTime<Utc>>, _>("batch_started_at")?
                .unwrap_or(started_at),
            completed_at: r.try_get("completed_at")?,
            timed_out: r.try_get("timed_out")?,
            progress: BTreeMap::new(),
        });
    }
    let rows = sqlx::query(
        "SELECT step, cluster, batch, state, action_index, completed_actions, failed_action, failure_message,
                timed_out, pushed_stage, pushed_at, push_attempts, refused, started_at, action_started_at, finished_at
         FROM rollout_clusters WHERE rollout_id = $1",
    )
    .bind(id)
    .fetch_all(&mut *conn)
    .await
    ?;
    for r in rows {
        let step: i32 = r.try_get("step")?;
        let completed: Vec<String> = r.try_get("completed_actions")?;
        let failed_action: Option<String> = r.try_get("failed_action")?;
        let pushed_stage: Option<String> = r.try_get("pushed_stage")?;
        let progress = ClusterProgress {
            batch: r.try_get::<i32, _>("batch")? as usize,
            phase: parse_phase(r.try_get::<String, _>("state")?.as_str()),
            action_index: r.try_get::<i32, _>("action_index")? as usize,
            completed: completed
                .iter()
                .map(|a| parse_action(a))
                .collect::<Result<_, _>>()?,
            failed: match failed_action {
                Some(a) => Some((
                    parse_action(&a)?,
                    r.try_get::<Option<String>, _>("failure_message")?
                        .unwrap_or_default(),
                )),
                None => None,
            },
            timed_out: r.try_get("timed_out")?,
            pushed_stage: pushed_stage
                .and_then(|s| serde_json::from_value::<Stage>(Value::String(s)).ok()),
            pushed_at: r.try_get("pushed_at")?,
            push_failures: r.try_get::<i32, _>("push_attempts")? as u32,
            refused: r.try_get("refused")?,
            started_at: r.try_get("started_at")?,
            action_started_at: r.try_get("action_started_at")?,
            finished_at: r.try_get("finished_at")?,
        };
        let cluster: String = r.try_get("cluster")?;
        if let Some(s) = steps.get_mut(step as usize) {
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
                   current_batch, batch_started_at, started_at, completed_at, timed_out)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
                 ON CONFLICT (rollout_id, step) DO UPDATE SET current_batch = EXCLUDED.current_batch,
                   batch_started_at = EXCLUDED.batch_started_at, completed_at = EXCLUDED.completed_at,
                   timed_out = EXCLUDED.timed_out",
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
        progress_upsert(&mut *conn, id, s, &rows).await?;
    }
    Ok(wrote)
}

/// One statement for all changed rows of a step (the engine writes in batches).
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
    let mut refused = Vec::new();
    let mut started = Vec::new();
    let mut action_started = Vec::new();
    let mut finished = Vec::new();
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
        refused.push(p.refused.clone());
        started.push(p.started_at);
        action_started.push(p.action_started_at);
        finished.push(p.finished_at);
    }
    sqlx::query(
        "INSERT INTO rollout_clusters (rollout_id, step, cluster, batch, state, action_index, completed_actions,
           failed_action, failure_message, timed_out, pushed_stage, pushed_at, push_attempts, refused,
           started_at, action_started_at, finished_at)
         SELECT $1, $2, u.cluster, u.batch, u.state, u.action_index,
           CASE WHEN u.completed = '' THEN '{}'::text[] ELSE string_to_array(u.completed, ',') END,
           u.failed_action, u.failure_message, u.timed_out, u.pushed_stage, u.pushed_at, u.attempts, u.refused,
           u.started, u.action_started, u.finished
         FROM UNNEST($3::text[], $4::int4[], $5::text[], $6::int4[], $7::text[], $8::text[], $9::text[],
                     $10::bool[], $11::text[], $12::timestamptz[], $13::int4[], $14::text[],
                     $15::timestamptz[], $16::timestamptz[], $17::timestamptz[])
           AS u(cluster, batch, state, action_index, completed, failed_action, failure_message, timed_out,
                pushed_stage, pushed_at, attempts, refused, started, action_started, finished)
         ON CONFLICT (rollout_id, step, cluster) DO UPDATE SET batch = EXCLUDED.batch, state = EXCLUDED.state,
           action_index = EXCLUDED.action_index, completed_actions = EXCLUDED.completed_actions,
           failed_action = EXCLUDED.failed_action, failure_message = EXCLUDED.failure_message,
           timed_out = EXCLUDED.timed_out, pushed_stage = EXCLUDED.pushed_stage, pushed_at = EXCLUDED.pushed_at,
           push_attempts = EXCLUDED.push_attempts, refused = EXCLUDED.refused, started_at = EXCLUDED.started_at,
           action_started_at = EXCLUDED.action_started_at, finished_at = EXCLUDED.finished_at",
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
    .bind(&refused)
    .bind(&started)
    .bind(&action_started)
    .bind(&finished)
    .execute(conn)
    .await
    ?;
    Ok(())
}
