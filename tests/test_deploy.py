"""deploy/ and the Dockerfile (issue 13): checked offline, since this machine has no Docker engine
and no cluster.

- The kustomizations render with the kubectl client (`kubectl kustomize`), and every rendered
  Kubernetes object passes `kubernetes-validate` (Kubernetes' own OpenAPI schemas, strict: an
  unknown or misspelt field fails). KEDA's objects are custom resources it has no schema for: they
  are checked against KEDA_SCHEMAS below, written from KEDA's documentation and its postgresql
  scaler's parameters (keda.sh/docs/2.x/scalers/postgresql), and their HPA `behavior` against the
  autoscaling/v2 schema.
- The numbers that must agree do: the worker's stop grace (terminationGracePeriodSeconds,
  TimeoutStopSec) covers the longest warm stop WorkerConfig allows; probes, scrape annotations,
  BATCHDB_METRICS_PORT and the container port name one port; every Secret reference resolves.
- The systemd units pass `systemd-analyze verify` (with ExecStart pointed at this virtualenv's
  `batchdb`, since /opt/batchdb does not exist here) and `systemd-analyze security --offline`.
- The Dagster Helm values have what the chart's deployment template reads, and its code location
  loads.
- The Dockerfile's own steps (COPY through .dockerignore, pip wheel, python -m venv, its pip
  install with constraints.txt, its ENTRYPOINT and CMD) run in a fresh virtualenv under a fake
  root, so the image recipe cannot rot; then the entry point runs the migrations, a worker (which
  drains a job against the provider simulator and stops on SIGTERM), the dashboard and the
  Dagster code server as the Helm chart starts it.
"""

from __future__ import annotations

import fnmatch
import importlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pandas as pd
import psycopg
import pytest
import yaml
from psycopg.conninfo import make_conninfo

import batchdb
from batchdb.dashboard.run import free_port
from batchdb.simulator import SimulatorProcess
from batchdb.workers.shutdown import Shutdown
from batchdb.workers.worker import WorkerConfig

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
KUBECTL = "/usr/bin/kubectl"
SYSTEMD_ANALYZE = "/usr/bin/systemd-analyze"
# Every kustomization an operator applies (deploy/kubernetes/keda is a Component, rendered through
# the example overlay).
KUSTOMIZATIONS = ("base", "overlays/example")
# The Kubernetes versions the objects are validated against: kubernetes-validate's newest and the
# oldest still supported upstream when this was written.
K8S_VERSIONS = (kubernetes_validate.utils.latest_version(), "1.32.0")

# The longest warm stop a worker can take after SIGTERM (workers/worker.py, Worker.run): its sent
# calls get shutdown_grace, then the batch driver's current step up to shutdown_grace more, and a
# database that stays unreachable is given up on after Shutdown.patience.
WORST_DRAIN_S = 2 * WorkerConfig().shutdown_grace + Shutdown().patience


def _tool(path: str) -> str:
    if not Path(path).exists():
        pytest.skip(f"{path} is not installed")
    return path


