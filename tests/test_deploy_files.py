"""The deployment files, checked offline by real tools (there is no Docker engine and no cluster here):
Kubernetes manifests rendered by `kubectl kustomize` and validated against the Kubernetes JSON schemas
(kubernetes-validate, strict); the compose files by the real `docker-compose config` (compose-spec validation,
no engine needed); the Dockerfile by hadolint; the PrometheusRule by promtool. Then the wiring that no schema sees:
names that must match across files, ARMT_* keys that must be real settings, the wheel the image installs."""
from __future__ import annotations

import copy
import importlib
import json
import subprocess
import sys
import zipfile
from urllib.parse import urlparse

import pytest
import yaml
from kubernetes_validate.utils import ValidationError, validate

from service.settings import Settings
from tests.deploy_tools import REPO, docker_compose, hadolint, kustomize, require, run
from tests.test_monitoring import PROMTOOL_INSTALL

K8S_VERSION = "1.30.0"  # the oldest Kubernetes these manifests are meant for
CRD_GROUPS = ("monitoring.coreos.com/", "ray.io/")  # no schema in kubernetes-validate: checked below instead


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, [d["metadata"]["name"] for d in found])
    return found[0]


def check_settings(env: dict[str, str]) -> None:
    """ARMT_* keys must be settings (a typo would be ignored silently) and their values valid."""
    fields = {f"ARMT_{name.upper()}": name for name in Settings.model_fields}
    unknown = sorted(k for k in env if k.startswith("ARMT_") and k not in fields)
    assert not unknown, f"not ARMT_* settings: {unknown}"
    Settings(**{fields[k]: v for k, v in env.items() if k in fields})


def check_store_url(url: str, docs: list[dict]) -> None:
    """ARMT_STORE names a Redis Service of the same manifests, on a port it exposes."""
    parsed = urlparse(url)
    assert parsed.scheme == "redis", url
    service = one(docs, "Service", parsed.hostname)
    assert parsed.port in {p["port"] for p in service["spec"]["ports"]}


def validate_builtins(docs: list[dict]) -> None:
    for doc in docs:
        if not doc["apiVersion"].startswith(CRD_GROUPS):
            validate(doc, K8S_VERSION, strict=True)


@pytest.fixture(scope="module")
def k8s() -> list[dict]:
    return kustomize(REPO / "deploy/k8s")


def test_k8s_manifests_render_and_pass_the_kubernetes_schemas(k8s):
    assert sorted(d["kind"] for d in k8s) == sorted([
        "Namespace", "Secret", "ConfigMap", "Service", "Service", "StatefulSet", "Deployment",
        "PodDisruptionBudget", "HorizontalPodAutoscaler", "ServiceMonitor", "PrometheusRule"])
    validate_builtins(k8s)
    assert {d["metadata"].get("namespace") for d in k8s if d["kind"] != "Namespace"} == {"armt"}
    broken = copy.deepcopy(one(k8s, "Deployment"))  # the validator really checks: a misspelt field fails
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(ValidationError):
        validate(broken, K8S_VERSION, strict=True)


