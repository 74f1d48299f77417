
import pytest
import torch

from course_utils import data, models, production
from course_utils.serving import Predictor, serve_in_background


@pytest.fixture(scope="module")
def cnn():
    return models.load_trained_cnn()


def test_production_model_predicts_batches_and_single_images(cnn):
    pm = production.ProductionModel(cnn, device="cpu", version="v1")
    x, y = data.split_tensors("test")
    answers = pm.classify_batch(x[:16], top_k=3)
    assert len(answers) == 16 and len(answers[0]) == 3
    assert [a[0].index for a in answers] == cnn(x[:16]).argmax(1).tolist()
    assert pm.classify(x[0])[0].index == int(y[0])       # one image, no batch dimension
    assert pm.stats()["count"] == 2 and pm.dtype == torch.float32
    assert isinstance(pm, Predictor) and pm.ready       # the same predictor every front end serves


@pytest.mark.parametrize("bad, message", [
    (torch.zeros(2, 3, 8, 8), r"expected a batch \(N, 1, 8, 8\)"),
    (torch.zeros(2, 1, 8, 8, dtype=torch.int64), "floating-point"),
    (torch.full((1, 1, 8, 8), float("nan")), "NaN"),
])
def test_production_model_rejects_bad_input_clearly(cnn, bad, message):
    pm = production.ProductionModel(cnn, device="cpu")
    with pytest.raises(ValueError, match=message):
        pm.predict(bad)
    with pytest.raises(ValueError, match="top_k"):
        pm.classify(torch.zeros(1, 8, 8), top_k=0)
    assert pm.stats()["errors"] == 1


def test_half_precision_casts_inputs_when_asked(cnn, monkeypatch):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    pm = production.ProductionModel(models.load_trained_cnn(), device="cpu", half=True)
    assert pm.dtype == torch.bfloat16
    x, y = data.split_tensors("test")
    top = [a[0].index for a in pm.classify_batch(x[:64])]       # float32 inputs are cast, not rejected
    assert sum(int(t == label) for t, label in zip(top, y[:64].tolist(), strict=True)) >= 60


def test_canary_routes_sticky_shares_and_shadows(cnn):
    stable = production.ProductionModel(cnn, device="cpu", version="stable")
    candidate = production.ProductionModel(models.load_trained_cnn(), device="cpu", version="candidate")
    router = production.CanaryRouter(stable, candidate, share=0.2)
    keys = [f"user-{i}" for i in range(2000)]
    arms = [router.route(k) for k in keys]
    assert arms == [router.route(k) for k in keys], "the same key always goes to the same model"
    assert 0.15 < arms.count("candidate") / len(arms) < 0.25
    x, y = data.split_tensors("val")
    for i in range(60):
        router.predict(f"user-{i}", x[i], int(y[i]))
    report = router.report()
    assert report.requests.sum() == 60
    shadow = production.CanaryRouter(stable, candidate, share=0.5, shadow=True)
    for i in range(20):
        arm, _ = shadow.predict(f"user-{i}", x[i], int(y[i]))
        assert arm == "stable", "shadow mode answers with the stable model"
    assert shadow.shadow_runs == 20 and shadow.shadow_agreements == 20
    with pytest.raises(ValueError):
        production.CanaryRouter(stable, candidate, share=1.5)


def test_checklist_against_a_running_service(tmp_path):
    from course_utils.monitoring import DriftDetector

    model_path = models.checkpoint_path()
    with serve_in_background("fastapi", args=["--api-key", "k"]) as server:
        table = production.run_checklist(model_path, server.url, api_key="k",
                                         drift_detector=DriftDetector.fit(*data.split_tensors("test")),
                                         measured_latency={"p50_ms": 1.0})
    assert table.loc["health check answers", "passed"] and table.loc["authentication on", "passed"]
    assert table.loc["resource limits on", "passed"] and table.loc["errors handled (4xx JSON, no 500)", "passed"]
    assert not table.loc["exported to a deployable format", "passed"], "a state_dict is not an export"
    assert not table.loc["quantized", "passed"]
    with serve_in_background("fastapi") as open_server:
        open_table = production.run_checklist(model_path, open_server.url)
    assert not open_table.loc["authentication on", "passed"] and not open_table.loc["drift detection configured", "passed"]
