"""Build the Lambda function as a container image and invoke it for real: `make image-check` runs `check`.

    python deploy/lambda/image.py build [--tag course-lambda:cpu]
    python deploy/lambda/image.py check [--tag course-lambda:cpu] [--report FILE]

The same engine, base image and offline wheelhouse as the serving image (deploy/docker/image.py).
`check` starts the container on 127.0.0.1 only (read-only root, a tmpfs for /tmp), posts every
sample event of deploy/lambda/events/ and a few bad ones to the invoke URL, and asserts that each
answer is exactly what the handler answers when called directly on the host, then removes the
container (also on failure).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

from course_utils import optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
WORK = ROOT / "artifacts" / "lambda-image"
INVOKE = "/2015-03-31/functions/function/invocations"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


service_image = _load("service_image", ROOT / "deploy" / "docker" / "image.py")   # engine, base, run
say = service_image.say


def requirements() -> list[str]:
    """Pinned requirements: exact pins as written, the rest from constraints.txt."""
    lines = [line.strip() for line in (HERE / "requirements-image.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    return [line if "==" in line else service_image._pins([line])[0] for line in lines]


def prepare() -> Path:
    """The function's files (the zip bundle's) and the wheelhouse, under artifacts/lambda-image/."""
    sys.path.insert(0, str(HERE))
    import build as bundle

    function = WORK / "function"
    inputs = [HERE / "handler.py", HERE / "build.py", HERE / "emulator.py", ROOT / "deploy" / "common" / "digits_preprocess.py",
              *sorted((ROOT / "data" / "checkpoints").iterdir())]
    stamp = hashlib.sha256(b"".join(path.read_bytes() for path in inputs)).hexdigest()[:16]
    if not (WORK / f".function-{stamp}").exists():      # the export takes seconds: only when an input changed
        bundle.build(WORK)                               # handler, preprocessing, model.onnx -> WORK/bundle
        shutil.rmtree(function, ignore_errors=True)
        shutil.copytree(WORK / "bundle", function)
        shutil.copy(HERE / "emulator.py", function / "emulator.py")
        for old in WORK.glob(".function-*"):
            old.unlink()
        (WORK / f".function-{stamp}").touch()
    pins = requirements()
    machines = {"x86_64": "x86_64", "AMD64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}
    if platform.machine() not in machines:
        raise SystemExit(f"no Lambda architecture for a {platform.machine()} host (Lambda runs x86_64 and arm64)")
    machine = machines[platform.machine()]
    key = hashlib.sha256(("\n".join(pins) + machine).encode()).hexdigest()[:16]
    wheels = WORK / "wheels"
    if not (wheels / f".{key}").exists():
        shutil.rmtree(wheels, ignore_errors=True)
        wheels.mkdir(parents=True)
        (wheels / "requirements.txt").write_text("\n".join(pins) + "\n")
        platforms = [f"--platform=manylinux_2_{v}_{machine}" for v in (36, 34, 31, 28, 27, 17, 5)] + \
                    [f"--platform=manylinux2014_{machine}", f"--platform=manylinux1_{machine}"]
        service_image.run(sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:",
                          "--python-version=3.11", "--implementation=cp", *platforms, "--dest", str(wheels),
                          "--requirement", str(wheels / "requirements.txt"))
        (wheels / f".{key}").touch()
    return function


def build(tag: str) -> dict[str, object]:
    tool = service_image.engine()
    if tool is None:
        raise SystemExit("no container engine: install Docker, or podman (apt-get install podman runc)")
    prepare()
    base = service_image.base_image(tool)
    command = [tool, "build", "--file", str(HERE / "Dockerfile"), "--tag", tag, "--build-arg", f"BASE_IMAGE={base}"]
    if tool == "podman":
        command += ["--format", "docker", "--network", "host"]
    started = time.perf_counter()
    result = service_image.run(*command, str(ROOT), check=False, timeout=1200)
    if result.returncode != 0:
        raise SystemExit(f"build failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    seconds = time.perf_counter() - started
    size = int(service_image.run(tool, "image", "inspect", "--format", "{{.Size}}", tag).stdout.strip())
    say(f"built {tag} on {base} with {tool} in {seconds:.0f} s: {size / 2**20:.0f} MiB")
    return {"engine": tool, "base": base, "build_s": round(seconds, 1), "size_mib": round(size / 2**20, 1)}


def _bad_events() -> dict[str, object]:
    return {"not base64": {"body": "%%%", "isBase64Encoded": True},
            "an S3 notification": {"Records": [{"eventSource": "aws:s3"}]},
            "not an event at all": "hello"}


def check(tag: str, report_path: Path) -> dict[str, object]:
    import requests

    from course_utils.serving import free_port

    report = build(tag)
    tool = str(report["engine"])
    os.environ["MODEL_PATH"] = str(WORK / "function" / "model.onnx")
    sys.path.insert(0, str(WORK / "function"))         # the handler imports digits_preprocess next to it
    handler = _load("lambda_handler_on_host", WORK / "function" / "handler.py")
    events = {p.stem: json.loads(p.read_text()) for p in sorted((HERE / "events").glob("*.json"))}
    events.update(_bad_events())
    name = f"course-lambda-check-{os.getpid()}"
    port = free_port()
    url = f"http://127.0.0.1:{port}{INVOKE}"
    try:
        started = time.perf_counter()
        service_image.run(tool, "run", "--detach", "--name", name, "--publish", f"127.0.0.1:{port}:8080",
                          "--read-only", "--tmpfs", "/tmp", tag)
        first = _first_answer(url, events["rest_api_binary"], 30.0, tool, name)
        report["cold_start_to_first_answer_s"] = round(time.perf_counter() - started, 2)
        answers = {}
        for event_name, event in events.items():
            container = first if event_name == "rest_api_binary" else \
                requests.post(url, data=json.dumps(event), timeout=30).json()
            direct = _comparable(json.loads(json.dumps(handler.lambda_handler(event, None))))
            container = _comparable(container)
            assert container == direct, f"{event_name}: container {container} vs handler on the host {direct}"
            answers[event_name] = container["statusCode"]
        report["events_identical"] = answers
        started = time.perf_counter()
        for _ in range(20):
            requests.post(url, data=json.dumps(events["rest_api_binary"]), timeout=30).raise_for_status()
        report["warm_invoke_ms"] = round((time.perf_counter() - started) / 20 * 1000, 1)
        torch = service_image.run(tool, "exec", name, "python", "-c", "import torch", check=False)
        assert torch.returncode != 0 and "No module named 'torch'" in torch.stderr, "torch is in the image"
        uid = service_image.run(tool, "exec", name, "id", "-u").stdout.strip()
        assert uid == "10001", f"the function runs as uid {uid}, not 10001"
    except Exception:
        logs = service_image.run(tool, "logs", name, check=False)
        say("container log (last 3000 characters):\n" + (logs.stdout + logs.stderr)[-3000:])
        raise
    finally:
        service_image.run(tool, "rm", "--force", name, check=False)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    say("lambda image check passed: " + json.dumps(report))
    return report


def _comparable(response: dict) -> dict:
    """The response with its body parsed and the one field that differs between two calls removed."""
    if not isinstance(response, dict) or not isinstance(response.get("body"), str):
        return response                                  # a runtime error object: compared as it is
    body = json.loads(response["body"])
    body.pop("latency_ms", None)
    return {**response, "body": body}


def _first_answer(url: str, event: object, timeout: float, tool: str, name: str) -> dict:
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return requests.post(url, data=json.dumps(event), timeout=30).json()
        except requests.ConnectionError:
            state = service_image.run(tool, "inspect", "--format", "{{.State.Status}}", name, check=False).stdout
            if state.strip() in ("exited", "dead"):
                raise RuntimeError("the container stopped before answering") from None
            time.sleep(0.2)
    raise RuntimeError(f"no answer within {timeout:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["build", "check"])
    parser.add_argument("--tag", default="course-lambda:cpu")
    parser.add_argument("--report", type=Path, default=WORK / "check.json")
    args = parser.parse_args(argv)
    if args.command == "build":
        build(args.tag)
        return 0
    part = "make image-check: the Lambda function's image built and invoked"
    if not optional.use("engine", part):
        return 0
    try:
        check(args.tag, args.report)
    except service_image.NoBaseImage as error:
        return service_image.skip_without_base(error, part, args.report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
