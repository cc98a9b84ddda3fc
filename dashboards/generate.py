#!/usr/bin/env python3
"""Writes the Grafana dashboards of fleet-hub (dashboard JSON) into this folder, built with
Grafana Labs' grafana-foundation-sdk (PyPI, pinned in requirements.txt): panels, queries,
variables and the layout are the SDK's typed builders.

The JSON files are what Grafana loads and what the tests check; this script is how they are
edited: change it, run `python3 dashboards/generate.py`, commit both (`--check` fails when
the committed files differ, as CI runs it). Every panel reads its datasource from a dashboard
variable: `datasource` (Prometheus) or `history` (the hub's Postgres, for the append-only
history).
"""
import argparse
import json
import os
import sys

from grafana_foundation_sdk.builders import bargauge, stat, table, timeseries
from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog import variants as cogvariants
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm

HERE = os.path.dirname(os.path.abspath(__file__))
PROM = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
PG = dm.DataSourceRef(type_val="grafana-postgresql-datasource", uid="${history}")
FAILURE_EVENTS = "'ActionFailed', 'ActionTimedOut', 'ClusterNotStarted'"
CONTROL_EVENTS = ("'RolloutHalted', 'StepHalted', 'Paused', 'Resumed', 'ActionRetried', "
                  "'WaitingForMaintenanceWindow'")


class SqlQuery(cogvariants.Dataquery):
    """A raw SQL query of Grafana's Postgres datasource (the SDK has no builder for it)."""

    def __init__(self, sql, fmt):
        self.sql = sql
        self.fmt = fmt

    def to_json(self):
        return {"datasource": PG, "editorMode": "code", "format": self.fmt, "rawQuery": True,
                "rawSql": self.sql, "refId": "A"}


class Sql(cogbuilder.Builder[cogvariants.Dataquery]):
    def __init__(self, sql, fmt):
        self._query = SqlQuery(sql, fmt)

    def build(self):
        return self._query


KINDS = {"timeseries": timeseries.Panel, "stat": stat.Panel, "bargauge": bargauge.Panel,
         "table": table.Panel}


def reduce_last():
    return cb.ReduceDataOptions().calcs(["lastNotNull"]).fields("").values(False)


def panel(kind, title, unit, description, targets, datasource, w=12, h=8):
    p = (KINDS[kind]().title(title).description(description).unit(unit)
         .datasource(datasource).span(w).height(h).targets(targets))
    if kind == "timeseries":
        p = (p.legend(cb.VizLegendOptions().display_mode(cm.LegendDisplayMode.TABLE)
                      .placement(cm.LegendPlacement.RIGHT).show_legend(True))
             .tooltip(cb.VizTooltipOptions().mode(cm.TooltipDisplayMode.MULTI)
                      .sort(cm.SortOrder.DESCENDING)))
    if kind == "stat":
        p = (p.reduce_options(reduce_last()).color_mode(cm.BigValueColorMode.VALUE)
             .graph_mode(cm.BigValueGraphMode.AREA))
    if kind == "bargauge":
        p = (p.reduce_options(reduce_last()).display_mode(cm.BarGaugeDisplayMode.GRADIENT)
             .orientation(cm.VizOrientation.HORIZONTAL))
    return p


def prom(kind, title, unit, description, queries, **kw):
    targets = [prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(chr(65 + i))
               .datasource(PROM) for i, (expr, legend) in enumerate(queries)]
    return panel(kind, title, unit, description, targets, PROM, **kw)


def sql(kind, title, unit, description, query, fmt="table", **kw):
    return panel(kind, title, unit, description, [Sql(query, fmt)], PG, **kw)


def sql_variable(name, label, query):
    return (db.QueryVariable(name).label(label).datasource(PG).query(query)
            .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(dm.VariableSort.ALPHABETICAL_ASC))


def dashboard(uid, title, description, panels, extra_vars=(), tags=()):
    d = (db.Dashboard(title).uid(uid).description(description).tags(["fleet-hub", *tags])
         .timezone("browser").editable().tooltip(dm.DashboardCursorSync.CROSSHAIR)
         .refresh("10s").time("now-1h", "now")
         .link(db.DashboardLink("fleet-hub dashboards").type(dm.DashboardLinkType.DASHBOARDS)
               .tags(["fleet-hub"]).as_dropdown(True).include_vars(False).keep_time(True))
         .with_variable(db.DatasourceVariable("datasource").label("Prometheus").type("prometheus"))
         .with_variable(db.DatasourceVariable("history").label("History (Postgres)")
                        .type("grafana-postgresql-datasource")))
    for v in extra_vars:
        d = d.with_variable(v)
    for i, p in enumerate(panels, start=1):
        d = d.with_panel(p.id(i))
    return d.build()


