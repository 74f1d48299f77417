"""The same model behind LitServe, one of the maintained alternatives to TorchServe.

    python deploy/litserve/server.py --port 8001 [--max-batch-size 16]

LitServe (Lightning AI) wraps FastAPI/uvicorn with a worker process per device and built-in
dynamic batching configured on the `LitAPI`. Same upload contract as the course's service:
multipart field `file`, JSON answer with top-3 predictions; bad images get a 400.
"""

from __future__ import annotations

import argparse

import litserve as ls
import torch
from fastapi import HTTPException

from course_utils.serving import Predictor, ServingError, decode_image


class DigitsAPI(ls.LitAPI):
    def setup(self, device: str) -> None:
        torch.set_num_threads(1)
        self.predictor = Predictor.load(device="cpu")
        self.predictor.warmup()

    def decode_request(self, request) -> torch.Tensor:
        upload = request.get("file") if hasattr(request, "get") else None
        if upload is None or not hasattr(upload, "file"):
            raise HTTPException(status_code=422, detail="send the image as a multipart form field named 'file'")
        try:
            return self.predictor.preprocess(decode_image(upload.file.read()))
        except ServingError as error:
            raise HTTPException(status_code=error.status, detail=error.message) from None

    def batch(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(inputs)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictor.predict(x)

    def unbatch(self, output: torch.Tensor) -> list[torch.Tensor]:
        return list(output)

    def encode_response(self, probabilities: torch.Tensor) -> dict[str, object]:
        return {"success": True, "predictions": [p.as_json() for p in self.predictor.top_k(probabilities, 3)],
                "model_version": self.predictor.version}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-timeout", type=float, default=0.002, help="seconds")
    args = parser.parse_args()
    api = DigitsAPI(max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=30)
    server.run(host="127.0.0.1", port=args.port, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
