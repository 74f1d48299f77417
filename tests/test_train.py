import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from course_utils import data, models, train


def test_evaluate_counts_a_known_confusion():
    class Fixed(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.one_hot(x[:, 0].long(), 3).float()

    x = torch.tensor([[0.0], [1.0], [1.0], [2.0]])
    y = torch.tensor([0, 1, 2, 2])
    result = train.evaluate(Fixed(), DataLoader(TensorDataset(x, y), batch_size=3), num_classes=3)
    assert result.accuracy == 0.75 and result.errors == 1 and result.n == 4
    assert result.confusion.tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]


def test_evaluate_refuses_an_empty_loader():
    empty = DataLoader(TensorDataset(torch.zeros(0, 1), torch.zeros(0, dtype=torch.long)))
    with pytest.raises(ValueError, match="no samples"):
        train.evaluate(torch.nn.Identity(), empty)


def test_short_training_learns_and_leaves_eval_mode():
    torch.manual_seed(0)
    model = models.DigitsCNN()
    history = train.train(model, data.make_loader("train"), epochs=2, val_loader=data.make_loader("val"))
    assert len(history.train_loss) == 2 and history.train_loss[1] < history.train_loss[0]
    assert history.val_accuracy[-1] > 0.8
    assert not model.training


def test_train_validates_epochs():
    with pytest.raises(ValueError, match="epochs"):
        train.train(models.DigitsCNN(), data.make_loader("val"), epochs=0)
