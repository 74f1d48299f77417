"""The models the course deploys.

* :class:`DigitsCNN` - the small CNN trained on the digits; conv-bn-relu blocks (so fusion and
  static quantization are real) with ``QuantStub``/``DeQuantStub`` at the edges (identity in
  float mode, so the same class serves every lesson).
* :class:`ControlFlowModel` - the chapter's model with a data-dependent ``if``, for the
  tracing-vs-scripting pitfall.
* :func:`load_trained_cnn` - the committed checkpoint in one call, loaded safely.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from .data import DATA_DIR, verify_file

CHECKPOINT = "checkpoints/digits_cnn.pt"
CHECKPOINT_CARD = "checkpoints/digits_cnn.json"
NUM_CLASSES = 10


class ConvBNReLU(nn.Sequential):
    """``Conv2d(3x3, no bias) -> BatchNorm2d -> ReLU``, named ``conv``/``bn``/``relu`` for fusion."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(OrderedDict(
            conv=nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            bn=nn.BatchNorm2d(out_channels),
            relu=nn.ReLU(inplace=False),
        ))


class DigitsCNN(nn.Module):
    """A small CNN for 1x8x8 digits: three conv-bn-relu blocks, two max-pools, one Linear.

    ``(N, 1, 8, 8) -> block1 (16ch, 8x8) -> block2 (32ch) -> pool (4x4) -> block3 (64ch)
    -> pool (2x2) -> flatten (256) -> dropout -> Linear(256, 10)``; about 26k parameters.
    ``forward`` returns logits.

    >>> DigitsCNN()(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = NUM_CLASSES, widths: tuple[int, int, int] = (16, 32, 64),
                 dropout: float = 0.2) -> None:
        super().__init__()
        c1, c2, c3 = widths
        self.quant = torch.ao.quantization.QuantStub()
        self.block1 = ConvBNReLU(1, c1)
        self.block2 = ConvBNReLU(c1, c2)
        self.pool1 = nn.MaxPool2d(2)
        self.block3 = ConvBNReLU(c2, c3)
        self.pool2 = nn.MaxPool2d(2)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(c3 * 2 * 2, num_classes)
        self.dequant = torch.ao.quantization.DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quant(x)
        x = self.pool1(self.block2(self.block1(x)))
        x = self.pool2(self.block3(x))
        x = torch.flatten(x, 1)  # works on quantized tensors, unlike the chapter's x.view
        x = self.fc(self.dropout(x))
        return self.dequant(x)

    def fusion_groups(self) -> list[list[str]]:
        """Module names to pass to ``torch.ao.quantization.fuse_modules`` (conv, bn, relu triples)."""
        return [[f"{name}.conv", f"{name}.bn", f"{name}.relu"]
                for name, module in self.named_children() if isinstance(module, ConvBNReLU)]


class ControlFlowModel(nn.Module):
    """The chapter's model with data-dependent control flow.

    ``forward`` applies a Linear layer when ``x.sum() > 0`` and doubles ``x`` otherwise. Tracing
    records only the branch the example input took; scripting keeps both.

    >>> m = ControlFlowModel(); bool((m(-torch.ones(1, 10)) == -2).all())
    True
    """

    def __init__(self, features: int = 10) -> None:
        super().__init__()
        self.linear = nn.Linear(features, features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.linear(x)
        return x * 2


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or not) in a model."""
    return sum(p.numel() for p in model.parameters())


def checkpoint_path(data_dir: str | Path = DATA_DIR) -> Path:
    """Path of the committed DigitsCNN checkpoint, after checking its sha256."""
    return verify_file(CHECKPOINT, data_dir)


def checkpoint_card(data_dir: str | Path = DATA_DIR) -> dict[str, object]:
    """The checkpoint's metadata (test accuracy, seed, epochs, versions) from its JSON card."""
    return json.loads(verify_file(CHECKPOINT_CARD, data_dir).read_text())


def load_trained_cnn(device: str | torch.device = "cpu", path: str | Path | None = None) -> DigitsCNN:
    """Load the trained DigitsCNN in eval mode on ``device``.

    The checkpoint is a plain ``state_dict`` read with ``torch.load(..., weights_only=True)``:
    no pickled code runs, unlike loading a whole pickled module. ``path`` defaults to the
    committed, sha256-verified checkpoint.

    >>> load_trained_cnn().training
    False
    """
    path = checkpoint_path() if path is None else Path(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = DigitsCNN()
    problem = state_dict_problem(state, model)
    if problem:
        raise ValueError(f"{path} is not a state_dict of the course's DigitsCNN: {problem}")
    model.load_state_dict(state)
    return model.to(device).eval()


def state_dict_problem(state: object, model: nn.Module) -> str | None:
    """Why ``state`` cannot be loaded into ``model`` (the first mismatching key), or None if it can.

    >>> state_dict_problem({"weight": torch.zeros(3, 2)}, nn.Linear(2, 3))
    "key 'bias' is missing"
    >>> state_dict_problem({"weight": torch.zeros(3, 3), "bias": torch.zeros(3)}, nn.Linear(2, 3))
    "'weight' has shape (3, 3), the model's is (3, 2)"
    """
    if not isinstance(state, dict):
        return f"it holds a {type(state).__name__}, not a dict of tensors"
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        instead = f"; it has {unexpected[0]!r} instead" if unexpected else ""
        return f"key {missing[0]!r} is missing{more}{instead}"
    if unexpected:
        return f"unexpected key {unexpected[0]!r}"
    for key, tensor in expected.items():
        value = state[key]
        if not isinstance(value, torch.Tensor):
            return f"{key!r} is a {type(value).__name__}, not a tensor"
        if value.shape != tensor.shape:
            return f"{key!r} has shape {tuple(value.shape)}, the model's is {tuple(tensor.shape)}"
    return None
