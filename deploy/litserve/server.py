"""The course's predictor behind LitServe, one of the maintained alternatives to TorchServe.

    python deploy/litserve/server.py --port 8001 [--model artifacts/serve/resnet18.onnx] [--max-batch-size 16]

LitServe (Lightning AI) wraps FastAPI/uvicorn with a worker process per device and built-in
dynamic batching configured on the `LitAPI`. Its four hooks are the predictor's four stages:
`decode_request` = decode + preprocess, `predict`, `encode_response` = encode. Same upload
contract as the course's service (multipart field `file` or `image`; the model spec's top-k);
a bad upload gets its 4xx with the course's error code and message.
"""

from __future__ import annotations

import argparse

import litserve as ls
import torch
from fastapi import HTTPException

from course_utils.serving import Predictor, ServingError
from course_utils.serving.contract import error_body, pick_upload


class ClassifierAPI(ls.LitAPI):
    def __init__(self, model: str | None = None, threads: int = 1, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.model, self.threads = model, threads

    def setup(self, device: str) -> None:
        torch.set_num_threads(self.threads)
        self.predictor = Predictor.load(self.model, device="cpu")
        self.predictor.warmup()

    def decode_request(self, request) -> torch.Tensor:
        try:
            upload = pick_upload(request if hasattr(request, "get") else {})
            if not hasattr(upload, "file"):
                raise ServingError(422, "missing_file", "the field must be a file upload")
            return self.predictor.preprocess(self.predictor.decode(upload.file.read()))
        except ServingError as error:   # LitServe answers {"detail": <the course's envelope>}
            raise HTTPException(status_code=error.status, detail=error_body(error.code, error.message)) from None

    def batch(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(inputs)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictor.predict(x)

    def unbatch(self, output: torch.Tensor) -> list[torch.Tensor]:
        return list(output)

    def encode_response(self, probabilities: torch.Tensor) -> dict[str, object]:
        return {"success": True, "predictions": [p.as_json() for p in self.predictor.encode(probabilities)],
                "model_version": self.predictor.version}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--model", help="model file (default: the course's digits CNN); its .spec.json is read")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the inference worker")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-timeout", type=float, default=0.002, help="seconds")
    args = parser.parse_args()
    api = ClassifierAPI(args.model, args.threads, max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=30)
    server.run(host="127.0.0.1", port=args.port, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
