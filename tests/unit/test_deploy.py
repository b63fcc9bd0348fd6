"""The deployment files (deploy/): Kubernetes manifests, Prometheus rules and config, Grafana dashboard.

All offline: the manifests against the Kubernetes schemas (kubernetes-validate), the Prometheus files with
promtool (Debian package `prometheus`), and every metric name the rules and the dashboard use against
deploy/prometheus/exported-metrics.txt, the contract of what the server exports (the allowlist that
tests/integration/test_metrics_exported.py checks against a real server). Each tool's absence skips its
tests with the command that installs it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
MANIFESTS = sorted((DEPLOY / "k8s").glob("*.yaml"))
RULES = DEPLOY / "prometheus" / "recserve-rules.yml"
RULES_TEST = DEPLOY / "prometheus" / "recserve-rules.test.yml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "recserve-dashboard.json"
EXPORTED_FILE = DEPLOY / "prometheus" / "exported-metrics.txt"
K8S_VERSION = "1.30.0"
# Kinds from CRDs: not in the Kubernetes schemas, so parsed and cross-checked only.
CRD_GROUPS = ("monitoring.coreos.com/",)
PROMTOOL_FIX = "apt-get install prometheus (Debian; promtool), or a promtool from prometheus.io/download"


def read_exported(path: Path = EXPORTED_FILE) -> dict[str, list[str]]:
    """{family name: its qualifiers (`until-sampled`, `flag=ARG`)} from exported-metrics.txt."""
    out = {}
    for line in path.read_text().splitlines():
        words = line.split("#", 1)[0].split()
        if words:
            out[words[0]] = words[1:]
    return out


EXPORTED = read_exported()
# Names the rules and the dashboard may use that do not come from the server.
EXTERNAL = {
    "up": "Prometheus: 1 when a target was scraped",
    "kube_deployment_status_replicas_available": "kube-state-metrics: ready replicas (readiness is no Triton metric)",
}
SUMMARY_SUFFIXES = ("_count", "_sum")

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
             "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not functions, keywords, labels or durations)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)                 # strings
    e = re.sub(r"\{[^}]*\}", " ", e)                              # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)                             # range and subquery durations
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = set()
    for m in re.finditer(r"(?<![\w:.$])([A-Za-z_:][\w:]*)(\s*\()?", e):
        if not m.group(2) and m.group(1).lower() not in _KEYWORDS:
            names.add(m.group(1))
    return names


def known(name: str) -> bool:
    if name in EXPORTED or name in EXTERNAL:
        return True
    return any(name.endswith(s) and name[: -len(s)] in EXPORTED for s in SUMMARY_SUFFIXES)


# -- Kubernetes -----------------------------------------------------------------------------------------------


def _docs() -> list[tuple[Path, dict]]:
    yaml = pytest.importorskip("yaml", reason="pyyaml is not installed: pip install pyyaml")
    return [(path, doc) for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


def _one(kind: str, name: str | None = None) -> dict:
    found = [d for _, d in _docs() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _container() -> dict:
    (container,) = _one("Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def _serve_params(container: dict) -> dict:
    """The container's `recserve serve` arguments, parsed by the real command line (unknown flags fail)."""
    import typer

    from recserve.cli import app

    assert container["command"] == ["recserve", "serve"]
    serve = typer.main.get_command(app).get_command(None, "serve")
    return serve.make_context("serve", list(container["args"])).params


def _port(container: dict, port: int | str) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return number


def test_manifests_parse():
    assert MANIFESTS, "no manifests under deploy/k8s"
    kinds = {d["kind"] for _, d in _docs()}
    assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"} <= kinds


def test_manifests_validate_against_the_kubernetes_schemas():
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    checked = 0
    for path, doc in _docs():
        if doc["apiVersion"].startswith(CRD_GROUPS):
            continue
        try:
            kv.validate(doc, K8S_VERSION, strict=True)
        except kv.ValidationError as exc:
            where = ".".join(map(str, exc.path))
            pytest.fail(f"{path.name}: {doc['kind']}/{doc['metadata']['name']}: {where}: {exc.message}")
        checked += 1
    assert checked >= 5


