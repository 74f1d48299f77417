"""Serving benchmark on loopback: `make bench` runs it after benchmarks/run.py.

    python benchmarks/serving.py [--seconds 3] [--out reports]

Requests/s and p50/p99 latency at 1, 8 and 32 concurrent clients for: Flask (waitress), FastAPI
with one model call per request, and FastAPI with dynamic batching; against the ceiling, the raw
model's own throughput at batch 32 (no HTTP). Writes reports/serving.{json,md}. Targets from the
serving issue (2-core CPU): batched FastAPI >= 2x naive FastAPI at 32 clients, and >= 70% of the
raw model's throughput; both are reported, not enforced.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd
import torch

from course_utils import bench, data, env
from course_utils.serving import Predictor, run_load, serve_in_background

SERVERS = {
    "Flask (waitress)": ("flask", ["--max-batch-size", "1"]),
    "FastAPI, no batching": ("fastapi", ["--max-batch-size", "1"]),
    "FastAPI, dynamic batching": ("fastapi", ["--max-batch-size", "32", "--max-wait-ms", "0"]),
}
CLIENTS = (1, 8, 32)


def markdown(frame: pd.DataFrame) -> str:
    frame = frame.reset_index()
    header = [str(c) for c in frame.columns]
    rows = [[f"{v:.1f}" if isinstance(v, float) else str(v) for v in row] for row in frame.itertuples(index=False)]
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(r) + " |" for r in rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="load duration per point")
    parser.add_argument("--out", type=Path, default=env.REPO_DIR / "reports")
    args = parser.parse_args(argv)
    env.setup(prefer="cpu")

    predictor = Predictor.load(device="cpu")
    x = data.split_tensors("test")[0][:32]
    raw = bench.measure_latency(predictor.predict, x, warmup=20, iters=300)
    ceiling = raw.throughput  # images/s of the model alone at batch 32
    print(f"[serving] raw model at batch 32: {ceiling:,.0f} images/s", flush=True)

    payloads = [(p.read_bytes(), "image/jpeg" if p.suffix == ".jpg" else "image/png", data.label_of_sample(p))
                for p in data.sample_images()]
    rows = []
    for name, (framework, extra) in SERVERS.items():
        with serve_in_background(framework, args=extra) as server:
            for clients in CLIENTS:
                result = run_load(server.url + "/predict", payloads, clients, seconds=args.seconds)
                rows.append({"server": name, **result.as_dict(), "mismatches": result.mismatches})
                print(f"[serving] {name:28s} {clients:3d} clients: {result.requests_per_s:7.1f} req/s, "
                      f"p50 {result.percentile(50):6.1f} ms, p99 {result.percentile(99):6.1f} ms, "
                      f"errors {len(result.errors)}", flush=True)
    table = pd.DataFrame(rows).set_index(["server", "clients"])
    batched32 = table.loc[("FastAPI, dynamic batching", 32), "req_per_s"]
    naive32 = table.loc[("FastAPI, no batching", 32), "req_per_s"]
    targets = [
        {"target": "batched FastAPI >= 2x naive FastAPI at 32 clients",
         "measured": f"{batched32 / naive32:.2f}x", "met": bool(batched32 >= 2 * naive32)},
        {"target": "batched FastAPI >= 70% of the raw model's throughput",
         "measured": f"{batched32 / ceiling:.2%} ({batched32:.0f} req/s vs {ceiling:,.0f} images/s)",
         "met": bool(batched32 >= 0.7 * ceiling)},
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"when": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__, "seconds_per_point": args.seconds,
            "raw_model_images_per_s_b32": ceiling}
    (args.out / "serving.json").write_text(json.dumps({"meta": meta, "targets": targets,
                                                       "results": table.reset_index().to_dict(orient="records")},
                                                      indent=2) + "\n")
    text = "\n".join([f"# Serving benchmark: {meta['when']}", "",
                      f"Loopback, closed-loop clients (course_utils.serving.run_load), {args.seconds:.0f} s per point. "
                      f"Raw model ceiling (no HTTP, batch 32): {ceiling:,.0f} images/s.", "",
                      markdown(table.round(1)), "", "## Targets (2-core CPU)", "",
                      markdown(pd.DataFrame(targets).set_index("target")), ""])
    (args.out / "serving.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
