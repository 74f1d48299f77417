"""Lesson 11's Ray Serve drill, run inside a private network namespace (see course_utils.cluster).

Starts a real 2-node Ray cluster on 127.0.0.1 (one CPU per node), serves the course model with
Ray Serve (serve_app.CourseService: two replicas, one per node), times it at several client
counts, SIGKILLs the worker node's raylet under load, optionally runs an engine-level canary,
stops everything and prints one JSON object (the last line of stdout):

    python -c "import subprocess, sys; from course_utils import cluster; subprocess.run(cluster.isolated_command(
        [sys.executable, 'deploy/ray/drill.py']))"
"""

from __future__ import annotations

import argparse
import io
import json
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

import requests  # noqa: E402

from course_utils import cluster, data  # noqa: E402
from course_utils.serving import run_load  # noqa: E402

RAY_ENV = {
    # Serve's proxy prefers replicas on its own node: with one proxy (on the head) the worker's would idle
    "RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0",
    # the GCS declares a silent node dead after 3 missed checks 0.5 s apart (default: 5 x 3 s)
    "RAY_health_check_period_ms": "500", "RAY_health_check_failure_threshold": "3",
}
PORT = 8000      # inside the namespace: nothing else listens here, and nothing outside can reach it


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=1.5, help="length of each timed load")
    parser.add_argument("--clients", default="1,8,32", help="client counts to time")
    parser.add_argument("--kill-clients", type=int, default=8)
    parser.add_argument("--candidate", help="a second model file: also run the canary (stable = the checkpoint)")
    parser.add_argument("--canary-requests", type=int, default=400)
    parser.add_argument("--share", type=float, default=0.3)
    parser.add_argument("--deadline", type=int, default=150,
                        help="give up after this many seconds (the cluster is still stopped, the report says why)")
    args = parser.parse_args(argv)
    if not _only_loopback():   # Ray would listen on a real interface, with no authentication
        parser.error("run me inside a private network namespace (course_utils.cluster.isolated_command)")
    report: dict = {"timings_s": {}}
    started = time.monotonic()

    def give_up(signum: int, frame: object) -> None:
        raise TimeoutError(f"the drill took over {args.deadline} s")

    signal.signal(signal.SIGALRM, give_up)
    signal.alarm(args.deadline)
    ray_cluster = cluster.LocalRayCluster(nodes=2, cpus_per_node=1, env=RAY_ENV)
    try:
        _drill(ray_cluster, args, report, started)
    except Exception as error:
        report["error"] = f"{type(error).__name__}: {error}"
        raise
    finally:
        signal.alarm(0)
        ray_cluster.stop()          # ray stop --force: Serve's controller, proxy and replicas go with the nodes
        report["leftover_ray_processes"] = cluster.ray_processes()
        report["timings_s"]["total"] = round(time.monotonic() - started, 1)
        print(json.dumps(report))
    return 0


def _only_loopback() -> bool:
    import psutil

    return set(psutil.net_if_addrs()) <= {"lo"}


def _drill(ray_cluster: cluster.LocalRayCluster, args: argparse.Namespace, report: dict, started: float) -> None:
    import serve_app
    from ray import serve

    ray_cluster.start()
    nodes = {ray_cluster.node_of(i)[:8]: ("head" if i == 0 else "worker") for i in range(2)}
    report["nodes"] = sorted(nodes.values())
    report["timings_s"]["cluster_up"] = round(time.monotonic() - started, 1)
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": PORT})
    serve.run(serve_app.CourseService.bind(), name="digits", route_prefix="/")
    url = f"http://127.0.0.1:{PORT}"
    ready = requests.get(url + "/ready", timeout=10)
    if ready.status_code != 200:
        raise RuntimeError(f"the Serve app is deployed but /ready answers {ready.status_code}: {ready.text[:200]}")
    report["timings_s"]["serving"] = round(time.monotonic() - started, 1)
    payloads = data.sample_payloads()

    details = serve.context._get_global_client().get_serve_details()   # private API: replica -> node
    replicas = details["applications"]["digits"]["deployments"]["CourseService"]["replicas"]
    report["replicas"] = sorted(nodes.get(r["node_id"][:8], r["node_id"][:8]) for r in replicas)
    # where the answers come from: the node named by each answer
    placed = run_load(url + "/predict", payloads, 4, 1.0, tally_header="X-Ray-Node")
    report["answers_by_node"] = {nodes.get(k, k): v for k, v in placed.tally.items()}

    report["load"] = {}
    for clients in (int(c) for c in args.clients.split(",")):
        result = run_load(url + "/predict", payloads, clients, args.seconds)
        report["load"][clients] = {**result.as_dict(), "mismatches": result.mismatches}

    if args.candidate:
        report["canary"] = _canary(serve, args, url)

    # the worker node dies under load
    drill = run_load(url + "/predict", payloads, args.kill_clients, 3.0, timeout_s=5,
                     actions=[(1.0, lambda: report.update(killed_pid=ray_cluster.kill_node(1)))],
                     tally_header="X-Ray-Node")
    report["kill"] = {**drill.as_dict(), "mismatches": drill.mismatches, "error_kinds": sorted(set(drill.errors)),
                      "recovery_s": round(drill.recovery_s(), 2),
                      "answers_by_node": {nodes.get(k, k): v for k, v in drill.tally.items()}}
    after = run_load(url + "/predict", payloads, 4, 1.0, tally_header="X-Ray-Node")
    report["after_kill"] = {**after.as_dict(), "answers_by_node": {nodes.get(k, k): v for k, v in after.tally.items()}}
    report["alive_nodes_after"] = len(ray_cluster.alive_nodes())
    report["timings_s"]["drill_done"] = round(time.monotonic() - started, 1)


def _canary(serve, args: argparse.Namespace, url: str) -> dict:
    import serve_app

    from course_utils.production import two_proportion_test

    serve.run(serve_app.build_canary({"candidate": args.candidate, "share": str(args.share)}),
              name="canary", route_prefix="/canary")
    arms: dict[str, dict[str, int]] = {"stable": {"n": 0, "correct": 0}, "candidate": {"n": 0, "correct": 0}}
    wrong: dict[str, list[int]] = {}
    session = requests.Session()
    samples = _test_pngs(args.canary_requests)
    for i, (raw, label) in enumerate(samples):
        response = session.post(url + "/canary/predict", files={"file": ("digit.png", raw, "image/png")},
                                headers={"X-User-Id": f"user-{i}"}, timeout=30)
        if response.status_code != 200:
            raise RuntimeError(f"the canary answered {response.status_code}: {response.text[:300]}")
        arm = response.headers["X-Arm"]
        arms[arm]["n"] += 1
        right = response.json()["predictions"][0]["class"] == label
        arms[arm]["correct"] += int(right)
        wrong.setdefault(arm, []).extend([] if right else [i])
    difference, p_value = two_proportion_test(arms["stable"]["correct"], arms["stable"]["n"],
                                              arms["candidate"]["correct"], arms["candidate"]["n"])
    serve.delete("canary")
    return {"arms": arms, "difference": difference, "p_value": p_value, "wrong": wrong}


def _test_pngs(count: int) -> list[tuple[bytes, int]]:
    """``count`` test-split digits as PNG uploads, with their labels."""
    split = data.load_split("test")
    out = []
    for pixels, label in list(zip(split.images, split.labels, strict=True))[:count]:
        buffer = io.BytesIO()
        data.digit_to_image(pixels).save(buffer, format="PNG")
        out.append((buffer.getvalue(), int(label)))
    return out


if __name__ == "__main__":
    sys.exit(main())
