"""Sparse per-token distributions of a causal LM: top-k log-probabilities plus a tail bucket.

Why: a causal LM's next-token distribution covers the whole vocabulary (49,152 words for
SmolLM2); 256 proxy rows × 128 response tokens × 49,152 × 2 B is 3.2 GB, far too much for a
device's uplink. Each response token is summarised instead by its k most probable words at the
distillation temperature T, log pᵢ = log softmax(z/T)ᵢ for i ∈ S (|S| = k), and the tail mass
m = 1 − Σ_S pᵢ: the distribution coarsened to k singletons plus one "everything else" bucket.
At k = 16 a token costs 16 × (2 B fp16 + 2 B uint16 index) + 2 B (bench/kd_payload.py).

Mixture (`sparse_mixture`, the consensus of several devices) on the union U of their supports:
p̄(v) = Σₖ wₖ·pₖ(v)·[v ∈ Sₖ] / Σ wₖ for v ∈ U, and p̄(tail) = Σₖ wₖ·mₖ / Σ wₖ. What device k
did not report stays in its tail, so p̄ sums to one and equals the dense mixture of the
coarsened distributions restricted to U (tests/test_topk.py). |U| varies per token, so the
result is kept in CSR form: token t owns entries `offsets[t]:offsets[t+1]`.

KL (`sparse_kl`): the student's softmax(z/T) coarsened to the teacher's support and tail,
q(v) for v ∈ U and q(tail) = 1 − Σ_U q(v); T²·Σ_{U ∪ tail} p log(p/q), averaged over tokens.
It is the exact KL between the two coarsened distributions (≥ 0, zero when the student agrees
on U) and never needs the teacher's dense logits. The teacher is detached.

Everything read from the network goes through `check_sparse` (indices in range and distinct per
token, log-probs finite and ≤ 0, tail in [0, 1], mass summing to one); a bad payload is a
ProtocolError with a code, which the coordinator sends back as a nack.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, Mapping, Sequence

from jetfed.edge.errors import ProtocolError

if TYPE_CHECKING:
    import torch

MASS_TOLERANCE = 1e-2
"""|Σ exp(log p) + tail − 1| allowed: fp16 on the wire rounds each value by ≤ 2⁻¹¹."""
_TINY = 1e-30
"""Probabilities are clamped here before their log (fp16 holds log 1e-30 ≈ −69)."""


def index_dtype(vocab: int) -> torch.dtype:
    """uint16 when every index fits (vocab ≤ 65,536), else int32."""
    import torch

    return torch.uint16 if vocab <= 1 << 16 else torch.int32


@dataclass
class SparseLogProbs:
    """Per-token distributions over a vocabulary of `vocab` words on a sparse support + tail."""

    logprobs: torch.Tensor
    """[S] fp32 log-probabilities of the support entries, all ≤ 0."""
    indices: torch.Tensor
    """[S] int64 word indices, distinct within a token."""
    offsets: torch.Tensor
    """[T + 1] int64: token t owns entries offsets[t]:offsets[t+1]."""
    tail: torch.Tensor
    """[T] fp32: the probability of every word outside the token's support."""
    vocab: int

    @property
    def num_tokens(self) -> int:
        return int(self.tail.numel())

    def token_of_entry(self) -> torch.Tensor:
        """[S] the token each entry belongs to."""
        import torch

        counts = self.offsets[1:] - self.offsets[:-1]
        return torch.repeat_interleave(torch.arange(self.num_tokens), counts)

    def select(self, tokens: torch.Tensor) -> SparseLogProbs:
        """The distributions of `tokens` (int64 token numbers), in that order."""
        import torch

        starts, ends = self.offsets[tokens], self.offsets[tokens + 1]
        counts = ends - starts
        offsets = torch.zeros(len(tokens) + 1, dtype=torch.long)
        offsets[1:] = torch.cumsum(counts, 0)
        first = torch.repeat_interleave(starts - offsets[:-1], counts)
        entries = torch.arange(int(offsets[-1])) + first
        return SparseLogProbs(
            self.logprobs[entries], self.indices[entries], offsets, self.tail[tokens], self.vocab
        )

    def top_k_tensors(self) -> Dict[str, torch.Tensor]:
        """The upload form of a fixed-width support: logprobs [T, k], indices [T, k] (uint16 or
        int32), tail [T]; floating tensors are cast to the wire dtype (fp16) when written."""
        k = int(self.offsets[1] - self.offsets[0]) if self.num_tokens else 0
        return {
            "logprobs": self.logprobs.reshape(self.num_tokens, k),
            "indices": self.indices.reshape(self.num_tokens, k).to(index_dtype(self.vocab)),
            "tail": self.tail,
        }

    def csr_tensors(self, prefix: str = "") -> Dict[str, torch.Tensor]:
        """The ragged form (the consensus): logprobs [S], indices [S], offsets [T + 1] int32,
        tail [T], each name after `prefix`."""
        import torch

        return {
            f"{prefix}logprobs": self.logprobs,
            f"{prefix}indices": self.indices.to(index_dtype(self.vocab)),
            f"{prefix}offsets": self.offsets.to(torch.int32),
            f"{prefix}tail": self.tail,
        }


