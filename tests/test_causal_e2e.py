"""Causal LMs end to end: a coordinator and 2 edge processes over a real Mosquitto, SmolLM2 (2 of
its layers), real data, 2 rounds. Each device holds a different task (SST-2 and RTE as
generation; kd's both hold SST-2, whose train split is the public proxy set); the metrics are
recorded every round; the exported round loads as users load it and answers through
`jetfed generate`. kd and fedcollm: the top-k payload's size, the sparse consensus exported,
the coordinator LLM's own metrics."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytest
import torch
import yaml

from tests.brokers import MosquittoBroker
from tests.conftest import DATASETS
from tests.fleet import ENV, jetfed, log_tail, read_metrics, stop, write_config
from tests.llm import TINY_LAYERS, require_smollm2

DEVICE_DATA = ("sst2", "rte")


def _run(
    tmp_path: Path,
    broker: MosquittoBroker,
    method: str,
    lr: float,
    settings: Optional[Dict[str, Any]] = None,
    device_data: Tuple[str, ...] = DEVICE_DATA,
) -> Path:
    """2 devices × 2 rounds of `method` (with `settings`), each device on its `device_data`."""
    require_smollm2()
    if not all((DATASETS / name / "train.jsonl").exists() for name in device_data):
        pytest.skip(f"real datasets not found at {DATASETS}")
    name = f"it-llm-{method}"
    config = write_config(
        tmp_path,
        name,
        method,
        DATASETS / "sst2",
        model={"name_or_path": "smollm2", "max_length": 64, "num_hidden_layers": TINY_LAYERS},
        training={"local_steps": 1, "batch_size": 2, "learning_rate": lr},
        evaluation={"generate_rows": 2, "max_new_tokens": 3},
    )
    raw = yaml.safe_load(config.read_text())
    raw["data"].update(partition={"kind": "none"}, max_eval_samples=4)
    raw["method"].update(settings or {})
    config.write_text(yaml.safe_dump(raw))
    log = tmp_path / "coord.log"
    coordinator = jetfed("-v", "coordinator", "run", str(config), "--broker", broker.url, log=log)
    logs = tmp_path / "logs"
    logs.mkdir()
    edges: List[subprocess.Popen[bytes]] = []
    for index, data in enumerate(device_data):
        flags = ["--device-id", f"dev-{index}", "--data", str(DATASETS / data), "--threads", "1"]
        edge = ["-v", "edge", "run", "--broker", broker.url, "--experiment", name, *flags]
        edges.append(jetfed(*edge, log=logs / f"dev-{index}.log"))
    try:
        assert coordinator.wait(timeout=900) == 0, log_tail(log, *logs.iterdir())
    finally:
        stop([coordinator, *edges])
    run_dir = tmp_path / "runs" / name
    rounds = read_metrics(run_dir)
    assert [m["status"] for m in rounds] == ["aggregated", "aggregated"]
    for metrics in rounds:
        assert metrics["num_aggregated"] == 2 and metrics["accuracy"] is None
        assert metrics["eval_loss"] > 0 and metrics["extra"]["perplexity"] > 1
        assert 0.0 <= metrics["extra"]["exact_match"] <= 1.0
    return run_dir


def _generate(run_dir: Path) -> str:
    command = ["generate", str(run_dir), "--prompt", "Say hi.", "--max-new-tokens", "4"]
    done = subprocess.run(
        [sys.executable, "-m", "jetfed", *command, "--threads", "1"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_lora_two_devices_two_rounds(tmp_path: Path, mosquitto: MosquittoBroker) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from jetfed.edge.packaged_llm import smollm2_folder

    run_dir = _run(tmp_path, mosquitto, "lora", 1e-3)
    adapter = run_dir / "global" / "round-0001"
    assert (
        json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
        == "smollm2"
    )
    torch.set_num_threads(1)
    base = AutoModelForCausalLM.from_pretrained(
        str(smollm2_folder()), num_hidden_layers=TINY_LAYERS
    )
    model = PeftModel.from_pretrained(base, str(adapter))
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False)
    assert out.shape == (1, 5)
    _generate(run_dir)  # a 2-layer model's answer is noise: that it answers is the check


@pytest.mark.slow
@pytest.mark.parametrize(("method", "lr"), [("federa", 5e-4), ("full", 2e-5)])
def test_federa_and_full_two_devices_two_rounds(
    tmp_path: Path, mosquitto: MosquittoBroker, method: str, lr: float
) -> None:
    run_dir = _run(tmp_path, mosquitto, method, lr)
    _generate(run_dir)


@pytest.mark.parametrize(
    "settings",
    [
        {"cut_layer": 1, "activation_dtype": "fp16"},
        pytest.param({"cut_layer": 1, "u_shaped": True}, marks=pytest.mark.slow),
    ],
    ids=["labels-shared", "u-shaped"],
)
def test_split_two_devices_two_rounds(
    tmp_path: Path, mosquitto: MosquittoBroker, settings: Dict[str, Any]
) -> None:
    """Device: embeddings + layer 0; coordinator: layer 1, norm, lm_head (or, U-shaped, layer 1
    only); every batch's activations through Mosquitto, the causal metrics every round."""
    run_dir = _run(tmp_path, mosquitto, "split", 1e-3, settings)
    for metrics in read_metrics(run_dir):
        assert metrics["extra"]["split_server_batches"] == 2  # 2 devices × 1 local step
        assert metrics["extra"]["split_bytes_per_batch"] > 0
    records = [json.loads(line) for line in (run_dir / "profiles.jsonl").read_text().splitlines()]
    train = [r for r in records if r["phase"] == "train"]
    assert len(train) == 4 and all(r["extra"]["split_batches"] == 1 for r in train)
    assert (run_dir / "global" / "round-0001" / "adapter_model.safetensors").exists()


