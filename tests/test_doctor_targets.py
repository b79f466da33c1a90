"""`jetfed doctor` for a device it does not run on: the causal-LM budget from an architecture
(installed config or the facts jetfed ships), one row per Orin size, the fit flipping at the
hand-computed batch, and one clear line for a model it cannot know."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

from jetfed.edge.architectures import KNOWN_ARCHITECTURES, known_architecture
from jetfed.edge.memory_budget import TrainingBudget, budget_model
from jetfed.edge.target_devices import ORIN_MODULES, TargetDevice, plan_targets
from tests.llm import require_smollm2

REPO_ROOT = Path(__file__).resolve().parent.parent
SMOLLM2_PARAMS = 134_515_008
SMOLLM2_LORA_QV_R8 = 30 * 8 * ((576 + 576) + (576 + 192))  # q: 576→576, v: 576→192 (3 KV heads)


def doctor(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), COLUMNS="220", HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "jetfed", "doctor", *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=env,
        timeout=300,
    )


def table_rows(stdout: str) -> List[List[str]]:
    return [
        [cell.strip() for cell in line.split("│")[1:-1]]
        for line in stdout.splitlines()
        if line.startswith("│")
    ]


def test_shipped_smollm2_facts_equal_its_installed_config() -> None:
    """The table's numbers build the same model as the real config.json: same estimate."""
    require_smollm2()
    installed = budget_model("smollm2").model.config
    shipped = KNOWN_ARCHITECTURES["smollm2"]
    for field in (
        "hidden_size",
        "num_hidden_layers",
        "intermediate_size",
        "vocab_size",
        "num_attention_heads",
        "num_key_value_heads",
        "tie_word_embeddings",
    ):
        assert getattr(installed, field) == getattr(shipped, field), field
    from_config = TrainingBudget("smollm2", "lora", 256, method_config={"rank": 8})
    from_table = TrainingBudget(shipped.hub_id, "lora", 256, method_config={"rank": 8})
    assert "config.json of" in from_config.source and "shipped with jetfed" in from_table.source
    ignore = {"model", "source"}
    assert from_table.estimate(8, True).model_dump(exclude=ignore) == from_config.estimate(
        8, True
    ).model_dump(exclude=ignore)


def test_smollm2_estimate_counts_what_the_loaded_model_holds() -> None:
    """The meta-device estimate against the real SmolLM2 with LoRA r8 as the method builds it."""
    require_smollm2()
    import torch

    from jetfed.edge.methods.base import get_method
    from jetfed.edge.wire import ModelRef

    torch.set_num_threads(1)
    ref = ModelRef(name_or_path="smollm2", num_labels=1, max_length=256)
    model = get_method("lora")({"rank": 8}, ref).build(None, seed=0)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    estimate = TrainingBudget("smollm2", "lora", 256, method_config={"rank": 8}).estimate(8)
    assert estimate.total_params == frozen == SMOLLM2_PARAMS
    assert estimate.trainable_params == trainable == SMOLLM2_LORA_QV_R8
    assert estimate.weights_bytes == 4 * frozen
    assert estimate.gradients_bytes + estimate.optimizer_bytes == 3 * 4 * trainable
    vocab = model.get_output_embeddings().weight.shape[0]
    assert estimate.logits_bytes == 8 * 256 * vocab * 4 * 3  # response tokens default: all 256


def test_issue_models_are_known_offline_with_their_published_sizes() -> None:
    """Qwen2.5-0.5B and Llama-3.2-1B are not installed here: their shipped facts give the
    parameter counts their model cards publish (0.49B, 1.24B)."""
    for name, params in (("qwen2.5-0.5b", 494_032_768), ("llama-3.2-1b", 1_235_814_400)):
        budget = TrainingBudget(name, "lora", 256, method_config={"rank": 8})
        assert budget.total_params == params and budget.causal
        assert "shipped with jetfed" in budget.source
    assert known_architecture("Qwen/Qwen2.5-0.5B") is KNOWN_ARCHITECTURES["qwen2.5-0.5b"]
    assert known_architecture("meta-llama/llama-3.2-1b-instruct") is not None


