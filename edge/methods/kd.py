"""KD-FedLLM: devices share logits on a public proxy set instead of weights (FedMD/FedDF family).

Schedule of round r on a device (its LoRA adapter stays on the device across rounds):
1. Local training, `training.local_steps` steps. Each step: the task loss on a private batch
   (CE; a causal LM's on its response tokens), plus, from round 1 on, λ·T²·KL(consensus of
   round r−1 ‖ model) on a proxy batch of the same size (`kl_weight` = λ, `temperature` = T).
   Round 0 has no consensus: the task loss only.
2. The trained model's view of the whole proxy set is the update, floats fp16 on the wire:
   - a classifier: its logits, {"logits": [proxy, classes]};
   - a causal LM: at every response token of the proxy rows, the top-k log-probs at T, their
     word indices (uint16, or int32 for vocabularies over 65,536) and the tail mass
     ({"logprobs", "indices": [tokens, k], "tail": [tokens]}, `jetfed.edge.topk`), never the
     whole vocabulary; its KL is taken on the consensus's sparse support + tail.
   Traffic scales with the proxy set, never with the model.
The proxy set is named by the coordinator (the `kd_proxy` blob: row indices of `proxy_split` and
the sha256 of their texts); each device reads those rows from its own --data. A classifier never
reads their labels; instruction rows are public prompt + response text, the response positions
being where the models are compared. The coordinator's half (consensus, global model) is
`coordinator/strategies/distill.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from pydantic import Field

from jetfed.edge.data import TextDataset, load_task_split
from jetfed.edge.distillation import (
    DistillationSettings,
    consensus_kl,
    predict_logits,
    proxy_top_k,
    response_kl,
    response_offsets,
    row_token_numbers,
    texts_digest,
    unlabelled,
)
from jetfed.edge.errors import ProtocolError, UserError
from jetfed.edge.instructions import InstructionSet, instruction_batch
from jetfed.edge.methods.base import (
    FederatedMethod,
    InitialState,
    LocalResult,
    LocalRound,
    MemoryFootprint,
    Tensors,
    register_method,
)
from jetfed.edge.methods.lora import LoraMethod
from jetfed.edge.topk import SparseLogProbs, read_csr
from jetfed.edge.train import tokenize_batch

PROXY_BLOB = "kd_proxy"
SPARSE_PREFIX = "consensus."
"""Names of a causal LM's sparse consensus in the kd_proxy blob (`SparseLogProbs.csr_tensors`)."""
ProxySet = Union[TextDataset, InstructionSet]


class KdSettings(DistillationSettings):
    proxy_split: str = "train"
    """Split of the shared dataset whose texts (never labels) form the public proxy set."""
    proxy_size: int = Field(default=256, ge=1, le=1_000_000)
    proxy_seed: int = 0