def fleet_overview():
    panels = [
        prom("stat", "Registered spokes", "none", "Clusters registered with the hub.",
             [("sum(fleet_hub_spokes_registered)", "registered")], w=6, h=5),
        prom("stat", "Unreachable spokes", "none",
             "Registered clusters whose last stage push failed to reach them.",
             [("sum(fleet_hub_spokes_registered) - sum(fleet_hub_spokes_reachable)", "unreachable")],
             w=6, h=5),
        prom("stat", "Active rollouts", "none", "ImageBasedGroupUpgrades not completed yet.",
             [('sum(fleet_hub_rollouts{phase!="Completed"})', "active")], w=6, h=5),
        prom("stat", "Rollouts halted", "none",
             "Rollouts a failure budget or a failed canary halted (they stay until deleted).",
             [("count(fleet_hub_rollout_halted) or vector(0)", "halted")], w=6, h=5),
        prom("stat", "Rollouts paused", "none", "Unfinished rollouts with spec.paused.",
             [("count(fleet_hub_rollout_paused) or vector(0)", "paused")], w=6, h=5),
        prom("stat", "Prep retries (1h)", "none",
             "Failed Preps aborted and tried again (rolloutStrategy.retries) in the last hour.",
             [('sum(increase(fleet_hub_rollout_events_total{event="ActionRetried"}[1h]))', "retries")],
             w=6, h=5),
        prom("stat", "Rollouts held by window or rate", "none",
             "Rollouts whose last pass held starts back for the maintenance window or maxStartsPerMinute.",
             [('count(fleet_hub_rollout_starts_held{reason!="paused"}) or vector(0)', "held")],
             w=6, h=5),
        prom("stat", "Cluster actions failed (1h)", "none",
             "Cluster actions that failed or timed out in the last hour.",
             [('sum(increase(fleet_hub_action_duration_seconds_count{result!="completed"}[1h]))',
               "failed")], w=6, h=5),
        prom("bargauge", "Clusters by IBU stage and state", "none",
             "What the spoke agents report: desired stage and the reason of the last condition.",
             [("sum by (stage, state) (spoke_ibu_clusters)", "{{stage}} / {{state}}")]),
        prom("bargauge", "Cluster actions of active rollouts", "none",
             "Every cluster action of the started steps of active rollouts, by state.",
             [("sum by (action, state) (fleet_hub_cluster_actions)", "{{action}} {{state}}")]),
        prom("timeseries", "Cluster actions per minute", "none",
             "Cluster actions ending per minute, by action and result.",
             [("sum by (action, result) (rate(fleet_hub_action_duration_seconds_count[$__rate_interval])) * 60",
               "{{action}} {{result}}")]),
        prom("timeseries", "Failures per minute", "none",
             "Cluster actions failing or timing out per minute; pushes refused by spokes.",
             [('sum by (action, result) (rate(fleet_hub_action_duration_seconds_count{result!="completed"}[$__rate_interval])) * 60',
               "{{action}} {{result}}"),
              ('sum(rate(fleet_hub_spoke_pushes_total{result="refused"}[$__rate_interval])) * 60',
               "pushes refused")]),
        prom("timeseries", "Rollouts by phase", "none", "ImageBasedGroupUpgrades by phase.",
             [("sum by (phase) (fleet_hub_rollouts)", "{{phase}}")]),
        prom("timeseries", "Unreachable spokes", "none",
             "Registered clusters whose last stage push failed to reach them.",
             [("sum(fleet_hub_spokes_registered) - sum(fleet_hub_spokes_reachable)", "unreachable")]),
        sql("table", "Recent failures", "none",
            "The last 100 failed, timed out or never started cluster actions, from the history.",
            "SELECT time, rollout_namespace || '/' || rollout_name AS rollout, step, cluster, "
            "action, event, message FROM history WHERE event IN (" + FAILURE_EVENTS + ") "
            "AND $__timeFilter(time) ORDER BY id DESC LIMIT 100", w=24, h=9),
    ]
    return dashboard("fleet-overview", "Fleet overview",
                     "The fleet at a glance: clusters by IBU state, active rollouts, actions per minute, failures, unreachable spokes.",
                     panels)


