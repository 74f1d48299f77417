import pytest
import torch

from course_utils import data, models, train


def test_cnn_shapes_and_size():
    model = models.DigitsCNN().eval()
    assert model(torch.zeros(3, 1, 8, 8)).shape == (3, 10)
    assert 20_000 < models.count_parameters(model) < 40_000


def test_cnn_fusion_groups_fuse_cleanly():
    model = models.DigitsCNN().eval()
    groups = model.fusion_groups()
    assert groups == [[f"block{i}.conv", f"block{i}.bn", f"block{i}.relu"] for i in (1, 2, 3)]
    x = torch.randn(4, 1, 8, 8)
    fused = torch.ao.quantization.fuse_modules(model, groups)
    torch.testing.assert_close(fused(x), model(x), atol=1e-5, rtol=1e-5)


def test_cnn_has_quant_stubs_for_static_quantization():
    model = models.DigitsCNN()
    assert isinstance(model.quant, torch.ao.quantization.QuantStub)
    assert isinstance(model.dequant, torch.ao.quantization.DeQuantStub)


def test_control_flow_model_takes_both_branches():
    model = models.ControlFlowModel()
    positive, negative = torch.ones(1, 10), -torch.ones(1, 10)
    torch.testing.assert_close(model(positive), model.linear(positive))
    torch.testing.assert_close(model(negative), negative * 2)


def test_trained_checkpoint_loads_safely_in_eval_mode_and_meets_accuracy():
    model = models.load_trained_cnn()
    assert not model.training
    result = train.evaluate(model, data.make_loader("test"))
    card = models.checkpoint_card()
    assert result.accuracy >= 0.97
    assert result.accuracy == pytest.approx(card["test_accuracy"], abs=1e-4)


def test_trained_model_reads_the_sample_files():
    model = models.load_trained_cnn()
    transform = data.digits_transform()
    from PIL import Image

    samples = data.sample_images()
    batch = torch.stack([transform(Image.open(p)) for p in samples])
    with torch.inference_mode():
        predicted = model(batch).argmax(1).tolist()
    truth = [data.label_of_sample(p) for p in samples]
    assert predicted == truth


def test_loader_refuses_a_pickled_module(tmp_path):
    path = tmp_path / "whole_model.pt"
    torch.save(models.DigitsCNN(), path)  # a pickled module, the pattern we teach against
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        models.load_trained_cnn(path=path)


def test_loader_reports_a_wrong_architecture(tmp_path):
    path = tmp_path / "other.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), path)
    with pytest.raises(ValueError, match="not a state_dict of the course's DigitsCNN: key 'block1.conv.weight' is "
                                         "missing .and 19 more.; it has 'weight' instead"):
        models.load_trained_cnn(path=path)
    state = models.DigitsCNN().state_dict()
    state["fc.weight"] = torch.zeros(10, 128)
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"'fc.weight' has shape \(10, 128\), the model's is \(10, 256\)"):
        models.load_trained_cnn(path=path)
