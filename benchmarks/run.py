"""Measure every deployment variant of the course on this machine: `make bench`.

    python benchmarks/run.py [--out reports] [--models cnn resnet18] [--skip-aoti]

Builds each variant of lessons 01-04 (eager, TorchScript, AOTInductor, ONNX Runtime fp32, int8
eager x86 / ORT QDQ / PT2E + torch.compile, pruned unstructured / structured) for the course CNN
and for ResNet-18 at 224x224 (random weights: speed does not depend on them), measures latency
(p50/p95; the variants timed in turn), throughput and size at several batch sizes, accuracy where it means something (the
CNN), and writes reports/bench.json, reports/bench.md and reports/bench.png. Speed-ups are ratios
to eager fp32 at the same batch size, measured in the same run, so they survive a noisy machine
better than milliseconds do. Not part of `make test`: it takes several minutes.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.utils.prune as prune
from torch import nn

from course_utils import bench, data, env, export, models, train

warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", message="To copy construct from a tensor")
warnings.filterwarnings("ignore", message=".*reduce_range will be deprecated")
warnings.filterwarnings("ignore", message=".*quantized tensor creation functions")
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

BATCHES = {"cnn": (1, 32), "resnet18": (1, 8, 32)}
#: Targets from the compression issue (2-core CPU); reported, not enforced.
TARGETS = [
    ("resnet18", 1, "ORT fp32", 1.5),
    ("resnet18", 8, "best int8", 3.0),
    ("resnet18", 1, "pruned structured 50%", 1.8),
]


def log(message: str) -> None:
    print(f"[bench] {message}", flush=True)


class Case:
    """One model: how to make inputs, calibration data, and the accuracy check."""

    def __init__(self, name: str, work: Path) -> None:
        self.name, self.work = name, work
        if name == "cnn":
            self.model = models.load_trained_cnn()
            self.x_test, self.y_test = data.split_tensors("test")
            self.calibration = data.split_tensors("train")[0][:512]
            self.example = self.x_test[:2]
        else:
            import torchvision

            self.model = torchvision.models.resnet18(weights=None).eval()
            generator = torch.Generator().manual_seed(0)
            self.x_test = torch.randn(32, 3, 224, 224, generator=generator)
            self.y_test = None
            self.calibration = torch.randn(16, 3, 224, 224, generator=generator)
            self.example = self.x_test[:2]

    def inputs(self, batch: int) -> torch.Tensor:
        return self.x_test[:batch]

    def accuracy(self, fn: Callable) -> float | None:
        if self.y_test is None:
            return None
        with torch.inference_mode():
            return float((torch.as_tensor(fn(self.x_test)).argmax(1) == self.y_test).float().mean())


def eager_static_int8(case: Case) -> nn.Module:
    if case.name == "cnn":
        model = torch.ao.quantization.fuse_modules(copy.deepcopy(case.model).eval(), case.model.fusion_groups())
    else:
        import torchvision

        model = torchvision.models.quantization.resnet18(weights=None, quantize=False).eval()
        model.load_state_dict(case.model.state_dict())
        model.fuse_model()
    model.qconfig = torch.ao.quantization.get_default_qconfig("x86")
    torch.ao.quantization.prepare(model, inplace=True)
    with torch.inference_mode():
        for batch in case.calibration.split(64):
            model(batch)
    return torch.ao.quantization.convert(model).eval()


def pt2e_int8(case: Case) -> Callable:
    import torch._inductor.config as inductor_config
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    if case.name == "cnn":
        base = copy.deepcopy(case.model)
    else:  # torchvision's quantizable ResNet uses each ReLU once, which the X86 quantizer needs
        import torchvision

        base = torchvision.models.quantization.resnet18(weights=None, quantize=False).eval()
        base.load_state_dict(case.model.state_dict())
    batch = torch.export.Dim("batch", min=1, max=1024)
    exported = torch.export.export(base, (case.example,), dynamic_shapes={"x": {0: batch}}).module()
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    with torch.inference_mode():
        for chunk in case.calibration.split(64):
            prepared(chunk)
    converted = convert_pt2e(prepared)
    inductor_config.freezing = True
    compiled = torch.compile(converted, dynamic=False)  # dynamic shapes fail in torch 2.14 (see lesson 03)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return compiled(x)
    return run


def pruned_unstructured(case: Case) -> nn.Module:
    model = copy.deepcopy(case.model)
    params = [(m, "weight") for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=0.9)
    if case.name == "cnn":  # a short fine-tune so the accuracy column means something
        env.seed_everything(0)
        train.train(model, data.make_loader("train"), epochs=3, lr=3e-3)
    for module, name in params:
        prune.remove(module, name)
    return model.eval()


def pruned_structured(case: Case) -> nn.Module:
    import torch_pruning as tp

    model = copy.deepcopy(case.model)
    tp.pruner.MetaPruner(model, case.example[:1], importance=tp.importance.GroupMagnitudeImportance(p=2),
                         pruning_ratio=0.5, ignored_layers=[model.fc]).step()
    if case.name == "cnn":
        env.seed_everything(0)
        train.train(model, data.make_loader("train"), epochs=3, lr=1e-3)
    return model.eval()


def build_variants(case: Case, skip_aoti: bool) -> dict[str, tuple[Callable, int | None, float]]:
    """name -> (callable, size in bytes or None, build seconds)."""
    work = case.work
    variants: dict[str, tuple[Callable, int | None, float]] = {}

    def add(name: str, make: Callable[[], tuple[Callable, int | None]]) -> None:
        start = time.perf_counter()
        try:
            fn, size = make()
        except Exception as error:  # a variant that cannot be built is reported, not fatal
            log(f"{case.name}: {name} failed: {type(error).__name__}: {str(error).splitlines()[0][:150]}")
            return
        variants[name] = (fn, size, time.perf_counter() - start)
        log(f"{case.name}: built {name} in {variants[name][2]:.1f} s")

    add("eager fp32", lambda: (case.model, bench.model_size_bytes(case.model)))

    def torchscript():
        traced = torch.jit.trace(case.model, case.example)
        path = work / f"{case.name}_traced.pt"
        traced.save(str(path))
        return torch.jit.load(str(path)), path.stat().st_size
    add("TorchScript", torchscript)

    if not skip_aoti:
        def aoti():
            batch = torch.export.Dim("batch", min=1, max=64)
            program = torch.export.export(case.model, (case.example,), dynamic_shapes={"x": {0: batch}})
            path = torch._inductor.aoti_compile_and_package(program, package_path=str(work / f"{case.name}_aoti.pt2"))
            return torch._inductor.aoti_load_package(path), Path(path).stat().st_size
        add("AOTInductor", aoti)

    fp32_onnx = work / f"{case.name}.onnx"

    def ort_fp32():
        export.onnx_export(case.model, case.example, fp32_onnx)
        return export.OrtRunner(export.ort_session(fp32_onnx)), export.artifact_size_bytes(fp32_onnx)
    add("ORT fp32", ort_fp32)

    def int8_eager():
        model = eager_static_int8(case)
        return model, bench.model_size_bytes(model)
    add("int8 eager x86", int8_eager)

    def int8_ort():
        path = export.quantize_onnx_static(fp32_onnx, work / f"{case.name}_int8.onnx", case.calibration, batch_size=8)
        return export.OrtRunner(export.ort_session(path)), export.artifact_size_bytes(path)
    add("int8 ORT QDQ", int8_ort)

    add("int8 PT2E + compile", lambda: (pt2e_int8(case), None))

    def unstructured():
        model = pruned_unstructured(case)
        return model, bench.model_size_bytes(model)
    add("pruned unstructured 90%", unstructured)

    def structured():
        model = pruned_structured(case)
        return model, bench.model_size_bytes(model)
    add("pruned structured 50%", structured)

    # Lesson 10's runtimes: ExecuTorch with the XNNPACK delegate, and OpenVINO (f32 hint; int8 by NNCF).
    def executorch(int8: bool) -> Callable[[], tuple[Callable, int | None]]:
        def make() -> tuple[Callable, int | None]:
            from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
            from executorch.exir import to_edge_transform_and_lower
            from executorch.runtime import Runtime

            model: Callable = case.model
            if int8:
                from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
                    XNNPACKQuantizer,
                    get_symmetric_quantization_config,
                )
                from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

                quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
                any_batch = {"x": {0: torch.export.Dim("batch", min=1, max=1024)}}     # so that each shape re-exports
                prepared = prepare_pt2e(torch.export.export(case.model, (case.example,), dynamic_shapes=any_batch).module(),
                                        quantizer)
                with torch.inference_mode():
                    for i in range(0, len(case.calibration), 8):
                        prepared(case.calibration[i:i + 8])
                model = convert_pt2e(prepared)
            # A .pte has static shapes here: one per batch size, lowered on first use (the warm-up
            # calls), since exports with a dynamic batch refused batches above 8 (executorch 1.5.1).
            methods: dict[tuple[int, ...], Any] = {}

            def lowered(shape: tuple[int, ...]) -> Any:
                if shape not in methods:
                    program = torch.export.export(model, (torch.zeros(shape),))
                    path = work / f"{case.name}_xnnpack{'_int8' if int8 else ''}_b{shape[0]}.pte"
                    path.write_bytes(
                        to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch().buffer)
                    with env.capture_native_stderr():             # the runtime's CPU probe
                        methods[shape] = Runtime.get().load_program(path).load_method("forward")
                return methods[shape]

            lowered(tuple(case.example[:1].shape))
            size = (work / f"{case.name}_xnnpack{'_int8' if int8 else ''}_b1.pte").stat().st_size
            return (lambda x: lowered(tuple(x.shape)).execute([x.contiguous()])[0]), size
        return make
    add("ExecuTorch XNNPACK fp32", executorch(int8=False))
    add("ExecuTorch XNNPACK int8", executorch(int8=True))

    def openvino(int8: bool) -> Callable[[], tuple[Callable, int | None]]:
        def make() -> tuple[Callable, int | None]:
            os.environ.setdefault("NNCF_CI", "1")             # no telemetry from NNCF
            import openvino as ov

            model = ov.convert_model(fp32_onnx)
            if int8:
                import nncf

                items = [case.calibration[i:i + 1].numpy() for i in range(len(case.calibration))]
                model = nncf.quantize(model, nncf.Dataset(items), subset_size=len(items))
            path = work / f"{case.name}_openvino{'_int8' if int8 else ''}.xml"
            ov.save_model(model, path, compress_to_fp16=False)   # the default rounds weights to fp16
            compiled = ov.Core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
            size = path.stat().st_size + path.with_suffix(".bin").stat().st_size
            return (lambda x: torch.from_numpy(compiled(x.numpy())[0])), size
        return make
    if fp32_onnx.exists():
        add("OpenVINO f32", openvino(int8=False))
        add("OpenVINO int8 (NNCF)", openvino(int8=True))
    return variants


def measure(case: Case, variants: dict, batches: tuple[int, ...]) -> list[dict]:
    """Every variant at each batch size, timed **in turn** (bench.measure_interleaved), so that a
    background load that comes and goes hits every variant alike and the speed-ups stay honest."""
    accuracy = {name: case.accuracy(fn) for name, (fn, _, _) in variants.items()}
    heavy = case.name == "resnet18"
    rows = []
    for batch in batches:
        iters = {1: 30, 8: 10, 32: 5}[batch] if heavy else {1: 300, 32: 150}[batch]
        stats = bench.measure_interleaved({name: fn for name, (fn, _, _) in variants.items()}, case.inputs(batch),
                                          warmup=2 if heavy else 20, iters=iters)
        for name, (_, size, build_s) in variants.items():
            rows.append({"model": case.name, "variant": name, "batch": batch, "p50_ms": stats[name].p50_ms,
                         "p95_ms": stats[name].p95_ms, "items_per_s": stats[name].throughput,
                         "size_MiB": None if size is None else size / 2**20,
                         "accuracy": accuracy[name], "build_s": build_s})
        log(f"{case.name}: measured every variant at batch {batch}")
    return rows


def with_speedups(table: pd.DataFrame) -> pd.DataFrame:
    eager = table[table.variant == "eager fp32"].set_index(["model", "batch"])["p50_ms"]
    table = table.copy()
    table["speedup"] = [eager[(m, b)] / p for m, b, p in zip(table.model, table.batch, table.p50_ms, strict=True)]
    return table


def check_targets(table: pd.DataFrame) -> list[dict]:
    results = []
    for model, batch, variant, target in TARGETS:
        rows = table[(table.model == model) & (table.batch == batch)]
        if variant == "best int8":
            rows = rows[rows.variant.str.startswith("int8")]
        else:
            rows = rows[rows.variant == variant]
        if rows.empty:
            results.append({"target": f"{variant} on {model} b{batch} >= {target}x", "measured": None, "met": False})
            continue
        best = rows.loc[rows.speedup.idxmax()]
        results.append({"target": f"{variant} on {model} b{batch} >= {target}x eager",
                        "measured": f"{best.speedup:.2f}x ({best.variant})", "met": bool(best.speedup >= target)})
    return results


def write_reports(table: pd.DataFrame, targets: list[dict], out: Path, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps({"meta": meta, "targets": targets,
                                                "results": table.to_dict(orient="records")}, indent=2) + "\n")
    lines = [f"# Benchmark: {meta['when']}", "",
             f"{meta['machine']}; torch {meta['torch']}, onnxruntime {meta['onnxruntime']}, "
             f"{meta['threads']} threads. Speed-up = eager fp32 p50 / variant p50 at the same batch.", ""]
    for model in table.model.unique():
        part = table[table.model == model]
        pivot = part.pivot_table(index="variant", columns="batch", values=["p50_ms", "speedup"], sort=False)
        pivot.columns = [f"{k} b{b}" for k, b in pivot.columns]
        extra = part.groupby("variant", sort=False)[["size_MiB", "accuracy"]].first()
        lines += [f"## {model}", "", bench.markdown_table(pivot.join(extra)), ""]
    lines += ["## Targets (2-core CPU)", "", bench.markdown_table(pd.DataFrame(targets), index=False), ""]
    (out / "bench.md").write_text("\n".join(lines))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models_ = list(table.model.unique())
    fig, axes = plt.subplots(1, len(models_), figsize=(6 * len(models_), 4), squeeze=False)
    for ax, model in zip(axes[0], models_, strict=True):
        part = table[table.model == model].pivot_table(index="variant", columns="batch", values="speedup", sort=False)
        part.plot.barh(ax=ax)
        ax.axvline(1.0, color="k", linewidth=0.8)
        ax.set(title=f"{model}: speed-up over eager fp32", xlabel="x faster (higher is better)", ylabel="")
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(out / "bench.png", dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=env.REPO_DIR / "reports")
    parser.add_argument("--models", nargs="+", choices=sorted(BATCHES), default=["cnn", "resnet18"])
    parser.add_argument("--skip-aoti", action="store_true", help="skip AOTInductor (minutes of compiling)")
    args = parser.parse_args(argv)

    env.setup(prefer="cpu")
    work = env.artifacts_dir("bench")
    start = time.perf_counter()
    rows = []
    for name in args.models:
        case = Case(name, work)
        rows += measure(case, build_variants(case, args.skip_aoti), BATCHES[name])
    table = with_speedups(pd.DataFrame(rows))
    targets = check_targets(table)
    import onnxruntime

    meta = {"when": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {env.os.cpu_count()} cores",
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "threads": torch.get_num_threads(),
            "seconds": round(time.perf_counter() - start, 1)}
    write_reports(table, targets, args.out, meta)
    print((args.out / "bench.md").read_text())
    log(f"done in {meta['seconds']:.0f} s: {args.out / 'bench.md'}, bench.json, bench.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
