"""FeDeRA on SmolLM2 (2 of its layers, fp32): the model at init is the base model, two devices
rebuild bitwise-identical residuals from the shipped factors, and the exported rank-2r adapter
on the ORIGINAL base reproduces the tuned model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jetfed.edge.instructions import instruction_batch, load_instructions
from jetfed.edge.methods.base import get_method
from jetfed.edge.models import load_causal_lm, load_tokenizer
from jetfed.edge.tensor_codec import encode_tensors
from jetfed.edge.train import train_local
from jetfed.edge.wire import TrainingConfig
from tests.conftest import DATASETS, REPO_ROOT
from tests.fleet import ENV
from tests.llm import SMOLLM2, require_smollm2

SETTINGS = {"rank": 4, "alpha": 8}


@pytest.fixture(scope="module")
def federa():  # type: ignore[no-untyped-def]
    require_smollm2()
    if not (DATASETS / "sst2").exists():
        pytest.skip(f"real datasets not found at {DATASETS}")
    method = get_method("federa")(SETTINGS, SMOLLM2)
    return method, method.initial_state(seed=0)


def _batch():  # type: ignore[no-untyped-def]
    data = load_instructions(str(DATASETS / "sst2"), "validation").subset(range(4))
    return data, instruction_batch(load_tokenizer(SMOLLM2), data, [0, 1, 2, 3], 64, "cpu")


def _logits(model, batch) -> torch.Tensor:  # type: ignore[no-untyped-def]
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_logits_at_init_equal_the_base_model(federa) -> None:  # type: ignore[no-untyped-def]
    method, state = federa
    model = method.build(state.init, seed=0)
    method.set_state(model, state.global_state)
    _, batch = _batch()
    diff = (_logits(model, batch) - _logits(load_causal_lm(SMOLLM2), batch)).abs().max()
    assert float(diff) <= 1e-3


DEVICE_SCRIPT = """
import hashlib, sys, torch
from safetensors.torch import load_file
from jetfed.edge.methods.base import get_method
from tests.llm import SMOLLM2
torch.set_num_threads(int(sys.argv[2]))
method = get_method("federa")({"rank": 4, "alpha": 8}, SMOLLM2)
model = method.build(load_file(sys.argv[1]), seed=int(sys.argv[3]))
digest = hashlib.sha256()
for name, tensor in sorted(model.state_dict().items()):
    digest.update(name.encode()); digest.update(tensor.detach().contiguous().numpy().tobytes())
print(digest.hexdigest())
"""


def test_two_devices_hold_bitwise_identical_residuals(federa, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Separate processes (other thread counts and seeds) rebuild from the shipped factors."""
    _, state = federa
    init_file = tmp_path / "init.safetensors"
    init_file.write_bytes(encode_tensors(state.init))
    env = dict(ENV, PYTHONPATH=str(REPO_ROOT))
    digests = [
        subprocess.run(
            [sys.executable, "-c", DEVICE_SCRIPT, str(init_file), threads, seed],
            capture_output=True,
            text=True,
            check=True,
            env=env,
            cwd=REPO_ROOT,
        ).stdout.strip()
        for threads, seed in (("1", "0"), ("2", "7"))
    ]
    assert len(digests[0]) == 64 and digests[0] == digests[1]


def test_exported_adapter_on_the_original_base_reproduces_the_tuned_model(
    federa, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    from peft import PeftModel

    method, state = federa
    model = method.build(state.init, seed=0)
    method.set_state(model, state.global_state)
    data, batch = _batch()
    training = TrainingConfig(local_steps=2, batch_size=4, learning_rate=5e-3)
    train_local(model, load_tokenizer(SMOLLM2), data, training, 64, "cpu", seed=0)
    tuned = _logits(model, batch)
    method.export(model, str(tmp_path / "adapter"))
    exported = PeftModel.from_pretrained(load_causal_lm(SMOLLM2), str(tmp_path / "adapter"))
    base = _logits(load_causal_lm(SMOLLM2), batch)
    assert float((tuned - base).abs().max()) > 1e-2  # training moved the model
    assert float((_logits(exported, batch) - tuned).abs().max()) <= 1e-3
