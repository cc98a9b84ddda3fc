#!/usr/bin/env python3
"""Writes the Grafana dashboards of fleet-hub (classic dashboard JSON) into this folder.

The JSON files are what Grafana loads and what the tests check; this script is how they are
edited: change it, run `python3 dashboards/generate.py`, commit both. Every panel reads its
datasource from a dashboard variable: `datasource` (Prometheus) or `history` (the hub's
Postgres, for the append-only history).
"""
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
PROM = {"type": "prometheus", "uid": "${datasource}"}
PG = {"type": "grafana-postgresql-datasource", "uid": "${history}"}
FAILURE_EVENTS = "'ActionFailed', 'ActionTimedOut', 'ClusterNotStarted'"
CONTROL_EVENTS = ("'RolloutHalted', 'StepHalted', 'Paused', 'Resumed', 'ActionRetried', "
                  "'WaitingForMaintenanceWindow'")


class Layout:
    """Places panels left to right, 24 columns wide, in rows."""

    def __init__(self):
        self.x = 0
        self.y = 0
        self.row_h = 0
        self.next_id = 1

    def place(self, w, h):
        if self.x + w > 24:
            self.x = 0
            self.y += self.row_h
            self.row_h = 0
        pos = {"x": self.x, "y": self.y, "w": w, "h": h}
        self.x += w
        self.row_h = max(self.row_h, h)
        pid = self.next_id
        self.next_id += 1
        return pid, pos


def prom_targets(queries):
    return [
        {"datasource": PROM, "expr": expr, "legendFormat": legend, "refId": chr(65 + i)}
        for i, (expr, legend) in enumerate(queries)
    ]


