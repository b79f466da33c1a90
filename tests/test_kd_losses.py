"""The distillation losses on hand-computed logits, and where their gradients go."""

from __future__ import annotations

import math
from typing import Optional

import pytest
import torch

from jetfed.edge.data import TextDataset
from jetfed.edge.distillation import (
    ce_plus_kl,
    consensus_kl,
    mixture_logits,
    soft_kl,
    texts_digest,
    unlabelled,
)

LN3 = math.log(3.0)
# teacher softmax([ln 3, 0]) = (3/4, 1/4), student softmax([0, 0]) = (1/2, 1/2):
# KL(teacher ‖ student) = 3/4·ln(3/2) + 1/4·ln(1/2)
KL_HAND = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)


def test_soft_kl_matches_hand_computation_at_t1() -> None:
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[LN3, 0.0]])
    assert float(soft_kl(student, teacher, 1.0)) == pytest.approx(KL_HAND, rel=1e-6)


def test_soft_kl_is_scaled_by_t_squared() -> None:
    # At T = 2 the teacher [2·ln 3, 0] softens to the same (3/4, 1/4): KL is unchanged, ×T² = 4.
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[2 * LN3, 0.0]])
    assert float(soft_kl(student, teacher, 2.0)) == pytest.approx(4 * KL_HAND, rel=1e-6)


def test_soft_kl_is_a_batch_mean_and_zero_on_agreement() -> None:
    student = torch.tensor([[0.0, 0.0], [LN3, 0.0]])
    teacher = torch.tensor([[LN3, 0.0], [LN3, 0.0]])
    assert float(soft_kl(student, teacher, 1.0)) == pytest.approx(KL_HAND / 2, rel=1e-6)


def test_ce_plus_kl_adds_lambda_times_kl() -> None:
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[LN3, 0.0]])
    loss = ce_plus_kl(student, torch.tensor([0]), teacher, temperature=1.0, kl_weight=0.5)
    assert float(loss) == pytest.approx(math.log(2) + 0.5 * KL_HAND, rel=1e-6)


def test_gradient_reaches_the_student_not_the_teacher() -> None:
    student = torch.tensor([[0.0, 0.0]], requires_grad=True)
    teacher = torch.tensor([[2 * LN3, 0.0]], requires_grad=True)
    ce_plus_kl(student, torch.tensor([0]), teacher, temperature=2.0, kl_weight=1.0).backward()
    assert teacher.grad is None
    # d/dz_s of T²·KL at T: T·(softmax(z_s/T) − softmax(z_t/T)) = 2·(1/2 − 3/4, 1/2 − 1/4);
    # d/dz_s of CE toward label 0: softmax(z_s) − onehot(0) = (−1/2, 1/2).
    expected = torch.tensor([[-0.5 - 0.5, 0.5 + 0.5]])
    assert torch.allclose(student.grad, expected, atol=1e-6)


@pytest.mark.parametrize("top_k", [None, 2])
def test_mutual_losses_give_each_model_only_its_own_gradient(top_k: Optional[int]) -> None:
    """FedCoLLM sums both directions and backpropagates once: each side must receive exactly
    the gradient of its own loss (its teacher term detached), never the other's; also with the
    KL on the teacher's top-k support (causal LMs: rows are response tokens over a vocabulary)."""
    generator = torch.Generator().manual_seed(0)
    small = torch.randn(3, 5, generator=generator).requires_grad_(True)
    large = torch.randn(3, 5, generator=generator).requires_grad_(True)
    labels = torch.tensor([0, 1, 4])
    small_loss = ce_plus_kl(small, labels, large, 2.0, 0.7, top_k)
    large_loss = ce_plus_kl(large, labels, small, 2.0, 0.7, top_k)
    (small_loss + large_loss).backward()
    small_alone = small.detach().clone().requires_grad_(True)
    ce_plus_kl(small_alone, labels, large.detach(), 2.0, 0.7, top_k).backward()
    large_alone = large.detach().clone().requires_grad_(True)
    ce_plus_kl(large_alone, labels, small.detach(), 2.0, 0.7, top_k).backward()
    assert small.grad is not None and large.grad is not None
    assert torch.allclose(small.grad, small_alone.grad)  # type: ignore[arg-type]
    assert torch.allclose(large.grad, large_alone.grad)  # type: ignore[arg-type]


def test_mixture_averages_probabilities_weighted_by_samples() -> None:
    # (3/4, 1/4) with weight 3 and (1/4, 3/4) with weight 1 → (5/8, 3/8).
    first = torch.tensor([[2 * LN3, 0.0]])
    second = torch.tensor([[0.0, 2 * LN3]])
    consensus = mixture_logits([first, second], [3.0, 1.0], temperature=2.0)
    assert torch.allclose(torch.softmax(consensus / 2.0, -1), torch.tensor([[0.625, 0.375]]))
    assert torch.allclose(consensus, 2.0 * torch.log(torch.tensor([[0.625, 0.375]])))


def test_mixture_of_one_model_keeps_its_distribution() -> None:
    logits = torch.tensor([[1.5, -0.5, 0.25]])
    consensus = mixture_logits([logits], [10.0], temperature=3.0)
    assert torch.allclose(torch.softmax(consensus / 3, -1), torch.softmax(logits / 3, -1))


def test_unlabelled_drops_labels_and_digest_ignores_them() -> None:
    data = TextDataset(texts_a=["good", "bad", "fine"], labels=[1, 0, 1])
    relabelled = TextDataset(texts_a=["good", "bad", "fine"], labels=[0, 0, 0])
    proxy = unlabelled(data)
    assert proxy.labels == [0, 1, 2] and proxy.texts_a == data.texts_a
    assert texts_digest(data) == texts_digest(relabelled)
    assert texts_digest(data) != texts_digest(data.subset([1, 0, 2]))


class _Logits:
    """A model stand-in returning fixed logits per row: consensus_kl must pick the batch's rows."""

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table

    def __call__(self, input_ids: torch.Tensor) -> object:
        return type("Output", (), {"logits": self.table[input_ids[:, 0]]})()


def test_consensus_kl_uses_the_rows_named_by_labels() -> None:
    consensus = torch.tensor([[0.0, 0.0], [LN3, 0.0], [0.0, LN3]])
    model = _Logits(torch.zeros(3, 2))
    batch = {"input_ids": torch.tensor([[1], [1]]), "labels": torch.tensor([1, 1])}
    assert float(consensus_kl(model, batch, consensus, 1.0)) == pytest.approx(KL_HAND, rel=1e-6)
