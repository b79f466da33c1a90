"""FedAvg (what `full` uses) over uploads read lazily from their files gives the in-memory
weighted mean for every wire dtype, and its sum walks row blocks: an upload's file is read a
few MB at a time, never whole (a small state, LoRA's, is summed whole: the same bits)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import pytest
import torch

from jetfed.coordinator.strategies import fedavg as fedavg_module
from jetfed.coordinator.strategies.base import AcceptedUpdate, ServerContext
from jetfed.coordinator.strategies.fedavg import FedAvg
from jetfed.edge.tensorfile import UPDATE_DTYPES, TensorFile, write_tensor_file
from jetfed.edge.wire import Update, make_manifest


def announced(num_samples: int, round_index: int = 0) -> Update:
    return Update(
        experiment="e",
        device_id=f"d{num_samples}",
        round_index=round_index,
        base_digest="0" * 64,
        num_samples=num_samples,
        local_steps=1,
        train_loss=0.1,
        blob=make_manifest(b"x", 1024),
    )


def fedavg() -> FedAvg:
    """Aggregation needs no evaluation model or data: no context."""
    return FedAvg(ServerContext.aggregation_only())


def deltas(count: int) -> List[Dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(3)
    shapes = {"emb": (12000, 48), "w": (48, 48), "b": (48,)}
    return [
        {n: torch.randn(s, generator=generator) * 1e-2 for n, s in shapes.items()}
        for _ in range(count)
    ]


class CountingFile(TensorFile):
    """A TensorFile that remembers the largest read (in rows) of each tensor."""

    largest: Dict[str, int]

    def rows(self, name: str, start: int, end: int) -> torch.Tensor:
        self.largest[name] = max(self.largest.get(name, 0), end - start)
        return super().rows(name, start, end)

    def __getitem__(self, name: str) -> torch.Tensor:
        raise AssertionError(f"{name} read whole")


@pytest.mark.parametrize("dtype", UPDATE_DTYPES)
def test_fedavg_over_files_equals_the_in_memory_mean(
    tmp_path: Path, dtype: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both sums (row blocks for big states, whole for small ones) give the in-memory mean and
    agree with each other bit for bit, and so does the row-block sum written over the state
    itself (the coordinator's full model); the row-block one never reads a big tensor whole."""
    updates, samples = deltas(3), [10, 30, 60]
    spec = {name: tuple(t.shape) for name, t in updates[0].items()}
    global_state = {name: torch.ones(shape) for name, shape in spec.items()}
    on_disk: List[AcceptedUpdate] = []
    in_memory: List[AcceptedUpdate] = []
    for i, (delta, n) in enumerate(zip(updates, samples)):
        path = str(tmp_path / f"u{i}")
        write_tensor_file(path, delta, dtype)
        tensors = CountingFile(path, spec, UPDATE_DTYPES)
        tensors.largest = {}
        on_disk.append(AcceptedUpdate(announced(n), tensors))
        in_memory.append(AcceptedUpdate(announced(n), dict(TensorFile(path, spec, UPDATE_DTYPES))))
    results = {}
    for path_kind, limit in (("whole", 1 << 40), ("rows", 0)):
        monkeypatch.setattr(fedavg_module, "WHOLE_SUM_MAX_BYTES", limit)
        folded = fedavg().aggregate(0, global_state, on_disk)
        expected = fedavg().aggregate(0, global_state, in_memory)
        for name in spec:
            assert torch.equal(folded[name], expected[name]), (path_kind, name)
        results[path_kind] = folded
    for name in spec:
        assert torch.equal(results["whole"][name], results["rows"][name]), name
    held = {name: value.clone() for name, value in global_state.items()}
    fedavg().aggregate_into(0, held, on_disk[::-1])  # over the state itself, any arrival order
    for name in spec:
        assert torch.equal(held[name], results["rows"][name]), name
    for item in on_disk:
        assert isinstance(item.tensors, CountingFile)
        assert item.tensors.largest["emb"] < 12000  # 2.3 MB of fp32: read in row blocks
        assert "emb" in item.tensors and "nope" not in item.tensors  # from the header


def test_fedavg_refuses_a_round_without_updates() -> None:
    with pytest.raises(ValueError, match="no update"):
        fedavg().aggregate(0, {"w": torch.zeros(2)}, [])
