"""Build the TorchServe archive and run TorchServe on loopback (used by lesson 07 and the tests).

    python deploy/torchserve/serve.py      # build artifacts/torchserve/store/digits.mar, serve, one prediction, stop

TorchServe needs Java 17+. Token authorization is on by default since 0.12: TorchServe writes
`key_file.json` in its working directory, and every call must send `Authorization: Bearer <key>`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent


def export_program(path: Path) -> Path:
    import torch

    from course_utils import models

    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(models.load_trained_cnn(), (torch.zeros(2, 1, 8, 8),), dynamic_shapes={"x": {0: batch}})
    torch.export.save(program, path)
    return path


def archiver_command(work: Path) -> list[str]:
    """The torch-model-archiver command line (printed in lesson 07)."""
    return [str(Path(sys.executable).parent / "torch-model-archiver"), "--model-name", "digits", "--version", "1.0",
            "--serialized-file", str(work / "digits_cnn.pt2"), "--handler", str(HERE / "handler.py"),
            "--extra-files", str(REPO / "deploy" / "common" / "digits_preprocess.py"),
            "--export-path", str(work / "store"), "--force"]


def build_archive(work: Path) -> Path:
    work = Path(work).resolve()
    (work / "store").mkdir(parents=True, exist_ok=True)
    export_program(work / "digits_cnn.pt2")
    subprocess.run(archiver_command(work), check=True, capture_output=True, text=True)
    return work / "store" / "digits.mar"


def write_config(work: Path, ports: tuple[int, int, int], batch_size: int = 8, max_batch_delay_ms: int = 5) -> Path:
    models = {"digits": {"1.0": {"defaultVersion": True, "marName": "digits.mar", "minWorkers": 1, "maxWorkers": 1,
                                 "batchSize": batch_size, "maxBatchDelay": max_batch_delay_ms, "responseTimeout": 30}}}
    lines = [f"inference_address=http://127.0.0.1:{ports[0]}", f"management_address=http://127.0.0.1:{ports[1]}",
             f"metrics_address=http://127.0.0.1:{ports[2]}", f"model_store={work / 'store'}", "load_models=digits.mar",
             f"models={json.dumps(models)}", "default_workers_per_model=1", "disable_system_metrics=true",
             "install_py_dep_per_model=false", "enable_envvars_config=false"]
    path = work / "config.properties"
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class TorchServe:
    url: str
    management_url: str
    inference_key: str
    management_key: str
    log: Path

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.inference_key}"}


@contextmanager
def running(work: Path, timeout: float = 120.0) -> Iterator[TorchServe]:
    """Start TorchServe in the foreground of a child process; wait until the model answers; stop it."""
    from course_utils.serving import free_port

    work = Path(work).resolve()  # TorchServe runs with cwd=work: every path it gets must be absolute
    if shutil.which("java") is None:
        raise FileNotFoundError("TorchServe needs Java 17+ (java is not on PATH)")
    ports = (free_port(), free_port(), free_port())
    config = write_config(work, ports)
    (work / "key_file.json").unlink(missing_ok=True)
    log = work / "torchserve.log"
    # TorchServe keeps its pid file in the temp folder (/tmp/.model_server.pid) and refuses to start while
    # another user's file is there, or while another TorchServe runs: each run gets a temp folder of its own.
    private_tmp = work / "tmp"
    private_tmp.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "LOG_LOCATION": str(work / "logs"), "METRICS_LOCATION": str(work / "logs"),
           "TMPDIR": str(private_tmp), "TEMP": str(private_tmp),
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    command = [str(Path(sys.executable).parent / "torchserve"), "--start", "--foreground", "--ncs",
               "--model-store", str(work / "store"), "--ts-config", str(config), "--models", "digits=digits.mar"]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, cwd=work, stdout=out, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        server = None
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"TorchServe exited ({process.returncode}):\n{log.read_text()[-3000:]}")
            keys = work / "key_file.json"
            if keys.exists() and server is None:
                try:
                    data = json.loads(keys.read_text())
                    server = TorchServe(f"http://127.0.0.1:{ports[0]}", f"http://127.0.0.1:{ports[1]}",
                                        data["inference"]["key"], data["management"]["key"], log)
                except (ValueError, KeyError):
                    pass
            if server is not None:
                try:
                    answer = requests.get(f"{server.management_url}/models/digits", timeout=2,
                                          headers={"Authorization": f"Bearer {server.management_key}"})
                    if answer.ok and any(w.get("status") == "READY" for m in answer.json() for w in m.get("workers", [])):
                        break
                except requests.RequestException:
                    pass
            time.sleep(0.25)
        else:
            raise TimeoutError(f"TorchServe was not ready after {timeout:.0f} s:\n{log.read_text()[-3000:]}")
        yield server
    finally:
        try:
            os.killpg(process.pid, 15)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait(timeout=10)


def main() -> int:
    work = REPO / "artifacts" / "torchserve"
    build_archive(work)
    with running(work) as server:
        image = (REPO / "data" / "samples" / "digit_7.png").read_bytes()
        answer = requests.post(f"{server.url}/predictions/digits", data=image, headers=server.headers(), timeout=30)
        print(answer.status_code, answer.json())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