def render(kustomization: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        [_tool(KUBECTL), "kustomize", str(DEPLOY / "kubernetes" / kustomization)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def container(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    [only] = by_kind(docs, kind)[name]["spec"]["template"]["spec"]["containers"]
    return only


def env_value(c: dict[str, Any], name: str) -> Any:
    return next(e for e in c.get("env", []) if e["name"] == name)


# -- Kubernetes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_rendered_object_passes_the_kubernetes_schemas(kustomization: str) -> None:
    docs = render(kustomization)
    kinds = sorted(d["kind"] for d in docs)
    assert {"Job", "Deployment", "Service"} <= set(kinds), kinds
    checked = 0
    for doc in docs:
        if doc["apiVersion"].startswith("keda.sh/"):
            continue  # custom resources: test_keda_scaled_object_matches_kedas_documented_fields
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} (Kubernetes {version}): {exc.message}")
        checked += 1
    assert checked == len([d for d in docs if not d["apiVersion"].startswith("keda.sh/")]) >= 4


def test_the_schemas_refuse_a_misspelt_field() -> None:
    """Strict validation is what makes the test above worth having: a typo in a field name fails."""
    worker = by_kind(render("base"), "Deployment")["batchdb-worker"]
    spec = worker["spec"]["template"]["spec"]
    spec["terminationGracePeriodSecond"] = spec.pop("terminationGracePeriodSeconds")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(worker, K8S_VERSIONS[0], strict=True)


def test_the_worker_gets_longer_than_its_longest_drain_before_sigkill() -> None:
    assert WORST_DRAIN_S == 65  # 30 s for sent calls, 30 s for the batch driver's step, 5 s database
    for kustomization in KUSTOMIZATIONS:
        pod = by_kind(render(kustomization), "Deployment")["batchdb-worker"]["spec"]["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] >= WORST_DRAIN_S + 15, kustomization
        # The container gets SIGTERM directly (no preStop hook eating into the grace).
        assert "lifecycle" not in pod["containers"][0]
    dockerfile = Dockerfile.parse(REPO / "Dockerfile")
    assert dockerfile.final.stopsignal == "SIGTERM"


def test_the_metrics_port_is_one_number_everywhere() -> None:
    docs = render("base")
    worker = by_kind(docs, "Deployment")["batchdb-worker"]
    c = container(docs, "Deployment", "batchdb-worker")
    port = int(env_value(c, "BATCHDB_METRICS_PORT")["value"])
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"metrics": port}
    annotations = worker["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(port),
        "prometheus.io/path": "/metrics",
    }
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}, probe
    # A database outage answers 503 too: liveness must outlast a short one (several minutes).
    live = c["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] >= 180
    dockerfile = Dockerfile.parse(REPO / "Dockerfile")
    assert dockerfile.final.env["BATCHDB_METRICS_PORT"] == str(port)
    assert str(port) in dockerfile.final.expose


def test_each_role_runs_the_entry_points_command_as_a_non_root_user() -> None:
    docs = render("base")
    roles = {
        ("Job", "batchdb-migrate"): "migrate",
        ("Deployment", "batchdb-worker"): "worker",
        ("Deployment", "batchdb-dashboard"): "dashboard",
    }
    for (kind, name), role in roles.items():
        obj = by_kind(docs, kind)[name]
        pod = obj["spec"]["template"]["spec"]
        c = container(docs, kind, name)
        assert c["args"][0] == role and "command" not in c, name  # the image's ENTRYPOINT picks the role
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert pod["automountServiceAccountToken"] is False
    # The image's own user is the one the pods ask for (runAsNonRoot needs a numeric USER to check).
    assert Dockerfile.parse(REPO / "Dockerfile").final.user == "10001:10001"
    dashboard_port = container(docs, "Deployment", "batchdb-dashboard")["ports"][0]
    service = by_kind(docs, "Service")["batchdb-dashboard"]
    assert service["spec"]["ports"][0]["targetPort"] == dashboard_port["name"]
    assert service["spec"]["selector"]["app.kubernetes.io/component"] == "dashboard"


def _secret_keys(doc: dict[str, Any]) -> set[str]:
    return set(doc.get("data", {})) | set(doc.get("stringData", {}))


def test_secret_references_resolve_and_provider_keys_reach_only_the_workers() -> None:
    docs = render("overlays/example")
    secrets = {name: _secret_keys(doc) for name, doc in by_kind(docs, "Secret").items()}
    assert set(secrets) == {"batchdb-database", "batchdb-providers"}
    users_of_providers = set()
    for doc in docs:
        if doc["kind"] not in ("Deployment", "Job"):
            continue
        for c in doc["spec"]["template"]["spec"]["containers"]:
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secrets[ref["name"]], (doc["metadata"]["name"], ref)
            for source in c.get("envFrom", []):
                name = source["secretRef"]["name"]
                assert name in secrets
                if name == "batchdb-providers":
                    users_of_providers.add(doc["metadata"]["name"])
            dsn = env_value(c, "BATCHDB_DSN")["valueFrom"]["secretKeyRef"]
            assert dsn["name"] == "batchdb-database"
    assert users_of_providers == {"batchdb-worker"}
    for auth in by_kind(docs, "TriggerAuthentication").values():
        for ref in auth["spec"]["secretTargetRef"]:
            assert ref["key"] in secrets[ref["name"]], ref


# KEDA 2.x custom resources, from its documentation (keda.sh/docs/2.x/concepts/scaling-deployments,
# .../authentication, .../scalers/postgresql). Closed objects, so a misspelt field fails here as it
# would be ignored (or refused) by the cluster.
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_NUMBER_TEXT = {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"}
KEDA_SCHEMAS: dict[str, dict[str, Any]] = {
    "ScaledObject": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "keda.sh/v1alpha1"},
            "kind": {"const": "ScaledObject"},
            "metadata": {"type": "object", "required": ["name"]},
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["scaleTargetRef", "triggers"],
                "properties": {
                    "scaleTargetRef": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["name"],
                        "properties": {
                            "apiVersion": {"type": "string"},
                            "kind": {"type": "string"},
                            "name": {"type": "string"},
                            "envSourceContainerName": {"type": "string"},
                        },
                    },
                    "pollingInterval": {"type": "integer", "minimum": 1},
                    "cooldownPeriod": {"type": "integer", "minimum": 0},
                    "initialCooldownPeriod": {"type": "integer", "minimum": 0},
                    "idleReplicaCount": {"type": "integer", "minimum": 0},
                    "minReplicaCount": {"type": "integer", "minimum": 0},
                    "maxReplicaCount": {"type": "integer", "minimum": 1},
                    "fallback": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["failureThreshold", "replicas"],
                        "properties": {"failureThreshold": {"type": "integer"}, "replicas": {"type": "integer"}},
                    },
                    "advanced": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "restoreToOriginalReplicaCount": {"type": "boolean"},
                            "horizontalPodAutoscalerConfig": {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": {"name": {"type": "string"}, "behavior": {"type": "object"}},
                            },
                            "scalingModifiers": {"type": "object"},
                        },
                    },
                    "triggers": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["type", "metadata"],
                            "properties": {
                                "type": {"type": "string"},
                                "name": {"type": "string"},
                                "metadata": _STRING_MAP,
                                "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                                "useCachedMetrics": {"type": "boolean"},
                                "authenticationRef": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "required": ["name"],
                                    "properties": {
                                        "name": {"type": "string"},
                                        "kind": {"enum": ["TriggerAuthentication", "ClusterTriggerAuthentication"]},
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
    "TriggerAuthentication": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "keda.sh/v1alpha1"},
            "kind": {"const": "TriggerAuthentication"},
            "metadata": {"type": "object", "required": ["name"]},
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "secretTargetRef": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["parameter", "name", "key"],
                            "properties": {
                                "parameter": {"type": "string"},
                                "name": {"type": "string"},
                                "key": {"type": "string"},
                            },
                        },
                    },
                    "env": {"type": "array"},
                    "podIdentity": {"type": "object"},
                },
            },
        },
    },
}
# The postgresql scaler's trigger metadata and authentication parameters (KEDA 2.x).
POSTGRESQL_METADATA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["query", "targetQueryValue"],
    "properties": {
        "query": {"type": "string", "pattern": r"(?i)^\s*select\b"},
        "targetQueryValue": _NUMBER_TEXT,
        "activationTargetQueryValue": _NUMBER_TEXT,
        "connectionFromEnv": {"type": "string"},
        "host": {"type": "string"},
        "port": {"type": "string"},
        "userName": {"type": "string"},
        "dbName": {"type": "string"},
        "sslmode": {"type": "string"},
        "passwordFromEnv": {"type": "string"},
    },
}
POSTGRESQL_AUTH_PARAMETERS = {"connection", "password", "host", "port", "userName", "dbName", "sslmode"}
QUEUE_DEPTH_QUERY = "SELECT coalesce(sum(due_rows), 0) FROM batchdb.queue_depth"


