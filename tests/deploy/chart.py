#!/usr/bin/env python3
"""Checks the Helm chart offline (issue 14, item 6): it lints, renders with the default
values and with non-default ones, every rendered manifest validates against the Kubernetes
schemas (kubernetes-validate; the Prometheus Operator's kinds, which have none there, are
checked for shape), the rendering says what the chart promises (Parallel pods, probes,
non-root, a PodDisruptionBudget keeping a majority), the values schema refuses bad
values, and the chart's copies of the alert rules and dashboard match deploy/'s.

Needs helm-python-sdk (no helm binary) and kubernetes-validate from PyPI. Run from
anywhere: python3 tests/deploy/chart.py. Exits non-zero with the reason on a failure.
"""
import os
import sys

import helm_python as helm
import kubernetes_validate
import yaml

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CHART = os.path.join(ROOT, "helm", "raftmq")
KUBERNETES = "1.30.0"
OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}

NON_DEFAULT = {
    "replicaCount": 5,
    "image": {"repository": "registry.example.com/raftmq", "tag": "0.1.0", "pullPolicy": "Always"},
    "service": {"type": "LoadBalancer", "loadBalancerIP": "10.0.0.5", "annotations": {"example.com/lb": "internal"}},
    "tls": {"enabled": True, "existingSecret": "raftmq-tls", "plainListeners": False},
    "secrets": {"existingSecret": "raftmq-secrets"},
    "auth": {"allowAnonymous": False, "passwordFile": "alice:$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA\n"},
    "config": "[mqtt]\nmax_inflight = 64\nsession_expiry_max_secs = 86400\n",
    "persistence": {"enabled": False},
    "podDisruptionBudget": {"enabled": True},
    "metrics": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
        "prometheusRule": {"enabled": True},
        "grafanaDashboard": {"enabled": True},
    },
    "nodeSelector": {"kubernetes.io/arch": "amd64"},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "mqtt", "effect": "NoSchedule"}],
}


def fail(message):
    print(f"chart check failed: {message}")
    sys.exit(1)


def manifests(rendered):
    """The Kubernetes objects a rendering produced (NOTES.txt and empty files left out)."""
    objects = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                objects.append((path, doc))
    return objects


def validate(path, doc):
    kind = doc.get("kind")
    if kind in OPERATOR_KINDS:
        if not doc.get("apiVersion", "").startswith("monitoring.coreos.com/") or not doc.get("metadata", {}).get("name") or not doc.get("spec"):
            fail(f"{path}: {kind} lacks apiVersion, name or spec")
        return
    try:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)
    except kubernetes_validate.ValidationError as e:
        fail(f"{path}: {kind} {doc.get('metadata', {}).get('name')}: {e.message} at {list(e.path)}")


def by_kind(objects, kind):
    return [doc for _, doc in objects if doc.get("kind") == kind]


def check_promises(objects, replicas, values):
    (sts,) = by_kind(objects, "StatefulSet")
    spec = sts["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    if spec["replicas"] != replicas or spec["podManagementPolicy"] != "Parallel":
        fail("the StatefulSet must start its pods in parallel with the requested replicas")
    if container["readinessProbe"]["httpGet"]["path"] != "/readyz" or container["livenessProbe"]["httpGet"]["path"] != "/healthz":
        fail("readiness must be /readyz and liveness /healthz")
    if not pod["securityContext"].get("runAsNonRoot") or not container["securityContext"].get("readOnlyRootFilesystem"):
        fail("the pod must run as non-root on a read-only root filesystem")
    if pod["terminationGracePeriodSeconds"] < 15:
        fail("the grace period must leave time to hand over the leadership")
    env = {e["name"]: e for e in container["env"]}
    if env["RAFTMQ_CLUSTER__BOOTSTRAP_EXPECT"]["value"] != str(replicas) or env["RAFTMQ_CLUSTER__DISCOVERY"]["value"] != "dns":
        fail("the nodes must discover each other by DNS and expect every replica before forming")
    if int(env["RAFTMQ_CLUSTER__AUTOCLEAN_SECS"]["value"]) <= 0:
        fail("nodes scaled away must leave the Raft group (cluster.autoclean_secs)")
    headless = [s for s in by_kind(objects, "Service") if s["spec"].get("clusterIP") == "None"]
    if len(headless) != 1 or not headless[0]["spec"].get("publishNotReadyAddresses"):
        fail("a headless Service must publish not-ready pods (they must meet before they can be ready)")
    if headless[0]["metadata"]["name"] not in env["RAFTMQ_CLUSTER__DNS_NAME"]["value"] or spec["serviceName"] != headless[0]["metadata"]["name"]:
        fail("discovery must resolve the headless Service the StatefulSet names")
    (pdb,) = by_kind(objects, "PodDisruptionBudget")
    majority_keeping = max(1, (min(replicas, 5) - 1) // 2)
    if pdb["spec"]["maxUnavailable"] != majority_keeping:
        fail(f"the PodDisruptionBudget must allow {majority_keeping} unavailable with {replicas} replicas")
    if values.get("persistence", {}).get("enabled", True) and not spec.get("volumeClaimTemplates"):
        fail("persistence needs a PersistentVolumeClaim per pod")
    if values.get("tls", {}).get("enabled"):
        ports = {p["name"] for s in by_kind(objects, "Service") for p in s["spec"]["ports"]}
        if not {"mqtts", "wss"} <= ports or "RAFTMQ_LISTENERS" not in env:
            fail("TLS must add the mqtts and wss listeners and ports")
    if values.get("metrics", {}).get("prometheusRule", {}).get("enabled"):
        (rule,) = by_kind(objects, "PrometheusRule")
        with open(os.path.join(ROOT, "deploy", "prometheus", "alerts.yml")) as f:
            if rule["spec"] != yaml.safe_load(f):
                fail("the PrometheusRule must carry deploy/prometheus/alerts.yml")


def main():
    for copy, original in [("files/alerts.yml", "deploy/prometheus/alerts.yml"), ("files/raftmq-dashboard.json", "deploy/grafana/dashboards/raftmq.json")]:
        with open(os.path.join(CHART, copy)) as a, open(os.path.join(ROOT, original)) as b:
            if a.read() != b.read():
                fail(f"helm/raftmq/{copy} differs from {original}: copy it again")
    lint = helm.lint(CHART)
    if lint.get("errors") or any(m.get("severity", 0) >= 3 for m in lint.get("messages", [])):
        fail(f"helm lint: {lint}")
    checked = 0
    with helm.Chart.load(CHART) as chart:
        for values, replicas in [({}, 3), (NON_DEFAULT, 5)]:
            chart.validate_schema(values)
            objects = manifests(chart.render(values, name="raftmq", namespace="mqtt"))
            for path, doc in objects:
                validate(path, doc)
                checked += 1
            check_promises(objects, replicas, values)
        for bad in [{"replicaCount": 0}, {"service": {"type": "Ingress"}}, {"persistence": {"size": "lots"}}]:
            try:
                chart.validate_schema(bad)
            except Exception:
                continue
            fail(f"the values schema accepted {bad}")
    print(f"chart check: lint clean, 2 renderings, {checked} manifests valid for Kubernetes {KUBERNETES}")


if __name__ == "__main__":
    main()
