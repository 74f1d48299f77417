"""Convert the course's digits CNN to LiteRT (TensorFlow Lite), in LiteRT's own environment.

litert-torch cannot be installed beside the course's pins (lesson 10 shows why), so this runs in
a separate venv, from the repository root:

    python3.11 -m venv .venv-litert
    .venv-litert/bin/pip install litert-torch==0.10.0 torch==2.14.1 torchvision==0.29.1
    .venv-litert/bin/python deploy/litert/convert.py artifacts/litert/cnn.tflite

It checks the converted model against eager PyTorch on 32 test images before writing it.
Measured on 1 December 2026 (2-core AMD EPYC): 12 s, a 107 KiB file, largest difference 3e-6.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # the course package, without installing it


def main(argv: list[str]) -> int:
    import litert_torch
    import torch

    from course_utils import data, models

    out = Path(argv[0] if argv else "artifacts/litert/cnn.tflite")
    out.parent.mkdir(parents=True, exist_ok=True)
    cnn = models.load_trained_cnn().eval()
    x_test, _ = data.split_tensors("test")
    edge = litert_torch.convert(cnn, (x_test[:1],))
    with torch.inference_mode():
        worst = max(float((torch.as_tensor(edge(x_test[i:i + 1])) - cnn(x_test[i:i + 1])).abs().max()) for i in range(32))
    if worst > 1e-4:
        print(f"error: the LiteRT model differs from eager by {worst:.2g}", file=sys.stderr)
        return 1
    edge.export(str(out))
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB); matches eager within 1e-4 on 32 test images")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
