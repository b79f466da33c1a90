"""The CUDA path's CPU-side parts (issue #23): the autocast choice per device, fp32 master weights
under autocast, fp16 loss scaling, deterministic kernels, and scripts/gpu_check.sh refusing a
machine without CUDA (its rehearsal on the CPU is the slow case). The GPU run itself is
docs/GPU_CHECK.md's."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import pytest
import torch

from jetfed.coordinator.demo import DEMO_DATA
from jetfed.edge.data import load_split
from jetfed.edge.determinism import use_deterministic_kernels
from jetfed.edge.methods.lora import LoraMethod
from jetfed.edge.models import autocast_dtype, load_tokenizer
from jetfed.edge.train import train_local
from jetfed.edge.wire import ModelRef, TrainingConfig

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu_check.sh"
REF = ModelRef(name_or_path="minilm", num_labels=2, max_length=32, num_hidden_layers=1)


def ref(dtype: str) -> ModelRef:
    return REF.model_copy(update={"dtype": dtype})


@pytest.mark.parametrize(
    ("dtype", "device", "bf16_native", "expected"),
    [
        ("auto", "cpu", None, None),
        ("bf16", "cpu", None, None),
        ("fp16", "cpu", None, None),
        ("fp32", "cuda", True, None),
        ("auto", "cuda", True, torch.bfloat16),
        ("auto", "cuda:1", True, torch.bfloat16),
        # Xavier, Volta, Turing: bf16 is emulated there, fp16 is native
        ("auto", "cuda", False, torch.float16),
        ("bf16", "cuda", False, torch.bfloat16),
        ("fp16", "cuda:0", True, torch.float16),
    ],
)
def test_autocast_dtype_per_device(
    dtype: str, device: str, bf16_native: Optional[bool], expected: Optional[torch.dtype]
) -> None:
    assert autocast_dtype(ref(dtype), device, bf16_native=bf16_native) is expected


def tiny_loss(model: Any, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """A loss whose gradient (1e-9 per logit) underflows to zero in fp16 unless scaled."""
    batch = {k: v for k, v in batch.items() if k != "labels"}
    return model(**batch).logits.float().sum() * 1e-9


def train_under_autocast(dtype: torch.dtype) -> Dict[str, float]:
    """One LoRA step with the forward autocast to `dtype` (on the CPU, which autocasts both);
    returns each trainable tensor's dtype check and how far the step moved it."""
    torch.set_num_threads(1)
    model = LoraMethod({}, REF).build(None, seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    data = load_split(str(DEMO_DATA), "train").subset(range(4))
    training = TrainingConfig(local_steps=1, batch_size=4)
    train_local(model, load_tokenizer(REF), data, training, 32, "cpu", 0, tiny_loss, autocast=dtype)
    trained = dict(model.named_parameters())
    assert {str(trained[n].dtype) for n in before} == {"torch.float32"}  # the master copy
    return {n: float((trained[n].detach() - before[n]).abs().max()) for n in before}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_keeps_fp32_master_weights_and_fp16_is_loss_scaled(
    dtype: torch.dtype, minilm_path: str
) -> None:
    moved = train_under_autocast(dtype)
    # bf16 has fp32's range; fp16 keeps the 1e-9 gradients only through the loss scaler
    assert max(moved.values()) > 1e-5


@pytest.fixture
def restore_determinism() -> Iterator[None]:
    algorithms = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    workspace = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    yield
    torch.use_deterministic_algorithms(algorithms, warn_only=warn_only)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn
    if workspace is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = workspace


def test_deterministic_kernels_switch(restore_determinism: None) -> None:
    os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    use_deterministic_kernels()
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


def run_script(*args: str, env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    environment = dict(os.environ, PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="", **(env or {}))
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, env=environment
    )


def test_gpu_check_refuses_a_machine_without_cuda() -> None:
    result = run_script()
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0]


def test_gpu_check_shellcheck_clean() -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (Debian: apt-get install shellcheck)")
    result = subprocess.run(
        ["shellcheck", "--severity=style", str(SCRIPT)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
@pytest.mark.timeout(3600)  # 12 fleet rounds on the CPU: 15-25 minutes on a loaded core
def test_gpu_check_rehearses_every_check_on_the_cpu(tmp_path: Path, minilm_path: str) -> None:
    """The whole check on the CPU, as `--allow-cpu` runs it before a GPU session: every row
    passes or is n/a (those need a GPU), and the JSON has every method on both models."""
    gpu_dir = tmp_path / "gpu"
    prepared = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "prepare-models", "--gpu-dir", str(gpu_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert prepared.returncode == 0, prepared.stderr
    out = tmp_path / "out"
    extra = ["--", "--gpu-dir", str(gpu_dir), "--work", str(tmp_path / "work")]
    result = run_script("--allow-cpu", *extra, env={"OUT": str(out)})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    rows = json.loads((out / "gpu_check.json").read_text())["rows"]
    assert {(r["check"], r["model"]) for r in rows} >= {
        (method, model)
        for method in ("lora", "federa", "full", "split", "kd", "fedcollm")
        for model in ("minilm", "smollm2")
    }
    assert {r["status"] for r in rows} <= {"pass", "n/a"}