def test_k8s_deployment_probes_gpu_config_and_secret(k8s):
    deployment = one(k8s, "Deployment", "armt-serve")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert "http" in {p["name"] for p in container["ports"]}
    probes = {kind: (container[kind]["httpGet"]["path"], container[kind]["httpGet"]["port"])
              for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes == {"startupProbe": ("/health", "http"), "livenessProbe": ("/health", "http"),
                      "readinessProbe": ("/ready", "http")}
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 10001  # Dockerfile USER
    refs = {k: v["name"] for ref in container["envFrom"] for k, v in ref.items()}
    config = one(k8s, "ConfigMap", refs["configMapRef"])  # the generated name, hash suffix and all
    check_settings(config["data"])
    check_store_url(config["data"]["ARMT_STORE"], k8s)
    secret = one(k8s, "Secret", refs["secretRef"])
    assert set(secret["stringData"]) == {"ARMT_API_KEYS"}
    with pytest.raises(ValueError, match="placeholder"):  # deployed unchanged, the server refuses to start
        check_settings(secret["stringData"])
    check_settings({"ARMT_API_KEYS": secret["stringData"]["ARMT_API_KEYS"].replace("replace-me", "k")})


def test_k8s_service_monitor_autoscaler_and_budget_select_the_pods(k8s):
    pod_labels = one(k8s, "Deployment", "armt-serve")["spec"]["template"]["metadata"]["labels"]
    service = one(k8s, "Service", "armt-serve")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    monitor = one(k8s, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    hpa = one(k8s, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "armt-serve"}
    assert [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]] == ["armt_queue_depth"]
    assert one(k8s, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    redis = one(k8s, "StatefulSet", "armt-redis")
    assert one(k8s, "Service", "armt-redis")["spec"]["selector"].items() <= \
        redis["spec"]["template"]["metadata"]["labels"].items()


def test_prometheus_rule_is_the_plain_rules_file_and_passes_promtool(k8s, tmp_path):
    rule = one(k8s, "PrometheusRule")
    plain = yaml.safe_load((REPO / "docker/prometheus/alerts.yml").read_text())
    assert rule["spec"]["groups"] == plain["groups"]
    extracted = tmp_path / "rules.yml"
    extracted.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    run([require("promtool", PROMTOOL_INSTALL), "check", "rules", str(extracted)])


def test_ray_service_renders_and_its_serve_config_builds_the_app():
    import ray

    docs = kustomize(REPO / "deploy/ray")
    validate_builtins(docs)
    service = one(docs, "RayService")
    assert service["spec"]["rayClusterConfig"]["rayVersion"] == ray.__version__  # the Ray the image installs
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    module, attr = app["import_path"].split(":")
    application = getattr(importlib.import_module(module), attr)(app["args"])  # builds without a cluster
    assert {d["name"] for d in app["deployments"]} == {application._bound_deployment.name}
    assert application._bound_deployment.num_replicas == int(app["args"]["num_replicas"])
    for group in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        env = {e["name"]: e.get("value", "") for e in container["env"]}
        check_settings({k: v for k, v in env.items() if k != "ARMT_API_KEYS"})
        check_store_url(env["ARMT_STORE"], docs)
        secret = next(e["valueFrom"]["secretKeyRef"] for e in container["env"] if e["name"] == "ARMT_API_KEYS")
        assert secret["key"] in one(docs, "Secret", secret["name"])["stringData"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"


def compose_config(*files: str) -> dict:
    cmd = [docker_compose()] + [arg for f in files for arg in ("-f", str(REPO / f))] + ["config", "--format", "json"]
    return json.loads(run(cmd, cwd=REPO, env={"PATH": "/usr/bin:/bin", "HOME": "/tmp"}).stdout)


def test_compose_files_pass_docker_compose_config(tmp_path):
    config = compose_config("docker-compose.yml")
    services = config["services"]
    assert set(services) == {"armt", "redis", "prometheus", "grafana"}
    assert all("healthcheck" in s for s in services.values())
    armt = services["armt"]
    check_settings(armt["environment"])
    assert urlparse(armt["environment"]["ARMT_STORE"]).hostname == "redis"
    assert armt["depends_on"]["redis"]["condition"] == "service_healthy"
    prometheus = yaml.safe_load((REPO / "docker/prometheus/prometheus.yml").read_text())
    (target,) = prometheus["scrape_configs"][0]["static_configs"][0]["targets"]
    assert target == f"armt:{armt['ports'][0]['target']}"
    assert {v["target"] for v in services["grafana"]["volumes"]} >= {"/etc/grafana/provisioning",
                                                                     "/var/lib/grafana/dashboards"}
    gpu = compose_config("docker-compose.yml", "docker-compose.gpu.yml")["services"]["armt"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert gpu["build"]["args"]["VARIANT"] == "cuda" and gpu["environment"]["ARMT_DEVICE"] == "cuda"
    check_settings(gpu["environment"])
    broken = tmp_path / "broken.yml"  # the checker really checks: a misspelt key fails
    broken.write_text((REPO / "docker-compose.yml").read_text().replace("healthcheck:", "healthchek:", 1))
    proc = subprocess.run([docker_compose(), "-f", str(broken), "config", "-q"], capture_output=True, text=True)
    assert proc.returncode != 0 and "healthchek" in proc.stderr


def test_dockerfile_passes_hadolint_and_its_final_stage_is_lean():
    dockerfile = (REPO / "Dockerfile").read_text()
    run([hadolint(), str(REPO / "Dockerfile")])
    final = dockerfile[dockerfile.rindex("\nFROM "):]
    assert final.startswith("\nFROM ${PYTHON_IMAGE} AS runtime") and "slim" in dockerfile.split("PYTHON_IMAGE=")[1]
    for word in ("apt-get", "gcc", "build-essential", "pip install"):  # nothing is built in the final stage
        assert word not in final, word
    assert "USER 10001:10001" in final and "/health" in final.split("HEALTHCHECK")[1]
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ignored[ignored.index("*") + 1:][:4] == ["!pyproject.toml", "!README.md", "!model/", "!service/"]


def test_the_wheel_the_image_installs_carries_the_default_model(tmp_path):
    """The image installs the package (not editable), so the default model must be package data."""
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(REPO)])
    (wheel,) = tmp_path.glob("armt_serve-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    wanted = {f"model/weights/default/{f}" for f in ("armt_config.json", "config.json", "model.safetensors",
                                                      "tokenizer.json")}
    assert wanted <= names and "service/ray_app.py" in names
    run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(tmp_path / "site"), str(wheel)])
    probe = "from model import default_model_path; print(default_model_path())"
    out = run([sys.executable, "-c", probe], env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"},
              cwd=tmp_path).stdout
    assert out.strip().startswith(str(tmp_path / "site"))
