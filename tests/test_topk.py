"""Sparse top-k distributions (kd on causal LMs): the payload's round trip through the update
file, its validation (one code per fault), the sparse consensus against a dense computation on
the same support, and the sparse KL against the dense one."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict

import pytest
import torch

from jetfed.edge.distillation import soft_kl
from jetfed.edge.errors import ProtocolError
from jetfed.edge.tensorfile import INDEX_DTYPES, UPDATE_DTYPES, TensorFile, write_tensor_file
from jetfed.edge.topk import (
    SparseLogProbs,
    read_csr,
    read_top_k,
    sparse_kl,
    sparse_mixture,
    top_k,
)

TOKENS, VOCAB, K, T = 6, 40, 5, 2.0


def logits(seed: int, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randn(TOKENS, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def through_file(tmp_path: Path, tensors: Dict[str, torch.Tensor]) -> TensorFile:
    """What the coordinator reads after a device wrote the upload (floats as fp16)."""
    path = str(tmp_path / "update.safetensors")
    write_tensor_file(path, tensors, "fp16")
    return TensorFile(
        path, {n: tuple(t.shape) for n, t in tensors.items()}, (*UPDATE_DTYPES, *INDEX_DTYPES)
    )


@pytest.mark.parametrize(("vocab", "stored"), [(VOCAB, "U16"), (70_000, "I32")])
def test_top_k_payload_round_trip(tmp_path: Path, vocab: int, stored: str) -> None:
    dist = top_k(logits(0, vocab), K, T)
    file = through_file(tmp_path, dist.top_k_tensors())
    assert file._stored["indices"][0] == stored and file._stored["logprobs"][0] == "F16"
    assert file.is_index("indices") and not file.is_index("tail")
    back = read_top_k(file, vocab, integer_indices=file.is_index("indices"))
    assert torch.equal(back.indices, dist.indices) and torch.equal(back.offsets, dist.offsets)
    assert torch.allclose(back.logprobs, dist.logprobs, atol=1e-2, rtol=1e-3)
    assert torch.allclose(back.tail, dist.tail, atol=1e-3)
    dense = torch.softmax(logits(0, vocab) / T, -1)
    assert torch.allclose(dist.tail, 1 - dense.topk(K, -1).values.sum(-1), atol=1e-6)
    # k fp16 values + k indices + the fp16 tail per token, plus the safetensors header
    index_bytes = 2 if stored == "U16" else 4
    written_bytes = (tmp_path / "update.safetensors").stat().st_size
    assert written_bytes < TOKENS * (K * (2 + index_bytes) + 2) + 300


def _bad(field: str, change: Callable[[torch.Tensor], torch.Tensor]) -> Dict[str, torch.Tensor]:
    tensors = {n: t.clone() for n, t in top_k(logits(1), K, T).top_k_tensors().items()}
    tensors[field] = change(tensors[field])
    return tensors


def _set(value: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def change(tensor: torch.Tensor) -> torch.Tensor:
        tensor.view(-1)[0] = value
        return tensor

    return change


@pytest.mark.parametrize(
    ("tensors", "code"),
    [
        (_bad("logprobs", _set(float("nan"))), "invalid_tensors"),
        (_bad("logprobs", _set(0.5)), "logprob_above_zero"),
        (_bad("tail", _set(1.5)), "tail_out_of_range"),
        (_bad("indices", lambda i: i.to(torch.int32).fill_(VOCAB)), "index_out_of_range"),
        (_bad("indices", lambda i: i.to(torch.int32).fill_(3)), "duplicate_index"),
        (_bad("tail", lambda t: t * 0 + 0.9), "mass_mismatch"),
        (_bad("indices", lambda i: i.float()), "indices_not_integer"),
    ],
)
def test_a_bad_payload_is_refused_with_its_code(
    tmp_path: Path, tensors: Dict[str, torch.Tensor], code: str
) -> None:
    with pytest.raises(ProtocolError) as refused:
        file = through_file(tmp_path, tensors)
        read_top_k(file, VOCAB, integer_indices=file.is_index("indices"))
    assert (refused.value.code or "invalid_tensors") == code


def test_sparse_consensus_equals_the_dense_mixture_on_the_same_support() -> None:
    parts = [top_k(logits(seed), K, T) for seed in (2, 3, 4)]
    weights = [3.0, 1.0, 2.0]
    consensus = sparse_mixture(parts, weights)
    # Dense: each device's distribution zero outside its top-k, mixed, restricted to the union.
    dense = torch.zeros(TOKENS, VOCAB, dtype=torch.float64)
    for part, weight in zip(parts, weights):
        coarse = torch.zeros(TOKENS, VOCAB, dtype=torch.float64)
        coarse[part.token_of_entry(), part.indices] = part.logprobs.double().exp()
        dense += coarse * weight / sum(weights)
    support = dense > 0
    token = consensus.token_of_entry()
    assert torch.equal(support.sum(-1), consensus.offsets[1:] - consensus.offsets[:-1])
    assert bool(support[token, consensus.indices].all())
    assert torch.allclose(consensus.logprobs.double().exp(), dense[token, consensus.indices])
    assert torch.allclose(consensus.tail.double(), 1 - dense.sum(-1), atol=1e-6)
    # the same bits whatever order the same updates are given in is the caller's job (sorted
    # by device id); a consensus is itself a valid payload
    read_csr(consensus.csr_tensors("c."), VOCAB, "c.")


def test_sparse_kl_is_the_dense_kl_when_the_support_is_everything() -> None:
    student = logits(5).requires_grad_(True)
    teacher = logits(6)
    whole = top_k(teacher, VOCAB, T)
    assert float(whole.tail.max()) < 1e-6
    assert float(sparse_kl(student, whole, T).detach()) == pytest.approx(
        float(soft_kl(student, teacher, T).detach()), rel=1e-4
    )


def test_sparse_kl_is_zero_on_agreement_and_reaches_only_the_student() -> None:
    teacher_logits = logits(7).requires_grad_(True)
    teacher = top_k(teacher_logits, K, T)
    assert float(sparse_kl(teacher_logits.detach(), teacher, T)) == pytest.approx(0.0, abs=1e-5)
    student = logits(8).requires_grad_(True)
    sparse_kl(student, teacher, T).backward()
    assert teacher_logits.grad is None and student.grad is not None
    assert float(student.grad.abs().sum()) > 0


def test_select_picks_tokens_in_order() -> None:
    consensus = sparse_mixture([top_k(logits(9), K, T), top_k(logits(10), K, T)], [1.0, 1.0])
    picked = consensus.select(torch.tensor([4, 1]))
    assert isinstance(picked, SparseLogProbs) and picked.num_tokens == 2
    for row, token in enumerate((4, 1)):
        a, b = int(consensus.offsets[token]), int(consensus.offsets[token + 1])
        c, d = int(picked.offsets[row]), int(picked.offsets[row + 1])
        assert torch.equal(picked.indices[c:d], consensus.indices[a:b])
        assert float(picked.tail[row]) == float(consensus.tail[token])