def rollout_detail():
    sel = "rollout_namespace = '$namespace' AND rollout_name = '$rollout'"
    match = 'namespace="$namespace", rollout="$rollout"'
    variables = [
        sql_variable("namespace", "Namespace",
                     "SELECT DISTINCT rollout_namespace FROM history ORDER BY 1"),
        sql_variable("rollout", "Rollout",
                     "SELECT DISTINCT rollout_name FROM history "
                     "WHERE rollout_namespace = '$namespace' ORDER BY 1"),
    ]
    panels = [
        prom("timeseries", "Clusters per step and state", "none",
             "Clusters of each started step of the rollout, by state (while the rollout is active).",
             [(f"sum by (step, state) (fleet_hub_rollout_clusters{{{match}}})", "step {{step}} {{state}}")]),
        prom("bargauge", "Batch per step", "none",
             "The batch each started step is on, out of its batch count (while the rollout is active).",
             [(f"max by (step) (fleet_hub_rollout_step_batch{{{match}}})", "step {{step}} batch"),
              (f"max by (step) (fleet_hub_rollout_step_batches{{{match}}})", "step {{step}} batches")]),
        sql("timeseries", "Cluster actions ended per minute", "none",
            "From the history: cluster actions of this rollout that completed, failed or timed out, per minute.",
            "SELECT $__timeGroupAlias(time, '1m'), action || ' ' || event AS metric, count(*) AS value "
            "FROM history WHERE " + sel + " AND event IN ('ActionCompleted', " + FAILURE_EVENTS + ") "
            "AND $__timeFilter(time) GROUP BY 1, 2 ORDER BY 1", fmt="time_series"),
        prom("timeseries", "Action duration (p50, p90), all rollouts", "s",
             "How long cluster actions take, by action (every rollout of the hub).",
             [("histogram_quantile(0.5, sum by (le, action) (rate(fleet_hub_action_duration_seconds_bucket[$__rate_interval])))",
               "{{action}} p50"),
              ("histogram_quantile(0.9, sum by (le, action) (rate(fleet_hub_action_duration_seconds_bucket[$__rate_interval])))",
               "{{action}} p90")]),
        sql("table", "Steps and batches", "none",
            "When each step and batch of the rollout started, completed or timed out.",
            "SELECT time, step, event, message FROM history WHERE " + sel + " AND event IN "
            "('StepStarted', 'StepCompleted', 'StepTimedOut', 'BatchStarted', 'BatchTimedOut') "
            "ORDER BY id", w=24, h=8),
        sql("table", "Action durations per cluster", "s",
            "From the history: how long each cluster spent on each action of the rollout.",
            "SELECT e.cluster, e.step, e.action, e.event AS result, "
            "extract(epoch FROM e.time - s.time) AS seconds, e.message FROM history e "
            "JOIN LATERAL (SELECT time FROM history s WHERE s.rollout_id = e.rollout_id "
            "AND s.cluster = e.cluster AND s.step = e.step AND s.action = e.action "
            "AND s.event = 'ActionStarted' AND s.id < e.id ORDER BY s.id DESC LIMIT 1) s ON true "
            "WHERE e." + sel.replace(" AND ", " AND e.") + " AND e.event IN "
            "('ActionCompleted', 'ActionFailed', 'ActionTimedOut') ORDER BY seconds DESC LIMIT 500",
            w=12, h=10),
        sql("table", "Failures", "none",
            "Every failed, timed out or never started cluster action of the rollout, with the spoke's message.",
            "SELECT time, step, cluster, action, event, message FROM history WHERE " + sel +
            " AND event IN (" + FAILURE_EVENTS + ") ORDER BY id", w=12, h=10),
        prom("stat", "Halted", "none",
             "1 once a plan item halted (failure budget exceeded or a canary failed): final, "
             "create a new IBGU to go on.",
             [(f"max(fleet_hub_rollout_halted{{{match}}}) or vector(0)", "halted")], w=6, h=5),
        prom("stat", "Paused", "none", "1 while spec.paused holds every start back.",
             [(f"max(fleet_hub_rollout_paused{{{match}}}) or vector(0)", "paused")], w=6, h=5),
        prom("timeseries", "Starts held back", "none",
             "Why the rollout's last pass held cluster starts back: paused, window (outside the "
             "maintenance window) or rate (maxStartsPerMinute reached); 0 while nothing holds them.",
             [(f"max by (reason) (fleet_hub_rollout_starts_held{{{match}}}) or vector(0)", "{{reason}}")],
             w=12, h=5),
        sql("table", "Rollout controls", "none",
            "From the history: halts, pauses and resumes (with who asked), Prep retries and "
            "maintenance window waits.",
            "SELECT time, step, cluster, event, actor, message FROM history WHERE " + sel +
            " AND event IN (" + CONTROL_EVENTS + ") ORDER BY id", w=24, h=8),
    ]
    return dashboard("fleet-rollout-detail", "Rollout detail",
                     "One ImageBasedGroupUpgrade: progress per step and batch, action durations, failures.",
                     panels, variables)


