"""Serving benchmark on loopback: `make bench` runs it after benchmarks/run.py.

    python benchmarks/serving.py [--seconds 3] [--out reports] [--models digits resnet18]

Requests/s and p50/p99 latency of the course's service (Flask under waitress; FastAPI with one
model call per request; FastAPI with dynamic batching) and of LitServe serving the same model,
at 1, 8 and 32 concurrent clients, against the ceiling: the raw model's own throughput at batch
32 (no HTTP, no decoding). Two workloads: the digits CNN (small PNG scans: HTTP and decoding
dominate) and torchvision's ResNet-18 at 224x224, fp32 and static int8 ONNX, with 320x240 JPEG
uploads (the model dominates; random weights: speed does not depend on them). Every answer is
checked against the local predictor's answer for the same image. Writes reports/serving.{json,md}.
Targets (2-core CPU), reported, not enforced: batched FastAPI >= 2x naive FastAPI on the digits
at 32 clients; batched FastAPI >= 80% of the raw model's batched throughput on ResNet-18.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageFilter

from course_utils import bench, data, env
from course_utils.serving import Predictor, free_port, run_load, serve_in_background, wait_until_ready
from course_utils.serving.spec import export_resnet18

CLIENTS = {"digits": (1, 8, 32), "resnet18": (1, 32)}


def servers(model: str | None, workload: str) -> dict[str, tuple[str, list[str]]]:
    """name -> (framework, CLI flags); "litserve" is deploy/litserve/server.py."""
    flags = ["--model", model] if model else []
    table = {
        "FastAPI, no batching": ("fastapi", [*flags, "--max-batch-size", "1"]),
        "FastAPI, dynamic batching": ("fastapi", [*flags, "--max-batch-size", "32", "--max-wait-ms", "0"]),
        "LitServe, batching": ("litserve", [*flags, "--max-batch-size", "32", "--batch-timeout", "0.002"]),
    }
    if workload == "digits":
        table = {"Flask (waitress)": ("flask", [*flags, "--max-batch-size", "1"]), **table}
    return table


@contextmanager
def litserve(args: list[str]) -> Iterator[str]:
    port = free_port()
    threads = str(torch.get_num_threads())
    process = subprocess.Popen([sys.executable, str(env.REPO_DIR / "deploy" / "litserve" / "server.py"),
                                "--port", str(port), "--threads", threads, *args], cwd=env.REPO_DIR,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until_ready(f"http://127.0.0.1:{port}", timeout=120, process=process, path="/health")
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


@contextmanager
def started(framework: str, args: list[str]) -> Iterator[str]:
    if framework == "litserve":
        with litserve(args) as url:
            yield url
    else:
        with serve_in_background(framework, args=args) as server:
            yield server.url


def photo_payloads(predictor: Predictor, count: int = 16) -> list[tuple[bytes, str, int]]:
    """Synthetic 320x240 JPEG "photos", each with the class the local predictor gives it."""
    rng = np.random.default_rng(0)
    payloads = []
    for _ in range(count):
        pixels = rng.integers(0, 256, size=(240, 320, 3), dtype=np.uint8)
        image = Image.fromarray(pixels, "RGB").filter(ImageFilter.GaussianBlur(3))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        raw = buffer.getvalue()
        payloads.append((raw, "image/jpeg", predictor.classify(raw, top_k=1)[0].index))
    return payloads


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="load duration per point")
    parser.add_argument("--out", type=Path, default=env.REPO_DIR / "reports")
    parser.add_argument("--models", nargs="+", choices=["digits", "resnet18"], default=["digits", "resnet18"])
    args = parser.parse_args(argv)
    env.setup(prefer="cpu")
    work = env.artifacts_dir("bench_serving")

    workloads: list[tuple[str, str, str | None]] = []   # (workload, model name, model file)
    if "digits" in args.models:
        workloads.append(("digits", "digits CNN", None))
    if "resnet18" in args.models:
        fp32 = export_resnet18(work / "resnet18.onnx")
        int8 = export_resnet18(work / "resnet18_int8.onnx", int8=True)
        workloads += [("resnet18", "ResNet-18 fp32", str(fp32)), ("resnet18", "ResNet-18 int8", str(int8))]

    rows, ceilings = [], {}
    for workload, model_name, model_file in workloads:
        predictor = Predictor.load(model_file, device="cpu")
        predictor.warmup()
        if workload == "digits":
            payloads = data.sample_payloads()
            x = data.split_tensors("test")[0][:32]
        else:
            payloads = photo_payloads(predictor)
            x = torch.stack([predictor.preprocess(predictor.decode(raw)) for raw, _, _ in payloads] * 2)
        raw_stats = bench.measure_latency(predictor.predict, x, warmup=3, iters=20 if workload == "resnet18" else 300)
        ceilings[model_name] = raw_stats.throughput
        print(f"[serving] {model_name}: raw model at batch 32: {raw_stats.throughput:,.1f} images/s", flush=True)
        del predictor
        for name, (framework, extra) in servers(model_file, workload).items():
            with started(framework, extra) as url:
                for clients in CLIENTS[workload]:
                    result = run_load(url + "/predict", payloads, clients, seconds=args.seconds)
                    rows.append({"model": model_name, "server": name, **result.as_dict(),
                                 "mismatches": result.mismatches,
                                 "share_of_raw": result.requests_per_s / raw_stats.throughput})
                    print(f"[serving] {model_name:15s} {name:26s} {clients:3d} clients: "
                          f"{result.requests_per_s:7.1f} req/s, p50 {result.percentile(50):7.1f} ms, "
                          f"p99 {result.percentile(99):7.1f} ms, errors {len(result.errors)}, "
                          f"mismatches {result.mismatches}", flush=True)
    table = pd.DataFrame(rows).set_index(["model", "server", "clients"])

    def rate(model: str, server: str) -> float:
        return float(table.loc[(model, server, 32), "req_per_s"])

    targets = []
    if "digits CNN" in ceilings:
        batched, naive = rate("digits CNN", "FastAPI, dynamic batching"), rate("digits CNN", "FastAPI, no batching")
        targets.append({"target": "digits: batched FastAPI >= 2x naive FastAPI at 32 clients",
                        "measured": f"{batched / naive:.2f}x", "met": bool(batched >= 2 * naive)})
    for model in ("ResNet-18 fp32", "ResNet-18 int8"):
        if model in ceilings:
            batched, naive = rate(model, "FastAPI, dynamic batching"), rate(model, "FastAPI, no batching")
            lit = rate(model, "LitServe, batching")
            targets.append({"target": f"{model}: batched FastAPI >= 80% of the raw model at batch 32",
                            "measured": f"{batched / ceilings[model]:.0%} ({batched:.1f} req/s vs "
                                        f"{ceilings[model]:.1f} images/s); naive {naive:.1f}, LitServe {lit:.1f}",
                            "met": bool(batched >= 0.8 * ceilings[model])})
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"when": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__, "seconds_per_point": args.seconds,
            "cpu": env.hardware_summary(), "raw_model_images_per_s_b32": ceilings}
    (args.out / "serving.json").write_text(json.dumps({"meta": meta, "targets": targets,
                                                       "results": table.reset_index().to_dict(orient="records")},
                                                      indent=2) + "\n")
    ceiling_text = ", ".join(f"{k} {v:,.1f}" for k, v in ceilings.items())
    text = "\n".join([f"# Serving benchmark: {meta['when']}", "", f"{meta['cpu']}.", "",
                      f"Loopback, closed-loop clients (course_utils.serving.run_load), {args.seconds:.0f} s per point. "
                      f"Raw model ceilings (no HTTP, batch 32, images/s): {ceiling_text}.", "",
                      bench.markdown_table(table, digits=2), "", "## Targets (2-core CPU)", "",
                      bench.markdown_table(pd.DataFrame(targets).set_index("target"), digits=2), ""])
    (args.out / "serving.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