@dataclass
class ProxyRound:
    """The `kd_proxy` blob: which proxy rows, their texts' digest, the previous consensus."""

    indices: List[int]
    texts_sha256: bytes
    consensus: Optional[Any] = None
    """The previous round's consensus (None in round 0): [proxy, classes] logits for a
    classifier, SparseLogProbs over the proxy's response tokens for a causal LM."""

    def encode(self) -> bytes:
        import torch
        from safetensors.torch import save

        tensors = {
            "indices": torch.tensor(self.indices, dtype=torch.int32),
            "texts_sha256": torch.tensor(list(self.texts_sha256), dtype=torch.uint8),
        }
        if isinstance(self.consensus, SparseLogProbs):
            for name, tensor in self.consensus.csr_tensors(SPARSE_PREFIX).items():
                floating = tensor.is_floating_point()
                tensors[name] = (tensor.to(torch.float16) if floating else tensor).contiguous()
        elif self.consensus is not None:
            tensors["consensus"] = self.consensus.to(torch.float16).contiguous()
        return bytes(save(tensors))

    @classmethod
    def decode(cls, data: bytes, num_classes: int, vocab: Optional[int] = None) -> ProxyRound:
        """Parse and check the blob; a causal LM's sparse consensus needs the model's `vocab`."""
        import torch
        from safetensors.torch import load

        try:
            tensors = load(data)
        except Exception as exc:  # safetensors raises its own types for malformed headers
            raise ProtocolError(f"{PROXY_BLOB}: not a valid safetensors payload: {exc}") from None
        indices = tensors.get("indices")
        digest = tensors.get("texts_sha256")
        if indices is None or indices.dtype != torch.int32 or indices.dim() != 1:
            raise ProtocolError(f"{PROXY_BLOB}: 'indices' must be a 1-D int32 tensor")
        if digest is None or digest.dtype != torch.uint8 or tuple(digest.shape) != (32,):
            raise ProtocolError(f"{PROXY_BLOB}: 'texts_sha256' must be 32 uint8 values")
        consensus: Any = tensors.get("consensus")
        if any(name.startswith(SPARSE_PREFIX) for name in tensors):
            if vocab is None:
                raise ProtocolError(f"{PROXY_BLOB}: a sparse consensus for a classifier")
            try:
                consensus = read_csr(tensors, vocab, SPARSE_PREFIX)
            except ProtocolError as exc:
                raise ProtocolError(f"{PROXY_BLOB}: consensus: {exc}", exc.code) from None
        elif consensus is not None:
            if vocab is not None:
                raise ProtocolError(f"{PROXY_BLOB}: a classifier's consensus for a causal LM")
            consensus = consensus.float()
            if tuple(consensus.shape) != (len(indices), num_classes):
                raise ProtocolError(
                    f"{PROXY_BLOB}: consensus shape {tuple(consensus.shape)}, "
                    f"expected {(len(indices), num_classes)}"
                )
            if not bool(torch.isfinite(consensus).all()):
                raise ProtocolError(f"{PROXY_BLOB}: consensus contains NaN or Inf")
        return cls(indices.tolist(), bytes(digest.tolist()), consensus)


def proxy_rows(source: str, split: str, indices: List[int], causal: bool) -> ProxySet:
    """The proxy rows of `split` at `indices`: texts without labels for a classifier,
    instruction rows (prompt + response) for a causal LM."""
    full = load_task_split(source, split, causal)
    if indices and not 0 <= min(indices) <= max(indices) < len(full):
        raise UserError(
            f"kd proxy: split {split!r} of {source} has {len(full)} rows, the coordinator named "
            f"row {max(indices)}: devices need the coordinator's dataset"
        )
    subset = full.subset(indices)
    return subset if isinstance(subset, InstructionSet) else unlabelled(subset)


