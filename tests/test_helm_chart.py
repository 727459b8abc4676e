"""The Helm chart, rendered without helm (tests/helm_render.py) and checked
against the Kubernetes OpenAPI schemas (kubernetes-validate, strict: unknown
fields fail), plus the properties a hospital IT team relies on: one gateway
with Recreate, workers without the vault key, probes, PVCs, NetworkPolicies,
GPU variant, and alert rules / dashboard that only use metrics BrainLine
exports. Not checked here: helm's own template engine (sprig), the
postgresql/redis subcharts, PromQL syntax (no promtool), CRD schemas of
PrometheusRule/ServiceMonitor (checked structurally only)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests.helm_render import Renderer, TemplateError, render_chart

CHART = Path(__file__).resolve().parents[1] / "helm" / "brainline"
K8S_VERSIONS = ["1.29", "1.33"]
ALL_ON = {"gpuWorker": {"enabled": True},
          "worker": {"autoscaling": {"queueDepth": {"enabled": True}}},
          "monitoring": {"prometheusRule": {"enabled": True}, "serviceMonitor": {"enabled": True}},
          "networkPolicy": {"dicomFrom": [{"ipBlock": {"cidr": "10.20.0.0/16"}}]},
          "persistence": {"workspaces": {"storageClass": "nfs-client"}}}
CRDS = {"PrometheusRule", "ServiceMonitor"}


def _by(docs, kind, name_suffix=""):
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix)]
    assert found, f"no {kind} *{name_suffix}"
    return found[0] if name_suffix else found


def _env(container) -> dict:
    return {e["name"]: e for e in container.get("env", [])}


@pytest.fixture(scope="module")
def default_docs():
    return render_chart(CHART)


@pytest.fixture(scope="module")
def full_docs():
    return render_chart(CHART, ALL_ON)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("variant", ["default", "all_on", "local"])
def test_rendered_manifests_match_the_kubernetes_schemas(variant, version):
    overrides = {"default": {}, "all_on": ALL_ON, "local": {"executor": "local"}}[variant]
    docs = render_chart(CHART, overrides)
    checked = 0
    for doc in docs:
        doc = {k: v for k, v in doc.items() if k != "__source__"}
        if doc["kind"] in CRDS:
            assert doc["apiVersion"] == "monitoring.coreos.com/v1" and doc["spec"]
            continue
        kubernetes_validate.validate(doc, version, strict=True)
        checked += 1
    assert checked >= 5


def test_schema_validation_can_fail():
    bad = render_chart(CHART)[0]
    bad = {k: v for k, v in bad.items() if k != "__source__"}
    bad["spec"]["strategy"]["typo"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, "1.33", strict=True)


def test_gateway_is_one_recreated_replica_with_probes_and_the_dicom_service(default_docs):
    gw = _by(default_docs, "Deployment", "-gateway")
    assert gw["spec"]["replicas"] == 1 and gw["spec"]["strategy"] == {"type": "Recreate"}
    pod = gw["spec"]["template"]["spec"]
    [c] = pod["containers"]
    assert c["args"] == ["serve"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    env = _env(c)
    assert env["BRAINLINE_VAULT_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "brainline-secrets"
    assert env["BRAINLINE_EXECUTOR"]["value"] == "celery"
    assert env["BRAINLINE_WORKSPACES"]["value"] == "/var/lib/brainline-workspaces"
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}
    assert claims["home"].endswith("-home") and claims["workspaces"].endswith("-workspaces")
    svc = [s for s in _by(default_docs, "Service") if s["spec"].get("clusterIP") != "None"][0]
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == {"dicom": 11112, "http": 8080}
    assert svc["spec"]["selector"] == gw["spec"]["selector"]["matchLabels"]


def test_workers_never_get_the_vault_key_the_spool_or_the_outbox(full_docs):
    for suffix in ("-worker", "-gpu-worker"):
        w = _by(full_docs, "Deployment", suffix)
        pod = w["spec"]["template"]["spec"]
        [c] = pod["containers"]
        env = _env(c)
        assert "BRAINLINE_VAULT_KEY" not in env and "BRAINLINE_API_TOKEN" not in env
        assert not c.get("envFrom"), "envFrom would hand the whole Secret (vault key) to a worker"
        secret_keys = {e["valueFrom"]["secretKeyRef"]["key"] for e in env.values() if "valueFrom" in e}
        assert secret_keys == {"BRAINLINE_DATABASE_URL", "BRAINLINE_BROKER_URL"}
        claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
        assert len(claims) == 1 and claims[0].endswith("-workspaces")
        assert c["args"][0] == "worker"
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
        assert "brainline.io/worker" in w["spec"]["template"]["metadata"]["labels"]


def test_gpu_worker_variant(full_docs):
    gpu = _by(full_docs, "Deployment", "-gpu-worker")
    pod = gpu["spec"]["template"]["spec"]
    [c] = pod["containers"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert _env(c)["BRAINLINE_DEVICE"]["value"] == "cuda"
    assert c["args"][:3] == ["worker", "--queues", "gpu"]
    cpu = _by(full_docs, "Deployment", "-worker")
    assert _env(cpu["spec"]["template"]["spec"]["containers"][0])["BRAINLINE_DEVICE"]["value"] == "cpu"


def test_hpa_scales_the_compute_workers(default_docs, full_docs):
    hpa = _by(default_docs, "HorizontalPodAutoscaler", "-worker")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == _by(default_docs, "Deployment", "-worker")["metadata"]["name"]
    assert [m["type"] for m in hpa["spec"]["metrics"]] == ["Resource"]
    assert "replicas" not in _by(default_docs, "Deployment", "-worker")["spec"]  # the HPA owns it
    full = _by(full_docs, "HorizontalPodAutoscaler", "-worker")
    external = [m for m in full["spec"]["metrics"] if m["type"] == "External"]
    assert external[0]["external"]["metric"]["name"] == "brainline_queue_depth"


def test_pvcs_home_rwo_and_shared_workspaces_rwx(full_docs):
    pvcs = {p["metadata"]["name"].rsplit("-", 1)[1]: p for p in _by(full_docs, "PersistentVolumeClaim")}
    assert pvcs["home"]["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert pvcs["workspaces"]["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvcs["workspaces"]["spec"]["storageClassName"] == "nfs-client"
    existing = render_chart(CHART, {"persistence": {"workspaces": {"existingClaim": "site-nfs"}}})
    assert [p["metadata"]["name"] for p in existing if p["kind"] == "PersistentVolumeClaim"] == ["test-brainline-home"]
    worker = _by(existing, "Deployment", "-worker")
    assert any(v.get("persistentVolumeClaim", {}).get("claimName") == "site-nfs"
               for v in worker["spec"]["template"]["spec"]["volumes"])


def test_network_policies_expose_only_dicom_http_and_worker_metrics(full_docs):
    gw, workers = _by(full_docs, "NetworkPolicy", "-gateway"), _by(full_docs, "NetworkPolicy", "-workers")
    ports = [p["port"] for rule in gw["spec"]["ingress"] for p in rule["ports"]]
    assert ports == ["dicom", "http"] and gw["spec"]["policyTypes"] == ["Ingress"]
    assert gw["spec"]["ingress"][0]["from"] == [{"ipBlock": {"cidr": "10.20.0.0/16"}}]
    assert [p["port"] for rule in workers["spec"]["ingress"] for p in rule["ports"]] == ["metrics"]
    assert workers["spec"]["podSelector"]["matchLabels"]["brainline.io/worker"] == "true"


def test_local_executor_renders_only_the_gateway():
    docs = render_chart(CHART, {"executor": "local"})
    kinds = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert ("Deployment", "test-brainline-gateway") in kinds
    assert not [k for k in kinds if "worker" in k[1]]
    gw = _by(docs, "Deployment", "-gateway")
    env = _env(gw["spec"]["template"]["spec"]["containers"][0])
    assert env["BRAINLINE_BROKER_URL"]["valueFrom"]["secretKeyRef"]["optional"] is True


def test_renderer_refuses_what_it_does_not_know(tmp_path):
    (tmp_path / "templates").mkdir()
    (tmp_path / "Chart.yaml").write_text("name: x\nversion: 0.1.0\n")
    (tmp_path / "templates" / "a.yaml").write_text('x: {{ .Values.a | sha256sum }}\n')
    with pytest.raises(TemplateError, match="sha256sum"):
        Renderer(tmp_path, {"a": "b"}).render()


# -- alerts and dashboard --------------------------------------------------------
def _exported_metric_names() -> set[str]:
    from brainline.service.metrics import Metrics
    from brainline.service.scaleout_metrics import WorkerMetrics, add_gateway_metrics

    class _Spool:
        def free_bytes(self):
            return 1

    class _Outbox:
        destinations = {"PACS@h:104": None}
        failing_since: dict = {}

    m = Metrics()
    m.add_outbox(lambda: 0, lambda: 0.0)
    m.add_jobs_by_state(lambda: {})
    add_gateway_metrics(m, _Spool(), _Outbox(), lambda: {"gateway": 0, "compute": 0, "gpu": 0})
    w = WorkerMetrics(queue_depth_fn=lambda: {"compute": 0}, running_fn=lambda: 0)
    w.on_stage("segment", "failed", 1.0)
    m.stage_duration.labels(stage="segment").observe(1)
    m.instances.labels(source="c-store").inc()
    m.rejections.labels(reason="timeout").inc()
    names = set()
    for registry in (m.registry, w.registry):
        for family in registry.collect():
            names.update(sample.name for sample in family.samples)
    return names


def _metric_names(text: str) -> set[str]:
    return set(re.findall(r"\bbrainline_[a-z0-9_]+", text))


def test_alert_rules_are_complete_and_use_exported_metrics():
    spec = yaml.safe_load((CHART / "files" / "prometheus-rules.yaml").read_text())
    rules = [r for g in spec["groups"] for r in g["rules"]]
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)) >= 10
    exported = _exported_metric_names()
    for rule in rules:
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["runbook"] == "README#" + rule["alert"].lower()
        used = _metric_names(rule["expr"])
        assert used and used <= exported, (rule["alert"], used - exported)
    covered = " ".join(r["expr"] for r in rules)
    for metric in ("brainline_spool_free_bytes", "brainline_queue_depth", "brainline_jobs",
                   "brainline_outbox_oldest_age_seconds", "brainline_destination_failing_seconds",
                   "brainline_instances_received_total", "brainline_stage_duration_seconds_bucket"):
        assert metric in covered


def test_dashboard_covers_what_the_on_call_needs():
    dash = json.loads((CHART / "files" / "grafana-dashboard.json").read_text())
    exprs = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in dash["panels"]}
    exported = _exported_metric_names()
    for title, expr in exprs.items():
        assert _metric_names(expr) <= exported, (title, _metric_names(expr) - exported)
    wanted = {"Ingest rate": "brainline_instances_received_total", "Studies waiting": "brainline_studies_receiving",
              "Queue depth": "brainline_queue_depth", "Stage duration": "brainline_stage_duration_seconds_bucket",
              "Failed and needs_input": 'state="needs_input"', "Outbox": "brainline_outbox_oldest_age_seconds",
              "Destination": "brainline_destination_up", "Free spool": "brainline_spool_free_bytes"}
    for prefix, needle in wanted.items():
        assert any(t.startswith(prefix) and needle in e for t, e in exprs.items()), prefix
    cm = _by(render_chart(CHART), "ConfigMap", "-dashboard")
    assert json.loads(cm["data"]["brainline.json"])["uid"] == dash["uid"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    rule = _by(render_chart(CHART, ALL_ON), "PrometheusRule", "-alerts")
    assert rule["spec"]["groups"][0]["rules"][0]["alert"] == "BrainLineGatewayDown"
