"""KD-FedLLM: devices share logits on a public proxy set instead of weights (FedMD/FedDF family).

Schedule of round r on a device (its LoRA adapter stays on the device across rounds):
1. Local training, `training.local_steps` steps. Each step: CE on a private batch, plus, from
   round 1 on, λ·T²·KL(consensus of round r−1 ‖ model) on a proxy batch of the same size
   (`kl_weight` = λ, `temperature` = T). Round 0 has no consensus: CE only.
2. Logits of the trained model on the whole proxy set → the update {"logits": [proxy, classes]},
   always fp16 on the wire. Traffic scales with proxy × classes, never with the model.
The proxy set is named by the coordinator (the `kd_proxy` blob: row indices of `proxy_split` and
the sha256 of their texts); each device reads those rows from its own --data and never their
labels. The coordinator's half (consensus, global model) is `coordinator/strategies/distill.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from pydantic import Field

from jetfed.edge.data import TextDataset, load_split
from jetfed.edge.distillation import (
    DistillationSettings,
    consensus_kl,
    predict_logits,
    texts_digest,
    unlabelled,
)
from jetfed.edge.errors import ProtocolError, UserError
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

PROXY_BLOB = "kd_proxy"


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
    """[proxy, classes] consensus logits of the previous round (None in round 0)."""

    def encode(self) -> bytes:
        import torch
        from safetensors.torch import save

        tensors = {
            "indices": torch.tensor(self.indices, dtype=torch.int32),
            "texts_sha256": torch.tensor(list(self.texts_sha256), dtype=torch.uint8),
        }
        if self.consensus is not None:
            tensors["consensus"] = self.consensus.to(torch.float16).contiguous()
        return bytes(save(tensors))

    @classmethod
    def decode(cls, data: bytes, num_classes: int) -> ProxyRound:
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
        consensus = tensors.get("consensus")
        if consensus is not None:
            consensus = consensus.float()
            if tuple(consensus.shape) != (len(indices), num_classes):
                raise ProtocolError(
                    f"{PROXY_BLOB}: consensus shape {tuple(consensus.shape)}, "
                    f"expected {(len(indices), num_classes)}"
                )
            if not bool(torch.isfinite(consensus).all()):
                raise ProtocolError(f"{PROXY_BLOB}: consensus contains NaN or Inf")
        return cls(indices.tolist(), bytes(digest.tolist()), consensus)


def proxy_rows(source: str, split: str, indices: List[int]) -> TextDataset:
    """The proxy texts (labels dropped) of `split` at `indices`."""
    full = load_split(source, split)
    if indices and not 0 <= min(indices) <= max(indices) < len(full):
        raise UserError(
            f"kd proxy: split {split!r} of {source} has {len(full)} rows, the coordinator named "
            f"row {max(indices)}: devices need the coordinator's dataset"
        )
    return unlabelled(full.subset(indices))


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
        self._proxy: Optional[Tuple[Tuple[str, str, bytes], TextDataset]] = None

    def initial_state(self, seed: int) -> InitialState:
        """No weights are federated: the global state is empty (a valid, 16-byte blob)."""
        return InitialState(global_state={})

    def get_state(self, model: Any) -> Tensors:
        """Nothing: each device keeps its own adapter; only logits leave it."""
        return {}

    def adapter_state(self, model: Any) -> Tensors:
        """The trainable tensors (LoRA + head), for the coordinator's student."""
        return FederatedMethod.get_state(self, model)

    def proxy_set(self, source: Optional[str], proxy: ProxyRound) -> TextDataset:
        """The named proxy rows from this device's data, checked against the texts' digest."""
        if not source:
            raise UserError("kd needs the device's dataset for the proxy set: pass --data DIR")
        key = (source, self.config.proxy_split, proxy.texts_sha256)
        if self._proxy is None or self._proxy[0] != key:
            dataset = proxy_rows(source, self.config.proxy_split, proxy.indices)
            if texts_digest(dataset) != proxy.texts_sha256:
                raise UserError(
                    f"kd proxy: rows of split {self.config.proxy_split!r} in {source} differ "
                    "from the coordinator's; devices need the same dataset files"
                )
            self._proxy = (key, dataset)
        return self._proxy[1]

    def local_round(self, job: LocalRound) -> LocalResult:
        from jetfed.edge.train import batch_indices, planned_steps, tokenize_batch

        if PROXY_BLOB not in job.extra_blobs:
            raise ProtocolError(f"kd task without the {PROXY_BLOB} blob")
        proxy = ProxyRound.decode(job.extra_blobs[PROXY_BLOB], job.model_ref.num_labels)
        proxy_set = self.proxy_set(job.data_path, proxy)
        max_length = job.model_ref.max_length
        loss_fn = None
        consensus = proxy.consensus
        if consensus is not None:
            steps = planned_steps(job.training, len(job.dataset))
            proxy_batches = batch_indices(
                len(proxy_set), job.training.batch_size, steps, job.seed + 1
            )
            settings = self.config

            def loss_fn(model: Any, batch: Dict[str, Any]) -> Any:
                proxy_batch = tokenize_batch(
                    job.tokenizer, proxy_set, next(proxy_batches), max_length, job.device
                )
                kl = consensus_kl(model, proxy_batch, consensus, settings.temperature)
                return model(**batch).loss + settings.kl_weight * kl

        stats = self.train(job, loss_fn)
        logits = predict_logits(job.model, job.tokenizer, proxy_set, max_length, job.device)
        return LocalResult(
            tensors={"logits": logits},
            num_samples=len(job.dataset),
            train_loss=stats.mean_loss,
            local_steps=stats.steps,
            metrics={"samples_seen": float(stats.samples_seen)},
            wire_dtype="fp16",
        )
