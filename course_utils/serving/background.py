"""Start servers in the background for notebooks and tests, and always stop them.

Example::

    with serve_in_background("fastapi", args=["--api-key", "k"]) as server:
        requests.get(server.url + "/health").json()     # {'status': 'healthy'}
    # the server process is stopped here, whatever happened in the block
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_until_ready(url: str, timeout: float = 60.0, process: subprocess.Popen | None = None,
                     path: str = "/ready") -> None:
    """Poll ``url + path`` until it answers 200; fail early if ``process`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode} before it was ready")
        try:
            if requests.get(url + path, timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url}{path} was not ready after {timeout:.0f} s")


@dataclass
class BackgroundServer:
    url: str
    port: int
    process: subprocess.Popen | None
    log_path: Path | None

    def log(self) -> str:
        """What the server wrote to stdout/stderr so far."""
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""


@contextmanager
def serve_in_background(framework: str = "fastapi", args: Sequence[str] = (), port: int | None = None,
                        env: dict[str, str] | None = None, timeout: float = 90.0) -> Iterator[BackgroundServer]:
    """Run ``python -m course_utils.serving`` on a free loopback port until the block ends.

    ``args`` are extra CLI flags (``["--api-key", "k", "--max-batch-size", "1"]``). The server
    is terminated (then killed if it lingers) however the block exits.
    """
    port = port or free_port()
    log = Path(tempfile.mkstemp(prefix=f"course-serve-{framework}-", suffix=".log")[1])
    command = [sys.executable, "-m", "course_utils.serving", "--framework", framework,
               "--host", "127.0.0.1", "--port", str(port), *args]
    child_env = {**os.environ, **(env or {})}
    with open(log, "wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=child_env)
    server = BackgroundServer(f"http://127.0.0.1:{port}", port, process, log)
    try:
        try:
            wait_until_ready(server.url, timeout, process)
        except Exception as error:
            raise RuntimeError(f"{error}\n--- server log ---\n{server.log()[-3000:]}") from None
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@contextmanager
def serve_wsgi_in_thread(app, port: int | None = None) -> Iterator[BackgroundServer]:
    """Serve a WSGI app (e.g. the chapter's Flask app) from a thread in this process, then shut it down.

    Uses werkzeug's development server: fine for a notebook demonstration, not for production.
    """
    from werkzeug.serving import WSGIRequestHandler, make_server

    class QuietHandler(WSGIRequestHandler):
        def log_request(self, *args, **kwargs) -> None:  # no timestamped access log in notebook output
            pass

    port = port or free_port()
    server = make_server("127.0.0.1", port, app, threaded=True, request_handler=QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="wsgi-demo-server", daemon=True)
    thread.start()
    try:
        yield BackgroundServer(f"http://127.0.0.1:{port}", port, None, None)
    finally:
        server.shutdown()
        thread.join(timeout=10)


@contextmanager
def serve_asgi_in_thread(app, port: int | None = None) -> Iterator[BackgroundServer]:
    """Serve an ASGI app (a FastAPI app defined in a notebook) with uvicorn in a thread, then stop it."""
    import uvicorn

    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="asgi-demo-server", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the in-thread uvicorn server did not start")
            time.sleep(0.05)
        yield BackgroundServer(url, port, None, None)
    finally:
        server.should_exit = True
        thread.join(timeout=15)
