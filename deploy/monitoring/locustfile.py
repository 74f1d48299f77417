"""Locust load test for the inference service (lesson 08).

    locust -f deploy/monitoring/locustfile.py --headless -u 8 -r 8 -t 10s --host http://127.0.0.1:8000 \
           --csv artifacts/locust/run --only-summary

Each simulated user uploads the course's sample images back to back (no think time: a closed
loop that finds the service's capacity) and checks the answer's class against the file's label.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

from locust import HttpUser, constant, task

SAMPLES = Path(__file__).resolve().parents[2] / "data" / "samples"
FILES = [(p.name, p.read_bytes(), "image/jpeg" if p.suffix == ".jpg" else "image/png", int(p.stem.rsplit("_", 1)[1]))
         for p in sorted(SAMPLES.iterdir()) if p.suffix in (".png", ".jpg")]
API_KEY = os.environ.get("COURSE_SERVE_API_KEY", "")


class ImageClient(HttpUser):
    wait_time = constant(0)

    def on_start(self) -> None:
        self.files = itertools.cycle(FILES)
        self.headers = {"X-API-Key": API_KEY} if API_KEY else {}

    @task
    def predict(self) -> None:
        name, raw, content_type, label = next(self.files)
        with self.client.post("/predict", files={"file": (name, raw, content_type)}, headers=self.headers,
                              name="/predict", catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"status {response.status_code}")
            elif response.json()["predictions"][0]["class"] != label:
                response.failure("wrong class")
