"""Rebuild everything in ``data/`` from scratch, deterministically.

    python -m course_utils.build_data            # writes data/ in the repository
    python -m course_utils.build_data --out DIR  # writes somewhere else (used by the tests)

Steps: read scikit-learn's bundled copy of the UCI digits (no download), make stratified
train/val/test splits with a fixed seed, write them as CSV, render sample images, train the
DigitsCNN on one thread with a fixed seed, and write its checkpoint, its JSON card and the
sha256 manifest. The same seed gives the same splits and the same accuracy.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import data as D
from .env import seed_everything
from .models import CHECKPOINT, CHECKPOINT_CARD, DigitsCNN, count_parameters
from .train import evaluate, train

SEED = 0
EPOCHS = 30
BATCH_SIZE = 64
LR = 3e-3


def make_splits(seed: int = SEED) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Stratified 70/10/20 train/val/test split of the 1,797 digits."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.uint8)  # values 0..16
    labels = digits.target.astype(np.int64)
    x_rest, x_test, y_rest, y_test = train_test_split(
        images, labels, test_size=0.2, stratify=labels, random_state=seed)
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=0.125, stratify=y_rest, random_state=seed)
    return {"train": (x_train, y_train), "val": (x_val, y_val), "test": (x_test, y_test)}


def write_split(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    header = "label," + ",".join(f"p{i}" for i in range(D.IMAGE_SIZE * D.IMAGE_SIZE))
    rows = np.column_stack([labels, images.reshape(len(images), -1)])
    np.savetxt(path, rows, fmt="%d", delimiter=",", header=header, comments="")


def write_samples(out: Path, images: np.ndarray, labels: np.ndarray) -> list[Path]:
    """One PNG per class (the first test image of that class), plus the 3 and the 8 again as
    larger, lossy RGB JPEGs, the way a phone would send them: same scan, different file."""
    folder = out / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for digit in range(10):
        index = int(np.flatnonzero(labels == digit)[0])
        path = folder / f"digit_{digit}.png"
        D.digit_to_image(images[index]).save(path, optimize=False)
        written.append(path)
    for digit in (3, 8):
        index = int(np.flatnonzero(labels == digit)[0])
        path = folder / f"photo_{digit}.jpg"
        D.digit_to_image(images[index], scale=32).convert("RGB").save(path, quality=90)
        written.append(path)
    return written


def write_manifest(out: Path) -> Path:
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.suffix in {".csv", ".png", ".jpg", ".pt", ".json"})
    lines = [f"{D.sha256_file(p)}  {p.relative_to(out).as_posix()}" for p in files]
    manifest = out / D.MANIFEST
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def build(out: Path = D.DATA_DIR, seed: int = SEED, epochs: int = EPOCHS) -> dict[str, Any]:
    """Write splits, samples, checkpoint, card and manifest to ``out``; return the card."""
    torch.set_num_threads(1)  # one thread: bit-identical training on any machine with this torch
    out.mkdir(parents=True, exist_ok=True)
    (out / "digits").mkdir(exist_ok=True)
    (out / "checkpoints").mkdir(exist_ok=True)
    splits = make_splits(seed)
    for name, (images, labels) in splits.items():
        write_split(out / "digits" / f"{name}.csv", images, labels)
    write_samples(out, *splits["test"])

    train_ink = splits["train"][0].astype(np.float64) / D.LEVELS
    mean, std = float(train_ink.mean()), float(train_ink.std())
    if abs(mean - D.DIGITS_MEAN) > 5e-5 or abs(std - D.DIGITS_STD) > 5e-5:
        raise RuntimeError(f"training statistics changed: mean={mean:.4f} std={std:.4f}; "
                           "update DIGITS_MEAN/DIGITS_STD in course_utils/data.py")

    def tensors(name: str) -> torch.utils.data.TensorDataset:
        images, labels = splits[name]
        x = D.normalize_ink(torch.from_numpy(images).float().div(D.LEVELS).unsqueeze(1))
        return torch.utils.data.TensorDataset(x, torch.from_numpy(labels))

    generator = torch.Generator().manual_seed(seed)
    loaders = {
        name: torch.utils.data.DataLoader(tensors(name), batch_size=BATCH_SIZE, shuffle=(name == "train"),
                                          generator=generator if name == "train" else None)
        for name in splits
    }
    seed_everything(seed)
    model = DigitsCNN()
    history = train(model, loaders["train"], epochs=epochs, lr=LR, val_loader=loaders["val"])
    result = evaluate(model, loaders["test"])
    torch.save(model.state_dict(), out / CHECKPOINT)
    card = {
        "model": "DigitsCNN",
        "parameters": count_parameters(model),
        "dataset": "UCI optical handwritten digits (scikit-learn load_digits), 8x8, 17 grey levels",
        "splits": {name: len(labels) for name, (_, labels) in splits.items()},
        "seed": seed,
        "epochs": epochs,
        "batch_size": BATCH_SIZE,
        "optimizer": f"AdamW(lr={LR}, weight_decay=1e-4), cosine schedule",
        "val_accuracy": round(history.val_accuracy[-1], 4),
        "test_accuracy": round(result.accuracy, 4),
        "test_errors": result.errors,
        "train_mean": round(mean, 4),
        "train_std": round(std, 4),
        "built_with": {"torch": torch.__version__, "python": platform.python_version()},
    }
    (out / CHECKPOINT_CARD).write_text(json.dumps(card, indent=2) + "\n")
    write_manifest(out)
    return card


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=D.DATA_DIR, help="folder to write (default: data/)")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    args = parser.parse_args(argv)
    card = build(args.out, seed=args.seed, epochs=args.epochs)
    print(json.dumps(card, indent=2))
    print(f"test accuracy {card['test_accuracy']:.2%} ({card['test_errors']} errors of {card['splits']['test']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