def hub_internals():
    panels = [
        prom("timeseries", "HTTP requests per second", "reqps",
             "Requests answered by the REST API, by route template and status code.",
             [("sum by (route, status) (rate(fleet_hub_http_requests_total[$__rate_interval]))",
               "{{route}} {{status}}")]),
        prom("timeseries", "HTTP latency p99", "s", "99th percentile time to answer, by route.",
             [("histogram_quantile(0.99, sum by (le, route) (rate(fleet_hub_http_request_duration_seconds_bucket[$__rate_interval])))",
               "{{route}}")]),
        prom("timeseries", "Decision latency", "s",
             "Spoke report stored -> next stage push sent: p50, p99 and the largest seen.",
             [("histogram_quantile(0.5, sum by (le) (rate(fleet_hub_decision_latency_seconds_bucket[$__rate_interval])))", "p50"),
              ("histogram_quantile(0.99, sum by (le) (rate(fleet_hub_decision_latency_seconds_bucket[$__rate_interval])))", "p99"),
              ("max(fleet_hub_decision_latency_max_seconds)", "max since start")]),
        prom("timeseries", "Engine pass duration", "s",
             "Time of one engine pass over one rollout (load, plan, store): p50 and p99; passes per second.",
             [("histogram_quantile(0.5, sum by (le) (rate(fleet_hub_engine_pass_duration_seconds_bucket[$__rate_interval])))", "p50"),
              ("histogram_quantile(0.99, sum by (le) (rate(fleet_hub_engine_pass_duration_seconds_bucket[$__rate_interval])))", "p99")]),
        prom("timeseries", "Stage pushes per second", "ops",
             "Stage transitions pushed to spokes, by result (accepted, refused, unreachable).",
             [("sum by (result) (rate(fleet_hub_spoke_pushes_total[$__rate_interval]))", "{{result}}")]),
        prom("timeseries", "Spoke reports per second", "ops",
             "Status reports from spokes, by result (stored, stale, rejected).",
             [("sum by (result) (rate(fleet_hub_spoke_reports_total[$__rate_interval]))", "{{result}}")]),
        prom("timeseries", "Database pool", "none",
             "Connections of the hub's Postgres pool in use and idle, and its limit.",
             [("sum by (state) (fleet_hub_db_pool_connections)", "{{state}}"),
              ("max(fleet_hub_db_pool_max_connections)", "max")]),
        prom("timeseries", "Rollout events per second", "ops",
             "Events written to the history, by event.",
             [("sum by (event) (rate(fleet_hub_rollout_events_total[$__rate_interval]))", "{{event}}")]),
        prom("timeseries", "Kubernetes requests per second", "reqps",
             "Requests of the hub's Kubernetes client (--kube), by verb and result.",
             [("sum by (verb, result) (rate(fleet_hub_kube_requests_total[$__rate_interval]))",
               "{{verb}} {{result}}")]),
        prom("timeseries", "Kubernetes request latency p99", "s",
             "99th percentile time of the hub's Kubernetes requests, by verb.",
             [("histogram_quantile(0.99, sum by (le, verb) (rate(fleet_hub_kube_request_duration_seconds_bucket[$__rate_interval])))",
               "{{verb}}")]),
        prom("timeseries", "IBGU reconcile errors per minute", "none",
             "Reconciles of ImageBasedGroupUpgrade CRs that failed and were retried (--kube), by error.",
             [("sum by (error) (rate(fleet_hub_kube_reconcile_errors_total[$__rate_interval])) * 60",
               "{{error}}")]),
        prom("stat", "Hub version", "none", "Versions of the running hub replicas.",
             [("count by (version) (fleet_hub_build_info)", "{{version}}")], w=12, h=8),
    ]
    return dashboard("fleet-hub-internals", "Hub internals",
                     "The hub itself: HTTP, engine passes, decision latency, pushes and reports, database pool, Kubernetes client.",
                     panels)