def test_fit_flips_at_the_hand_computed_batch() -> None:
    """SmolLM2, LoRA q,v r8, 256 tokens all response, CUDA. By hand, from the config numbers:
    fixed = weights 4·134,515,008 + grads/AdamW 12·460,800 + runtime (420 MiB + 1 GiB)
          = 2,057,733,376 B;
    per row = activations 4·(30·(256·(12·576 + 2·1536) + 9·256²) + 256·576) = 378,077,184
            + logits 256·49,152·4·3 = 150,994,944  → 529,072,128 B.
    A device of exactly peak(6) bytes fits batch 5 and not 6 (the peak must stay below)."""
    fixed, per_row = 2_057_733_376, 529_072_128
    budget = TrainingBudget(
        KNOWN_ARCHITECTURES["smollm2"].hub_id, "lora", 256, method_config={"rank": 8}
    )
    assert budget.estimate(1, True).total_bytes == fixed + per_row
    device = TargetDevice(name="hand-checked", total_bytes=fixed + 6 * per_row)
    five, six = (plan_targets(budget, [device], batch).rows[0] for batch in (5, 6))
    assert five.fits and not six.fits
    assert five.largest_batch == six.largest_batch == 5
    assert five.headroom_bytes == per_row and six.headroom_bytes == 0
    checkpointed = plan_targets(budget, [device], 6, gradient_checkpointing=True).rows[0]
    assert checkpointed.fits and checkpointed.largest_batch > 6


def test_cli_answers_for_every_orin_size_offline() -> None:
    done = doctor(
        "--model", "llama-3.2-1b", "--batch-size", "8", "--max-length", "256",
        *("--orin", "8", "--orin", "16", "--orin", "32", "--orin", "64"),
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr[-2000:]  # the 8 GB does not fit
    assert "estimate from the architecture" in done.stdout
    assert "meta-llama/Llama-3.2-1B-Instruct's config.json" in done.stdout
    assert "logits" in done.stdout and "1,235,814,400 parameters" in done.stdout
    rows = table_rows(done.stdout)
    names = [module.name for module in ORIN_MODULES.values()]
    assert [row[0].split(" (")[0] for row in rows] == names
    fits = {row[0].split(" (")[0]: row[4] for row in rows}
    assert fits["Orin Nano 8GB"] == "does not fit" and fits["AGX Orin 64GB"] == "fits"
    largest = [int(row[5]) if row[5].isdigit() else 0 for row in rows]
    assert largest == sorted(largest) and largest[-1] > 8
    assert "Traceback" not in done.stderr


def test_cli_names_a_model_it_cannot_know_in_one_line() -> None:
    done = doctor("--model", "someone/not-installed-anywhere", "--device-memory-gb", "8")
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "not installed" in lines[0], done.stderr[-2000:]
    assert "qwen2.5-0.5b" in lines[0]
    wrong = doctor("--model", "smollm2", "--orin", "12")
    assert wrong.returncode == 2 and "--orin must be one of 8, 16, 32, 64" in wrong.stderr


@pytest.mark.parametrize(("batch", "code"), [(5, 0), (6, 1)])
def test_cli_exit_code_follows_the_fit(batch: int, code: int) -> None:
    """The hand-checked case through the CLI: 5.232166144 GB is exactly peak(6)."""
    done = doctor(
        "--model", "HuggingFaceTB/SmolLM2-135M-Instruct", "--max-length", "256",
        "--batch-size", str(batch), "--device-memory-gb", "5.232166144",
    )  # fmt: skip
    assert done.returncode == code, done.stdout + done.stderr[-2000:]
    (row,) = table_rows(done.stdout)
    assert row[4] == ("fits" if code == 0 else "does not fit") and row[5] == "5"