def test_keda_scaled_object_matches_kedas_documented_fields() -> None:
    docs = render("overlays/example")
    [scaled] = by_kind(docs, "ScaledObject").values()
    [auth] = by_kind(docs, "TriggerAuthentication").values()
    jsonschema.validate(scaled, KEDA_SCHEMAS["ScaledObject"])
    jsonschema.validate(auth, KEDA_SCHEMAS["TriggerAuthentication"])
    [trigger] = scaled["spec"]["triggers"]
    assert trigger["type"] == "postgresql"
    jsonschema.validate(trigger["metadata"], POSTGRESQL_METADATA)
    assert trigger["metadata"]["query"] == QUEUE_DEPTH_QUERY
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    assert {ref["parameter"] for ref in auth["spec"]["secretTargetRef"]} == {"connection"}
    assert {ref["parameter"] for ref in auth["spec"]["secretTargetRef"]} <= POSTGRESQL_AUTH_PARAMETERS
    # It scales the worker Deployment, which leaves its replica count to KEDA.
    target = scaled["spec"]["scaleTargetRef"]
    worker = by_kind(docs, "Deployment")[target["name"]]
    assert (target["apiVersion"], target["kind"]) == ("apps/v1", "Deployment")
    assert worker["metadata"]["name"] == "batchdb-worker" and "replicas" not in worker["spec"]
    assert 1 <= scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"]
    # The HPA KEDA creates gets this behavior verbatim: Kubernetes' own schema for it.
    behavior = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "keda-hpa-batchdb-worker"},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "batchdb-worker"},
            "maxReplicas": scaled["spec"]["maxReplicaCount"],
            "behavior": behavior,
        },
    }
    kubernetes_validate.validate(hpa, K8S_VERSIONS[0], strict=True)


