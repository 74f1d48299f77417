"""The release gate (lesson 12): a label bug is blocked, a good retrain promoted, every gate can fail."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from course_utils import data, env, models, release, train
from course_utils.registry import ModelRegistry
from course_utils.serving import ModelSpec, Predictor


def retrain(seed: int, epochs: int, label_bug: bool = False) -> models.DigitsCNN:
    """The course's recipe on the train split; ``label_bug``: half the 9s labelled 4 (lesson 12's bad candidate)."""
    x, y = data.split_tensors("train")
    y = y.clone()
    if label_bug:
        nines = (y == 9).nonzero().flatten()
        y[nines[: len(nines) // 2]] = 4
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        env.seed_everything(seed)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64, shuffle=True,
                                             generator=torch.Generator().manual_seed(seed))
        model = models.DigitsCNN()
        train.train(model, loader, epochs=epochs)
    finally:
        torch.set_num_threads(threads)
    return model


@pytest.fixture(scope="module")
def candidates(tmp_path_factory):
    folder = tmp_path_factory.mktemp("candidates")
    torch.save(retrain(2, 20).state_dict(), folder / "good.pt")
    torch.save(retrain(1, 20, label_bug=True).state_dict(), folder / "bad.pt")
    (folder / "broken.pt").write_bytes(b"not a checkpoint")
    return folder


def gate_command(candidate, registry, version, report, *extra):
    return subprocess.run([sys.executable, "-m", "course_utils.release", "gate", str(candidate), "--registry",
                           str(registry), "--version", version, "--report", str(report), *extra],
                          capture_output=True, text=True, timeout=300)


def test_the_command_blocks_a_label_bug_promotes_a_good_retrain_and_rolls_back(tmp_path, candidates):
    registry = tmp_path / "registry"
    first = gate_command(models.checkpoint_path(), registry, "v1", tmp_path / "v1.json")
    assert first.returncode == 0 and first.stdout.startswith("PROMOTED v1: first release"), first.stdout + first.stderr

    bad = gate_command(candidates / "bad.pt", registry, "v2", tmp_path / "v2.json")
    assert bad.returncode == release.EXIT_BLOCKED, bad.stdout + bad.stderr
    assert bad.stdout.strip().splitlines() == [bad.stdout.strip()] and bad.stdout.startswith("BLOCKED v2: accuracy gate")
    report = json.loads((tmp_path / "v2.json").read_text())
    assert report["decision"] == "blocked" and report["production_after"] == "v1" and report["canary"] is None
    statuses = {g["name"]: g["status"] for g in report["gates"]}
    assert statuses["accuracy"] == "fail" and statuses["parity"] == statuses["spec"] == "pass"
    assert ModelRegistry(registry).versions() == ["v1"], "a blocked candidate is not registered"

    good = gate_command(candidates / "good.pt", registry, "v3", tmp_path / "v3.json")
    assert good.returncode == 0 and good.stdout.startswith("PROMOTED v3: every gate passed"), good.stdout + good.stderr
    report = json.loads((tmp_path / "v3.json").read_text())
    assert all(g["status"] == "pass" for g in report["gates"]), report["gates"]
    assert release.Report.read(tmp_path / "v3.json").line() == good.stdout.strip()
    assert report["canary"]["passed"] and report["canary"]["errors"] == []
    assert ModelRegistry(registry).production()["version"] == "v3"

    where = subprocess.run([sys.executable, "-m", "course_utils.release", "production", "--registry", str(registry)],
                           capture_output=True, text=True, timeout=120)
    assert where.returncode == 0 and where.stdout.strip().endswith("v3/model.onnx")
    assert release.main(["rollback", "--registry", str(registry), "--reason", "incident"]) == 0
    assert ModelRegistry(registry).load().version == "v1"


def test_bad_input_exits_2_and_a_broken_candidate_is_blocked(tmp_path, candidates, capsys):
    registry = tmp_path / "registry"
    assert release.main(["gate", str(tmp_path / "missing.pt"), "--registry", str(registry), "--version", "v1"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert release.main(["gate", str(candidates / "bad.pt"), "--registry", str(registry), "--version", "../x"]) == 2
    assert "invalid version" in capsys.readouterr().err
    assert release.main(["rollback", "--registry", str(registry)]) == 2
    assert "no previous version" in capsys.readouterr().err
    assert release.main(["gate", str(candidates / "bad.pt"), "--registry", str(registry), "--version", "v1",
                         "--canary-share", "1.5"]) == 2
    assert "canary_share must be in [0, 1], got 1.5" in capsys.readouterr().err
    assert ModelRegistry(registry).versions() == []
    assert release.main(["gate", str(candidates / "broken.pt"), "--registry", str(registry), "--version", "v1"]) == 1
    assert capsys.readouterr().out.startswith("BLOCKED v1: loads gate: candidate broken.pt is not a PyTorch state_dict")
    assert release.main(["gate", str(models.checkpoint_path()), "--registry", str(registry), "--version", "v1",
                         "--min-accuracy", "0.999"]) == 1
    assert "accuracy gate: 98.33% on 360 held-out images; at least 99.90%" in capsys.readouterr().out
    assert release.main(["gate", str(models.checkpoint_path()), "--registry", str(registry), "--version", "v1"]) == 0
    capsys.readouterr()
    assert release.main(["gate", str(models.checkpoint_path()), "--registry", str(registry), "--version", "v1"]) == 2
    assert "already registered" in capsys.readouterr().err


def test_each_gate_can_fail():
    limits = release.Limits()
    digits = ModelSpec()
    renamed = ModelSpec(labels=tuple(f"d{i}" for i in range(10)))
    assert release.spec_gate(digits, digits).status == "pass"
    changed = release.spec_gate(renamed, digits)
    assert changed.failed and "breaking change of the contract: labels" in changed.detail
    assert release.spec_gate(digits, None).status == "skip"
    assert release.size_gate(1000, 1000, limits).status == "pass"
    assert release.size_gate(2001, 1000, limits).failed
    assert release.size_gate(60 * 2**20, None, limits).failed

    probabilities = torch.softmax(torch.randn(20, 10, generator=torch.Generator().manual_seed(0)), 1)
    assert release.parity_gate(probabilities, probabilities + 1e-6, limits).status == "pass"
    assert release.parity_gate(probabilities, probabilities + 1e-3, limits).failed
    assert release.accuracy_gate(0.975, 0.98, limits, 360).status == "pass"
    assert release.accuracy_gate(0.969, 0.98, limits, 360).failed
    assert release.accuracy_gate(355 / 360, 355 / 360, limits, 360).status == "pass"
    assert release.accuracy_gate(0.85, None, limits, 360).failed

    x, _ = data.split_tensors("test")
    predictor = Predictor.load(device="cpu")
    # the same model twice: a ratio near 1, within 10x even on a machine busy with other work
    assert release.latency_gate(predictor, predictor, x[:32], release.Limits(latency_factor=10), iters=10).status == "pass"
    slow = release.latency_gate(predictor, predictor, x[:32], release.Limits(latency_factor=0.01), iters=10)
    assert slow.failed and "interleaved" in slow.detail
    classes = predictor.predict(x).argmax(1)
    same = release.drift_gate(x, classes, x, classes, limits)
    assert same.status == "pass" and "no alarm" in same.detail
    faint = release.drift_gate(x, classes, x * 0.5, classes, limits)   # faint scans (lesson 08)
    assert faint.failed and "input: ink mean" in faint.detail
    only_ones = release.drift_gate(x, classes, x, torch.ones_like(classes), limits)
    assert only_ones.failed and "predicted classes" in only_ones.detail


def test_the_canary_decides_on_errors_and_significant_harm():
    assert release.canary_verdict(95, 100, 50, 100, errors=0)[0] is False
    assert release.canary_verdict(95, 100, 94, 100, errors=0)[0] is True
    assert release.canary_verdict(95, 100, 95, 100, errors=1) == (False, "the canary raised 1 error(s)")
    assert release.canary_verdict(95, 100, 0, 0, errors=0)[0] is False

    def out_of_memory(batch):
        raise RuntimeError("out of memory")

    stable = Predictor.load(device="cpu")
    crashing = Predictor(out_of_memory, "eager", "bad")
    x, y = data.split_tensors("val")
    passed, canary = release.run_canary(stable, crashing, x[:60], y[:60], release.Limits())
    assert not passed and canary["errors"][0] == "RuntimeError: out of memory" and "error(s)" in canary["detail"]


def test_a_failed_canary_leaves_production_and_stages_the_candidate(tmp_path, monkeypatch):
    registry = ModelRegistry(tmp_path / "registry")
    assert release.release(models.load_trained_cnn(), registry, "v1").decision == "promoted"
    monkeypatch.setattr(release, "run_canary", lambda *args: (False, {"detail": "the canary raised 3 error(s)"}))
    report = release.release(models.load_trained_cnn(), registry, "v2")
    assert report.decision == "rolled back" and report.production_after == "v1"
    assert report.line() == "ROLLED BACK v2: canary: the canary raised 3 error(s); production stays v1"
    assert registry.get("v2")["stage"] == "staging"


def test_extra_gates_and_a_custom_spec(tmp_path):
    registry = ModelRegistry(tmp_path / "registry")
    spec = ModelSpec(name="digits-renamed", labels=tuple(f"digit {i}" for i in range(10)))

    def never(candidate_classes, current_classes, labels):
        return release.gate("never", False, 0, 1, "this gate always fails")

    report = release.release(models.load_trained_cnn(), registry, "v1", spec=spec, extra_gates=[never])
    assert report.decision == "blocked" and report.reason == "never gate: this gate always fails"
    report = release.release(models.load_trained_cnn(), registry, "v1", spec=spec)
    assert report.decision == "promoted" and registry.load().spec.labels[3] == "digit 3"
    summary = release.summary([report])
    assert summary.loc["decision", "v1"] == "promoted" and summary.loc["spec", "v1"] == "skip"
