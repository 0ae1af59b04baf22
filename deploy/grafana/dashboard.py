#!/usr/bin/env python3
"""Writes dashboards/raftmq.json, the raftmq Grafana dashboard, from the panel list below.

Edit the panels here and run `python3 deploy/grafana/dashboard.py`; the JSON (and the Helm
chart's copy) is committed so Grafana (docker-compose provisioning, the chart's ConfigMap)
needs no build step.
tests/tests/deploy checks that every query parses and, against a Prometheus scraping a
live three-node cluster, returns data.
"""
import json
import os

DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'instance=~"$instance"'
RATE = "$__rate_interval"

# (row, [(title, kind, unit, [(expr, legend)], description)])
ROWS = [
    ("Cluster", [
        ("Nodes up (scraped)", "stat", "none", [('sum(up{job=~".*raftmq.*"})', "up")],
         "raftmq nodes Prometheus scrapes successfully."),
        ("Nodes each node sees up", "timeseries", "none", [(f'raftmq_cluster_nodes{{status="up",{SEL}}}', "{{instance}}")],
         "Cluster members (itself included) each node sees up: all equal in a healthy cluster."),
        ("Raft leader", "stat", "none", [(f'raftmq_raft_is_leader{{{SEL}}} == 1', "{{instance}}")],
         "The node that leads the Raft group (one at a time)."),
        ("Raft term", "stat", "none", [("max(raftmq_raft_term)", "term")],
         "Raft term: each election raises it; a climbing term means unstable leadership."),
        ("Nodes knowing a leader", "stat", "none", [("sum(raftmq_raft_has_leader)", "with leader")],
         "Nodes that know a Raft leader; below the node count, writes on the others wait."),
    ]),
    ("Clients", [
        ("Connections", "timeseries", "none", [(f"sum by (instance) (raftmq_connections{{{SEL}}})", "{{instance}}"),
                                               (f"sum(raftmq_connections{{{SEL}}})", "cluster")],
         "Client connections with an accepted CONNECT, per node and in all."),
        ("Sessions", "timeseries", "none", [(f"sum by (instance) (raftmq_sessions{{{SEL}}})", "{{instance}} all"),
                                            (f"sum by (instance) (raftmq_sessions_persistent{{{SEL}}})", "{{instance}} persistent")],
         "Sessions held by each node, online and offline; persistent ones outlive their connection."),
        ("CONNECT outcomes", "timeseries", "ops", [(f"sum by (result) (rate(raftmq_connects_total{{{SEL}}}[{RATE}]))", "{{result}}")],
         "CONNECTs per second by result: storms, bad credentials, bans."),
        ("Subscriptions", "timeseries", "none", [(f"sum by (instance) (raftmq_subscriptions{{{SEL}}})", "{{instance}}")],
         "Distinct subscribed filters per node."),
    ]),
    ("Messages", [
        ("Messages in by QoS", "timeseries", "ops", [(f"sum by (qos) (rate(raftmq_messages_received_total{{{SEL}}}[{RATE}]))", "QoS {{qos}}")],
         "PUBLISH packets received from clients per second."),
        ("Messages out by QoS", "timeseries", "ops", [(f"sum by (qos) (rate(raftmq_messages_sent_total{{{SEL}}}[{RATE}]))", "QoS {{qos}}")],
         "PUBLISH packets sent to clients per second."),
        ("Dropped by reason", "timeseries", "ops", [(f"sum by (reason) (rate(raftmq_messages_dropped_total{{{SEL}}}[{RATE}]))", "{{reason}}")],
         "Messages or deliveries dropped per second, by reason (docs/metrics.md)."),
        ("Delivery latency", "timeseries", "s", [
            (f"histogram_quantile(0.5, sum by (le) (rate(raftmq_delivery_latency_seconds_bucket{{{SEL}}}[{RATE}])))", "p50"),
            (f"histogram_quantile(0.99, sum by (le) (rate(raftmq_delivery_latency_seconds_bucket{{{SEL}}}[{RATE}])))", "p99")],
         "From receiving a PUBLISH to queueing it into a subscriber's socket."),
        ("Queued and in flight", "timeseries", "none", [(f"sum by (instance) (raftmq_queued_messages{{{SEL}}})", "{{instance}} queued"),
                                                         (f"sum by (instance) (raftmq_inflight_messages{{{SEL}}})", "{{instance}} in flight")],
         "Messages waiting in session queues, and QoS 1/2 messages sent and not yet acknowledged."),
        ("Retained messages", "timeseries", "none", [(f"raftmq_retained_messages{{{SEL}}}", "{{instance}}")],
         "Retained messages (replicated: every node holds them all)."),
    ]),
    ("Forwarding", [
        ("Routes per peer", "timeseries", "none", [(f"raftmq_cluster_peer_routes{{{SEL}}}", "{{instance}} from {{peer}}")],
         "Routes each peer has sent this node."),
        ("Forwarded per peer", "timeseries", "ops", [(f"sum by (instance, peer) (rate(raftmq_cluster_forwarded_messages_total{{{SEL}}}[{RATE}]))", "{{instance}} to {{peer}}")],
         "Messages forwarded to each peer per second."),
        ("Forward queue depth", "timeseries", "none", [(f"raftmq_cluster_forward_queue{{{SEL}}}", "{{instance}} to {{peer}}"),
                                                        (f"max(raftmq_cluster_forward_queue_capacity{{{SEL}}})", "capacity")],
         "Messages waiting to be forwarded to each peer, against what a queue holds."),
        ("Forward drops", "timeseries", "ops", [(f"sum by (instance, peer) (rate(raftmq_cluster_forward_dropped_total{{{SEL}}}[{RATE}]))", "{{instance}} to {{peer}}")],
         "Copies for a peer dropped: its queue stayed full, or its link was down."),
    ]),
    ("Raft", [
        ("Commit and applied index", "timeseries", "none", [(f"raftmq_raft_commit_index{{{SEL}}}", "{{instance}} committed"),
                                                             (f"raftmq_raft_applied_index{{{SEL}}}", "{{instance}} applied")],
         "Log positions: known committed by a majority, and applied to the state machine."),
        ("Apply lag", "timeseries", "none", [(f"raftmq_raft_apply_lag{{{SEL}}}", "{{instance}}")],
         "Entries held but not applied yet; growing means the node cannot keep up."),
        ("Proposal latency", "timeseries", "s", [
            (f"histogram_quantile(0.5, sum by (le, instance) (rate(raftmq_raft_proposal_seconds_bucket{{{SEL}}}[{RATE}])))", "{{instance}} p50"),
            (f"histogram_quantile(0.99, sum by (le, instance) (rate(raftmq_raft_proposal_seconds_bucket{{{SEL}}}[{RATE}])))", "{{instance}} p99")],
         "From proposing a log entry to its being applied on the proposing node: the price of durability per batch."),
        ("Proposals and batch size", "timeseries", "none", [
            (f"sum by (instance) (rate(raftmq_raft_proposals_total{{{SEL}}}[{RATE}]))", "{{instance}} entries/s"),
            (f"sum by (instance) (rate(raftmq_raft_proposed_operations_total{{{SEL}}}[{RATE}])) / sum by (instance) (rate(raftmq_raft_proposals_total{{{SEL}}}[{RATE}]))", "{{instance}} ops/entry")],
         "Log entries proposed per second, and store operations per entry."),
        ("Log size", "timeseries", "none", [(f"raftmq_raft_log_entries{{{SEL}}}", "{{instance}}")],
         "Entries held in the log; the rest is in the snapshot."),
        ("Snapshots", "timeseries", "none", [(f"raftmq_raft_snapshot_index{{{SEL}}}", "{{instance}} index"),
                                             (f"increase(raftmq_raft_snapshots_total{{{SEL}}}[1h])", "{{instance}} built / h")],
         "What the last snapshot covers, and snapshots built in the last hour."),
    ]),
]


