"""Knowledge-distillation losses and settings shared by KD-FedLLM (`kd`) and FedCoLLM.

Classifiers distil dense logits over their classes; causal LMs distil at response positions on
a top-k support with a tail bucket (`jetfed.edge.topk`): the proxy set's response tokens are
numbered in row order (`response_offsets`), so a row's teacher tokens are found by number.

Every loss detaches its teacher. In FedCoLLM's mutual distillation each model is the other's
teacher; if the teacher side kept its graph, the KL term would also pull the teacher toward the
student (a public FedCoLLM implementation detaches the wrong side and does exactly that).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

from pydantic import Field

from jetfed.edge.data import TextDataset
from jetfed.edge.instructions import InstructionSet, instruction_batch, row_tokens
from jetfed.edge.methods.lora import LoraSettings
from jetfed.edge.wire import TrainingConfig

if TYPE_CHECKING:
    import torch

    from jetfed.edge.topk import SparseLogProbs


class DistillationSettings(LoraSettings):
    """LoRA plus the distillation hyper-parameters both methods share."""

    temperature: float = Field(default=2.0, gt=0)
    kl_weight: float = Field(default=1.0, ge=0)
    """λ in CE + λ·KL."""
    server_steps: int = Field(default=50, ge=1)
    """Coordinator-side distillation steps per round."""
    server_batch_size: int = Field(default=16, ge=1, le=4096)
    server_learning_rate: float = Field(default=1e-3, gt=0, le=1)
    top_k: int = Field(default=16, ge=1, le=65_536)
    """Causal LMs: words kept per response token (the rest is one tail bucket)."""


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
    top_k: Optional[int] = None,
) -> torch.Tensor:
    """CE(student, labels) + λ·T²·KL(teacher ‖ student) at temperature T (teacher detached);
    with `top_k` the KL is taken on the teacher's top-k support + tail (`sparse_kl`: a causal
    LM's rows are response tokens over a whole vocabulary)."""
    import torch.nn.functional as F

    from jetfed.edge.topk import sparse_kl
    from jetfed.edge.topk import top_k as support

    ce = F.cross_entropy(student_logits.float(), labels)
    if top_k is None:
        kl = soft_kl(student_logits, teacher_logits, temperature)
    else:
        kl = sparse_kl(student_logits, support(teacher_logits, top_k, temperature), temperature)
    return ce + kl_weight * kl


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


def texts_digest(dataset: Union[TextDataset, InstructionSet]) -> bytes:
    """sha256 of the texts (not labels; for instruction rows the system message, prompt and
    response): a device proves it holds the coordinator's proxy set."""
    import hashlib

    digest = hashlib.sha256()
    if isinstance(dataset, InstructionSet):
        rows = [
            (f"{dataset.system}\x00{prompt}", response)
            for prompt, response in zip(dataset.prompts, dataset.responses)
        ]
    else:
        rows = list(zip(dataset.texts_a, dataset.texts_b or [""] * len(dataset.texts_a)))
    for text_a, text_b in rows:
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


def map_row_batches(
    model: Any, num_rows: int, device: str, batch_size: int, fn: Callable[[List[int]], Any]
) -> List[Any]:
    """`fn(rows)` for consecutive batches of rows, the model on `device` in eval mode, no grad."""
    import torch

    model.to(device)
    model.eval()
    with torch.no_grad():
        return [
            fn(list(range(start, min(num_rows, start + batch_size))))
            for start in range(0, num_rows, batch_size)
        ]


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

    def logits(rows: List[int]) -> torch.Tensor:
        batch = tokenize_batch(tokenizer, dataset, rows, max_length, device)
        batch.pop("labels")
        return model(**batch).logits.float().cpu()

    return torch.cat(map_row_batches(model, len(dataset), device, batch_size, logits))


def response_offsets(tokenizer: Any, data: InstructionSet, max_length: int) -> torch.Tensor:
    """[rows + 1]: row i's response tokens are tokens offsets[i]:offsets[i + 1] of the set.

    Responses are never truncated, so devices and coordinator count the same tokens."""
    import torch

    counts = [len(row_tokens(tokenizer, data, i, max_length)[1]) for i in range(len(data))]
    offsets = torch.zeros(len(data) + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(torch.tensor(counts, dtype=torch.long), 0)
    return offsets


def row_token_numbers(offsets: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
    """The numbers of the response tokens of `rows`, in batch order (as `response_logits`)."""
    import torch

    return torch.cat([torch.arange(int(offsets[r]), int(offsets[r + 1])) for r in rows])


def proxy_top_k(
    model: Any,
    tokenizer: Any,
    data: InstructionSet,
    max_length: int,
    device: str,
    k: int,
    temperature: float,
    batch_size: int = 16,
) -> SparseLogProbs:
    """The model's top-k log-probs at temperature T at every response token of `data`, rows in
    order (the causal twin of `predict_logits`)."""
    import torch

    from jetfed.edge.causal_lm import response_logits
    from jetfed.edge.topk import SparseLogProbs, top_k

    def support(rows: List[int]) -> SparseLogProbs:
        batch = instruction_batch(tokenizer, data, rows, max_length, device)
        return top_k(response_logits(model, batch)[0].cpu(), k, temperature)

    parts = map_row_batches(model, len(data), device, batch_size, support)
    width = int(parts[0].offsets[1])
    tail = torch.cat([part.tail for part in parts])
    return SparseLogProbs(
        logprobs=torch.cat([part.logprobs for part in parts]),
        indices=torch.cat([part.indices for part in parts]),
        offsets=torch.arange(len(tail) + 1) * width,
        tail=tail,
        vocab=parts[0].vocab,
    )


def response_kl(
    model: Any, batch: Dict[str, torch.Tensor], teacher: SparseLogProbs, temperature: float
) -> torch.Tensor:
    """`sparse_kl` of the model at the batch's response tokens toward `teacher` (those tokens'
    distributions, in the same order)."""
    from jetfed.edge.causal_lm import response_logits
    from jetfed.edge.topk import sparse_kl

    return sparse_kl(response_logits(model, batch)[0], teacher, temperature)


def batch_rows(dataset_size: int, training: TrainingConfig, seed: int) -> Iterator[List[int]]:
    """The rows of each batch `train_local` draws with these arguments (the same seeded
    `batch_indices`), for a loss that must know which proxy rows its batch holds."""
    from jetfed.edge.train import batch_indices, planned_steps

    steps = planned_steps(training, dataset_size)
    return batch_indices(dataset_size, training.batch_size, steps, seed)
