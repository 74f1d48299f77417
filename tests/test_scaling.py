"""Lesson 11's pieces: a real 2-node Ray cluster (in a private network namespace), the load
generator's fault injection, the engine batching hook, and the offline Kubernetes checks."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from course_utils import cluster, data, optional
from course_utils.serving import run_load, serve_asgi_in_thread

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "deploy" / "k8s"))
import validate  # noqa: E402


# ----------------------------------------------------------------------------- the Ray cluster
def test_isolated_command_brings_loopback_up_and_runs_the_command():
    command = cluster.isolated_command(["python", "-c", "pass"])
    assert command[0] == "unshare" and "--pid" in command and "ip link set lo up" in command[7]
    assert command[-3:] == ["python", "-c", "pass"]
    with pytest.raises(ValueError, match="nodes >= 1"):
        cluster.LocalRayCluster(nodes=0)


def test_two_node_ray_cluster_serves_survives_a_node_kill_and_leaves_nothing_behind():
    optional.skip_unless("userns", "test_scaling: the two-node Ray cluster drill")
    drill = [sys.executable, str(ROOT / "deploy" / "ray" / "drill.py"), "--seconds", "0.5", "--clients", "4",
             "--deadline", "100"]
    done = subprocess.run(cluster.isolated_command(drill), capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["nodes"] == ["head", "worker"] and report["replicas"] == ["head", "worker"], report
    assert set(report["answers_by_node"]) == {"head", "worker"}, "both replicas answered before the kill"
    assert report["load"]["4"]["errors"] == 0 and report["load"]["4"]["mismatches"] == 0
    kill = report["kill"]
    assert report["killed_pid"] > 0 and report["alive_nodes_after"] == 1, report
    assert kill["mismatches"] == 0, "every answer, even during the kill, is the right digit for its upload"
    # the requests in flight on the dead node's replica fail (at most a few per client), not the rest
    assert kill["requests"] > kill["errors"] and kill["errors"] <= 3 * 8, kill
    after = report["after_kill"]
    assert after["errors"] == 0 and set(after["answers_by_node"]) == {"head"}, after
    assert report["leftover_ray_processes"] == [], "ray stop left processes in the cluster's namespace"


# ----------------------------------------------------------------------------- fault injection in run_load
def _flaky_app(state: dict):
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    app = FastAPI()

    @app.post("/predict")
    async def predict() -> JSONResponse:
        if state["down"]:
            return JSONResponse({"success": False}, status_code=503)
        return JSONResponse({"predictions": [{"class": 0}]}, headers={"X-Served-By": "a"})

    return app


def test_run_load_injects_a_fault_times_the_errors_and_tallies_who_answered():
    state = {"down": False}
    payloads = [(b"png", "image/png", 0)]
    with serve_asgi_in_thread(_flaky_app(state)) as server:
        def outage():
            state["down"] = True

        result = run_load(server.url + "/predict", payloads, 2, 1.0, tally_header="X-Served-By",
                          actions=[(0.4, outage)])
    assert len(result.actions_s) == 1 and 0.35 < result.actions_s[0] < 0.8
    assert result.errors and set(result.errors) == {"503"} and min(result.error_times_s) >= result.actions_s[0]
    assert result.tally["a"] == len(result.latencies_ms) > 0 and result.mismatches == 0
    assert 0.1 < result.recovery_s() <= 1.0          # errors until the end of the run: it never recovered


def test_an_engine_can_take_over_the_services_batching():
    from course_utils.serving.fastapi_app import create_app
    from course_utils.serving.service import ServiceConfig

    calls = []

    async def run_batch(x: np.ndarray) -> np.ndarray:
        calls.append(x.shape)
        await asyncio.sleep(0)
        return np.full((len(x), 10), 0.1)

    raw, content_type, _ = data.sample_payloads()[3]
    with serve_asgi_in_thread(create_app(ServiceConfig(max_batch_size=8), run_batch=run_batch)) as server:
        import requests

        answer = requests.post(server.url + "/predict", files={"file": ("d.png", raw, content_type)}, timeout=30)
    assert answer.status_code == 200 and answer.json()["success"] and calls == [(1, 1, 8, 8)]


# ----------------------------------------------------------------------------- Kubernetes, offline
def test_every_manifest_passes_its_schema_and_agrees_with_the_image():
    lines = validate.check(sorted((ROOT / "deploy" / "k8s").glob("*.yaml")))
    assert len(lines) >= 6 and all(line.startswith("OK") for line in lines), "\n".join(lines)
    kinds = {line.split()[2].split("/")[0] for line in lines}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "InferenceService", "RayService"} <= kinds


@pytest.mark.parametrize("file, old, new, expected", [
    ("service.yaml", "readinessProbe:", "readinesProbe:", "'readinesProbe' was unexpected"),
    ("service.yaml", "{name: http, containerPort: 8000}", "{name: http, containerPort: 8080}", "the image listens on 8000"),
    ("service.yaml", "runAsUser: 10001", "runAsUser: 0", "the image's USER is 10001"),
    ("service.yaml", "path: /health", "path: /healthz", "answers it on '/health'"),
    ("service.yaml", "COURSE_SERVE_THREADS", "COURSE_SERVE_THREAD", "not read by the service"),
    ("service.yaml", "averageUtilization: 70", "averageUtilization: high", "not of type 'integer'"),
    ("inferenceservice.yaml", "canaryTrafficPercent: 10", "canaryTrafficPercent: ten", "not of type 'integer'"),
    ("inferenceservice.yaml", "minReplicas: 2", "minReplica: 2", "'minReplica' was unexpected"),
    ("rayservice.yaml", "name: CourseService", "name: Classifier", "no deployment 'Classifier'"),
    ("rayservice.yaml", "rayVersion:", "rayVersions:", "'rayVersions' was unexpected"),
    ("rayservice.yaml", "max_replicas: 4", "max_replicas: 8", "is not serve_app.AUTOSCALING"),
])
def test_a_broken_manifest_is_refused_with_the_reason(tmp_path, file, old, new, expected):
    text = (ROOT / "deploy" / "k8s" / file).read_text()
    assert old in text
    broken = tmp_path / file
    broken.write_text(text.replace(old, new, 1))
    errors = [line for line in validate.check([broken]) if line.startswith("ERROR")]
    assert any(expected in line for line in errors), errors


def test_vendored_crd_schemas_name_their_source():
    import gzip

    for name in validate.SCHEMAS.values():
        vendored = json.loads(gzip.decompress((ROOT / "deploy" / "k8s" / "schemas" / name).read_bytes()))
        assert vendored["source"].startswith("https://github.com/") and len(vendored["sha256_of_crd"]) == 64
        assert vendored["openAPIV3Schema"]["properties"]["spec"]["type"] == "object"
    assert yaml.safe_load((ROOT / "deploy" / "k8s" / "rayservice.yaml").read_text())["spec"]["serveConfigV2"]
