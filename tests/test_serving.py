"""The inference service: image decoding, batching, predictor formats, and both HTTP front ends.

HTTP behaviour is tested against real servers on loopback (``python -m course_utils.serving``
started in the background), for Flask and FastAPI alike, plus in-process clients.
"""

from __future__ import annotations

import io
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from course_utils import data, models
from course_utils.serving import (
    DynamicBatcher,
    Predictor,
    ServiceConfig,
    ServingError,
    decode_image,
    serve_in_background,
)
from course_utils.serving.__main__ import parse_args

API_KEY = "test-key-123"
SEVEN = data.DATA_DIR / "samples" / "digit_7.png"


# ----------------------------------------------------------------------------- image fixtures

def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _png_with_size(width: int, height: int) -> bytes:
    """A valid PNG header that declares width x height pixels (a decompression bomb's header)."""
    raw = bytearray(_encode(Image.new("L", (1, 1)), "PNG"))
    ihdr = struct.pack(">II", width, height) + bytes(raw[24:29])
    raw[16:29] = ihdr
    raw[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return bytes(raw)


def good_images() -> dict[str, tuple[bytes, str]]:
    """The digit 7 in every format and mode a camera or browser produces: (bytes, content type)."""
    base = Image.open(SEVEN).convert("L")
    ink = 255 - np.asarray(base)
    rgba = Image.fromarray(np.dstack([np.zeros_like(ink)] * 3 + [ink]).astype(np.uint8), "RGBA")  # ink on transparency
    frame2 = Image.new("L", base.size, 255)
    rotated = base.rotate(90, expand=True)                # stored sideways...
    exif = Image.Exif()
    exif[0x0112] = 6                                      # ...with "rotate 90 CW to display"
    return {
        "png (grey)": (SEVEN.read_bytes(), "image/png"),
        "jpeg (rgb)": (_encode(base.convert("RGB"), "JPEG", quality=95), "image/jpeg"),
        "jpeg (cmyk)": (_encode(base.convert("RGB").convert("CMYK"), "JPEG", quality=95), "image/jpeg"),
        "jpeg (exif-rotated)": (_encode(rotated.convert("RGB"), "JPEG", quality=95, exif=exif), "image/jpeg"),
        "png (rgba, transparent paper)": (_encode(rgba, "PNG"), "image/png"),
        "png (palette)": (_encode(base.convert("P"), "PNG"), "image/png"),
        "png (16-bit)": (_encode(Image.fromarray(np.asarray(base).astype(np.uint16) * 257), "PNG"), "image/png"),
        "gif (animated)": (_encode(base.convert("P"), "GIF", save_all=True, append_images=[frame2.convert("P")]),
                           "image/gif"),
        "webp": (_encode(base.convert("RGB"), "WEBP", lossless=True), "image/webp"),
        "bmp": (_encode(base, "BMP"), "image/bmp"),
        "tiff": (_encode(base, "TIFF"), "image/tiff"),
        "no content type": (SEVEN.read_bytes(), "application/octet-stream"),
    }


def bad_images() -> dict[str, tuple[bytes, str, int, str]]:
    """Broken uploads: (bytes, content type, expected status, expected code)."""
    png = SEVEN.read_bytes()
    corrupted = bytearray(png)
    corrupted[60:80] = b"\x00" * 20
    return {
        "empty": (b"", "image/png", 400, "empty_file"),
        "text as png": (b"hello, I am not an image", "image/png", 400, "not_an_image"),
        "truncated png": (png[: len(png) // 2], "image/png", 400, "corrupt_image"),
        "corrupted png": (bytes(corrupted), "image/png", 400, "corrupt_image"),
        "truncated jpeg": (good_images()["jpeg (rgb)"][0][:300], "image/jpeg", 400, "corrupt_image"),
        "decompression bomb": (_png_with_size(60_000, 60_000), "image/png", 413, "image_too_large"),
        "ppm (unsupported format)": (_encode(Image.open(SEVEN), "PPM"), "image/x-portable-pixmap", 415,
                                     "unsupported_image_format"),
        "pdf content type": (b"%PDF-1.4 not really", "application/pdf", 415, "unsupported_media_type"),
        "text content type": (b"hello", "text/plain", 415, "unsupported_media_type"),
    }


# ----------------------------------------------------------------------------- decoding, unit level

@pytest.mark.parametrize("name", list(good_images()))
def test_every_common_format_decodes_to_the_right_digit(name):
    raw, _ = good_images()[name]
    image = decode_image(raw)
    predictor = Predictor.load()
    probabilities = predictor.predict(predictor.preprocess(image).unsqueeze(0))[0]
    assert int(probabilities.argmax()) == 7, name


@pytest.mark.parametrize("name", [n for n in bad_images() if "content type" not in n])
def test_broken_uploads_raise_client_errors(name):
    raw, _, status, code = bad_images()[name]
    with pytest.raises(ServingError) as caught:
        decode_image(raw)
    assert (caught.value.status, caught.value.code) == (status, code)
    assert caught.value.message and str(caught.value).startswith(f"{status} {code}: ")


def test_pixel_limit_is_configurable():
    with pytest.raises(ServingError, match="pixels"):
        decode_image(SEVEN.read_bytes(), max_pixels=100)


# ----------------------------------------------------------------------------- batching

def test_batcher_gathers_concurrent_requests_and_answers_each():
    sizes = []
    batcher = DynamicBatcher(lambda x: x * 10, max_batch_size=8, max_wait_ms=50, on_batch=sizes.append)
    try:
        futures = [batcher.submit(torch.full((2,), float(i))) for i in range(8)]
        results = [f.result(timeout=5) for f in futures]
    finally:
        batcher.close()
    assert [r.tolist() for r in results] == [[i * 10.0, i * 10.0] for i in range(8)]
    assert max(sizes) > 1 and sum(sizes) == 8


def test_batcher_respects_max_batch_size_and_reports_model_errors():
    sizes = []
    batcher = DynamicBatcher(lambda x: x, max_batch_size=3, max_wait_ms=20, on_batch=sizes.append)
    futures = [batcher.submit(torch.zeros(1)) for _ in range(7)]
    [f.result(timeout=5) for f in futures]
    batcher.close()
    assert max(sizes) <= 3 and sum(sizes) == 7

    def broken(x):
        raise RuntimeError("model exploded")

    failing = DynamicBatcher(broken, max_batch_size=4, max_wait_ms=1)
    with pytest.raises(RuntimeError, match="model exploded"):
        failing.submit(torch.zeros(1)).result(timeout=5)
    failing.close()
    with pytest.raises(RuntimeError, match="closed"):
        failing.submit(torch.zeros(1))
    with pytest.raises(ValueError):
        DynamicBatcher(broken, max_batch_size=0)


# ----------------------------------------------------------------------------- predictor formats

@pytest.fixture(scope="module")
def exported_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    cnn = models.load_trained_cnn()
    example = torch.zeros(2, 1, 8, 8)
    batch = torch.export.Dim("batch", min=1, max=64)
    paths = {"eager": models.checkpoint_path()}
    paths["torchscript"] = folder / "cnn_traced.pt"
    torch.jit.trace(cnn, example).save(str(paths["torchscript"]))
    paths["exported"] = folder / "cnn_exported.pt2"
    torch.export.save(torch.export.export(cnn, (example,), dynamic_shapes={"x": {0: batch}}), paths["exported"])
    paths["onnx"] = folder / "cnn.onnx"
    torch.onnx.export(cnn, (example,), paths["onnx"], dynamo=True, dynamic_shapes={"x": {0: batch}},
                      input_names=["input"], output_names=["logits"], external_data=False, verbose=False)
    return paths


@pytest.mark.parametrize("kind", ["eager", "torchscript", "exported", "onnx"])
def test_predictor_loads_every_format_and_agrees(kind, exported_models):
    predictor = Predictor.load(exported_models[kind], device="cpu")
    assert predictor.kind == kind and predictor.version.startswith(exported_models[kind].stem)
    predictor.warmup()
    x, y = data.split_tensors("test")
    probabilities = predictor.predict(x[:64])
    assert probabilities.shape == (64, 10)
    torch.testing.assert_close(probabilities.sum(1), torch.ones(64))
    assert (probabilities.argmax(1) == y[:64]).float().mean() > 0.95
    top = predictor.encode(probabilities[0], 3)
    assert [p.index for p in top] == probabilities[0].topk(3).indices.tolist()
    assert top[0].label == data.CLASS_LABELS[top[0].index]


def test_predictor_rejects_unknown_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        Predictor.load(tmp_path / "missing.pt")
    odd = tmp_path / "model.h5"
    odd.write_bytes(b"x")
    with pytest.raises(ValueError, match="unknown model format"):
        Predictor.load(odd)
    with pytest.raises(ValueError, match="expected a batch"):
        Predictor.load().predict(torch.zeros(8, 8))


def test_config_reads_environment(monkeypatch):
    monkeypatch.setenv("COURSE_SERVE_MAX_BATCH_SIZE", "4")
    monkeypatch.setenv("COURSE_SERVE_MAX_WAIT_MS", "1.5")
    monkeypatch.setenv("COURSE_SERVE_API_KEY", "k")
    config = ServiceConfig.from_env(default_top_k=2)
    assert (config.max_batch_size, config.max_wait_ms, config.api_key, config.default_top_k) == (4, 1.5, "k", 2)
    assert ServiceConfig.from_env(**{"max_batch_size": 1}).max_batch_size == 1
    assert config.to_env()["COURSE_SERVE_MAX_BATCH_SIZE"] == "4"
    monkeypatch.setenv("COURSE_SERVE_MAX_BATCH_SIZE", "lots")
    with pytest.raises(ValueError, match="COURSE_SERVE_MAX_BATCH_SIZE='lots' is not a valid int"):
        ServiceConfig.from_env()


def test_cli_validates_its_arguments(capsys):
    for argv in (["--port", "0"], ["--max-batch-size", "0"], ["--model", "/nonexistent/model.pt"],
                 ["--framework", "django"], ["--workers", "0"], ["--threads", "0"]):
        with pytest.raises(SystemExit):
            parse_args(argv)
    assert "error" in capsys.readouterr().err
    args = parse_args([])
    assert (args.framework, args.host, args.port) == ("fastapi", "127.0.0.1", 8000)


# ----------------------------------------------------------------------------- real servers on loopback

FRAMEWORKS = ["fastapi", "flask"]


@pytest.fixture(scope="module", params=FRAMEWORKS)
def server(request):
    args = ["--api-key", API_KEY, "--max-upload-mb", "1", "--max-batch-size", "16", "--max-wait-ms", "2"]
    with serve_in_background(request.param, args=args) as running:
        running.framework = request.param
        yield running


def post(server, files=None, params=None, key=API_KEY, timeout=10):
    headers = {"X-API-Key": key} if key is not None else {}
    return requests.post(server.url + "/predict", files=files, params=params, headers=headers, timeout=timeout)


def test_predict_answers_the_contract(server):
    response = post(server, files={"file": ("digit_7.png", SEVEN.read_bytes(), "image/png")}, params={"top_k": 3})
    assert response.status_code == 200, response.text
    body = response.json()
    assert list(body) == ["success", "predictions", "model_version", "latency_ms"]
    assert body["success"] is True and body["model_version"].startswith("digits_cnn-")
    assert len(body["predictions"]) == 3 and body["predictions"][0]["class"] == 7
    assert body["predictions"][0]["label"] == "seven" and 0.5 < body["predictions"][0]["probability"] <= 1
    assert body["latency_ms"] > 0


def test_the_chapters_field_name_image_is_accepted(server):
    response = post(server, files={"image": ("digit_7.png", SEVEN.read_bytes(), "image/png")})
    assert response.status_code == 200 and response.json()["predictions"][0]["class"] == 7


def test_health_ready_and_metrics(server):
    assert requests.get(server.url + "/health", timeout=5).json() == {"status": "healthy"}
    ready = requests.get(server.url + "/ready", timeout=5)
    assert ready.status_code == 200 and ready.json()["status"] == "ready" and ready.json()["auth"] is True
    post(server, files={"file": ("digit_7.png", SEVEN.read_bytes(), "image/png")})
    metrics = requests.get(server.url + "/metrics", timeout=5)
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert 'inference_requests_total{endpoint="/predict",status="200"}' in text
    for name in ("inference_request_latency_seconds_bucket", "inference_batch_size_bucket",
                 "inference_in_flight_requests", "inference_model_info"):
        assert name in text, name


@pytest.mark.parametrize("key, code", [(None, "missing_api_key"), ("wrong-key", "invalid_api_key")])
def test_api_key_is_required(server, key, code):
    response = post(server, files={"file": ("digit_7.png", SEVEN.read_bytes(), "image/png")}, key=key)
    assert response.status_code == 401 and response.json()["error"]["code"] == code


@pytest.mark.parametrize("top_k", ["0", "11", "abc", "-1", "2.5"])
def test_bad_top_k_is_422(server, top_k):
    response = post(server, files={"file": ("digit_7.png", SEVEN.read_bytes(), "image/png")}, params={"top_k": top_k})
    assert response.status_code == 422
    assert response.json() == {"success": False, "error": {"code": "invalid_parameter", "message": response.json()[
        "error"]["message"]}} and "1 to 10" in response.json()["error"]["message"]


def test_missing_file_is_422_and_oversized_upload_is_413(server):
    missing = post(server, files={"other": ("x.png", SEVEN.read_bytes(), "image/png")})
    assert missing.status_code == 422 and missing.json()["error"]["code"] == "missing_file"
    big = post(server, files={"file": ("big.png", b"\x89PNG" + b"0" * (2 * 2**20), "image/png")})
    assert big.status_code == 413 and big.json()["error"]["code"] == "payload_too_large"


def test_unknown_path_and_wrong_method_are_json_errors(server):
    missing = requests.get(server.url + "/nope", timeout=5)
    assert missing.status_code == 404 and missing.json()["success"] is False
    wrong = requests.get(server.url + "/predict", timeout=5)
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"


def test_every_format_is_accepted(server):
    for name, (raw, content_type) in good_images().items():
        response = post(server, files={"file": ("upload", raw, content_type)})
        assert response.status_code == 200, (name, response.text)
        assert response.json()["predictions"][0]["class"] == 7, name


def test_bad_input_matrix_gets_4xx_json_and_the_server_keeps_serving(server):
    for name, (raw, content_type, status, code) in bad_images().items():
        response = post(server, files={"file": ("upload", raw, content_type)})
        assert response.status_code == status, (name, response.status_code, response.text)
        assert response.json() == {"success": False, "error": {"code": code, "message": response.json()["error"]["message"]}}
    not_multipart = requests.post(server.url + "/predict", data=b"raw bytes", headers={"X-API-Key": API_KEY,
                                  "Content-Type": "application/octet-stream"}, timeout=5)
    assert 400 <= not_multipart.status_code < 500
    assert requests.get(server.url + "/health", timeout=5).status_code == 200
    assert post(server, files={"file": ("digit_7.png", SEVEN.read_bytes(), "image/png")}).status_code == 200


def test_32_concurrent_clients_get_their_own_answers(server):
    samples = [(p.read_bytes(), data.label_of_sample(p), "image/jpeg" if p.suffix == ".jpg" else "image/png")
               for p in data.sample_images()]
    deadline = time.monotonic() + 3.0
    errors, answered = [], [0]
    lock = threading.Lock()

    def client(worker: int) -> None:
        session = requests.Session()
        i = worker
        while time.monotonic() < deadline:
            raw, label, content_type = samples[i % len(samples)]
            response = session.post(server.url + "/predict", files={"file": ("s", raw, content_type)},
                                    headers={"X-API-Key": API_KEY}, timeout=30)
            with lock:
                if response.status_code != 200 or response.json()["predictions"][0]["class"] != label:
                    errors.append((response.status_code, label, response.text[:200]))
                answered[0] += 1
            i += 7

    with ThreadPoolExecutor(max_workers=32) as pool:
        list(pool.map(client, range(32)))
    assert not errors, errors[:3]
    assert answered[0] >= 32
    metrics = requests.get(server.url + "/metrics", timeout=5).text
    batches = [line for line in metrics.splitlines() if line.startswith("inference_batch_size_count")]
    total = float(batches[0].split()[-1])
    assert total < answered[0], "under 32 concurrent clients, some requests must share a model call"


# ----------------------------------------------------------------------------- in-process clients

def test_fastapi_in_process_and_openapi_contract():
    from fastapi.testclient import TestClient

    from course_utils.serving.fastapi_app import create_app

    with TestClient(create_app(ServiceConfig(max_batch_size=1))) as client:
        response = client.post("/predict", files={"file": ("d.png", SEVEN.read_bytes(), "image/png")})
        assert response.status_code == 200 and response.json()["predictions"][0]["class"] == 7
        assert client.post("/predict", files={"file": ("d.png", b"", "image/png")}).status_code == 400
        schema = client.get("/openapi.json").json()
    operation = schema["paths"]["/predict"]["post"]
    assert {"200", "400", "401", "413", "415", "422"} <= set(operation["responses"])
    assert "PredictResponse" in schema["components"]["schemas"] and "ErrorResponse" in schema["components"]["schemas"]
    properties = schema["components"]["schemas"]["PredictResponse"]["properties"]
    assert {"success", "predictions", "model_version", "latency_ms"} <= set(properties)


def test_flask_in_process():
    from course_utils.serving.flask_app import create_app

    client = create_app(ServiceConfig(max_batch_size=1, api_key="k")).test_client()
    ok = client.post("/predict", data={"file": (io.BytesIO(SEVEN.read_bytes()), "d.png", "image/png")},
                     headers={"X-API-Key": "k"})
    assert ok.status_code == 200 and ok.json["predictions"][0]["class"] == 7
    assert client.post("/predict", data={}, headers={"X-API-Key": "bad"}).status_code == 401
    assert client.get("/health").json == {"status": "healthy"}


def test_the_service_never_imports_pandas_or_matplotlib():
    import subprocess
    import sys

    code = ("import sys, course_utils.serving, course_utils.serving.fastapi_app, course_utils.serving.flask_app, "
            "course_utils.serving.__main__; print(sorted(m for m in ('pandas', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"the service pulled in {out.strip()}: keep them out of its import path"


def test_package_submodules_load_on_first_use():
    import course_utils

    assert course_utils.bench.measure_latency and course_utils.export.ort_session
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        course_utils.nope  # noqa: B018


# ----------------------------------------------------------------------------- one contract, every client

def _multipart(size: int) -> bytes:
    return (b'--x\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\nContent-Type: image/png\r\n\r\n'
            + b"\x89PNG" + b"0" * size + b"\r\n--x--\r\n")


def _send(client: str, url: str, body: bytes, chunked: bool, key: str = API_KEY) -> tuple[int, dict]:
    """POST ``body`` as multipart with one of the common HTTP clients; (status, JSON answer)."""
    import json
    import subprocess
    import tempfile
    import urllib.request

    import httpx

    headers = {"Content-Type": "multipart/form-data; boundary=x", "X-API-Key": key}
    pieces = [body[i:i + 65536] for i in range(0, len(body), 65536)]
    if client == "urllib":
        request = urllib.request.Request(url, data=iter(pieces) if chunked else body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())
    if client == "requests":
        answer = requests.post(url, data=iter(pieces) if chunked else body, headers=headers, timeout=30)
        return answer.status_code, answer.json()
    if client == "httpx":
        answer = httpx.post(url, content=iter(pieces) if chunked else body, headers=headers, timeout=30)
        return answer.status_code, answer.json()
    with tempfile.NamedTemporaryFile(suffix=".bin") as upload:
        upload.write(body)
        upload.flush()
        extra = ["-H", "Transfer-Encoding: chunked"] if chunked else []
        out = subprocess.run(["curl", "-sS", "-w", "\n%{http_code}", "--data-binary", f"@{upload.name}", *extra,
                              *sum((["-H", f"{k}: {v}"] for k, v in headers.items()), []), url],
                             capture_output=True, text=True, timeout=60, check=True).stdout
    text, status = out.rsplit("\n", 1)
    return int(status), json.loads(text)


CLIENTS = [(c, chunked) for c in ("urllib", "requests", "httpx", "curl") for chunked in (False, True)]


@pytest.mark.parametrize("client, chunked", CLIENTS, ids=[f"{c}-{'chunked' if k else 'length'}" for c, k in CLIENTS])
def test_an_oversized_body_is_413_for_every_common_client(server, client, chunked):
    # urllib sends its whole body before it reads: a server that answers and closes mid-upload resets it
    status, body = _send(client, server.url + "/predict", _multipart(20 * 2**20), chunked)
    assert (status, body["error"]["code"]) == (413, "payload_too_large"), body
    assert "1,048,576" in body["error"]["message"]
    assert requests.get(server.url + "/health", timeout=5).status_code == 200


@pytest.mark.parametrize("chunked", [False, True])
def test_an_early_error_reaches_a_client_still_sending(server, chunked):
    status, body = _send("urllib", server.url + "/predict", _multipart(900 * 1024), chunked, key="wrong")
    assert (status, body["error"]["code"]) == (401, "invalid_api_key")
    status, body = _send("urllib", server.url + "/predict", b"0" * (900 * 1024), chunked)
    assert 400 <= status < 500 and body["success"] is False


def test_the_contract_is_defined_once():
    """The envelope, the code map, the header names and the field names live in contract.py only."""
    from pathlib import Path

    import course_utils

    package = Path(course_utils.__file__).parent
    for needle in ('"success": False, "error"', '404: "not_found"', '"X-API-Key"', '"X-Request-ID"',
                   '"missing_file"', '"payload_too_large"', '"inference_requests_total"'):
        holders = sorted(str(p.relative_to(package)) for p in package.rglob("*.py") if needle in p.read_text())
        assert len(holders) == 1, f"{needle} is written in {holders}"


def test_flask_env_factory_writes_the_request_log(monkeypatch, capsys):
    import json

    from course_utils.serving.flask_app import create_app_from_env

    monkeypatch.setenv("COURSE_SERVE_MAX_BATCH_SIZE", "1")
    client = create_app_from_env().test_client()   # what `waitress-serve --call` runs
    ok = client.post("/predict", data={"file": (io.BytesIO(SEVEN.read_bytes()), "d.png", "image/png")},
                     headers={"X-Request-ID": "abc-1"})
    bad = client.post("/predict", data={"file": (io.BytesIO(b"nope"), "d.png", "image/png")})
    assert (ok.status_code, bad.status_code) == (200, 400) and ok.headers["X-Request-ID"] == "abc-1"
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    assert [(r["request_id"], r["status"], r.get("predicted_class")) for r in lines][0] == ("abc-1", 200, 7)
    assert lines[1]["status"] == 400 and lines[1]["error_code"] == "not_an_image"


# ----------------------------------------------------------------------------- the Open Inference Protocol

def test_tritonclient_talks_to_both_front_ends(server):
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    def auth():   # a new dict each call: tritonclient writes its Inference-Header-Content-Length into it
        return {"X-API-Key": API_KEY}

    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("digits")
    metadata = client.get_model_metadata("digits")
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert metadata["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]
    x, y = data.split_tensors("test")
    expected = Predictor.load(device="cpu").predict(x[:20]).numpy()
    for binary in (True, False):
        tensor = triton.InferInput("input", [20, 1, 8, 8], "FP32")
        tensor.set_data_from_numpy(x[:20].numpy(), binary_data=binary)
        result = client.infer("digits", [tensor], headers=auth(), request_id="r-1",
                              outputs=[triton.InferRequestedOutput("probabilities", binary_data=binary)])
        np.testing.assert_allclose(result.as_numpy("probabilities"), expected, atol=1e-5)
        assert result.get_response()["id"] == "r-1"
    default = client.infer("digits", [tensor], headers=auth()).as_numpy("probabilities")   # binary by default
    assert (default.argmax(1) == expected.argmax(1)).all() and (expected.argmax(1) == y[:20].numpy()).mean() > 0.9
    with pytest.raises(InferenceServerException, match="X-API-Key") as no_key:
        client.infer("digits", [tensor])
    assert no_key.value.status() == "401"
    with pytest.raises(InferenceServerException, match="serves 'digits'") as unknown:
        client.infer("resnet", [tensor], headers=auth())
    assert unknown.value.status() == "404"
    wrong = triton.InferInput("input", [1, 3, 8, 8], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 3, 8, 8), np.float32))
    with pytest.raises(InferenceServerException, match=r"shape must be \[N, 1, 8, 8\]"):
        client.infer("digits", [wrong], headers=auth())
    metrics = requests.get(server.url + "/metrics", timeout=5).text
    assert 'endpoint="/v2/models/{name}/infer",status="200"' in metrics


V2_BAD = {
    "not json": (b"{nope", {}, 400, "bad_request"),
    "no inputs": (b'{"outputs": []}', {}, 400, "bad_request"),
    "wrong name": (b'{"inputs": [{"name": "x", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": []}]}', {}, 400,
                   "invalid_tensor"),
    "too few values": (b'{"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [1]}]}',
                       {}, 400, "invalid_tensor"),
    "strings": (b'{"inputs": [{"name": "input", "shape": [1, 1, 1, 1], "datatype": "FP32", "data": ["a"]}]}',
                {}, 400, "invalid_tensor"),
    "int datatype": (b'{"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "INT8", "data": []}]}',
                     {}, 400, "invalid_tensor"),
    "NaN": (('{"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [NaN'
             + ", 0" * 63 + "]}]}").encode(), {}, 400, "invalid_tensor"),
    "too many inputs": (b'{"inputs": [{"name": "input", "shape": [257, 1, 8, 8], "datatype": "FP32", "data": []}]}',
                        {}, 400, "invalid_tensor"),
    "binary size lies": (b'{"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", '
                         b'"parameters": {"binary_data_size": 256}}]}' + b"\0" * 10, {"header": True}, 400,
                         "invalid_tensor"),
    "header length lies": (b"{}", {"length": "999"}, 400, "bad_request"),
    "parameters not an object": (b'{"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", '
                                 b'"parameters": 5, "data": []}]}', {}, 400, "bad_request"),
    "request parameters a list": (('{"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0'
                                   + ", 0" * 63 + ']}], "parameters": [1]}').encode(), {}, 400, "bad_request"),
    "outputs not a list": (('{"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0'
                            + ", 0" * 63 + ']}], "outputs": 3}').encode(), {}, 400, "bad_request"),
    "unknown output": (('{"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0'
                        + ", 0" * 63 + ']}], "outputs": [{"name": "logits"}]}').encode(), {}, 400, "unknown_output"),
}


@pytest.mark.parametrize("name", list(V2_BAD))
def test_v2_bad_requests_get_a_4xx_in_the_protocols_shape(server, name):
    body, how, status, code = V2_BAD[name]
    headers = {"X-API-Key": API_KEY}
    if how.get("header"):
        headers["Inference-Header-Content-Length"] = str(body.index(b"}]}") + 3)
    if "length" in how:
        headers["Inference-Header-Content-Length"] = how["length"]
    answer = requests.post(server.url + "/v2/models/digits/infer", data=body, headers=headers, timeout=10)
    assert (answer.status_code, answer.json()["code"]) == (status, code), answer.text
    assert isinstance(answer.json()["error"], str) and answer.json()["error"]
    assert requests.get(server.url + "/v2/health/ready", timeout=5).json() == {"ready": True}


# ----------------------------------------------------------------------------- the ONNX path needs no torch

TORCH_FREE = """
import sys
from fastapi.testclient import TestClient
from course_utils.serving.service import ServiceConfig
from course_utils.serving import {module} as front
config = ServiceConfig(model_path={model!r}, max_batch_size=4)
raw = open({sample!r}, "rb").read()
body = {{"inputs": [{{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}}]}}
if {module!r} == "fastapi_app":
    with TestClient(front.create_app(config)) as client:
        answer = client.post("/predict", files={{"file": ("d.png", raw, "image/png")}}).json()
        infer = client.post("/v2/models/digits/infer", json=body).status_code
else:
    client = front.create_app(config).test_client()
    answer = client.post("/predict", data={{"file": (__import__("io").BytesIO(raw), "d.png", "image/png")}}).json
    infer = client.post("/v2/models/digits/infer", json=body).status_code
print(answer["predictions"][0]["class"], infer, "torch" in sys.modules)
"""


@pytest.mark.parametrize("module", ["fastapi_app", "flask_app"])
def test_serving_an_onnx_model_never_imports_torch(exported_models, module):
    import subprocess
    import sys

    code = TORCH_FREE.format(module=module, model=str(exported_models["onnx"]), sample=str(SEVEN))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["7", "200", "False"], "serving ONNX must not import torch"


def test_the_cli_service_process_never_maps_libtorch_for_onnx(exported_models):
    from pathlib import Path

    with serve_in_background("fastapi", args=["--model", str(exported_models["onnx"])]) as server:
        answer = requests.post(server.url + "/predict", files={"file": ("d.png", SEVEN.read_bytes(), "image/png")},
                               timeout=10)
        maps = Path(f"/proc/{server.process.pid}/maps")
        mapped = maps.read_text() if maps.exists() else None
    assert answer.status_code == 200 and answer.json()["predictions"][0]["class"] == 7
    if mapped is None:
        pytest.skip("no /proc on this system: the in-process test above covers it")
    assert "libtorch" not in mapped and "onnxruntime" in mapped


def test_array_and_tensor_faces_agree():
    predictor = Predictor.load(device="cpu")
    x = data.split_tensors("test")[0][:16]
    probabilities = predictor.predict_array(x.numpy())
    assert isinstance(probabilities, np.ndarray) and probabilities.dtype == np.float32
    torch.testing.assert_close(predictor.predict(x), torch.from_numpy(probabilities))
    image = Image.open(SEVEN)
    assert np.array_equal(predictor.preprocess_array(image), predictor.preprocess(image).numpy())
    assert predictor.classify(SEVEN.read_bytes())[0].index == 7 == predictor.classify(image)[0].index