def dashboard():
    panels, pid, y = [], 1, 0
    for row, items in ROWS:
        panels.append({"type": "row", "title": row, "id": pid, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        pid, y, x = pid + 1, y + 1, 0
        for title, kind, unit, queries, description in items:
            w = 6 if kind == "stat" else 12
            if x + w > 24:
                x, y = 0, y + 8
            panel = {
                "type": kind, "title": title, "id": pid, "description": description, "datasource": DS,
                "gridPos": {"h": 8, "w": w, "x": x, "y": y},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "options": {"legend": {"displayMode": "list", "placement": "bottom"}} if kind == "timeseries" else
                           {"reduceOptions": {"calcs": ["lastNotNull"]}, "textMode": "value_and_name"},
                "targets": [{"refId": chr(ord("A") + i), "datasource": DS, "expr": e, "legendFormat": legend}
                            for i, (e, legend) in enumerate(queries)],
            }
            panels.append(panel)
            pid, x = pid + 1, x + w
        y += 8
    return {
        "title": "raftmq", "uid": "raftmq", "schemaVersion": 39, "version": 1, "editable": True,
        "tags": ["raftmq", "mqtt"], "time": {"from": "now-1h", "to": "now"}, "refresh": "10s",
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus"},
            {"name": "instance", "label": "Node", "type": "query", "datasource": DS, "includeAll": True, "multi": True,
             "allValue": ".*", "current": {"text": "All", "value": "$__all"},
             "query": {"query": "label_values(raftmq_build_info, instance)", "refId": "instance"},
             "definition": "label_values(raftmq_build_info, instance)", "refresh": 2},
        ]},
        "panels": panels,
    }


if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    text = json.dumps(dashboard(), indent=2) + "\n"
    # The Helm chart ships a copy (charts cannot read files outside their directory).
    for path in [os.path.join(here, "dashboards", "raftmq.json"),
                 os.path.join(here, "..", "..", "helm", "raftmq", "files", "raftmq-dashboard.json")]:
        with open(path, "w") as f:
            f.write(text)
