"""`--resume`: it restores what a strategy keeps beyond the global state (split's server half,
kd's consensus, fedcollm's LLM adapter, also a causal LM's), refuses a changed config naming the
change, and accepts a run saved before jetfed grew a setting. Real coordinators on real MiniLM
(and SmolLM2); no round runs, so no broker is contacted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List

import pytest
import torch
import yaml

from jetfed.coordinator.config import load_config
from jetfed.coordinator.server import Coordinator
from jetfed.coordinator.strategies.base import Strategy
from jetfed.coordinator.strategies.distill import KdStrategy
from jetfed.edge.errors import UserError
from jetfed.edge.methods.base import Tensors
from jetfed.edge.methods.kd import SPARSE_PREFIX
from jetfed.edge.mqtt import BrokerSpec
from jetfed.edge.topk import top_k
from tests.fleet import write_config
from tests.llm import require_smollm2

UNUSED_BROKER = BrokerSpec(url="mqtt://127.0.0.1:1")


def random_state(strategy: Strategy) -> Tensors:
    """Tensors of the names and shapes `strategy` keeps, unlike anything it starts with."""
    generator = torch.Generator().manual_seed(0)
    if isinstance(strategy, KdStrategy) and strategy.causal:
        logits = torch.randn(int(strategy.offsets[-1]), strategy.vocab, generator=generator)
        return top_k(logits, 4, 2.0).csr_tensors(SPARSE_PREFIX)
    if isinstance(strategy, KdStrategy):
        shapes = {"consensus": torch.Size((len(strategy.indices), 2))}
    else:
        shapes = {name: tensor.shape for name, tensor in strategy.state().items()}
    return {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}


@pytest.mark.parametrize(
    "method, overrides",
    [
        ("split", []),
        ("kd", ["method.proxy_size=16"]),
        ("fedcollm", ["model.num_hidden_layers=3", "method.aux_size=16"]),
        (
            "fedcollm",
            [
                *("model.name_or_path=smollm2", "model.num_hidden_layers=1"),
                *("method.llm=smollm2", "method.llm_num_hidden_layers=2", "method.aux_size=4"),
            ],
        ),
        ("kd", ["model.name_or_path=smollm2", "model.num_hidden_layers=1", "method.proxy_size=4"]),
    ],
    ids=["split", "kd", "fedcollm", "fedcollm-causal", "kd-causal"],
)
def test_resume_restores_the_strategy_state(
    method: str, overrides: List[str], tmp_path: Path, minilm_path: str, sst2_dir: Path
) -> None:
    if "model.name_or_path=smollm2" in overrides:  # the sparse consensus, the LLM adapter
        require_smollm2()
    path = write_config(tmp_path, f"it-state-{method}", method, sst2_dir)
    config = load_config(str(path), overrides)
    first = Coordinator(config, UNUSED_BROKER)
    saved = random_state(first.strategy)
    assert saved, "the strategy keeps server-side tensors"
    first.strategy.load_state(saved)
    first.save_checkpoint(completed_round=0, wall_clock_s=1.0)

    restored = Coordinator(config, UNUSED_BROKER, resume=True).strategy.state()
    assert restored.keys() == saved.keys()
    assert all(torch.equal(restored[name], saved[name]) for name in saved)


def test_a_checkpoint_of_another_shape_is_refused(
    tmp_path: Path, minilm_path: str, sst2_dir: Path
) -> None:
    path = write_config(tmp_path, "it-state-bad", "split", sst2_dir)
    strategy = Coordinator(load_config(str(path)), UNUSED_BROKER).strategy
    wrong = {name: torch.zeros(3) for name in strategy.state()}
    with pytest.raises(UserError, match="does not match"):
        strategy.load_state(wrong)


def test_a_changed_setting_is_refused_by_name_a_new_round_count_is_not(
    tmp_path: Path, minilm_path: str, sst2_dir: Path
) -> None:
    path = write_config(tmp_path, "it-resume-config", "lora", sst2_dir, rounds=2)
    Coordinator(load_config(str(path)), UNUSED_BROKER).save_checkpoint(0, 1.0)
    with pytest.raises(UserError, match=r"training\.learning_rate: 0\.001 → 0\.002"):
        Coordinator(load_config(str(path), ["training.learning_rate=0.002"]), UNUSED_BROKER, True)
    resumed = Coordinator(load_config(str(path), ["rounds.count=5"]), UNUSED_BROKER, resume=True)
    assert resumed.start_round == 1


def test_a_run_saved_before_a_setting_existed_resumes(
    tmp_path: Path, minilm_path: str, sst2_dir: Path
) -> None:
    """An older jetfed wrote config.yaml without settings added since: they take their defaults."""
    path = write_config(tmp_path, "it-resume-old", "lora", sst2_dir, rounds=2)
    config = load_config(str(path))
    Coordinator(config, UNUSED_BROKER).save_checkpoint(0, 1.0)
    saved = config.run_dir / "config.yaml"
    raw = yaml.safe_load(saved.read_text())
    del raw["rounds"]["offline_grace_s"], raw["aggregation"]["max_update_norm"]
    saved.write_text(yaml.safe_dump(raw))
    # ...and its checkpoint names a digest of that older config, which no current config has.
    state_path = config.run_dir / "checkpoint" / "state.json"
    state = json.loads(state_path.read_text())
    state["config_digest"] = "0123456789abcdef"
    state_path.write_text(json.dumps(state))
    assert Coordinator(config, UNUSED_BROKER, resume=True).start_round == 1