def test_kd_two_devices_two_rounds(tmp_path: Path, mosquitto: MosquittoBroker) -> None:
    from safetensors.torch import load_file

    from jetfed.edge.distillation import response_offsets
    from jetfed.edge.instructions import load_instructions
    from jetfed.edge.models import load_tokenizer
    from tests.llm import SMOLLM2

    proxy, k = 8, 4
    settings = {"proxy_size": proxy, "top_k": k, "server_steps": 2, "server_batch_size": 4}
    run_dir = _run(tmp_path, mosquitto, "kd", 1e-3, settings, device_data=("sst2", "sst2"))
    rows = load_instructions(str(DATASETS / "sst2"), "train")
    tokens = int(response_offsets(load_tokenizer(SMOLLM2), rows.subset(range(proxy)), 64)[-1])
    # SST-2 answers are one word + the end-of-turn token: a few tokens per row, any 8 rows
    assert proxy * 2 <= tokens <= proxy * 4
    for metrics in read_metrics(run_dir):
        # per device: fp16 log-probs + uint16 indices [tokens, k], fp16 tail [tokens], a header
        payload = metrics["extra"]["update_payload_bytes"] / 2
        assert tokens * (4 * k + 2) < payload <= 2 * (4 * k + 2) * proxy * 4 + 400
    consensus = load_file(str(run_dir / "global" / "round-0001" / "consensus.safetensors"))
    assert consensus["consensus.indices"].dtype == torch.uint16
    widths = consensus["consensus.offsets"].diff()
    assert bool((widths >= k).all()) and bool((widths <= 2 * k).all()), "union of 2 top-k sets"


@pytest.mark.slow
def test_fedcollm_two_devices_two_rounds(tmp_path: Path, mosquitto: MosquittoBroker) -> None:
    settings = {
        "llm": "smollm2",
        "llm_num_hidden_layers": TINY_LAYERS + 1,
        "aux_size": 8,
        "server_steps": 2,
        "server_batch_size": 4,
    }
    run_dir = _run(tmp_path, mosquitto, "fedcollm", 1e-3, settings)
    for metrics in read_metrics(run_dir):
        extra = metrics["extra"]
        assert extra["llm_eval_loss"] > 0 and extra["llm_perplexity"] > 1
        assert 0.0 <= extra["llm_exact_match"] <= 1.0
    llm = run_dir / "global" / "round-0001" / "llm" / "adapter_model.safetensors"
    assert llm.exists()
