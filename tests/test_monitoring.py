"""The dashboard and the alert rules can never go blank silently: every series name that a Grafana panel, a
dashboard variable, an alert rule or the autoscaler queries is exported by a running service's /metrics.
Also: the PromQL name extraction itself, and the Prometheus configuration and rules checked by promtool."""
from __future__ import annotations

import json
import subprocess

import httpx
import pytest
import yaml

from tests.deploy_tools import (REPO, dashboard_queries, exported_names, promql_metric_names, require,
                                rule_queries, run)
from tests.service_helpers import Server

DASHBOARD = REPO / "docker/grafana/dashboards/armt.json"
PROMETHEUS = REPO / "docker/prometheus"
HPA = REPO / "deploy/k8s/hpa.yaml"
# Series that Prometheus makes itself for every target; no service exports them.
PROMETHEUS_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
PROMTOOL_INSTALL = "`apt-get install prometheus` (Debian's package carries promtool; .ci/run installs it)"


def queried_names() -> dict[str, set[str]]:
    """Series name -> where it is queried."""
    sources = {"dashboard": dashboard_queries(json.loads(DASHBOARD.read_text())),
               "alert rules": rule_queries(yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]),
               "autoscaler": [m["pods"]["metric"]["name"] for m in yaml.safe_load(HPA.read_text())["spec"]["metrics"]]}
    where: dict[str, set[str]] = {}
    for source, exprs in sources.items():
        for expr in exprs:
            for name in promql_metric_names(expr):
                where.setdefault(name, set()).add(source)
    return where


def test_promql_names_are_series_not_functions_labels_or_keywords():
    expr = ('sum by (le, route) (rate(a_bucket{route=~"/v1/(x|y)", s!="5.."}[$__rate_interval] offset 1h))'
            ' / on (instance) group_left(version) b_info and ignoring (x) c > bool 0.95 or vector(1)')
    assert promql_metric_names(expr) == {"a_bucket", "b_info", "c"}
    assert promql_metric_names('histogram_quantile(0.99, sum(rate(x_seconds_bucket[5m])) by (le))') == \
        {"x_seconds_bucket"}


@pytest.fixture(scope="module")
def metrics_page(tiny_model_dir, tmp_path_factory) -> str:
    """/metrics of a real `armt serve` after some traffic: a question, an append, a 409, a 404."""
    with Server(tiny_model_dir, tmp_path_factory.mktemp("monitoring")) as srv, httpx.Client(base_url=srv.url) as c:
        sid = c.post("/v1/sessions").json()["id"]
        text = {"Content-Type": "text/plain; charset=utf-8"}
        assert c.post(f"/v1/sessions/{sid}/append", params={"offset": 0}, content=b"a b c d e f",
                      headers=text).status_code == 200
        assert c.post(f"/v1/sessions/{sid}/append", params={"offset": 3}, content=b"x", headers=text).status_code == 409
        assert c.get(f"/v1/sessions/{'0' * 32}").status_code == 404
        assert c.post(f"/v1/sessions/{sid}/ask", json={"question": "What?", "max_new_tokens": 3}).status_code == 200
        return c.get("/metrics").text


def test_every_queried_series_is_exported(metrics_page):
    exported = exported_names(metrics_page)
    where = queried_names()
    assert len(where) >= 15  # the extraction found the dashboard's queries at all
    missing = {name: sorted(src) for name, src in where.items()
               if name not in exported and name not in PROMETHEUS_SERIES}
    assert not missing, f"queried but not exported by /metrics: {missing}"
    samples = {line.split("{")[0].split(" ")[0] for line in metrics_page.splitlines() if not line.startswith("#")}
    # After that traffic these have real samples, not just a TYPE line.
    assert {"armt_time_to_first_token_seconds_bucket", "armt_failures_total", "armt_state_save_seconds_bucket",
            "armt_request_duration_seconds_count", "armt_queue_capacity"} <= samples


def test_dashboard_is_provisioned_against_the_provisioned_datasource():
    dashboard = json.loads(DASHBOARD.read_text())
    sources = yaml.safe_load((REPO / "docker/grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = sources["datasources"][0]["uid"]
    provider = yaml.safe_load((REPO / "docker/grafana/provisioning/dashboards/armt.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"  # compose mounts it there
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    for panel in panels:
        assert panel["datasource"]["uid"] == uid and panel["targets"], panel["title"]
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
    titles = " ".join(p["title"].lower() for p in panels)
    for wanted in ("time to first token", "inter-token", "ingest tokens", "ingest segments", "request rate",
                   "errors by reason", "queue depth", "sessions", "state bytes", "save and load"):
        assert wanted in titles, wanted


def test_promtool_checks_the_prometheus_config_and_rules(tmp_path):
    promtool = require("promtool", PROMTOOL_INSTALL)
    run([promtool, "check", "config", str(PROMETHEUS / "prometheus.yml")])
    out = run([promtool, "check", "rules", str(PROMETHEUS / "alerts.yml")]).stdout
    assert "SUCCESS: 6 rules found" in out
    run([promtool, "test", "rules", str(PROMETHEUS / "alerts.test.yml")])  # each alert fires when it should
    broken = tmp_path / "broken.yml"  # the checker really checks
    broken.write_text("groups:\n  - name: x\n    rules:\n      - alert: A\n        expr: sum(rate(x[5m]) > \n")
    assert subprocess.run([promtool, "check", "rules", str(broken)], capture_output=True).returncode != 0
