"""A short training loop and an accuracy / confusion-matrix evaluation.

Used to build the committed checkpoint (``python -m course_utils.build_data``) and later to
fine-tune after pruning. Deliberately plain: the lessons are about deployment, not training.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader


@dataclass
class EvalResult:
    """Accuracy (in [0, 1]), mean cross-entropy loss, and a ``(C, C)`` confusion matrix
    whose row ``i`` counts the images of true class ``i`` by predicted class."""

    accuracy: float
    loss: float
    confusion: torch.Tensor
    n: int

    @property
    def errors(self) -> int:
        return self.n - int(self.confusion.diag().sum())


@dataclass
class History:
    """Per-epoch training loss and validation accuracy."""

    train_loss: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)


@torch.inference_mode()
def evaluate(model: nn.Module, loader: DataLoader, device: str | torch.device = "cpu",
             num_classes: int = 10) -> EvalResult:
    """Evaluate ``model`` (switched to eval mode) on every batch of ``loader``.

    >>> from course_utils import data, models
    >>> evaluate(models.load_trained_cnn(), data.make_loader("test")).accuracy > 0.97
    True
    """
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    total_loss, n = 0.0, 0
    for x, y in loader:
        logits = model(x.to(device)).float().cpu()
        total_loss += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        pred = logits.argmax(dim=1)
        confusion += torch.bincount(y * num_classes + pred, minlength=num_classes**2).view(num_classes, -1)
        n += len(y)
    if n == 0:
        raise ValueError("the loader yielded no samples")
    return EvalResult(accuracy=int(confusion.diag().sum()) / n, loss=total_loss / n, confusion=confusion, n=n)


def train(model: nn.Module, train_loader: DataLoader, epochs: int, lr: float = 3e-3,
          weight_decay: float = 1e-4, val_loader: DataLoader | None = None,
          device: str | torch.device = "cpu") -> History:
    """Train with AdamW and a cosine learning-rate schedule; return the loss/accuracy history.

    Works for fine-tuning too (pass a small ``lr`` and few ``epochs``). Parametrizations added
    by ``torch.nn.utils.prune`` are respected: masked weights stay zero.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * len(train_loader))
    history = History()
    for _ in range(epochs):
        model.train()
        total, n = 0.0, 0
        for x, y in train_loader:
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(y)
            n += len(y)
        history.train_loss.append(total / n)
        if val_loader is not None:
            history.val_accuracy.append(evaluate(model, val_loader, device).accuracy)
    model.eval()
    return history
