"""A release gate as code: the checks of lessons 02-09 run on every candidate model, then a canary and a promotion.

One command, the same in a notebook, on a laptop and in CI (``deploy/ci/release.yml``)::

    python -m course_utils.release gate CANDIDATE --registry DIR --version V [--report FILE] [limits]
    python -m course_utils.release rollback --registry DIR [--reason TEXT] [--report FILE]
    python -m course_utils.release production --registry DIR     # the production file's path, sha256-checked

``CANDIDATE`` is what training writes: a ``state_dict`` of the course's ``DigitsCNN`` (``.pt``). From
Python, :func:`release` also takes any ``nn.Module`` with its :class:`~course_utils.serving.ModelSpec`.

The gate exports the candidate to ONNX (the file the service will serve) and runs, against the
registry's production model (the *current* one):

========  ==========================================================================================
spec      the served contract is unchanged: input shape, channels, preprocessing, labels
size      the ONNX file is at most ``size_factor`` x the current one's (and ``max_size_mb``)
parity    ONNX Runtime agrees with eager PyTorch on the held-out split (max abs diff of probabilities)
accuracy  held-out accuracy of the *served* file >= current - ``max_accuracy_drop`` (and ``min_accuracy``)
latency   median at batch 32, timed interleaved with the current model: <= ``latency_factor`` x current
drift     a reference batch (recent traffic) looks like the held-out split, and the candidate's mix of
          predicted classes on it looks like the current model's on the held-out split (lesson 08's
          DriftDetector: PSI and a test)
========  ==========================================================================================

A candidate that passes every gate is registered (staging), answers a share of the reference
traffic beside the current model (:class:`~course_utils.production.CanaryRouter`, sticky by caller),
and is promoted only if the canary raised no error and was not significantly worse; otherwise the
canary is rolled back and production is unchanged. The first release (an empty registry) has
nothing to compare with: its spec and latency gates say ``skip``, the others compare with absolute
limits (``min_accuracy``, ``parity_atol``, ``max_size_mb``) and the drift gate checks the inputs only.

Every run writes a JSON report; the command prints one line (``PROMOTED``/``BLOCKED``/``ROLLED BACK``
and why) and exits 0 when promoted, 1 when a gate or the canary stopped it, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .registry import ModelRegistry
    from .serving.predictor import Predictor
    from .serving.spec import ModelSpec

EXIT_PROMOTED, EXIT_BLOCKED, EXIT_ERROR = 0, 1, 2
#: The spec fields a client depends on: a change in any of them is a breaking change of the contract.
CONTRACT_FIELDS = ("input_size", "channels", "resize", "interpolation", "invert", "mean", "std", "labels")


@dataclass
class Limits:
    """What a candidate must meet. The defaults hold on any CPU: the timing limit is wide on purpose."""

    max_accuracy_drop: float = 0.01     # 1 point below the current model at most
    min_accuracy: float = 0.90          # and never below this, even on a first release
    parity_atol: float = 1e-4           # ONNX Runtime vs eager, probabilities
    latency_factor: float = 1.5         # candidate median <= 1.5 x current, timed interleaved
    size_factor: float = 2.0            # ONNX file <= 2 x the current one's
    max_size_mb: float = 50.0
    drift_psi: float = 0.2              # lesson 08's thresholds
    drift_alpha: float = 0.01
    canary_share: float = 0.3
    canary_alpha: float = 0.05

    def __post_init__(self) -> None:
        for name in ("canary_share", "canary_alpha", "drift_alpha", "max_accuracy_drop", "min_accuracy"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("parity_atol", "latency_factor", "size_factor", "max_size_mb", "drift_psi"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


@dataclass
class Gate:
    """One check: ``status`` is ``pass``, ``fail`` or ``skip`` (nothing to compare with), with its evidence."""

    name: str
    status: str
    value: float | str | None
    limit: float | str | None
    detail: str

    @property
    def failed(self) -> bool:
        return self.status == "fail"


@dataclass
class Report:
    """What one release run did, as written to the JSON report."""

    version: str
    candidate: str
    decision: str                      # promoted | blocked | rolled back
    reason: str
    production_before: str | None
    production_after: str | None
    gates: list[Gate] = field(default_factory=list)
    canary: dict[str, Any] | None = None
    limits: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def line(self) -> str:
        """The one line the command prints: the decision, the version and why."""
        return f"{self.decision.upper()} {self.version}: {self.reason}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def read(cls, path: str | Path) -> Report:
        """A report written by :meth:`write` (``--report``), gates included."""
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(**{**raw, "gates": [Gate(**g) for g in raw["gates"]]})

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.as_dict(), indent=2) + "\n", encoding="utf-8")
        return path


def gate(name: str, passed: bool, value: float | str | None, limit: float | str | None, detail: str) -> Gate:
    return Gate(name, "pass" if passed else "fail", value, limit, detail)


def skip(name: str, detail: str = "first release: no current model to compare with") -> Gate:
    return Gate(name, "skip", None, None, detail)


# ---------------------------------------------------------------------------------------------- the gates
def spec_gate(candidate: ModelSpec, current: ModelSpec | None) -> Gate:
    """The served contract: a client built for the current model must work unchanged with the candidate."""
    if current is None:
        return skip("spec")
    changed = [f for f in CONTRACT_FIELDS if getattr(candidate, f) != getattr(current, f)]
    detail = ("input, preprocessing and labels unchanged" if not changed else
              "breaking change of the contract: " + ", ".join(f"{f} {getattr(current, f)!r} -> "
                                                              f"{getattr(candidate, f)!r}" for f in changed))
    return gate("spec", not changed, ", ".join(changed) or "none", "none", detail)


def size_gate(candidate_bytes: int, current_bytes: int | None, limits: Limits) -> Gate:
    limit = limits.max_size_mb * 2**20
    if current_bytes is not None:
        limit = min(limit, limits.size_factor * current_bytes)
    mb = candidate_bytes / 2**20
    detail = f"{mb:.3f} MB" + (f" (current {current_bytes / 2**20:.3f} MB)" if current_bytes else "")
    return gate("size", candidate_bytes <= limit, round(mb, 4), round(limit / 2**20, 4), detail)


def parity_gate(eager_probabilities: torch.Tensor, served_probabilities: torch.Tensor, limits: Limits) -> Gate:
    worst = float((eager_probabilities - served_probabilities).abs().max())
    same = float((eager_probabilities.argmax(1) == served_probabilities.argmax(1)).float().mean())
    return gate("parity", worst <= limits.parity_atol, worst, limits.parity_atol,
                f"max abs diff {worst:.1e} over {len(served_probabilities)} inputs; same class on {same:.1%}")


def accuracy_gate(candidate_accuracy: float, current_accuracy: float | None, limits: Limits, n: int) -> Gate:
    floor = limits.min_accuracy
    detail = f"{candidate_accuracy:.2%} on {n} held-out images"
    if current_accuracy is not None:
        floor = max(floor, current_accuracy - limits.max_accuracy_drop)
        detail += (f"; current {current_accuracy:.2%}, allowed drop {limits.max_accuracy_drop * 100:.2f} points "
                   f"-> at least {floor:.2%}")
    else:
        detail += f"; at least {floor:.2%}"
    # a tiny tolerance: 355/360 computed two ways must not fail "355/360 >= 355/360"
    return gate("accuracy", candidate_accuracy >= floor - 1e-9, candidate_accuracy, floor, detail)


def latency_gate(candidate: Predictor, current: Predictor | None, batch: torch.Tensor, limits: Limits,
                 iters: int = 60, attempts: int = 3) -> Gate:
    """Median of both models on the same batch, timed in turn (``bench.measure_interleaved``): a ratio, not a time.

    A ratio over the limit is measured again, up to ``attempts`` times: a burst of other work can
    slow one model's samples, a slower model is slower every time.
    """
    from . import bench

    if current is None:
        return skip("latency")
    for _ in range(attempts):
        stats = bench.measure_interleaved({"candidate": candidate.predict, "current": current.predict}, batch,
                                          warmup=5, iters=iters)
        ratio = stats["candidate"].p50_ms / stats["current"].p50_ms
        if ratio <= limits.latency_factor:
            break
    return gate("latency", ratio <= limits.latency_factor, round(ratio, 3), limits.latency_factor,
                f"batch {len(batch)}: candidate {stats['candidate'].p50_ms:.3f} ms vs current "
                f"{stats['current'].p50_ms:.3f} ms (median, interleaved)")


def drift_gate(held_out: torch.Tensor, reference_predictions: torch.Tensor, batch: torch.Tensor,
               candidate_predictions: torch.Tensor, limits: Limits) -> Gate:
    """Lesson 08's detector, fitted on the held-out split with the current model's classes.

    An input alarm says the held-out split no longer looks like the traffic (the accuracy gate
    measured the wrong thing); a prediction alarm says the candidate answers the traffic with
    another mix of classes than the current model did - a warning that needs no labels.
    """
    from .monitoring import DriftDetector

    detector = DriftDetector.fit(held_out, reference_predictions, psi_threshold=limits.drift_psi,
                                 alpha=limits.drift_alpha)
    checks = detector.check(batch, candidate_predictions).checks
    alarms = checks[checks["alarm"]]
    worst = float(checks["psi"].max())
    detail = (f"{len(batch)} reference images: no alarm (largest PSI {worst:.3f})" if alarms.empty else
              "; ".join(f"{row.Index}: PSI {row.psi:.3f}, p = {row.p_value:.1e}" for row in alarms.itertuples()))
    return gate("drift", alarms.empty, round(worst, 4), limits.drift_psi, detail)


def canary_verdict(stable_ok: int, stable_n: int, canary_ok: int, canary_n: int, errors: int,
                   alpha: float = 0.05) -> tuple[bool, str]:
    """Promote unless the canary raised an error or was significantly worse (two-sided test at ``alpha``)."""
    from .production import two_proportion_test

    if errors:
        return False, f"the canary raised {errors} error(s)"
    if min(stable_n, canary_n) == 0:
        return False, "an arm of the canary received no traffic: raise the share or send more requests"
    diff, p = two_proportion_test(stable_ok, stable_n, canary_ok, canary_n)
    if diff < 0 and p < alpha:
        return False, f"the canary was worse by {-diff * 100:.1f} points (p = {p:.3f} < {alpha})"
    return True, f"{canary_ok}/{canary_n} right vs {stable_ok}/{stable_n} (difference {diff * 100:+.1f} points, p = {p:.2f})"


def run_canary(current: Predictor, candidate: Predictor, traffic: torch.Tensor, labels: torch.Tensor,
               limits: Limits) -> tuple[bool, dict[str, Any]]:
    """Both models on ``traffic``, a sticky ``canary_share`` of the requests to the candidate."""
    from .production import CanaryRouter

    router = CanaryRouter(current, candidate, share=limits.canary_share)
    errors: list[str] = []
    for i in range(len(traffic)):
        try:
            router.predict(f"user-{i}", traffic[i], int(labels[i]))
        except Exception as error:   # a crashing candidate is exactly what a canary is for
            errors.append(f"{type(error).__name__}: {error}")
    stable, canary = router.arms["stable"], router.arms["candidate"]
    passed, why = canary_verdict(stable.correct, stable.labelled, canary.correct, canary.labelled, len(errors),
                                 limits.canary_alpha)
    return passed, {"share": limits.canary_share, "requests": len(traffic), "stable": [stable.correct, stable.labelled],
                    "candidate": [canary.correct, canary.labelled], "errors": errors[:3], "passed": passed,
                    "detail": why}


# ---------------------------------------------------------------------------------------------- the pipeline
def load_candidate(path: str | Path) -> nn.Module:
    """A ``state_dict`` of the course's DigitsCNN, checked (``models.state_dict_problem``); ``ValueError`` if not."""
    import torch

    from .models import DigitsCNN, state_dict_problem

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"candidate {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"candidate {path.name} is not a PyTorch state_dict: {error}") from None
    model = DigitsCNN()
    problem = state_dict_problem(state, model)
    if problem:
        raise ValueError(f"candidate {path.name} does not fit DigitsCNN: {problem}")
    model.load_state_dict(state)
    return model.eval()


