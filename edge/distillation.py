"""Knowledge-distillation losses and settings shared by KD-FedLLM (`kd`) and FedCoLLM.

Every loss detaches its teacher. In FedCoLLM's mutual distillation each model is the other's
teacher; if the teacher side kept its graph, the KL term would also pull the teacher toward the
student (a public FedCoLLM implementation detaches the wrong side and does exactly that).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Sequence

from pydantic import Field

from jetfed.edge.data import TextDataset
from jetfed.edge.methods.lora import LoraSettings

if TYPE_CHECKING:
    import torch


class DistillationSettings(LoraSettings):
    """LoRA plus the distillation hyper-parameters both methods share."""

    temperature: float = Field(default=2.0, gt=0)
    kl_weight: float = Field(default=1.0, ge=0)
    """λ in CE + λ·KL."""
    server_steps: int = Field(default=50, ge=1)
    """Coordinator-side distillation steps per round."""
    server_batch_size: int = Field(default=16, ge=1, le=4096)
    server_learning_rate: float = Field(default=1e-3, gt=0, le=1)


def soft_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """T²·KL(softmax(teacher/T) ‖ softmax(student/T)), batch mean; no gradient reaches the teacher.

    T² keeps the gradient scale independent of T (Hinton et al., 2015).
    """
    import torch.nn.functional as F

    t = float(temperature)
    student = F.log_softmax(student_logits.float() / t, dim=-1)
    teacher = F.log_softmax(teacher_logits.detach().float() / t, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * (t * t)


def ce_plus_kl(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    kl_weight: float,
) -> torch.Tensor:
    """CE(student, labels) + λ·T²·KL(teacher ‖ student) at temperature T (teacher detached)."""
    import torch.nn.functional as F

    ce = F.cross_entropy(student_logits.float(), labels)
    return ce + kl_weight * soft_kl(student_logits, teacher_logits, temperature)


def mixture_logits(
    logits: Sequence[torch.Tensor], weights: Sequence[float], temperature: float
) -> torch.Tensor:
    """The consensus of several models: p̄ = Σ wₖ·softmax(zₖ/T) / Σ wₖ, returned as T·log p̄.

    Probabilities, not logits, are averaged: the result is a proper ensemble, and one client with
    large logits (over-confident after local training) cannot outvote the rest. Returning T·log p̄
    means softmax(consensus/T) = p̄ exactly, so the consensus plugs into `soft_kl` as a teacher.
    """
    import torch

    total = float(sum(weights))
    t = float(temperature)
    probabilities = torch.zeros_like(logits[0], dtype=torch.float64)
    for z, weight in zip(logits, weights):
        probabilities += torch.softmax(z.double() / t, dim=-1) * (weight / total)
    return (t * torch.log(probabilities.clamp_min(1e-30))).float()


def unlabelled(dataset: TextDataset) -> TextDataset:
    """The texts only: labels become row numbers, so a public set's labels can never be used
    and a batch's `labels` column says which consensus rows it needs."""
    rows: List[int] = list(range(len(dataset)))
    return TextDataset(texts_a=list(dataset.texts_a), labels=rows, texts_b=dataset.texts_b)


def texts_digest(dataset: TextDataset) -> bytes:
    """sha256 of the texts (not labels): a device proves it holds the coordinator's proxy set."""
    import hashlib

    digest = hashlib.sha256()
    pairs = dataset.texts_b or [""] * len(dataset.texts_a)
    for text_a, text_b in zip(dataset.texts_a, pairs):
        digest.update(text_a.encode("utf-8") + b"\x00" + text_b.encode("utf-8") + b"\x01")
    return digest.digest()


def consensus_kl(
    model: Any, batch: Dict[str, torch.Tensor], consensus: torch.Tensor, temperature: float
) -> torch.Tensor:
    """`soft_kl` of the model on a proxy batch (from `unlabelled`) toward those consensus rows."""
    inputs = {name: value for name, value in batch.items() if name != "labels"}
    logits = model(**inputs).logits
    teacher = consensus[batch["labels"].cpu()].to(logits.device)
    return soft_kl(logits, teacher, temperature)


def predict_logits(
    model: Any,
    tokenizer: Any,
    dataset: TextDataset,
    max_length: int,
    device: str,
    batch_size: int = 64,
) -> torch.Tensor:
    """[len(dataset), classes] fp32 logits of the model in eval mode, on the CPU."""
    import torch

    from jetfed.edge.train import tokenize_batch

    model.to(device)
    model.eval()
    parts = []
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            indices = list(range(start, min(len(dataset), start + batch_size)))
            batch = tokenize_batch(tokenizer, dataset, indices, max_length, device)
            batch.pop("labels")
            parts.append(model(**batch).logits.float().cpu())
    return torch.cat(parts)