def top_k(logits: torch.Tensor, k: int, temperature: float) -> SparseLogProbs:
    """The k most probable words of each row of `logits` [T, vocab] at temperature T, and the
    tail mass (computed as −expm1(logsumexp(top-k)) so a tiny tail keeps its precision)."""
    import torch

    with torch.no_grad():
        logp = torch.log_softmax(logits.detach().float() / float(temperature), dim=-1)
        values, indices = logp.topk(min(k, logp.shape[-1]), dim=-1)
        tail = (-torch.expm1(torch.logsumexp(values, dim=-1))).clamp(0.0, 1.0)
    tokens, width = values.shape
    return SparseLogProbs(
        logprobs=values.reshape(-1),
        indices=indices.reshape(-1),
        offsets=torch.arange(tokens + 1) * width,
        tail=tail,
        vocab=int(logits.shape[-1]),
    )


def read_top_k(
    tensors: Mapping[str, torch.Tensor], vocab: int, integer_indices: bool
) -> SparseLogProbs:
    """A fixed-width upload (`top_k_tensors`) as validated SparseLogProbs; `integer_indices`
    says whether the payload stored its indices as integers (a float index is refused)."""
    import torch

    if not integer_indices:
        raise ProtocolError(
            "top-k indices must be stored as uint16 or int32", "indices_not_integer"
        )
    logprobs, tail = tensors["logprobs"].float(), tensors["tail"].float()
    if logprobs.dim() != 2 or tensors["indices"].shape != logprobs.shape or tail.dim() != 1:
        raise ProtocolError("top-k shapes: logprobs, indices [T, k] and tail [T]", "bad_shape")
    tokens, width = logprobs.shape
    dist = SparseLogProbs(
        logprobs=logprobs.reshape(-1),
        indices=tensors["indices"].reshape(-1).to(torch.int64),
        offsets=torch.arange(tokens + 1) * width,
        tail=tail,
        vocab=vocab,
    )
    check_sparse(dist)
    return dist


def read_csr(tensors: Mapping[str, torch.Tensor], vocab: int, prefix: str = "") -> SparseLogProbs:
    """The ragged form (`csr_tensors`) as validated SparseLogProbs."""
    import torch

    names = [f"{prefix}{name}" for name in ("logprobs", "indices", "offsets", "tail")]
    if any(name not in tensors for name in names):
        raise ProtocolError(f"sparse distribution needs {names}", "bad_shape")
    logprobs, indices, offsets, tail = (tensors[name] for name in names)
    if indices.is_floating_point() or offsets.is_floating_point():
        raise ProtocolError("sparse indices and offsets must be integers", "indices_not_integer")
    offsets = offsets.to(torch.int64)
    entries = int(logprobs.numel())
    if (
        logprobs.dim() != 1
        or indices.shape != logprobs.shape
        or tuple(offsets.shape) != (tail.numel() + 1,)
        or int(offsets[0]) != 0
        or int(offsets[-1]) != entries
        or bool((offsets[1:] < offsets[:-1]).any())
    ):
        raise ProtocolError("sparse distribution: inconsistent shapes or offsets", "bad_shape")
    dist = SparseLogProbs(
        logprobs.float(), indices.to(torch.int64), offsets, tail.float().reshape(-1), vocab
    )
    check_sparse(dist)
    return dist