def test_deployment_runs_recserve_serve_with_the_ports_it_declares():
    deployment = _one("Deployment")
    assert deployment["spec"]["replicas"] == 2
    container = _container()
    params = _serve_params(container)
    assert params["host"] == "0.0.0.0"
    assert str(params["repository"]) == "/models"
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "http": params["http_port"], "grpc": params["grpc_port"], "metrics": params["metrics_port"]}
    assert (params["http_port"], params["grpc_port"], params["metrics_port"]) == (8000, 8001, 8002)
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/models"].get("readOnly") is True
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(params["metrics_port"])
    limits = container["resources"]["limits"]
    assert limits["cpu"] == "2" and limits["memory"] == "2Gi"
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_probes_use_the_health_paths_and_the_grace_period_covers_the_drain():
    container = _container()
    params = _serve_params(container)
    http = params["http_port"]
    ready, live, startup = (container[k] for k in ("readinessProbe", "livenessProbe", "startupProbe"))
    assert ready["httpGet"]["path"] == "/v2/health/ready" and _port(container, ready["httpGet"]["port"]) == http
    assert live["httpGet"]["path"] == "/v2/health/live" and _port(container, live["httpGet"]["port"]) == http
    assert startup["httpGet"]["path"] in ("/v2/health/live", "/v2/health/ready")
    assert _port(container, startup["httpGet"]["port"]) == http
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "model load needs a generous startup"
    drain = params["drain_timeout"]
    pre_stop = container.get("lifecycle", {}).get("preStop", {})
    sleep = float(pre_stop["exec"]["command"][-1]) if "exec" in pre_stop else 0.0
    grace = _one("Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    # preStop, then the front door's drain, then Triton's --exit-timeout-secs (= the drain timeout), a margin
    assert grace > drain
    assert grace > sleep + 2 * drain + 5, (grace, sleep, drain)


def test_services_pdb_and_hpa_select_the_deployment():
    deployment = _one("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    container = _container()
    services = [d for _, d in _docs() if d["kind"] == "Service"]
    main = _one("Service", "recserve")
    assert main["spec"]["type"] == "ClusterIP"
    assert {p["name"] for p in main["spec"]["ports"]} == {"http", "grpc", "metrics"}
    for service in services:
        assert service["spec"]["selector"].items() <= labels.items(), service["metadata"]["name"]
        for port in service["spec"]["ports"]:
            assert _port(container, port["targetPort"]) == port["port"], (service["metadata"]["name"], port)
    pdb = _one("PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = _one("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert hpa["spec"]["minReplicas"] >= pdb["spec"]["minAvailable"] + 1
    (cpu,) = [m for m in hpa["spec"]["metrics"] if m["type"] == "Resource"]
    assert cpu["resource"]["name"] == "cpu" and cpu["resource"]["target"]["type"] == "Utilization"
    (queue,) = [m for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    yaml = pytest.importorskip("yaml", reason="pyyaml is not installed: pip install pyyaml")
    adapter = yaml.safe_load((DEPLOY / "prometheus" / "adapter-rules.yaml").read_text())
    (rule,) = adapter["rules"]
    assert queue["pods"]["metric"]["name"] == rule["name"]["as"], "the HPA scales on the adapter's metric"
    query = rule["metricsQuery"].replace("<<.GroupBy>>", "pod").replace("<<.LabelMatchers>>", 'pod="x"')
    used = metric_names(query) | metric_names(rule["seriesQuery"])
    assert used == {"nv_inference_queue_duration_us", "nv_inference_request_success"} and all(known(n) for n in used)


def test_the_service_monitor_selects_one_service_and_its_metrics_port():
    monitors = [d for _, d in _docs() if d["kind"] == "ServiceMonitor"]
    if not monitors:
        pytest.skip("no ServiceMonitor")
    (monitor,) = monitors
    wanted = monitor["spec"]["selector"]["matchLabels"].items()
    selected = [d for _, d in _docs() if d["kind"] == "Service" and wanted <= d["metadata"]["labels"].items()]
    assert [s["metadata"]["name"] for s in selected] == ["recserve"], "each replica would be scraped twice"
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]


# -- Prometheus -----------------------------------------------------------------------------------------------


def _promtool() -> str:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.skip(f"promtool not found: {PROMTOOL_FIX}")
    return tool


def _run(*args: str, cwd: Path | None = None) -> str:
    proc = subprocess.run([_promtool(), *args], capture_output=True, text=True, timeout=120, cwd=cwd)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    return out


def _rules() -> list[dict]:
    yaml = pytest.importorskip("yaml", reason="pyyaml is not installed: pip install pyyaml")
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def test_promtool_checks_the_rules():
    assert "SUCCESS" in _run("check", "rules", str(RULES))


def test_promtool_checks_the_config():
    # relative rule_files resolve against the config's folder
    out = _run("check", "config", str(PROMETHEUS_CONFIG))
    assert "SUCCESS: 1 rule files found" in out


def test_promtool_unit_tests_of_the_rules_pass():
    assert "SUCCESS" in _run("test", "rules", str(RULES_TEST))


def test_the_rule_tests_cover_the_error_and_fallback_alerts_both_ways():
    yaml = pytest.importorskip("yaml", reason="pyyaml is not installed: pip install pyyaml")
    cases = [c for t in yaml.safe_load(RULES_TEST.read_text())["tests"] for c in t["alert_rule_test"]]
    for alert in ("RecserveErrorRateHigh", "RecserveFallbacks"):
        outcomes = {bool(c["exp_alerts"]) for c in cases if c["alertname"] == alert}
        assert outcomes == {True, False}, f"{alert}: needs a firing and a silent case"


def test_every_alert_has_for_severity_summary_and_description():
    alerts = [r for r in _rules() if "alert" in r]
    assert {"RecserveErrorRateHigh", "RecserveFallbacks", "RecserveColdStartShareHigh", "RecserveLatencyHigh",
            "RecserveDown", "RecserveNoTraffic"} <= {a["alert"] for a in alerts}
    for alert in alerts:
        assert alert.get("for"), alert["alert"]
        assert alert["labels"]["severity"] in ("critical", "warning", "info"), alert["alert"]
        assert alert["annotations"].get("summary") and alert["annotations"].get("description"), alert["alert"]


# -- metric names: the rules and the dashboard use only what the server exports --------------------------------


def test_metric_name_extraction():
    expr = ('sum by (job, kind) (rate(recserve_fallbacks_total{job="recserve", kind!="x"}[5m])) / 1e3 > 0.5 '
            'and on (job) absent(up{job="a"} == 1) or histogram_quantile(0.99, foo_bucket[$__rate_interval] offset 5m)')
    assert metric_names(expr) == {"recserve_fallbacks_total", "up", "foo_bucket"}


def test_the_allowlist_file():
    assert "recserve_responses_total" in EXPORTED and "nv_inference_request_success" in EXPORTED
    for name, words in EXPORTED.items():
        assert re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", name), name
        assert all(w == "until-sampled" or w.startswith("flag=") for w in words), (name, words)


def test_the_rules_use_only_exported_metrics():
    used = {name for rule in _rules() for name in metric_names(rule["expr"])}
    assert {"nv_inference_request_failure", "recserve_fallbacks_total", "recserve_responses_total"} <= used
    unknown = sorted(n for n in used if not known(n))
    assert not unknown, f"not exported by the server (deploy/prometheus/exported-metrics.txt): {unknown}"


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _targets() -> list[tuple[dict, dict]]:
    return [(panel, target) for panel in _dashboard()["panels"] for target in panel.get("targets", [])]


def test_the_dashboard_parses_with_unique_ids_a_datasource_variable_and_a_query_per_panel():
    dashboard = _dashboard()
    assert 36 <= dashboard["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        exprs = [t.get("expr", "").strip() for t in panel.get("targets", [])]
        assert exprs and all(exprs), f"panel {panel['title']!r} has no PromQL target"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
    # no two panels overlap on the 24-column grid
    cells = set()
    for panel in panels:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"panel {panel['title']!r} overlaps another"
        cells |= mine
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("request rate", "latency", "queue", "error rate", "source", "fallbacks", "pending", "drift", "score",
                  "candidates"):
        assert topic in titles, topic


def test_the_dashboard_uses_only_exported_metrics():
    used = {name for _, target in _targets() for name in metric_names(target["expr"])}
    assert {"recserve_responses_total", "recserve_fallbacks_total", "nv_inference_pending_request_count"} <= used
    unknown = sorted(n for n in used if not known(n))
    assert not unknown, f"not exported by the server (deploy/prometheus/exported-metrics.txt): {unknown}"


def test_the_dashboards_queries_are_valid_promql(tmp_path):
    """Each panel query, with Grafana's variables filled in, as a recording rule that promtool parses."""
    yaml = pytest.importorskip("yaml", reason="pyyaml is not installed: pip install pyyaml")
    values = {"$__rate_interval": "5m", "$__interval": "1m", "$job": "recserve", "$instance": ".*"}
    rules = []
    for panel, target in _targets():
        expr = target["expr"]
        for var, value in values.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, f"panel {panel['title']!r}: unknown variable in {expr}"
        rules.append({"record": f"dashboard:panel{panel['id']}:{target['refId']}", "expr": expr})
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    assert f"SUCCESS: {len(rules)} rules found" in _run("check", "rules", str(path))
