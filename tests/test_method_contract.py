"""What every federated method gets from the house, whatever it forgets to do itself."""

from __future__ import annotations

from typing import Any, Optional

import torch

from edge.data import TextDataset
from edge.methods.base import (
    FederatedMethod,
    InitialState,
    LocalResult,
    LocalRound,
    Tensors,
    run_local_round,
)
from edge.telemetry.phases import Profiler
from edge.wire import ModelRef, TrainingConfig


class Forgetful(FederatedMethod):
    """Opens no phase and counts nothing: its local round only returns a result."""

    name = "forgetful"

    def initial_state(self, seed: int) -> InitialState:
        return InitialState(global_state={"w": torch.zeros(1)})

    def build(self, init: Optional[Tensors], seed: int) -> Any:
        return None

    def local_round(self, job: LocalRound) -> LocalResult:
        job.counters.extra["mine"] = 1.0
        return LocalResult(
            tensors={"w": torch.ones(1)}, num_samples=1, train_loss=0.0, local_steps=3
        )


def test_a_method_that_opens_no_phase_still_gets_its_train_record() -> None:
    ref = ModelRef(name_or_path="minilm", num_labels=2)
    profiler = Profiler("exp", "dev-0", method="forgetful")
    job = LocalRound(
        model=None,
        tokenizer=None,
        dataset=TextDataset(texts_a=["a"], labels=[0]),
        training=TrainingConfig(),
        model_ref=ref,
        round_index=2,
        seed=0,
        device="cpu",
        global_state={"w": torch.zeros(1)},
        profiler=profiler,
    )
    run_local_round(Forgetful({}, ref), job)
    (record,) = profiler.drain()
    assert (record.phase, record.round_index) == ("train", 2)
    assert record.extra == {"mine": 1.0, "steps": 3.0}