def release(candidate: nn.Module | str | Path, registry: ModelRegistry, version: str,
            spec: ModelSpec | None = None, limits: Limits | None = None,
            held_out: tuple[torch.Tensor, torch.Tensor] | None = None,
            traffic: tuple[torch.Tensor, torch.Tensor] | None = None,
            extra_gates: Sequence[Callable[..., Gate]] = (), work_dir: str | Path | None = None,
            metadata: dict[str, Any] | None = None) -> Report:
    """Gate ``candidate``, then register, canary and promote it (or not); return the :class:`Report`.

    ``held_out``: (inputs, labels) for accuracy and parity (default: the test split);
    ``traffic``: the reference batch of recent, labelled traffic for drift and the canary (default:
    the validation split). ``extra_gates``: functions ``(candidate_classes, current_classes, labels)
    -> Gate`` on the held-out split, run after the built-in gates.
    """
    import torch

    from . import data
    from .export import onnx_export
    from .registry import RegistryError, check_version
    from .serving.predictor import ModelLoadError, Predictor
    from .serving.spec import ModelSpec

    start = time.perf_counter()
    limits = limits or Limits()
    check_version(version)
    if version in registry.versions():
        raise RegistryError(f"version {version!r} is already registered; versions are immutable")
    name = str(candidate) if isinstance(candidate, str | Path) else type(candidate).__name__
    x_held, y_held = held_out if held_out is not None else data.split_tensors("test")
    x_ref, y_ref = traffic if traffic is not None else data.split_tensors("val")
    spec = spec or ModelSpec()
    before = registry.production()
    current = registry.load(device="cpu") if before else None   # hash-checked, as the service loads it
    report = Report(version, Path(name).name, "blocked", "", before["version"] if before else None,
                    before["version"] if before else None, limits=asdict(limits))

    def finish(decision: str, reason: str) -> Report:
        report.decision, report.reason = decision, reason
        report.production_after = (registry.production() or {}).get("version")
        report.seconds = round(time.perf_counter() - start, 2)
        return report

    def blocked() -> Report | None:
        failed = [g for g in report.gates if g.failed]
        return finish("blocked", f"{failed[0].name} gate: {failed[0].detail}") if failed else None

    with tempfile.TemporaryDirectory(dir=work_dir) as scratch:
        # 0. the candidate becomes the file the service will serve
        try:
            module = load_candidate(candidate) if isinstance(candidate, str | Path) else candidate.eval()
            artifact = onnx_export(module, x_held[:2], Path(scratch) / "model.onnx")
            if spec != ModelSpec():
                spec.save_next_to(artifact)
            served = Predictor.load(artifact, device="cpu", version=version, spec=spec)
        except (ValueError, ModelLoadError, RuntimeError) as error:
            report.gates.append(gate("loads", False, None, None, str(error).splitlines()[0]))
            return blocked() or report
        report.gates.append(gate("loads", True, None, None, "exported to ONNX and loaded as the service loads it"))

        # 1. the gates, cheapest first; all of them run, so the report shows everything that is wrong
        report.gates.append(spec_gate(spec, current.spec if current else None))
        report.gates.append(size_gate(artifact.stat().st_size,
                                      registry.path().stat().st_size if current else None, limits))
        with torch.inference_mode():
            eager = torch.softmax(module(x_held).float(), dim=1)
        probabilities = served.predict(x_held)
        report.gates.append(parity_gate(eager, probabilities, limits))
        candidate_classes = probabilities.argmax(1)
        current_classes = current.predict(x_held).argmax(1) if current else None
        accuracy = float((candidate_classes == y_held).float().mean())
        current_accuracy = float((current_classes == y_held).float().mean()) if current_classes is not None else None
        report.gates.append(accuracy_gate(accuracy, current_accuracy, limits, len(y_held)))
        report.gates.append(latency_gate(served, current, x_held[:32], limits))
        report.gates.append(drift_gate(x_held, current_classes if current_classes is not None else candidate_classes,
                                       x_ref, served.predict(x_ref).argmax(1), limits))
        for extra in extra_gates:
            report.gates.append(extra(candidate_classes, current_classes, y_held))
        stopped = blocked()
        if stopped:
            return stopped

        # 2. register (the bytes that passed), canary against production, promote or roll the canary back
        gates = {g.name: g.status for g in report.gates}
        registry.register(artifact, version, {"accuracy": round(accuracy, 4), "gates": gates, **(metadata or {})})
        if current is None:
            registry.promote(version)
            return finish("promoted", f"first release, accuracy {accuracy:.2%}; every gate passed or had nothing "
                                      f"to compare with")
        staged = registry.load(version, device="cpu")   # the registered copy, hash-checked
        passed, report.canary = run_canary(current, staged, x_ref, y_ref, limits)
        if not passed:
            return finish("rolled back", f"canary: {report.canary['detail']}; production stays "
                                         f"{report.production_before}")
        registry.promote(version)
        return finish("promoted", f"every gate passed; canary {report.canary['detail']}; accuracy "
                                  f"{accuracy:.2%} (current {current_accuracy:.2%})")