def panel(layout, kind, title, unit, description, targets, datasource, w=12, h=8, **extra):
    pid, pos = layout.place(w, h)
    p = {
        "id": pid,
        "type": kind,
        "title": title,
        "description": description,
        "datasource": datasource,
        "gridPos": pos,
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {},
        "targets": targets,
    }
    if kind == "timeseries":
        p["options"] = {"legend": {"displayMode": "table", "placement": "right", "showLegend": True},
                        "tooltip": {"mode": "multi", "sort": "desc"}}
    if kind == "stat":
        p["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                        "colorMode": "value", "graphMode": "area"}
    if kind == "bargauge":
        p["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                        "displayMode": "gradient", "orientation": "horizontal"}
    p.update(extra)
    return p


def prom(layout, kind, title, unit, description, queries, **kw):
    return panel(layout, kind, title, unit, description, prom_targets(queries), PROM, **kw)


def sql(layout, kind, title, unit, description, query, fmt="table", **kw):
    target = {"datasource": PG, "editorMode": "code", "format": fmt, "rawQuery": True,
              "rawSql": query, "refId": "A"}
    return panel(layout, kind, title, unit, description, [target], PG, **kw)


def datasource_vars():
    return [
        {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
         "current": {}, "hide": 0, "refresh": 1, "options": []},
        {"name": "history", "label": "History (Postgres)", "type": "datasource",
         "query": "grafana-postgresql-datasource", "current": {}, "hide": 0, "refresh": 1,
         "options": []},
    ]


def dashboard(uid, title, description, panels, extra_vars=(), tags=()):
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["fleet-hub", *tags],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "annotations": {"list": []},
        "links": [{"type": "dashboards", "tags": ["fleet-hub"], "asDropdown": True,
                   "title": "fleet-hub dashboards", "includeVars": False, "keepTime": True}],
        "templating": {"list": [*datasource_vars(), *extra_vars]},
        "panels": panels,
    }


def fleet_overview():
    l = Layout()
    panels = [
        prom(l, "stat", "Registered spokes", "none", "Clusters registered with the hub.",
             [("sum(fleet_hub_spokes_registered)", "registered")], w=6, h=5),
        prom(l, "stat", "Unreachable spokes", "none",
             "Registered clusters whose last stage push failed to reach them.",
             [("sum(fleet_hub_spokes_registered) - sum(fleet_hub_spokes_reachable)", "unreachable")],
             w=6, h=5),
        prom(l, "stat", "Active rollouts", "none", "ImageBasedGroupUpgrades not completed yet.",
             [('sum(fleet_hub_rollouts{phase!="Completed"})', "active")], w=6, h=5),
        prom(l, "stat", "Rollouts halted", "none",
             "Rollouts a failure budget or a failed canary halted (they stay until deleted).",
             [("count(fleet_hub_rollout_halted) or vector(0)", "halted")], w=6, h=5),
        prom(l, "stat", "Rollouts paused", "none", "Unfinished rollouts with spec.paused.",
             [("count(fleet_hub_rollout_paused) or vector(0)", "paused")], w=6, h=5),
        prom(l, "stat", "Prep retries (1h)", "none",
             "Failed Preps aborted and tried again (rolloutStrategy.retries) in the last hour.",
             [('sum(increase(fleet_hub_rollout_events_total{event="ActionRetried"}[1h]))', "retries")],
             w=6, h=5),
        prom(l, "stat", "Rollouts held by window or rate", "none",
             "Rollouts whose last pass held starts back for the maintenance window or maxStartsPerMinute.",
             [('count(fleet_hub_rollout_starts_held{reason!="paused"}) or vector(0)', "held")],
             w=6, h=5),
        prom(l, "stat", "Cluster actions failed (1h)", "none",
             "Cluster actions that failed or timed out in the last hour.",
             [('sum(increase(fleet_hub_action_duration_seconds_count{result!="completed"}[1h]))',
               "failed")], w=6, h=5),
        prom(l, "bargauge", "Clusters by IBU stage and state", "none",
             "What the spoke agents report: desired stage and the reason of the last condition.",
             [("sum by (stage, state) (spoke_ibu_clusters)", "{{stage}} / {{state}}")]),
        prom(l, "bargauge", "Cluster actions of active rollouts", "none",
             "Every cluster action of the started steps of active rollouts, by state.",
             [("sum by (action, state) (fleet_hub_cluster_actions)", "{{action}} {{state}}")]),
        prom(l, "timeseries", "Cluster actions per minute", "none",
             "Cluster actions ending per minute, by action and result.",
             [("sum by (action, result) (rate(fleet_hub_action_duration_seconds_count[$__rate_interval])) * 60",
               "{{action}} {{result}}")]),
        prom(l, "timeseries", "Failures per minute", "none",
             "Cluster actions failing or timing out per minute; pushes refused by spokes.",
             [('sum by (action, result) (rate(fleet_hub_action_duration_seconds_count{result!="completed"}[$__rate_interval])) * 60',
               "{{action}} {{result}}"),
              ('sum(rate(fleet_hub_spoke_pushes_total{result="refused"}[$__rate_interval])) * 60',
               "pushes refused")]),
        prom(l, "timeseries", "Rollouts by phase", "none", "ImageBasedGroupUpgrades by phase.",
             [("sum by (phase) (fleet_hub_rollouts)", "{{phase}}")]),
        prom(l, "timeseries", "Unreachable spokes", "none",
             "Registered clusters whose last stage push failed to reach them.",
             [("sum(fleet_hub_spokes_registered) - sum(fleet_hub_spokes_reachable)", "unreachable")]),
        sql(l, "table", "Recent failures", "none",
            "The last 100 failed, timed out or never started cluster actions, from the history.",
            "SELECT time, rollout_namespace || '/' || rollout_name AS rollout, step, cluster, "
            "action, event, message FROM history WHERE event IN (" + FAILURE_EVENTS + ") "
            "AND $__timeFilter(time) ORDER BY id DESC LIMIT 100", w=24, h=9),
    ]
    return dashboard("fleet-overview", "Fleet overview",
                     "The fleet at a glance: clusters by IBU state, active rollouts, actions per minute, failures, unreachable spokes.",
                     panels)


def rollout_detail():
    l = Layout()
    sel = "rollout_namespace = '$namespace' AND rollout_name = '$rollout'"
    match = 'namespace="$namespace", rollout="$rollout"'
    variables = [
        {"name": "namespace", "label": "Namespace", "type": "query", "datasource": PG,
         "query": "SELECT DISTINCT rollout_namespace FROM history ORDER BY 1",
         "definition": "SELECT DISTINCT rollout_namespace FROM history ORDER BY 1",
         "refresh": 2, "current": {}, "hide": 0, "options": [], "sort": 1},
        {"name": "rollout", "label": "Rollout", "type": "query", "datasource": PG,
         "query": "SELECT DISTINCT rollout_name FROM history WHERE rollout_namespace = '$namespace' ORDER BY 1",
         "definition": "SELECT DISTINCT rollout_name FROM history WHERE rollout_namespace = '$namespace' ORDER BY 1",
         "refresh": 2, "current": {}, "hide": 0, "options": [], "sort": 1},
    ]
    panels = [
        prom(l, "timeseries", "Clusters per step and state", "none",
             "Clusters of each started step of the rollout, by state (while the rollout is active).",
             [(f"sum by (step, state) (fleet_hub_rollout_clusters{{{match}}})", "step {{step}} {{state}}")]),
        prom(l, "bargauge", "Batch per step", "none",
             "The batch each started step is on, out of its batch count (while the rollout is active).",
             [(f"max by (step) (fleet_hub_rollout_step_batch{{{match}}})", "step {{step}} batch"),
              (f"max by (step) (fleet_hub_rollout_step_batches{{{match}}})", "step {{step}} batches")]),
        sql(l, "timeseries", "Cluster actions ended per minute", "none",
            "From the history: cluster actions of this rollout that completed, failed or timed out, per minute.",
            "SELECT $__timeGroupAlias(time, '1m'), action || ' ' || event AS metric, count(*) AS value "
            "FROM history WHERE " + sel + " AND event IN ('ActionCompleted', " + FAILURE_EVENTS + ") "
            "AND $__timeFilter(time) GROUP BY 1, 2 ORDER BY 1", fmt="time_series"),
        prom(l, "timeseries", "Action duration (p50, p90), all rollouts", "s",
             "How long cluster actions take, by action (every rollout of the hub).",
             [("histogram_quantile(0.5, sum by (le, action) (rate(fleet_hub_action_duration_seconds_bucket[$__rate_interval])))",
               "{{action}} p50"),
              ("histogram_quantile(0.9, sum by (le, action) (rate(fleet_hub_action_duration_seconds_bucket[$__rate_interval])))",
               "{{action}} p90")]),
        sql(l, "table", "Steps and batches", "none",
            "When each step and batch of the rollout started, completed or timed out.",
            "SELECT time, step, event, message FROM history WHERE " + sel + " AND event IN "
            "('StepStarted', 'StepCompleted', 'StepTimedOut', 'BatchStarted', 'BatchTimedOut') "
            "ORDER BY id", w=24, h=8),
        sql(l, "table", "Action durations per cluster", "s",
            "From the history: how long each cluster spent on each action of the rollout.",
            "SELECT e.cluster, e.step, e.action, e.event AS result, "
            "extract(epoch FROM e.time - s.time) AS seconds, e.message FROM history e "
            "JOIN LATERAL (SELECT time FROM history s WHERE s.rollout_id = e.rollout_id "
            "AND s.cluster = e.cluster AND s.step = e.step AND s.action = e.action "
            "AND s.event = 'ActionStarted' AND s.id < e.id ORDER BY s.id DESC LIMIT 1) s ON true "
            "WHERE e." + sel.replace(" AND ", " AND e.") + " AND e.event IN "
            "('ActionCompleted', 'ActionFailed', 'ActionTimedOut') ORDER BY seconds DESC LIMIT 500",
            w=12, h=10),
        sql(l, "table", "Failures", "none",
            "Every failed, timed out or never started cluster action of the rollout, with the spoke's message.",
            "SELECT time, step, cluster, action, event, message FROM history WHERE " + sel +
            " AND event IN (" + FAILURE_EVENTS + ") ORDER BY id", w=12, h=10),
        prom(l, "stat", "Halted", "none",
             "1 once a plan item halted (failure budget exceeded or a canary failed): final, "
             "create a new IBGU to go on.",
             [(f"max(fleet_hub_rollout_halted{{{match}}}) or vector(0)", "halted")], w=6, h=5),
        prom(l, "stat", "Paused", "none", "1 while spec.paused holds every start back.",
             [(f"max(fleet_hub_rollout_paused{{{match}}}) or vector(0)", "paused")], w=6, h=5),
        prom(l, "timeseries", "Starts held back", "none",
             "Why the rollout's last pass held cluster starts back: paused, window (outside the "
             "maintenance window) or rate (maxStartsPerMinute reached); 0 while nothing holds them.",
             [(f"max by (reason) (fleet_hub_rollout_starts_held{{{match}}}) or vector(0)", "{{reason}}")],
             w=12, h=5),
        sql(l, "table", "Rollout controls", "none",
            "From the history: halts, pauses and resumes (with who asked), Prep retries and "
            "maintenance window waits.",
            "SELECT time, step, cluster, event, actor, message FROM history WHERE " + sel +
            " AND event IN (" + CONTROL_EVENTS + ") ORDER BY id", w=24, h=8),
    ]
    return dashboard("fleet-rollout-detail", "Rollout detail",
                     "One ImageBasedGroupUpgrade: progress per step and batch, action durations, failures.",
                     panels, variables)


def hub_internals():
    l = Layout()
    panels = [
        prom(l, "timeseries", "HTTP requests per second", "reqps",
             "Requests answered by the REST API, by route template and status code.",
             [("sum by (route, status) (rate(fleet_hub_http_requests_total[$__rate_interval]))",
               "{{route}} {{status}}")]),
        prom(l, "timeseries", "HTTP latency p99", "s", "99th percentile time to answer, by route.",
             [("histogram_quantile(0.99, sum by (le, route) (rate(fleet_hub_http_request_duration_seconds_bucket[$__rate_interval])))",
               "{{route}}")]),
        prom(l, "timeseries", "Decision latency", "s",
             "Spoke report stored -> next stage push sent: p50, p99 and the largest seen.",
             [("histogram_quantile(0.5, sum by (le) (rate(fleet_hub_decision_latency_seconds_bucket[$__rate_interval])))", "p50"),
              ("histogram_quantile(0.99, sum by (le) (rate(fleet_hub_decision_latency_seconds_bucket[$__rate_interval])))", "p99"),
              ("max(fleet_hub_decision_latency_max_seconds)", "max since start")]),
        prom(l, "timeseries", "Engine pass duration", "s",
             "Time of one engine pass over one rollout (load, plan, store): p50 and p99; passes per second.",
             [("histogram_quantile(0.5, sum by (le) (rate(fleet_hub_engine_pass_duration_seconds_bucket[$__rate_interval])))", "p50"),
              ("histogram_quantile(0.99, sum by (le) (rate(fleet_hub_engine_pass_duration_seconds_bucket[$__rate_interval])))", "p99")]),
        prom(l, "timeseries", "Stage pushes per second", "ops",
             "Stage transitions pushed to spokes, by result (accepted, refused, unreachable).",
             [("sum by (result) (rate(fleet_hub_spoke_pushes_total[$__rate_interval]))", "{{result}}")]),
        prom(l, "timeseries", "Spoke reports per second", "ops",
             "Status reports from spokes, by result (stored, stale, rejected).",
             [("sum by (result) (rate(fleet_hub_spoke_reports_total[$__rate_interval]))", "{{result}}")]),
        prom(l, "timeseries", "Database pool", "none",
             "Connections of the hub's Postgres pool in use and idle, and its limit.",
             [("sum by (state) (fleet_hub_db_pool_connections)", "{{state}}"),
              ("max(fleet_hub_db_pool_max_connections)", "max")]),
        prom(l, "timeseries", "Rollout events per second", "ops",
             "Events written to the history, by event.",
             [("sum by (event) (rate(fleet_hub_rollout_events_total[$__rate_interval]))", "{{event}}")]),
        prom(l, "timeseries", "Kubernetes requests per second", "reqps",
             "Requests of the hub's Kubernetes client (--kube), by verb and result.",
             [("sum by (verb, result) (rate(fleet_hub_kube_requests_total[$__rate_interval]))",
               "{{verb}} {{result}}")]),
        prom(l, "timeseries", "Kubernetes request latency p99", "s",
             "99th percentile time of the hub's Kubernetes requests, by verb.",
             [("histogram_quantile(0.99, sum by (le, verb) (rate(fleet_hub_kube_request_duration_seconds_bucket[$__rate_interval])))",
               "{{verb}}")]),
        prom(l, "timeseries", "IBGU reconcile errors per minute", "none",
             "Reconciles of ImageBasedGroupUpgrade CRs that failed and were retried (--kube), by error.",
             [("sum by (error) (rate(fleet_hub_kube_reconcile_errors_total[$__rate_interval])) * 60",
               "{{error}}")]),
        prom(l, "stat", "Hub version", "none", "Versions of the running hub replicas.",
             [("count by (version) (fleet_hub_build_info)", "{{version}}")], w=12, h=8),
    ]
    return dashboard("fleet-hub-internals", "Hub internals",
                     "The hub itself: HTTP, engine passes, decision latency, pushes and reports, database pool, Kubernetes client.",
                     panels)


def spoke_agent():
    l = Layout()
    panels = [
        prom(l, "bargauge", "Agents by stage and state", "none",
             "Agents by desired stage and the reason of their last condition.",
             [("sum by (stage, state) (spoke_ibu_clusters)", "{{stage}} / {{state}}")]),
        prom(l, "stat", "Automatic rollbacks (24h)", "none",
             "Rollbacks the agents started on their own (init-monitor watchdog, post-reboot failure).",
             [("sum(increase(spoke_auto_rollbacks_total[24h]))", "rollbacks")]),
        prom(l, "timeseries", "Stage duration p50 / p90", "s",
             "How long Prep, Upgrade and Rollback take, by stage, for completed stages.",
             [('histogram_quantile(0.5, sum by (le, stage) (rate(spoke_stage_duration_seconds_bucket{result="completed"}[$__rate_interval])))',
               "{{stage}} p50"),
              ('histogram_quantile(0.9, sum by (le, stage) (rate(spoke_stage_duration_seconds_bucket{result="completed"}[$__rate_interval])))',
               "{{stage}} p90")]),
        prom(l, "timeseries", "Phase duration p90", "s",
             "How long each phase of a stage takes (Stateroot, Precache, PrePivot, PostPivot, ...).",
             [("histogram_quantile(0.9, sum by (le, stage, phase) (rate(spoke_phase_duration_seconds_bucket[$__rate_interval])))",
               "{{stage}} {{phase}}")]),
        prom(l, "timeseries", "Stages ended per minute", "none",
             "Stages completing and failing per minute.",
             [("sum by (stage, result) (rate(spoke_stage_duration_seconds_count[$__rate_interval])) * 60",
               "{{stage}} {{result}}")]),
        prom(l, "timeseries", "Stage requests per second", "ops",
             "Stage requests to the agents' API, accepted or refused.",
             [("sum by (result) (rate(spoke_transitions_total[$__rate_interval]))", "{{result}}")]),
        prom(l, "timeseries", "Reports to the hub per second", "ops",
             "Status reports sent to the hub and failed attempts.",
             [("sum by (result) (rate(spoke_reports_total[$__rate_interval]))", "{{result}}")]),
        prom(l, "timeseries", "Automatic rollbacks", "none", "Automatic rollbacks started per hour.",
             [("sum(increase(spoke_auto_rollbacks_total[1h]))", "per hour")]),
        prom(l, "stat", "Agent version", "none", "Versions of the running agents.",
             [("count by (version) (spoke_build_info)", "{{version}}")], w=24, h=4),
    ]
    return dashboard("fleet-spoke-agent", "Spoke agent",
                     "The agents on the clusters: stage and phase timings, stage requests, reports, automatic rollbacks.",
                     panels, tags=("spoke",))


def main():
    # The hub's chart ships the same files (a chart cannot read outside its folder).
    chart = os.path.join(HERE, "..", "charts", "fleet-hub", "dashboards")
    os.makedirs(chart, exist_ok=True)
    for name, d in [("fleet-overview", fleet_overview()), ("rollout-detail", rollout_detail()),
                    ("hub-internals", hub_internals()), ("spoke-agent", spoke_agent())]:
        for folder in (HERE, chart):
            with open(os.path.join(folder, name + ".json"), "w") as f:
                json.dump(d, f, indent=2)
                f.write("\n")
    # And the alert rules, which are written by hand in alerts/.
    alerts = os.path.join(HERE, "..", "charts", "fleet-hub", "alerts")
    os.makedirs(alerts, exist_ok=True)
    with open(os.path.join(HERE, "alerts", "fleet-hub.rules.yml")) as src:
        rules = src.read()
    with open(os.path.join(alerts, "fleet-hub.rules.yml"), "w") as dst:
        dst.write(rules)


if __name__ == "__main__":
    main()
