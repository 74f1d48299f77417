"""TorchServe handler for the course's digits CNN.

Fixes the chapter's handler: the model is loaded **once**, in `initialize`, from the archive's
own `model_dir` (an absolute path TorchServe provides; the chapter loads from a relative path,
and loads twice). The archive carries a `torch.export` program (`digits_cnn.pt2`), so no model
class is needed to load it, plus `digits_preprocess.py` (torch-free preprocessing shared with the
Lambda handler). Requests are batched by TorchServe (`batchSize`/`maxBatchDelay` in the config);
each answer has the same JSON shape as the course's FastAPI service; a bad image in a batch
gets its own 400 without failing the others.
"""

from __future__ import annotations

import time
from http import HTTPStatus
from pathlib import Path

import digits_preprocess as pre  # shipped with --extra-files, unpacked next to this handler
import numpy as np
import torch
from ts.torch_handler.base_handler import BaseHandler


class DigitsHandler(BaseHandler):
    def initialize(self, context) -> None:
        properties = context.system_properties
        model_dir = Path(properties["model_dir"])
        serialized = context.manifest["model"]["serializedFile"]
        torch.set_num_threads(int(properties.get("torch_threads", 1) or 1))
        self.program = torch.export.load(str(model_dir / serialized)).module()
        self.version = f"{context.model_name}-{context.manifest['model'].get('modelVersion', '1.0')}"
        self.context = context
        self.initialized = True

    def handle(self, data, context):
        started = time.perf_counter()
        answers: list[object] = [None] * len(data)
        inputs, positions = [], []
        for index, request in enumerate(data):
            raw = request.get("data") or request.get("body") or request.get("file")
            try:
                if isinstance(raw, str):
                    raw = raw.encode("latin-1")
                inputs.append(pre.preprocess(pre.decode(bytes(raw or b""))))
                positions.append(index)
            except pre.RequestError as error:   # the contract's status, code and message, as the service's
                context.set_response_status(error.status, HTTPStatus(error.status).phrase, idx=index)
                answers[index] = pre.error_body(error.code, error.message)
            except TypeError:
                context.set_response_status(400, "Bad Request", idx=index)
                answers[index] = pre.error_body("bad_request", "the request holds no image bytes")
        if inputs:
            with torch.inference_mode():
                logits = self.program(torch.from_numpy(np.stack(inputs))).numpy()
            probabilities = pre.softmax(logits)
            latency_ms = round((time.perf_counter() - started) * 1000, 3)
            for row, index in enumerate(positions):
                answers[index] = {"success": True, "predictions": pre.encode(probabilities[row], 3),
                                  "model_version": self.version, "latency_ms": latency_ms}
        return answers
