"""Build the Lambda bundle: handler + preprocessing + model.onnx (+ dependencies), and report sizes.

    python deploy/lambda/build.py                 # -> artifacts/lambda/bundle/ and bundle.zip (no deps)
    python deploy/lambda/build.py --with-deps     # also pip-installs onnxruntime, numpy, Pillow for Lambda's
                                                  # Linux x86_64 / Python 3.11 runtime into the bundle
The model is the course's trained CNN exported with the dynamo exporter, as one file
(external_data=False: a Lambda bundle must not lose the weights sidecar).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEPENDENCIES = ["onnxruntime", "numpy", "pillow"]


def export_model(path: Path) -> Path:
    import torch

    from course_utils import models

    batch = torch.export.Dim("batch", min=1, max=64)
    torch.onnx.export(models.load_trained_cnn(), (torch.zeros(2, 1, 8, 8),), path, dynamo=True,
                      dynamic_shapes={"x": {0: batch}}, input_names=["input"], output_names=["logits"],
                      external_data=False, verbose=False)
    return path


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def build(out: Path, with_deps: bool = False) -> dict[str, int]:
    bundle = out / "bundle"
    shutil.rmtree(bundle, ignore_errors=True)
    bundle.mkdir(parents=True)
    shutil.copy(HERE / "handler.py", bundle / "handler.py")
    shutil.copy(HERE.parent / "common" / "digits_preprocess.py", bundle / "digits_preprocess.py")
    export_model(bundle / "model.onnx")
    if with_deps:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--target", str(bundle),
                        "--platform", "manylinux2014_x86_64", "--python-version", "3.11", "--only-binary=:all:",
                        "--implementation", "cp", *DEPENDENCIES], check=True)
    archive = out / "bundle.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(bundle.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                zf.write(path, path.relative_to(bundle))
    return {"unzipped_bytes": folder_bytes(bundle), "zip_bytes": archive.stat().st_size}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE.parent.parent / "artifacts" / "lambda")
    parser.add_argument("--with-deps", action="store_true")
    args = parser.parse_args()
    sizes = build(args.out, args.with_deps)
    print(f"bundle: {sizes['unzipped_bytes'] / 2**20:.1f} MiB unzipped, {sizes['zip_bytes'] / 2**20:.1f} MiB zipped "
          f"(Lambda limits: 250 MiB unzipped, 50 MiB zipped for direct upload)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