def spoke_agent():
    panels = [
        prom("bargauge", "Agents by stage and state", "none",
             "Agents by desired stage and the reason of their last condition.",
             [("sum by (stage, state) (spoke_ibu_clusters)", "{{stage}} / {{state}}")]),
        prom("stat", "Automatic rollbacks (24h)", "none",
             "Rollbacks the agents started on their own (init-monitor watchdog, post-reboot failure).",
             [("sum(increase(spoke_auto_rollbacks_total[24h]))", "rollbacks")]),
        prom("timeseries", "Stage duration p50 / p90", "s",
             "How long Prep, Upgrade and Rollback take, by stage, for completed stages.",
             [('histogram_quantile(0.5, sum by (le, stage) (rate(spoke_stage_duration_seconds_bucket{result="completed"}[$__rate_interval])))',
               "{{stage}} p50"),
              ('histogram_quantile(0.9, sum by (le, stage) (rate(spoke_stage_duration_seconds_bucket{result="completed"}[$__rate_interval])))',
               "{{stage}} p90")]),
        prom("timeseries", "Phase duration p90", "s",
             "How long each phase of a stage takes (Stateroot, Precache, PrePivot, PostPivot, ...).",
             [("histogram_quantile(0.9, sum by (le, stage, phase) (rate(spoke_phase_duration_seconds_bucket[$__rate_interval])))",
               "{{stage}} {{phase}}")]),
        prom("timeseries", "Stages ended per minute", "none",
             "Stages completing and failing per minute.",
             [("sum by (stage, result) (rate(spoke_stage_duration_seconds_count[$__rate_interval])) * 60",
               "{{stage}} {{result}}")]),
        prom("timeseries", "Stage requests per second", "ops",
             "Stage requests to the agents' API, accepted or refused.",
             [("sum by (result) (rate(spoke_transitions_total[$__rate_interval]))", "{{result}}")]),
        prom("timeseries", "Reports to the hub per second", "ops",
             "Status reports sent to the hub and failed attempts.",
             [("sum by (result) (rate(spoke_reports_total[$__rate_interval]))", "{{result}}")]),
        prom("timeseries", "Automatic rollbacks", "none", "Automatic rollbacks started per hour.",
             [("sum(increase(spoke_auto_rollbacks_total[1h]))", "per hour")]),
        prom("stat", "Agent version", "none", "Versions of the running agents.",
             [("count by (version) (spoke_build_info)", "{{version}}")], w=24, h=4),
    ]
    return dashboard("fleet-spoke-agent", "Spoke agent",
                     "The agents on the clusters: stage and phase timings, stage requests, reports, automatic rollbacks.",
                     panels, tags=("spoke",))


def render():
    """Every file this script writes, by path: the four dashboards in this folder and in the
    hub's chart (a chart cannot read outside its folder), and the alert rules (written by
    hand in alerts/) in the chart."""
    chart = os.path.join(HERE, "..", "charts", "fleet-hub")
    out = {}
    for name, d in [("fleet-overview", fleet_overview()), ("rollout-detail", rollout_detail()),
                    ("hub-internals", hub_internals()), ("spoke-agent", spoke_agent())]:
        text = json.dumps(d, cls=JSONEncoder, indent=2) + "\n"
        for folder in (HERE, os.path.join(chart, "dashboards")):
            out[os.path.join(folder, name + ".json")] = text
    with open(os.path.join(HERE, "alerts", "fleet-hub.rules.yml")) as src:
        out[os.path.join(chart, "alerts", "fleet-hub.rules.yml")] = src.read()
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", action="store_true",
                        help="fail when a committed file differs from what this script writes")
    args = parser.parse_args()
    stale = []
    for path, text in render().items():
        current = open(path).read() if os.path.exists(path) else None
        if current == text:
            continue
        if args.check:
            stale.append(os.path.relpath(path, os.path.join(HERE, "..")))
            continue
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    if stale:
        print("dashboards: stale, run python3 dashboards/generate.py: " + ", ".join(stale))
        sys.exit(1)


if __name__ == "__main__":
    main()
