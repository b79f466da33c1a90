"""FeDeRA on the real MiniLM: PiSSA-exact factors, an unchanged model at init, identical devices."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jetfed.edge.methods.base import get_method
from jetfed.edge.models import load_classifier, load_tokenizer
from jetfed.edge.tensor_codec import encode_tensors
from jetfed.edge.wire import ModelRef

REF = ModelRef(name_or_path="minilm", num_labels=2, max_length=64)
SENTENCES = ["a gorgeous, witty, seductive movie .", "the plot is nothing but boilerplate clichés"]


@pytest.fixture(scope="module")
def federa(minilm_path: str):  # type: ignore[no-untyped-def]
    method = get_method("federa")({"rank": 8, "alpha": 16}, REF)
    return method, method.initial_state(seed=0)


def test_logits_at_init_equal_the_base_model(federa) -> None:  # type: ignore[no-untyped-def]
    method, state = federa
    model = method.build(state.init, seed=0)
    method.set_state(model, state.global_state)
    base = load_classifier(REF, seed=0)
    batch = load_tokenizer(REF)(SENTENCES, padding=True, return_tensors="pt")
    model.eval()
    base.eval()
    with torch.no_grad():
        diff = (model(**batch).logits - base(**batch).logits).abs().max()
    assert float(diff) < 1e-4


def test_factors_equal_peft_pissa_init(federa) -> None:  # type: ignore[no-untyped-def]
    from peft import LoraConfig, TaskType, get_peft_model

    _, state = federa
    pissa = get_peft_model(
        load_classifier(REF, seed=0),
        LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=8,
            lora_alpha=16,
            target_modules=["query", "value"],
            init_lora_weights="pissa",
        ),
    )
    params = dict(pissa.named_parameters())
    for name, value in state.init.items():
        assert torch.allclose(params[name], value, atol=1e-6), name


DEVICE_SCRIPT = """
import hashlib, sys, torch
from safetensors.torch import load_file
from jetfed.edge.methods.base import get_method
from jetfed.edge.wire import ModelRef
torch.set_num_threads(int(sys.argv[2]))
ref = ModelRef(name_or_path="minilm", num_labels=2)
method = get_method("federa")({"rank": 8, "alpha": 16}, ref)
model = method.build(load_file(sys.argv[1]), seed=int(sys.argv[3]))
digest = hashlib.sha256()
for name, tensor in sorted(model.state_dict().items()):
    if "classifier" not in name:
        digest.update(name.encode()); digest.update(tensor.detach().contiguous().numpy().tobytes())
print(digest.hexdigest())
"""


def test_two_devices_hold_bitwise_identical_residuals(federa, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Separate processes (different thread counts, seeds) rebuild from the shipped factors."""
    _, state = federa
    init_file = tmp_path / "init.safetensors"
    init_file.write_bytes(encode_tensors(state.init))
    digests = [
        subprocess.run(
            [sys.executable, "-c", DEVICE_SCRIPT, str(init_file), threads, seed],
            capture_output=True,
            text=True,
            check=True,
            timeout=300,
        ).stdout.strip()
        for threads, seed in (("1", "0"), ("2", "7"))
    ]
    assert len(digests[0]) == 64
    assert digests[0] == digests[1]


def test_export_is_a_plain_lora_on_the_original_base(federa, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The saved adapter loads with PeftModel.from_pretrained on the untouched base."""
    from peft import PeftModel

    method, state = federa
    model = method.build(state.init, seed=0)
    trained = {
        name: value + 0.01 * torch.randn_like(value) for name, value in state.global_state.items()
    }
    method.set_state(model, trained)
    method.export(model, str(tmp_path / "adapter"))
    loaded = PeftModel.from_pretrained(load_classifier(REF, seed=123), str(tmp_path / "adapter"))
    batch = load_tokenizer(REF)(SENTENCES, padding=True, return_tensors="pt")
    model.eval()
    loaded.eval()
    with torch.no_grad():
        diff = (loaded(**batch).logits - model(**batch).logits).abs().max()
    assert float(diff) < 1e-4
