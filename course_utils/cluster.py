"""A real multi-node Ray cluster on one machine, started and stopped safely (lesson 11).

Ray has no authentication by default (CVE-2023-48022) and, asked for 127.0.0.1, still listens on
the host's own address. So the cluster runs inside a **private network namespace** where only
loopback exists (:func:`isolated_command`: ``unshare -n`` as root, ``unshare -rn`` as a user), and
a private PID namespace: nothing outside can reach it, its fixed ports collide with nothing, and
``ray stop`` cannot touch anybody else's Ray.
:class:`LocalRayCluster` is used from inside that namespace: every node its own ``ray start``
with its own CPU budget and ports, bounded waits, and ``ray stop --force`` however the block ends.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

#: The loopback-only namespace: bring ``lo`` up, then run the command.
_ISOLATE = 'ip link set lo up && exec "$0" "$@"'


def isolation_problem() -> str | None:
    """Why a private network namespace cannot be made here (not Linux, no ``unshare``), or None.

    >>> isolation_problem() is None or isinstance(isolation_problem(), str)
    True
    """
    if not sys.platform.startswith("linux"):
        return f"private network namespaces are a Linux feature (this is {sys.platform})"
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "needs `unshare` (util-linux) and `ip` (iproute2)"
    probe = subprocess.run(isolated_command(["true"]), capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        return f"`unshare` could not make a network namespace: {probe.stderr.strip()[:200]}"
    return None


def isolated_command(argv: Sequence[str]) -> list[str]:
    """``argv`` wrapped to run in new network and PID namespaces: only loopback, only its own processes.

    The PID namespace keeps ``ray stop`` and the leftover check to this cluster's processes, and
    when the command ends (or is killed) the kernel kills every process it started.

    >>> isolated_command(["python", "-V"])[:2] in (["unshare", "-n"], ["unshare", "-rn"])
    True
    """
    flag = "-n" if os.geteuid() == 0 else "-rn"   # a user maps itself to root inside the namespace
    return ["unshare", flag, "--pid", "--fork", "--mount-proc", "sh", "-c", _ISOLATE, *argv]


class LocalRayCluster:
    """``nodes`` Ray nodes on 127.0.0.1 (call from inside a private namespace), stopped on exit.

    Node 0 is the head (GCS on ``port``); node ``i`` takes ports ``port + 100 * i + ...`` for its
    raylet, object manager, agents and workers, so the nodes do not collide. ``resources`` gives
    each node a custom resource ``node<i>`` (1 unit), which lets a deployment ask for a node.
    ``env`` reaches every Ray process (``RAY_health_check_period_ms``, Serve's ``RAY_SERVE_*`` options).
    """

    def __init__(self, nodes: int = 2, cpus_per_node: int = 1, port: int = 6379, timeout_s: float = 60.0,
                 env: dict[str, str] | None = None, ray: str | None = None) -> None:
        if nodes < 1 or cpus_per_node < 1:
            raise ValueError("need nodes >= 1 and cpus_per_node >= 1")
        self.nodes, self.cpus, self.port, self.timeout_s = nodes, cpus_per_node, port, timeout_s
        beside = Path(sys.executable).with_name("ray")
        self.ray = ray or (str(beside) if beside.exists() else shutil.which("ray") or "ray")
        self.address = f"127.0.0.1:{port}"
        self.env = {"RAY_USAGE_STATS_ENABLED": "0", **(env or {})}   # read by every process the nodes start

    def node_manager_port(self, node: int) -> int:
        """The raylet port of node ``node`` (how :meth:`kill_node` finds it)."""
        return self.port + 100 * node + 10

    def _start_node(self, node: int) -> subprocess.Popen:
        base = self.port + 100 * node
        command = [self.ray, "start", f"--num-cpus={self.cpus}", "--node-ip-address=127.0.0.1",
                   f"--resources={{\"node{node}\": 1}}", "--disable-usage-stats",
                   f"--node-manager-port={base + 10}", f"--object-manager-port={base + 11}",
                   f"--dashboard-agent-grpc-port={base + 12}", f"--dashboard-agent-listen-port={base + 13}",
                   f"--runtime-env-agent-port={base + 14}", f"--metrics-export-port={base + 15}",
                   f"--min-worker-port={base + 20}", f"--max-worker-port={base + 99}"]
        if node == 0:
            command += ["--head", f"--port={self.port}", "--include-dashboard=false",
                        f"--ray-client-server-port={self.port + 1}"]
        else:
            command += [f"--address={self.address}"]
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, **self.env})

    def _finish(self, node: int, process: subprocess.Popen) -> None:
        try:
            out, _ = process.communicate(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
            raise TimeoutError(f"`ray start` for node {node} took over {self.timeout_s:.0f} s") from None
        if process.returncode != 0:
            raise RuntimeError(f"`ray start` for node {node} failed ({process.returncode}):\n{out[-2000:]}")

    def _wait_for_gcs(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the head's GCS did not open port {self.port} in {self.timeout_s:.0f} s")
            time.sleep(0.1)

    def start(self) -> LocalRayCluster:
        """Start every node (bounded waits), then wait until the head sees them all alive."""
        import ray

        try:
            starting = {0: self._start_node(0)}
            self._wait_for_gcs()          # the other nodes join while the head finishes starting
            starting.update({node: self._start_node(node) for node in range(1, self.nodes)})
            for node, process in starting.items():
                self._finish(node, process)
            ray.init(address=self.address, logging_level=logging.ERROR, log_to_driver=False)
            self.wait_for_nodes(self.nodes)
        except BaseException:
            self.stop()
            raise
        return self

    def alive_nodes(self) -> list[dict]:
        """The nodes the GCS considers alive (``ray.nodes()``)."""
        import ray

        return [n for n in ray.nodes() if n["Alive"]]

    def wait_for_nodes(self, count: int) -> None:
        """Wait (at most ``timeout_s``) until exactly ``count`` nodes are alive."""
        deadline = time.monotonic() + self.timeout_s
        while len(self.alive_nodes()) != count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.alive_nodes())} Ray nodes alive after {self.timeout_s:.0f} s, "
                                   f"expected {count}")
            time.sleep(0.2)

    def node_of(self, node: int) -> str:
        """The Ray node id of node ``node`` (the one holding resource ``node<i>``)."""
        for info in self.alive_nodes():
            if info["Resources"].get(f"node{node}"):
                return str(info["NodeID"])
        raise KeyError(f"node {node} is not alive")

    def kill_node(self, node: int) -> int:
        """SIGKILL node ``node``'s raylet, as a machine that loses power: returns its pid."""
        import psutil

        flag = f"--node_manager_port={self.node_manager_port(node)}"
        for process in psutil.process_iter(["name", "cmdline"]):
            cmdline = process.info["cmdline"] or []
            if any("raylet" in part for part in cmdline[:1]) and flag in cmdline:
                process.send_signal(signal.SIGKILL)
                return int(process.pid)
        raise ProcessLookupError(f"no raylet with {flag}")

    def stop(self) -> None:
        """Disconnect and ``ray stop --force`` (every Ray process it can see: inside :func:`isolated_command`,
        only this cluster's)."""
        import ray

        if ray.is_initialized():
            ray.shutdown()
        subprocess.run([self.ray, "stop", "--force"], capture_output=True, timeout=self.timeout_s)

    def __enter__(self) -> LocalRayCluster:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()


def ray_processes() -> list[str]:
    """Ray's own processes that this process can see (inside :func:`isolated_command`: this cluster's).

    >>> isinstance(ray_processes(), list)
    True
    """
    import psutil

    names = ("gcs_server", "raylet", "ray::", "default_worker.py", "dashboard/agent.py", "runtime_env/agent",
             "log_monitor.py", "ray/autoscaler/_private/monitor.py", "ray.util.client.server", "dashboard/dashboard.py")
    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if any(name in cmdline for name in names) and process.info["pid"] != os.getpid():
            found.append(f"{process.info['pid']} {cmdline[:120]}")
    return found
