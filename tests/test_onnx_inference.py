"""ONNX export of a run's global model (LoRA merged, or a full model) and the ONNX Runtime bench.

The run directory is laid out exactly as the coordinator writes it (config.yaml +
global/round-NNNN saved by the method's own `export`), with a trained-looking adapter: random
non-zero LoRA B and head, so merging changes the weights and parity means something.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from jetfed.edge.errors import UserError

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

REPO_ROOT = Path(__file__).resolve().parent.parent
PARITY = 1e-4


def jetfed(*args: str, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run(
        [sys.executable, "-m", "jetfed", *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=env,
        timeout=timeout_s,
    )


def write_config(run_dir: Path, num_hidden_layers: Any = None) -> None:
    run_dir.mkdir(parents=True)
    model = {"name_or_path": "minilm", "max_length": 64, "num_hidden_layers": num_hidden_layers}
    config = {"name": run_dir.name, "model": model, "method": {"name": "lora"}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory, minilm_path: str) -> Path:
    """runs/lora-run with a LoRA adapter after "round 2", saved by LoraMethod.export."""
    import torch

    from jetfed.edge.methods.lora import LoraMethod
    from jetfed.edge.wire import ModelRef

    run_dir = tmp_path_factory.mktemp("runs") / "lora-run"
    write_config(run_dir)
    method = LoraMethod({}, ModelRef(name_or_path="minilm", num_labels=2, max_length=64))
    model = method.build(None, seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    method.export(model, str(run_dir / "global" / "round-0002"))
    return run_dir


def test_export_cli_merges_lora_with_parity_and_bench_reports_the_provider_used(
    lora_run: Path, tmp_path: Path
) -> None:
    out = tmp_path / "model.onnx"
    exported = jetfed("export-onnx", str(lora_run), "--out", str(out))
    assert exported.returncode == 0, exported.stderr[-3000:]
    match = re.search(r"max abs diff ([0-9.e+-]+)", exported.stdout)
    assert match, exported.stdout
    assert float(match.group(1)) < PARITY
    assert "round 2 (peft-adapter)" in exported.stdout
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["max_abs_diff"] < PARITY and meta["opset"] >= 17

    import onnx

    graph = onnx.load(str(out), load_external_data=False).graph
    shapes = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
        for i in graph.input
    }
    assert set(shapes) == {"input_ids", "attention_mask", "token_type_ids"}
    assert all(isinstance(d, str) for dims in shapes.values() for d in dims), shapes
    assert not any("lora" in init.name for init in graph.initializer)

    report = tmp_path / "bench.json"
    bench = jetfed(
        "edge",
        "bench-inference",
        str(out),
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--iterations",
        "5",
        "--min-seconds",
        "0",
        "--json",
        str(report),
    )
    assert bench.returncode == 0, bench.stderr[-3000:]
    result = json.loads(report.read_text())
    assert result["provider_used"] == result["providers_active"][0]
    assert result["provider_used"] in result["providers_available"]
    assert result["provider_used"] in bench.stdout
    assert result["iterations"] >= 5
    assert 0 < result["latency_p50_ms"] <= result["latency_p95_ms"]
    assert result["throughput_per_s"] > 0
    if result["telemetry_backend"] == "psutil":
        assert result["energy_per_inference_j"] is None
        assert "n/a" in bench.stdout


@pytest.fixture(scope="module")
def full_export(tmp_path_factory: pytest.TempPathFactory, minilm_path: str) -> Any:
    """`full` saves a plain transformers model; exported as it is (2 layers: fast)."""
    from jetfed.coordinator.onnx_export import export_onnx
    from jetfed.edge.models import load_classifier
    from jetfed.edge.wire import ModelRef

    run_dir = tmp_path_factory.mktemp("runs") / "full-run"
    write_config(run_dir, num_hidden_layers=2)
    ref = ModelRef(name_or_path="minilm", num_labels=3, num_hidden_layers=2)
    load_classifier(ref).save_pretrained(str(run_dir / "global" / "round-0000"))
    return export_onnx(run_dir)


def test_export_of_a_full_model_round(full_export: Any) -> None:
    assert full_export.source == "full-model" and full_export.round_index == 0
    assert full_export.onnx_path.name == "round-0000.onnx"
    assert full_export.onnx_path.parent.name == "onnx"
    assert full_export.max_abs_diff < PARITY and full_export.parity_ok


def test_round_selection_errors(lora_run: Path, tmp_path: Path) -> None:
    from jetfed.coordinator.onnx_export import pick_round

    assert pick_round(lora_run, None)[0] == 2
    with pytest.raises(UserError, match="--round 5: not saved; available: 2"):
        pick_round(lora_run, 5)
    with pytest.raises(UserError, match="not a run directory"):
        pick_round(tmp_path, None)


def test_bench_energy_per_inference_from_a_power_sensor(full_export: Any, tmp_path: Path) -> None:
    """An AGX Orin INA3221 tree at a constant 10 W: energy per inference = 10 W × time / count."""
    from jetfed.edge.inference import BenchSettings, bench_inference
    from jetfed.edge.telemetry.backends.ina3221 import Ina3221Backend
    from jetfed.edge.telemetry.sampler import Sampler
    from tests.telemetry_trees import build_ina3221_tree

    sysfs = tmp_path / "sys"
    build_ina3221_tree(
        sysfs,
        {"VDD_GPU_SOC": (5000, 1000), "VDD_CPU_CV": (5000, 400), "VIN_SYS_5V0": (5000, 600)},
    )
    backend = Ina3221Backend(str(sysfs))
    backend.open()
    settings = BenchSettings(
        model_path=str(full_export.onnx_path),
        batch_size=2,
        seq_len=8,
        iterations=3,
        min_seconds=0.5,
    )
    with Sampler(backend, rate_hz=20) as sampler:
        result = bench_inference(settings, sampler=sampler)
    assert result.telemetry_backend == "ina3221"
    assert result.mean_power_w == pytest.approx(10.0, rel=1e-6)
    inferences = result.iterations * settings.batch_size
    assert result.energy_j is not None and result.energy_per_inference_j is not None
    assert result.energy_per_inference_j == pytest.approx(result.energy_j / inferences)
    assert result.energy_j == pytest.approx(10.0 * result.duration_s, rel=0.1)


def test_provider_choice() -> None:
    from jetfed.edge.inference import resolve_providers

    here = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert resolve_providers(None, here) == here
    assert resolve_providers(None, ["AzureExecutionProvider", "CPUExecutionProvider"]) == [
        "CPUExecutionProvider"
    ]
    assert resolve_providers(["cuda"], here) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    with pytest.raises(UserError, match="--providers: 'tensorrt' is not available"):
        resolve_providers(["tensorrt"], ["CPUExecutionProvider"])


@pytest.mark.slow
def test_demo_run_exports_and_benches(tmp_path: Path, minilm_path: str) -> None:
    """The issue's acceptance path on a run the real demo (coordinator + 2 devices) wrote."""
    demo = jetfed(
        "demo",
        "--rounds",
        "1",
        "--local-steps",
        "3",
        "--max-eval-samples",
        "32",
        "--output-dir",
        str(tmp_path),
        "--name",
        "x",
        timeout_s=600,
    )
    assert demo.returncode == 0, demo.stderr[-3000:]
    exported = jetfed("export-onnx", str(tmp_path / "x"))
    assert exported.returncode == 0, exported.stderr[-3000:]
    meta = json.loads((tmp_path / "x" / "onnx" / "round-0000.json").read_text())
    assert meta["source"] == "peft-adapter" and meta["max_abs_diff"] < PARITY
    report = tmp_path / "bench.json"
    bench = jetfed(
        "edge",
        "bench-inference",
        str(tmp_path / "x" / "onnx" / "round-0000.onnx"),
        "--iterations",
        "3",
        "--min-seconds",
        "0",
        "--json",
        str(report),
    )
    assert bench.returncode == 0, bench.stderr[-3000:]
    assert json.loads(report.read_text())["provider_used"] in bench.stdout


def test_an_exact_runs_fold_is_part_of_the_loaded_model(lora_run: Path, tmp_path: Path) -> None:
    """An `exact` run exports its adapter with the fold beside it (base_fold.safetensors): what
    `export-onnx` and `generate` load is base + fold + adapter, the model the run evaluated."""
    import shutil

    import torch
    from safetensors.torch import save_file

    from jetfed.coordinator.onnx_export import load_round_model
    from jetfed.coordinator.strategies.exact import FOLD_FILE

    run_dir = tmp_path / "exact-run"
    write_config(run_dir)
    folder = run_dir / "global" / "round-0002"
    shutil.copytree(lora_run / "global" / "round-0002", folder)
    plain = load_round_model(run_dir, folder)[0]
    name = next(n for n, _ in plain.named_parameters() if n.endswith("query.base_layer.weight"))
    before = dict(plain.named_parameters())[name].detach().clone()
    fold = 0.1 * torch.randn(before.shape, generator=torch.Generator().manual_seed(2))
    save_file({name: fold}, str(folder / FOLD_FILE))
    folded = dict(load_round_model(run_dir, folder)[0].named_parameters())[name]
    assert torch.allclose(folded, before + fold, atol=1e-6)