@register_method
class KdMethod(LoraMethod):
    name = "kd"
    config_model = KdSettings
    config: KdSettings
    strategy = "kd"

    def memory_footprint(self, model: Any) -> MemoryFootprint:
        """LoRA's, with a proxy batch of the same size through the graph each step."""
        footprint = super().memory_footprint(model)
        footprint.graphs = 2
        return footprint

    def __init__(self, config: Any, model_ref: Any) -> None:
        super().__init__(config, model_ref)
        self._proxy: Optional[Tuple[Tuple[str, str, bytes, bool], ProxySet]] = None

    def initial_state(self, seed: int) -> InitialState:
        """No weights are federated: the global state is empty (a valid, 16-byte blob)."""
        return InitialState(global_state={})

    def get_state(self, model: Any) -> Tensors:
        """Nothing: each device keeps its own adapter; only logits leave it."""
        return {}

    def state_spec(self, model: Any) -> Dict[str, Tuple[int, ...]]:
        return {}

    def adapter_state(self, model: Any) -> Tensors:
        """The trainable tensors (LoRA + head), for the coordinator's student."""
        return FederatedMethod.get_state(self, model)

    def proxy_set(self, source: Optional[str], proxy: ProxyRound, causal: bool = False) -> ProxySet:
        """The named proxy rows from this device's data, checked against the texts' digest."""
        if not source:
            raise UserError("kd needs the device's dataset for the proxy set: pass --data DIR")
        key = (source, self.config.proxy_split, proxy.texts_sha256, causal)
        if self._proxy is None or self._proxy[0] != key:
            dataset = proxy_rows(source, self.config.proxy_split, proxy.indices, causal)
            if texts_digest(dataset) != proxy.texts_sha256:
                raise UserError(
                    f"kd proxy: rows of split {self.config.proxy_split!r} in {source} differ "
                    "from the coordinator's; devices need the same dataset files"
                )
            self._proxy = (key, dataset)
        return self._proxy[1]

    def local_round(self, job: LocalRound) -> LocalResult:
        from jetfed.edge.causal_lm import response_loss, vocab_size
        from jetfed.edge.models import is_causal_lm
        from jetfed.edge.train import batch_indices, planned_steps

        if PROXY_BLOB not in job.extra_blobs:
            raise ProtocolError(f"kd task without the {PROXY_BLOB} blob")
        causal = is_causal_lm(job.model)
        vocab = vocab_size(job.model) if causal else None
        proxy = ProxyRound.decode(job.extra_blobs[PROXY_BLOB], job.model_ref.num_labels, vocab)
        proxy_set = self.proxy_set(job.data_path, proxy, causal)
        loss_fn = None
        if proxy.consensus is not None:
            proxy_kl = self.proxy_kl(job, proxy_set, proxy.consensus)
            rows = batch_indices(
                len(proxy_set),
                job.training.batch_size,
                planned_steps(job.training, len(job.dataset)),
                job.seed + 1,
            )
            kl_weight = self.config.kl_weight

            def loss_fn(model: Any, batch: Dict[str, Any]) -> Any:
                task = response_loss(model, batch) if causal else model(**batch).loss
                return task + kl_weight * proxy_kl(model, next(rows))

        stats = self.train(job, loss_fn)
        return LocalResult(
            tensors=self.proxy_payload(job, proxy_set),
            num_samples=len(job.dataset),
            train_loss=stats.mean_loss,
            local_steps=stats.steps,
            metrics={"samples_seen": float(stats.samples_seen)},
            wire_dtype="fp16",
        )

    def proxy_kl(
        self, job: LocalRound, proxy_set: ProxySet, consensus: Any
    ) -> Callable[[Any, List[int]], Any]:
        """kl(model, proxy rows): the distillation term toward the consensus on those rows."""
        max_length, temperature = job.model_ref.max_length, self.config.temperature
        if isinstance(proxy_set, InstructionSet):
            offsets = response_offsets(job.tokenizer, proxy_set, max_length)
            if consensus.num_tokens != int(offsets[-1]):
                raise ProtocolError(
                    f"{PROXY_BLOB}: consensus for {consensus.num_tokens} response tokens, "
                    f"the proxy rows have {int(offsets[-1])}"
                )

            def causal_kl(model: Any, rows: List[int]) -> Any:
                batch = instruction_batch(job.tokenizer, proxy_set, rows, max_length, job.device)
                teacher = consensus.select(row_token_numbers(offsets, rows))
                return response_kl(model, batch, teacher, temperature)

            return causal_kl

        def classifier_kl(model: Any, rows: List[int]) -> Any:
            batch = tokenize_batch(job.tokenizer, proxy_set, rows, max_length, job.device)
            return consensus_kl(model, batch, consensus, temperature)

        return classifier_kl

    def proxy_payload(self, job: LocalRound, proxy_set: ProxySet) -> Tensors:
        """The trained model on the whole proxy set: logits, or top-k log-probs + tail."""
        max_length = job.model_ref.max_length
        if isinstance(proxy_set, InstructionSet):
            settings = self.config
            return proxy_top_k(
                job.model,
                job.tokenizer,
                proxy_set,
                max_length,
                job.device,
                settings.top_k,
                settings.temperature,
            ).top_k_tensors()
        logits = predict_logits(job.model, job.tokenizer, proxy_set, max_length, job.device)
        return {"logits": logits}