def check_sparse(dist: SparseLogProbs) -> None:
    """Refuse (ProtocolError with a code) what no model could have produced."""
    import torch

    if not bool(torch.isfinite(dist.logprobs).all()) or not bool(torch.isfinite(dist.tail).all()):
        raise ProtocolError("log-probs or tail contain NaN or Inf", "not_finite")
    if bool((dist.logprobs > 0).any()):
        raise ProtocolError("a log-probability is above 0", "logprob_above_zero")
    if bool(((dist.tail < 0) | (dist.tail > 1)).any()):
        raise ProtocolError("a tail mass is outside [0, 1]", "tail_out_of_range")
    if bool(((dist.indices < 0) | (dist.indices >= dist.vocab)).any()):
        raise ProtocolError(f"a word index is outside [0, {dist.vocab})", "index_out_of_range")
    token = dist.token_of_entry()
    keys = torch.sort(token * dist.vocab + dist.indices).values
    if bool((keys[1:] == keys[:-1]).any()):
        raise ProtocolError("a word appears twice in one token's support", "duplicate_index")
    mass = torch.zeros(dist.num_tokens, dtype=torch.float64)
    mass.index_add_(0, token, dist.logprobs.double().exp())
    if bool(((mass + dist.tail.double() - 1).abs() > MASS_TOLERANCE).any()):
        raise ProtocolError("a token's probabilities and tail do not sum to 1", "mass_mismatch")


def sparse_mixture(parts: Sequence[SparseLogProbs], weights: Sequence[float]) -> SparseLogProbs:
    """Σₖ wₖ·pₖ / Σ wₖ on the union of the supports, tails summed into the tail (see module).

    Accumulated in fp64 in the order given (updates come sorted by device id): the same
    uploads give the same bits whatever order they arrived in."""
    import torch

    total = float(sum(weights))
    vocab = parts[0].vocab
    tokens = parts[0].num_tokens
    keys, probabilities = [], []
    tail = torch.zeros(tokens, dtype=torch.float64)
    for part, weight in zip(parts, weights):
        keys.append(part.token_of_entry() * vocab + part.indices)
        probabilities.append(part.logprobs.double().exp() * (weight / total))
        tail += part.tail.double() * (weight / total)
    union, where = torch.unique(torch.cat(keys), sorted=True, return_inverse=True)
    mass = torch.zeros(len(union), dtype=torch.float64)
    mass.index_add_(0, where, torch.cat(probabilities))
    offsets = torch.zeros(tokens + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(torch.bincount(union // vocab, minlength=tokens), 0)
    return SparseLogProbs(
        logprobs=torch.log(mass.clamp_min(_TINY)).float(),
        indices=union % vocab,
        offsets=offsets,
        tail=tail.float(),
        vocab=vocab,
    )


def sparse_kl(
    student_logits: torch.Tensor, teacher: SparseLogProbs, temperature: float
) -> torch.Tensor:
    """T²·KL(teacher ‖ student) on the teacher's support + tail, mean over the T tokens;
    `student_logits` [T, vocab] are the student's raw logits, the teacher's log-probs are
    already at temperature T. No gradient reaches the teacher."""
    import torch

    t = float(temperature)
    logq = torch.log_softmax(student_logits.float() / t, dim=-1)
    token = teacher.token_of_entry().to(logq.device)
    logq_support = logq[token, teacher.indices.to(logq.device)]
    logp = teacher.logprobs.detach().to(logq.device)
    tail_p = teacher.tail.detach().to(logq.device)
    tokens = teacher.num_tokens
    support_q = torch.zeros(tokens, device=logq.device).index_add(0, token, logq_support.exp())
    tail_logq = torch.log((1.0 - support_q).clamp_min(1e-12))
    per_token = torch.zeros(tokens, device=logq.device).index_add(
        0, token, logp.exp() * (logp - logq_support)
    )
    per_token = per_token + torch.xlogy(tail_p, tail_p) - tail_p * tail_logq
    return per_token.mean() * (t * t)