def test_the_keda_schema_refuses_a_misspelt_trigger_field() -> None:
    [scaled] = by_kind(render("overlays/example"), "ScaledObject").values()
    scaled["spec"]["triggers"][0]["authRef"] = scaled["spec"]["triggers"][0].pop("authenticationRef")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(scaled, KEDA_SCHEMAS["ScaledObject"])
    metadata = {"query": QUEUE_DEPTH_QUERY, "targetValue": "1000"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(metadata, POSTGRESQL_METADATA)


def test_the_keda_query_counts_the_rows_due(conn: psycopg.Connection, dsn: str) -> None:
    """KEDA's scaler reads the first column of the first row as a number: 0 on an empty queue, the
    queued rows once a job is submitted."""
    found = conn.execute("SELECT to_regclass('batchdb.queue_depth') IS NOT NULL AS found").fetchone()
    if not found["found"]:
        pytest.skip("batchdb.queue_depth is not in this schema yet (issue 13's metrics work adds it)")
    [value] = conn.execute(QUEUE_DEPTH_QUERY).fetchone().values()
    assert float(value) == 0
    batchdb.submit(
        pd.DataFrame({"text": ["a", "b", "c", "d", "e"]}), prompt="{text}", model="m", provider="instant", dsn=dsn
    )
    [value] = conn.execute(QUEUE_DEPTH_QUERY).fetchone().values()
    assert float(value) == 5


# -- systemd ---------------------------------------------------------------------------------------

UNITS = DEPLOY / "systemd"
IMAGE_BATCHDB = "/opt/batchdb/bin/batchdb"


def _units_here(tmp_path: Path) -> Path:
    """The units with ExecStart pointed at this virtualenv's `batchdb`: `systemd-analyze verify`
    refuses a unit whose binary does not exist, and /opt/batchdb exists only where it is installed."""
    here = Path(sys.executable).parent / "batchdb"
    assert here.exists(), here
    for unit in UNITS.glob("*.service"):
        text = unit.read_text()
        assert f"ExecStart={IMAGE_BATCHDB} " in text, unit.name
        (tmp_path / unit.name).write_text(text.replace(IMAGE_BATCHDB, str(here)))
    return tmp_path


def test_the_systemd_units_verify(tmp_path: Path) -> None:
    units = _units_here(tmp_path)
    result = subprocess.run(
        [_tool(SYSTEMD_ANALYZE), "verify", "--man=no", "batchdb-worker@9464.service", "batchdb-migrate.service"],
        cwd=units,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_the_worker_unit_stops_gracefully_and_is_hardened(tmp_path: Path) -> None:
    text = (UNITS / "batchdb-worker@.service").read_text()
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            name, value = line.split("=", 1)
            settings.setdefault(name, []).append(value)
    assert settings["KillSignal"] == ["SIGTERM"] and settings["Restart"] == ["on-failure"]
    [stop] = settings["TimeoutStopSec"]
    assert int(stop.removesuffix("s")) >= WORST_DRAIN_S + 15
    assert settings["User"] == ["batchdb"] and settings["Environment"] == ["BATCHDB_METRICS_PORT=%i"]
    assert settings["EnvironmentFile"] == ["/etc/batchdb/worker.env", "-/etc/batchdb/worker-%i.env"]
    units = _units_here(tmp_path)
    # systemd's own exposure score (0 safest, 10 unprotected); --threshold is in tenths.
    for unit, most in (("batchdb-worker@9464.service", 2.0), ("batchdb-migrate.service", 3.0)):
        result = subprocess.run(
            [_tool(SYSTEMD_ANALYZE), "security", "--offline=yes", f"--threshold={int(most * 10)}", unit],
            cwd=units,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr


# -- Dagster Helm values ---------------------------------------------------------------------------


def test_the_dagster_helm_values_have_what_the_chart_reads() -> None:
    """The chart's user-deployment template (helm/dagster/charts/dagster-user-deployments) reads
    name, image.{repository,tag,pullPolicy}, dagsterApiGrpcArgs (or codeServerArgs), port, env (a
    list of EnvVar), envSecrets and volumes/volumeMounts and the security contexts (Kubernetes types)."""
    values = yaml.safe_load((DEPLOY / "dagster" / "values.yaml").read_text())
    user_code = values["dagster-user-deployments"]
    assert user_code["enabled"] is True
    [deployment] = user_code["deployments"]
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", deployment["name"])
    image = deployment["image"]
    assert set(image) == {"repository", "tag", "pullPolicy"} and image["pullPolicy"] in ("IfNotPresent", "Always")
    kustomization = yaml.safe_load((DEPLOY / "kubernetes" / "overlays" / "example" / "kustomization.yaml").read_text())
    [kimage] = kustomization["images"]
    # The same image and release as the Kubernetes example, which is this version.
    assert (image["repository"], image["tag"]) == (kimage["newName"], kimage["newTag"])
    assert image["tag"] == batchdb.__version__
    args = deployment["dagsterApiGrpcArgs"]
    assert "codeServerArgs" not in deployment and all(isinstance(a, str) for a in args)
    assert isinstance(deployment["port"], int)
    assert all(set(s) == {"name"} for s in deployment["envSecrets"])
    # The Kubernetes-typed parts, as the chart places them in its pod template.
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": deployment["name"]},
        "spec": {
            "securityContext": deployment["podSecurityContext"],
            "volumes": deployment["volumes"],
            "containers": [
                {
                    "name": "dagster-user-deployments",
                    "image": f"{image['repository']}:{image['tag']}",
                    "imagePullPolicy": image["pullPolicy"],
                    "args": ["dagster", "api", "grpc", "-h", "0.0.0.0", "-p", str(deployment["port"]), *args],
                    "env": deployment["env"],
                    "envFrom": [{"secretRef": s} for s in deployment["envSecrets"]],
                    "volumeMounts": deployment["volumeMounts"],
                    "securityContext": deployment["securityContext"],
                    "resources": deployment["resources"],
                }
            ],
        },
    }
    kubernetes_validate.validate(pod, K8S_VERSIONS[0], strict=True)
    # The code location it names loads, with batchdb's assets in it.
    assert args[0] == "-m"
    module = importlib.import_module(args[1])
    from dagster import Definitions

    [defs] = [v for v in vars(module).values() if isinstance(v, Definitions)]
    assert defs.resolve_asset_graph().get_all_asset_keys()


# -- the Dockerfile, run in a fresh virtualenv ------------------------------------------------------


@dataclass
class Stage:
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    expose: list[str] = field(default_factory=list)
    stopsignal: str | None = None
    user: str | None = None
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)


@dataclass
class Dockerfile:
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    @classmethod
    def parse(cls, path: Path) -> Dockerfile:
        """Instructions per stage (continuation lines joined, comments dropped)."""
        lines: list[str] = []
        pending = ""
        for raw in path.read_text().splitlines():
            if raw.lstrip().startswith("#") or not raw.strip():
                continue
            if raw.rstrip().endswith("\\"):
                pending += raw.rstrip()[:-1] + " "
                continue
            lines.append(pending + raw.strip())
            pending = ""
        stages: list[Stage] = []
        for line in lines:
            keyword, _, rest = line.partition(" ")
            keyword, rest = keyword.upper(), rest.strip()
            if keyword == "FROM":
                parts = rest.split()
                stages.append(Stage(parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None))
                continue
            stage = stages[-1]
            stage.instructions.append((keyword, rest))
            if keyword == "ENV":
                for pair in shlex.split(rest):
                    name, _, value = pair.partition("=")
                    stage.env[name] = value
            elif keyword == "EXPOSE":
                stage.expose += rest.split()
            elif keyword == "STOPSIGNAL":
                stage.stopsignal = rest
            elif keyword == "USER":
                stage.user = rest
            elif keyword in ("ENTRYPOINT", "CMD"):
                setattr(stage, keyword.lower(), json.loads(rest))
        return cls(stages)


# The image paths the Dockerfile writes; under the fake root here.
IMAGE_PATHS = ("/src", "/wheels", "/opt/batchdb", "/usr/local/bin/batchdb-entrypoint", "/home/batchdb")
_IMAGE_PATH = re.compile(r"(?<![\w./-])(" + "|".join(re.escape(p) for p in IMAGE_PATHS) + r")(?=$|[/\s\"':;)*])")


def dockerignore_admits(patterns: list[str], relative: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    admitted = True
    parts = relative.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.removeprefix("!")
        for candidate in candidates:
            if fnmatch.fnmatchcase(candidate, pattern) or (
                pattern.startswith("**/") and fnmatch.fnmatchcase(candidate.rsplit("/", 1)[-1], pattern[3:])
            ):
                admitted = negated
                break
    return admitted


def build_context(dest: Path) -> None:
    """What `docker build .` sends: the checkout through .dockerignore (symlinks kept, as COPY keeps them)."""
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    tracked = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for relative in sorted(filter(None, tracked.split("\0"))):
        source = REPO / relative
        if not dockerignore_admits(patterns, relative) or not (source.exists() or source.is_symlink()):
            continue
        target = dest / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            target.symlink_to(os.readlink(source))
        else:
            shutil.copy2(source, target)


@dataclass
class FakeImage:
    root: Path  # the final stage's filesystem, image paths under it
    env: dict[str, str]
    entrypoint: list[str]
    cmd: list[str]
    workdir: Path
    log: list[str]

    def run_env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
        return {**env, **self.env, "HOME": str(self.workdir), **extra}


def _inside(root: Path, text: str) -> str:
    return _IMAGE_PATH.sub(lambda m: str(root) + m.group(1), text)


def build_fake_image(dockerfile: Dockerfile, base: Path) -> FakeImage:
    """Run the Dockerfile's steps on this machine, every image path under a fake root per stage.

    What differs from `docker build`, and why: the base image's Python is this interpreter (3.11, as
    python:3.11-slim's); `useradd` is not run (the tests are not root); the fresh virtualenv the
    Dockerfile creates gets this environment's site-packages through a .pth line and its
    `pip install` runs with --no-index added, so the dependencies are found installed (offline, as
    tests/test_packaging.py does) while the batchdb wheel, its extras and constraints.txt are resolved
    by the Dockerfile's own command."""
    import sysconfig

    log: list[str] = []
    roots: dict[str, Path] = {}
    path_env = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    deps = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    context = base / "context"
    build_context(context)
    for index, stage in enumerate(dockerfile.stages):
        root = base / f"stage{index}"
        root.mkdir()
        roots[stage.name or str(index)] = root
        env: dict[str, str] = {}
        workdir = root
        for keyword, rest in stage.instructions:
            if keyword == "ENV":
                for name, value in stage.env.items():
                    env[name] = _inside(root, value).replace("$PATH", path_env)
            elif keyword == "WORKDIR":
                workdir = Path(_inside(root, rest))
                workdir.mkdir(parents=True, exist_ok=True)
            elif keyword == "COPY":
                words = rest.split()
                source_root = context
                if words[0].startswith("--from="):
                    source_root = roots[words.pop(0).removeprefix("--from=")]
                *sources, dest = words
                for source in sources:
                    origin = source_root / source.lstrip("/") if source != "." else source_root
                    target = Path(_inside(root, dest)) if dest.startswith("/") else workdir / dest
                    if origin.is_dir():
                        shutil.copytree(origin, target, symlinks=True, dirs_exist_ok=True)
                    else:
                        target.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(origin, target)
            elif keyword == "RUN":
                if rest.startswith("useradd "):
                    log.append(f"skipped: {rest}")
                    continue
                command = _inside(root, rest)
                command = re.sub(r"\bpip install ", "pip install --no-index ", command)
                log.append(command)
                result = subprocess.run(
                    ["sh", "-c", command],
                    cwd=workdir,
                    env={**os.environ, "PATH": path_env, **env},
                    capture_output=True,
                    text=True,
                    timeout=600,
                )
                assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
                venv_python = root / "opt" / "batchdb" / "bin" / "python"
                if " -m venv " in command and venv_python.exists():
                    purelib = subprocess.run(
                        [str(venv_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        capture_output=True,
                        text=True,
                        check=True,
                    ).stdout.strip()
                    Path(purelib, "_batchdb_test_deps.pth").write_text("".join(f"{d}\n" for d in deps))
            elif keyword in ("USER", "EXPOSE", "STOPSIGNAL", "ENTRYPOINT", "CMD", "ARG", "LABEL"):
                pass
            else:
                pytest.fail(f"the fake build does not know {keyword}: teach build_fake_image what it does")
    final = dockerfile.final
    return FakeImage(
        root=root,
        env=env,
        entrypoint=[_inside(root, word) for word in final.entrypoint],
        cmd=final.cmd,
        workdir=workdir,
        log=log,
    )


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> FakeImage:
    return build_fake_image(Dockerfile.parse(REPO / "Dockerfile"), tmp_path_factory.mktemp("image"))


@pytest.fixture
def empty_database(admin_dsn: str) -> Iterator[str]:
    name = f"batchdb_t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    yield make_conninfo(admin_dsn, dbname=name)
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def started() -> Iterator[Callable[[subprocess.Popen[bytes]], subprocess.Popen[bytes]]]:
    """Processes handed to it get SIGTERM, then SIGKILL, if still running when the test ends."""
    processes: list[subprocess.Popen[bytes]] = []
    yield lambda process: processes.append(process) or process  # type: ignore[func-returns-value]
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=WORST_DRAIN_S + 15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _start(image: FakeImage, args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [*image.entrypoint, *args],
            cwd=image.workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group, as PID 1 of a container is
        )


def _wait_for(condition: Callable[[], bool], process: subprocess.Popen[bytes], log: Path, what: str) -> None:
    deadline = time.monotonic() + 180
    while not condition():
        assert process.poll() is None, f"{what}: exited {process.returncode}\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}\n{log.read_text()[-3000:]}"
        time.sleep(0.2)


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status, reply.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, ""


@pytest.mark.slow
def test_the_image_recipe_builds_in_a_fresh_virtualenv(image: FakeImage) -> None:
    site = subprocess.run(
        [str(image.root / "opt" / "batchdb" / "bin" / "python"), "-c", "import batchdb; print(batchdb.__file__)"],
        env=image.run_env(),
        cwd=image.workdir,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert site.startswith(str(image.root / "opt" / "batchdb")), site  # the wheel's, not this checkout's
    assert image.cmd == ["worker"] and image.entrypoint == [str(image.root / "usr/local/bin/batchdb-entrypoint")]
    assert any("pip wheel" in line for line in image.log) and any("[dagster,dashboard]" in line for line in image.log)
    # The wheel was built from what .dockerignore lets through, and holds every migration.
    wheel_sql = sorted((Path(site).parent / "_sql" / "migrations").glob("*.sql"))
    assert [p.name for p in wheel_sql] == sorted(p.name for p in (REPO / "sql" / "migrations").glob("*.sql"))


@pytest.mark.slow
def test_the_entry_point_migrates_then_runs_a_worker_that_drains_and_stops_on_sigterm(
    image: FakeImage,
    empty_database: str,
    tmp_path: Path,
    simulator: Callable[..., SimulatorProcess],
    started: Callable[[subprocess.Popen[bytes]], subprocess.Popen[bytes]],
) -> None:
    sim = simulator()
    env = image.run_env(BATCHDB_DSN=empty_database, OPENAI_BASE_URL=sim.openai_base_url, OPENAI_API_KEY="sk-test")
    migrate = subprocess.run(
        [*image.entrypoint, "migrate"], cwd=image.workdir, env=env, capture_output=True, text=True, timeout=300
    )
    assert migrate.returncode == 0, migrate.stdout[-3000:] + migrate.stderr[-3000:]
    job = batchdb.submit(
        pd.DataFrame({"text": [f"t{i}" for i in range(20)]}),
        prompt="Say {text}",
        model="gpt-4o-mini",
        provider="openai",
        dsn=empty_database,
    )
    help_text = subprocess.run(
        [*image.entrypoint, "worker", "--help"], cwd=image.workdir, env=env, capture_output=True, text=True, timeout=120
    ).stdout
    metrics_port = free_port() if "--metrics-port" in help_text else None
    if metrics_port is not None:
        env["BATCHDB_METRICS_PORT"] = str(metrics_port)
    else:
        env.pop("BATCHDB_METRICS_PORT", None)  # a worker without metrics may not know the variable
    log = tmp_path / "worker.log"
    worker = started(_start(image, [*image.cmd, "--poll-interval", "0.3"], log, env))
    _wait_for(lambda: job.status().status == "completed", worker, log, "the job to complete")
    assert job.status().n_succeeded == 20
    if metrics_port is not None:
        status, body = _get(f"http://127.0.0.1:{metrics_port}/healthz")
        assert status == 200, body
        status, body = _get(f"http://127.0.0.1:{metrics_port}/metrics")
        assert status == 200 and "# TYPE batchdb_" in body, body[:2000]
    os.killpg(worker.pid, signal.SIGTERM)
    assert worker.wait(timeout=WORST_DRAIN_S + 15) == 0, log.read_text()[-3000:]


@pytest.mark.slow
def test_the_entry_point_serves_the_dashboard_on_every_address(
    image: FakeImage,
    dsn: str,
    tmp_path: Path,
    started: Callable[[subprocess.Popen[bytes]], subprocess.Popen[bytes]],
) -> None:
    port = free_port("0.0.0.0")
    log = tmp_path / "dashboard.log"
    dashboard = started(_start(image, ["dashboard", "--port", str(port)], log, image.run_env(BATCHDB_DSN=dsn)))
    _wait_for(lambda: f"batchdb dashboard on http://0.0.0.0:{port}" in log.read_text(), dashboard, log, "the dashboard")
    assert _get(f"http://127.0.0.1:{port}/_stcore/health") == (200, "ok")  # what the probes ask
    os.killpg(dashboard.pid, signal.SIGTERM)
    assert dashboard.wait(timeout=60) == 0, log.read_text()[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("started_as", ["helm chart", "code-server role"])
def test_the_entry_point_runs_the_dagster_code_server(
    started_as: str,
    image: FakeImage,
    dsn: str,
    tmp_path: Path,
    started: Callable[[subprocess.Popen[bytes]], subprocess.Popen[bytes]],
) -> None:
    """The chart passes `dagster api grpc -h 0.0.0.0 -p PORT <dagsterApiGrpcArgs>` as the container's
    args (after the image's ENTRYPOINT) and probes it with `dagster api grpc-health-check -p PORT`;
    the `code-server` role starts the same server."""
    values = yaml.safe_load((DEPLOY / "dagster" / "values.yaml").read_text())
    [deployment] = values["dagster-user-deployments"]["deployments"]
    port = free_port("0.0.0.0")
    if started_as == "helm chart":
        args = ["dagster", "api", "grpc", "-h", "0.0.0.0", "-p", str(port), *deployment["dagsterApiGrpcArgs"]]
    else:
        args = ["code-server", "-p", str(port), "-m", "batchdb.dagster.example"]
    env = image.run_env(BATCHDB_DSN=dsn, DAGSTER_HOME=str(tmp_path))
    log = tmp_path / "code-server.log"
    server = started(_start(image, args, log, env))

    def healthy() -> bool:
        probe = subprocess.run(
            ["dagster", "api", "grpc-health-check", "-p", str(port)],
            env=env,
            cwd=image.workdir,
            capture_output=True,
            timeout=60,
        )
        return probe.returncode == 0

    _wait_for(healthy, server, log, "the code server's health check")
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=60)