def rollback(registry: ModelRegistry, reason: str = "") -> Report:
    """Production back to the version before it (``ModelRegistry.rollback``, which load-checks it first)."""
    before = (registry.production() or {}).get("version")
    entry = registry.rollback()
    why = f"production {before} -> {entry['version']}" + (f" ({reason})" if reason else "")
    return Report(entry["version"], "", "rolled back", why, before, entry["version"])


# ---------------------------------------------------------------------------------------------- the command
def main(argv: Sequence[str] | None = None) -> int:
    from .registry import IntegrityError, ModelRegistry, RegistryError

    parser = argparse.ArgumentParser(prog="python -m course_utils.release", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("gate", help="gate a candidate; register, canary and promote it if it passes")
    run.add_argument("candidate", help="a state_dict of the course's DigitsCNN (.pt)")
    run.add_argument("--version", required=True)
    defaults = Limits()
    for name, value in asdict(defaults).items():
        run.add_argument("--" + name.replace("_", "-"), type=float, default=value, help=f"default {value}")
    back = commands.add_parser("rollback", help="production back to the previous version")
    back.add_argument("--reason", default="")
    where = commands.add_parser("production", help="print the production artifact's path (after its sha256 check)")
    for sub in (run, back, where):
        sub.add_argument("--registry", required=True, help="the registry folder (created if missing)")
    for sub in (run, back):
        sub.add_argument("--report", help="write the JSON report here")
    args = parser.parse_args(argv)
    try:
        registry = ModelRegistry(args.registry)
        if args.command == "production":
            print(registry.path())
            return EXIT_PROMOTED
        if args.command == "gate":
            limits = Limits(**{name: getattr(args, name) for name in asdict(defaults)})
            report = release(args.candidate, registry, args.version, limits=limits)
        else:
            report = rollback(registry, args.reason)
        if args.report:
            report.write(args.report)
    except (OSError, ValueError, RegistryError, IntegrityError) as error:
        print(f"ERROR: {error}", file=sys.stderr)
        return EXIT_ERROR
    print(report.line())
    return EXIT_PROMOTED if report.decision == "promoted" or args.command == "rollback" else EXIT_BLOCKED


def summary(reports: Sequence[Report]) -> Any:
    """One row per gate, one column per report: each gate's status (a pandas DataFrame)."""
    import pandas as pd

    columns = {r.version: {g.name: g.status for g in r.gates} | {"decision": r.decision} for r in reports}
    return pd.DataFrame(columns).fillna("-")


if __name__ == "__main__":   # pragma: no cover
    sys.exit(main())


__all__ = ["Gate", "Limits", "Report", "accuracy_gate", "canary_verdict", "drift_gate", "gate", "latency_gate",
           "load_candidate", "main", "parity_gate", "release", "rollback", "run_canary", "size_gate", "skip",
           "spec_gate", "summary"]
