"""Coordinator halves of KD-FedLLM (`kd`) and FedCoLLM (`fedcollm`).

`kd`: the devices' proxy-set logits are combined into a consensus (`mixture_logits`: the
sample-weighted mean of probabilities at temperature T), broadcast in the next round's `kd_proxy`
blob. The global model of round r, the one evaluated and exported, is the coordinator's student:
the base model with a FRESH adapter distilled for `server_steps` steps on the proxy set toward the
consensus of round r (KL at T, no labels). Rebuilding it every round makes it a pure function of
the consensus. The federated global state is empty; the consensus is checkpointed, so after
`--resume` devices distil toward the last one as in an uninterrupted run.

`fedcollm`: FedAvg of the SLM adapters, then `server_steps` steps of mutual distillation on the
auxiliary labelled data: the SLM minimises CE + λ·KL(LLM ‖ SLM), the LLM CE + λ·KL(SLM ‖ LLM),
each direction's teacher detached; the distilled SLM adapter is the next global state. The
SLM is evaluated as `accuracy`, the LLM as `llm_accuracy` / `llm_eval_loss`. The LLM adapter is
coordinator-only state (exported under `llm/`), checkpointed and restored by `--resume`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from jetfed.coordinator.strategies.base import (
    AcceptedUpdate,
    ServerContext,
    Strategy,
    check_saved_state,
    register_strategy,
)
from jetfed.coordinator.strategies.fedavg import apply_mean_delta
from jetfed.edge.causal_lm import response_logits, vocab_size
from jetfed.edge.data import TextDataset, load_task_split
from jetfed.edge.distillation import (
    DistillationSettings,
    batch_rows,
    ce_plus_kl,
    consensus_kl,
    mixture_logits,
    response_kl,
    response_offsets,
    row_token_numbers,
    texts_digest,
)
from jetfed.edge.errors import ProtocolError, UserError
from jetfed.edge.instructions import InstructionSet
from jetfed.edge.methods.base import Tensors
from jetfed.edge.methods.fedcollm import FedCoLLMMethod
from jetfed.edge.methods.kd import PROXY_BLOB, SPARSE_PREFIX, KdMethod, ProxyRound, proxy_rows
from jetfed.edge.models import load_tokenizer
from jetfed.edge.tensorfile import TensorFile
from jetfed.edge.topk import SparseLogProbs, read_csr, read_top_k, sparse_mixture
from jetfed.edge.train import batch_indices, make_batch, train_local
from jetfed.edge.wire import TrainingConfig


def sample_rows(num_rows: int, count: int, seed: int) -> List[int]:
    """`count` distinct row numbers (all when the split is smaller), sorted, seeded."""
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(num_rows, min(count, num_rows), replace=False).tolist())


def server_training(settings: DistillationSettings, seed: int) -> TrainingConfig:
    return TrainingConfig(
        local_steps=settings.server_steps,
        batch_size=settings.server_batch_size,
        learning_rate=settings.server_learning_rate,
        seed=seed,
    )


class PayloadAccounting(Strategy):
    """Adds `update_payload_bytes` (the round's accepted update blobs, summed) to the metrics:
    what these methods claim to save is exactly that payload."""

    update_payload_bytes: Optional[float] = None

    def note_updates(self, updates: List[AcceptedUpdate]) -> None:
        self.update_payload_bytes = float(sum(item.update.blob.size_bytes for item in updates))

    def evaluate(self, global_state: Tensors) -> Dict[str, float]:
        results = super().evaluate(global_state)
        if self.update_payload_bytes is not None:
            results["update_payload_bytes"] = self.update_payload_bytes
        self.update_payload_bytes = None
        return results


@register_strategy
class KdStrategy(PayloadAccounting):
    name = "kd"

    def __init__(self, ctx: ServerContext) -> None:
        super().__init__(ctx)
        if not isinstance(ctx.method, KdMethod):
            raise UserError(f"aggregation.strategy kd needs method kd, not {ctx.method.name}")
        self.method: KdMethod = ctx.method
        settings = self.method.config
        self.causal = isinstance(ctx.validation, InstructionSet)
        split = load_task_split(ctx.data_path, settings.proxy_split, self.causal)
        self.indices = sample_rows(len(split), settings.proxy_size, settings.proxy_seed)
        self.proxy = proxy_rows(ctx.data_path, settings.proxy_split, self.indices, self.causal)
        self.texts_sha256 = texts_digest(self.proxy)
        self.consensus: Optional[Any] = None
        """[proxy, classes] logits (classifier) or SparseLogProbs (causal LM)."""
        self.student_init = self.method.adapter_state(ctx.eval_model)
        if isinstance(self.proxy, InstructionSet):
            self.offsets = response_offsets(ctx.tokenizer, self.proxy, ctx.model_ref.max_length)
            self.vocab = vocab_size(ctx.eval_model)

    def update_spec(self) -> Dict[str, Tuple[int, ...]]:
        if not self.causal:
            return {"logits": (len(self.indices), self.ctx.model_ref.num_labels)}
        tokens, k = int(self.offsets[-1]), min(self.method.config.top_k, self.vocab)
        return {"logprobs": (tokens, k), "indices": (tokens, k), "tail": (tokens,)}

    def check_update(self, tensors: TensorFile) -> None:
        """A causal LM's top-k payload: indices integers below the vocabulary and distinct per
        token, log-probs ≤ 0, tails in [0, 1], each token's mass summing to one."""
        if self.causal:
            read_top_k(tensors, self.vocab, tensors.is_index("indices"))
        else:
            super().check_update(tensors)

    def configure_round(self, round_index: int, global_state: Tensors) -> Dict[str, bytes]:
        proxy = ProxyRound(self.indices, self.texts_sha256, self.consensus)
        return {PROXY_BLOB: proxy.encode()}

    def aggregate(
        self, round_index: int, global_state: Tensors, updates: List[AcceptedUpdate]
    ) -> Tensors:
        """Consensus of the uploads, then a fresh student distilled toward it."""
        settings = self.method.config
        self.note_updates(updates)
        weights = [float(item.update.num_samples) for item in updates]
        if self.causal:
            parts = [read_top_k(item.tensors, self.vocab, True) for item in updates]
            self.consensus = sparse_mixture(parts, weights)
        else:
            logits = [item.tensors["logits"] for item in updates]
            self.consensus = mixture_logits(logits, weights, settings.temperature)
        self.distil_student(self.consensus, round_index)
        return global_state

    def distil_student(self, consensus: Any, round_index: int) -> None:
        """The global model: a fresh adapter trained on the proxy set toward the consensus."""
        ctx, settings = self.ctx, self.method.config
        training = server_training(settings, seed=round_index)
        self.method.set_state(ctx.eval_model, self.student_init)
        if self.causal:
            rows = batch_rows(len(self.proxy), training, seed=round_index)
            offsets = self.offsets

            def loss_fn(model: Any, batch: Dict[str, Any]) -> Any:
                teacher = consensus.select(row_token_numbers(offsets, next(rows)))
                return response_kl(model, batch, teacher, settings.temperature)

        else:

            def loss_fn(model: Any, batch: Dict[str, Any]) -> Any:
                return consensus_kl(model, batch, consensus, settings.temperature)

        train_local(
            ctx.eval_model,
            ctx.tokenizer,
            self.proxy,
            training,
            max_length=ctx.model_ref.max_length,
            device=ctx.torch_device,
            seed=round_index,
            loss_fn=loss_fn,
        )

    def state(self) -> Tensors:
        """The consensus devices distil toward next round (none before the first aggregation);
        the student needs no saving: every aggregation distils a fresh one from `student_init`."""
        if isinstance(self.consensus, SparseLogProbs):
            return self.consensus.csr_tensors(SPARSE_PREFIX)
        return {} if self.consensus is None else {"consensus": self.consensus}

    def load_state(self, tensors: Tensors) -> None:
        mismatch = UserError("checkpoint's kd consensus does not match this experiment's proxy set")
        if not tensors:
            self.consensus = None
        elif self.causal:
            try:
                sparse = read_csr(tensors, self.vocab, SPARSE_PREFIX)
            except ProtocolError:
                raise mismatch from None
            if sparse.num_tokens != int(self.offsets[-1]) or len(tensors) != 4:
                raise mismatch
            self.consensus = sparse
        else:
            expected = (len(self.indices), self.ctx.model_ref.num_labels)
            dense = tensors.get("consensus")
            if set(tensors) != {"consensus"} or dense is None or dense.shape != expected:
                raise mismatch
            self.consensus = dense

    def export(self, global_state: Tensors, out_dir: str) -> None:
        """The student adapter (PEFT) and, once there is one, `consensus.safetensors`."""
        from safetensors.torch import save_file

        self.method.export(self.ctx.eval_model, out_dir)
        if self.consensus is not None:
            tensors = self.state()
            tensors["indices"] = torch.tensor(self.indices, dtype=torch.int64)
            save_file(tensors, str(Path(out_dir) / "consensus.safetensors"))


def mutual_distillation(
    slm: Any,
    llm: Any,
    tokenizer: Any,
    data: Union[TextDataset, InstructionSet],
    settings: DistillationSettings,
    max_length: int,
    device: str,
    seed: int,
) -> Tuple[float, float]:
    """`server_steps` steps, each: SLM ← CE + λ·KL(LLM ‖ SLM), LLM ← CE + λ·KL(SLM ‖ LLM).

    Both losses come from the same forward passes; each detaches its teacher, so one backward of
    the sum gives each model exactly the gradient of its own loss. Causal LMs: CE and KL at the
    response tokens, the KL on the teacher's top-k support + tail (`settings.top_k`). Returns
    the mean (SLM, LLM) loss.
    """
    torch.manual_seed(seed)
    models = (slm, llm)
    optimizers = []
    for model in models:
        model.to(device)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizers.append(torch.optim.AdamW(params, lr=settings.server_learning_rate))
    totals = [0.0, 0.0]
    steps = settings.server_steps
    causal = isinstance(data, InstructionSet)
    top_k = settings.top_k if causal else None
    for indices in batch_indices(len(data), settings.server_batch_size, steps, seed):
        batch = make_batch(tokenizer, data, indices, max_length, device)
        (slm_logits, labels), (llm_logits, _) = (task_logits(m, batch, causal) for m in models)
        t, weight = settings.temperature, settings.kl_weight
        slm_loss = ce_plus_kl(slm_logits, labels, llm_logits, t, weight, top_k)
        llm_loss = ce_plus_kl(llm_logits, labels, slm_logits, t, weight, top_k)
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        (slm_loss + llm_loss).backward()
        for model, optimizer in zip(models, optimizers):
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            optimizer.step()
        totals[0] += float(slm_loss.detach())
        totals[1] += float(llm_loss.detach())
    for model in models:
        model.eval()
    return totals[0] / steps, totals[1] / steps


def task_logits(
    model: Any, batch: Dict[str, Any], causal: bool
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(logits, targets) where the task's loss is: a classifier's rows, or a causal LM's
    response tokens (the lm_head applied there only)."""
    if causal:
        return response_logits(model, batch)
    inputs = {name: value for name, value in batch.items() if name != "labels"}
    return model(**inputs).logits, batch["labels"]


def check_same_tokenizer(slm_tokenizer: Any, llm_tokenizer: Any, slm: str, llm: str) -> None:
    """Both models read the same token ids: their vocabularies must be identical."""
    if slm_tokenizer.get_vocab() != llm_tokenizer.get_vocab():
        raise UserError(
            f"method.llm {llm!r} and model.name_or_path {slm!r} have different tokenizers; "
            "FedCoLLM needs a pair from one family (e.g. Qwen2.5-0.5B with Qwen2.5-1.5B)"
        )


@register_strategy
class FedCoLLMStrategy(PayloadAccounting):
    name = "fedcollm"

    def __init__(self, ctx: ServerContext) -> None:
        super().__init__(ctx)
        if not isinstance(ctx.method, FedCoLLMMethod):
            raise UserError(
                f"aggregation.strategy fedcollm needs method fedcollm, not {ctx.method.name}"
            )
        self.method: FedCoLLMMethod = ctx.method
        settings = self.method.config
        self.llm_method = self.method.llm_method()
        check_same_tokenizer(
            ctx.tokenizer,
            load_tokenizer(self.llm_method.model_ref),
            ctx.model_ref.name_or_path,
            settings.llm,
        )
        self.llm = self.llm_method.build(None, seed=0)
        causal = isinstance(ctx.validation, InstructionSet)
        split = load_task_split(ctx.data_path, settings.aux_split, causal)
        self.aux = split.subset(sample_rows(len(split), settings.aux_size, settings.aux_seed))
        if causal and vocab_size(self.llm) != vocab_size(ctx.eval_model):
            raise UserError(
                f"method.llm {settings.llm!r} has {vocab_size(self.llm)} output words, "
                f"the SLM {vocab_size(ctx.eval_model)}: FedCoLLM compares them word by word"
            )

    def aggregate(
        self, round_index: int, global_state: Tensors, updates: List[AcceptedUpdate]
    ) -> Tensors:
        ctx = self.ctx
        self.note_updates(updates)
        self.method.set_state(ctx.eval_model, apply_mean_delta(global_state, updates))
        mutual_distillation(
            ctx.eval_model,
            self.llm,
            ctx.tokenizer,
            self.aux,
            self.method.config,
            max_length=ctx.model_ref.max_length,
            device=ctx.torch_device,
            seed=round_index,
        )
        return self.method.get_state(ctx.eval_model)

    def evaluate(self, global_state: Tensors) -> Dict[str, float]:
        """The SLM's metrics as for any run, the LLM's own under `llm_` (`llm_accuracy`,
        `llm_eval_loss`; a causal LM's `llm_perplexity`, `llm_exact_match` or `llm_rouge_l`)."""
        results = super().evaluate(global_state)
        llm = self.evaluate_model(self.llm)
        results.update({f"llm_{name}": value for name, value in llm.items()})
        return results

    def state(self) -> Tensors:
        """The server LLM's adapter, trained by mutual distillation every round."""
        return self.llm_method.get_state(self.llm)

    def load_state(self, tensors: Tensors) -> None:
        check_saved_state(self.llm_method.get_state(self.llm), tensors, "fedcollm LLM adapter")
        self.llm_method.set_state(self.llm, tensors)

    def export(self, global_state: Tensors, out_dir: str) -> None:
        """The SLM adapter where users expect the global model, the LLM adapter under `llm/`."""
        super().export(global_state, out_dir)
        self.llm_method.export(self.llm, str(Path(out_dir) / "llm"))
