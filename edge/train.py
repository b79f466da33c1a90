"""The local training loop and evaluation shared by the methods.

Deliberately a plain PyTorch loop (AdamW, dynamic padding per batch) so its step time can be
compared one-to-one with a bare PEFT loop; see bench/edge_step_overhead.py. A classifier trains
on a TextDataset with cross-entropy over its labels; a causal LM on an InstructionSet
(`jetfed.edge.instructions`) with the loss on response tokens only
(`jetfed.edge.causal_lm.response_loss`).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Union

import numpy as np

from jetfed.edge.data import TextDataset
from jetfed.edge.instructions import InstructionSet, instruction_batch
from jetfed.edge.wire import TrainingConfig


@dataclass
class TrainStats:
    steps: int
    samples_seen: int
    mean_loss: float


@dataclass
class EvalStats:
    accuracy: float
    loss: float
    num_samples: int


def tokenize_batch(
    tokenizer: Any, dataset: TextDataset, indices: List[int], max_length: int, device: str
) -> Dict[str, Any]:
    """Tokens of `indices`, padded to the batch's longest (≤ max_length), with labels."""
    import torch

    texts_a = [dataset.texts_a[i] for i in indices]
    texts_b = None if dataset.texts_b is None else [dataset.texts_b[i] for i in indices]
    batch = tokenizer(
        texts_a,
        texts_b,
        truncation=True,
        max_length=max_length,
        padding=True,
        return_tensors="pt",
    )
    batch["labels"] = torch.tensor([dataset.labels[i] for i in indices], dtype=torch.long)
    return {key: value.to(device) for key, value in batch.items()}


def device_seed(experiment_seed: int, round_index: int, client_index: int) -> int:
    """One device's training seed for one round: a pure function of the experiment's seed, the
    round and the device's client index, mixed (numpy's SeedSequence) so that neighbouring
    seeds, rounds and clients give independent streams."""
    words = np.random.SeedSequence([experiment_seed, round_index, client_index]).generate_state(1)
    return int(words[0])


def make_batch(
    tokenizer: Any,
    dataset: Union[TextDataset, InstructionSet],
    indices: List[int],
    max_length: int,
    device: str,
) -> Dict[str, Any]:
    """A padded batch of either kind of data (see `tokenize_batch`, `instruction_batch`)."""
    if isinstance(dataset, InstructionSet):
        return instruction_batch(tokenizer, dataset, indices, max_length, device)
    return tokenize_batch(tokenizer, dataset, indices, max_length, device)


def batch_indices(num_samples: int, batch_size: int, steps: int, seed: int) -> Iterator[List[int]]:
    """`steps` batches from reshuffled passes over the data (deterministic for a seed)."""
    rng = np.random.default_rng(seed)
    order: List[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            order.extend(rng.permutation(num_samples).tolist())
        batch, order = order[:batch_size], order[batch_size:]
        yield batch


def planned_steps(training: TrainingConfig, num_samples: int) -> int:
    """Steps from `epochs` (rounded up), capped by `local_steps` when both are set."""
    steps_per_epoch = math.ceil(num_samples / training.batch_size)
    candidates = []
    if training.epochs is not None:
        candidates.append(max(1, math.ceil(training.epochs * steps_per_epoch)))
    if training.local_steps is not None:
        candidates.append(training.local_steps)
    return min(candidates) if candidates else steps_per_epoch


def is_head_parameter(name: str) -> bool:
    """A classifier's task head: `classifier.*` / `score.*`, wrapped by PEFT or not."""
    parts = name.split(".")
    return "classifier" in parts or "score" in parts


def parameter_groups(model: Any, training: TrainingConfig) -> List[Dict[str, Any]]:
    """AdamW's groups: the task head at `head_learning_rate` when set, the rest at
    `learning_rate`."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if training.head_learning_rate is None:
        return [{"params": [p for _, p in trainable]}]
    head = [p for n, p in trainable if is_head_parameter(n)]
    body = [p for n, p in trainable if not is_head_parameter(n)]
    groups: List[Dict[str, Any]] = [{"params": body}] if body else []
    if head:
        groups.append({"params": head, "lr": training.head_learning_rate})
    return groups


def loss_scaler(autocast: Optional[Any], device: str) -> Optional[Any]:
    """A GradScaler for fp16 autocast, else None: fp16's range (smallest normal 6e-5) turns
    small activation gradients into zeros, so the loss is scaled up before backward and the
    gradients back down before the step; bf16 has fp32's range and needs no scaling."""
    import torch

    if autocast is not torch.float16:
        return None
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler(device.split(":")[0])
    return torch.cuda.amp.GradScaler()  # torch < 2.3 (JetPack 5's 2.1)


def train_local(
    model: Any,
    tokenizer: Any,
    dataset: Union[TextDataset, InstructionSet],
    training: TrainingConfig,
    max_length: int,
    device: str,
    seed: int,
    loss_fn: Optional[Any] = None,
    on_step: Optional[Callable[[int, int], None]] = None,
    autocast: Optional[Any] = None,
) -> TrainStats:
    """Train the model's trainable parameters in place; `loss_fn(model, batch)` overrides the
    default loss (CE, or the response-token loss on instruction data); `on_step(k, n)` is told
    after each of the n steps (progress reports); `autocast` is a torch dtype to autocast the
    forward pass to (CUDA bf16/fp16), None for plain fp32. The weights, their gradients and
    AdamW's state stay fp32 (the master copy) whatever `autocast` says; fp16 is loss-scaled."""
    import torch

    if loss_fn is None and isinstance(dataset, InstructionSet):
        from jetfed.edge.causal_lm import response_loss

        loss_fn = response_loss

    torch.manual_seed(seed)
    model.to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        parameter_groups(model, training),
        lr=training.learning_rate,
        weight_decay=training.weight_decay,
    )
    scaler = loss_scaler(autocast, device)
    steps = planned_steps(training, len(dataset))
    total_loss = 0.0
    samples_seen = 0
    for step, indices in enumerate(batch_indices(len(dataset), training.batch_size, steps, seed)):
        batch = make_batch(tokenizer, dataset, indices, max_length, device)
        with (
            torch.autocast(device.split(":")[0], dtype=autocast)
            if autocast is not None
            else contextlib.nullcontext()
        ):
            loss = loss_fn(model, batch) if loss_fn is not None else model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
        else:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        if training.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, training.max_grad_norm)
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)  # skipped when the scaled gradients overflowed
            scaler.update()
        total_loss += float(loss.detach())
        samples_seen += len(indices)
        if on_step is not None:
            on_step(step + 1, steps)
    model.eval()
    return TrainStats(steps=steps, samples_seen=samples_seen, mean_loss=total_loss / steps)


def evaluate(
    model: Any,
    tokenizer: Any,
    dataset: TextDataset,
    max_length: int,
    device: str,
    batch_size: int = 64,
) -> EvalStats:
    """Accuracy and mean cross-entropy over the whole dataset. Rows are batched by length
    (characters, a proxy for tokens), so a batch pads to rows like its own: on SST-2's
    validation sentences this halves the tokens a padded batch of 64 computes."""
    import torch

    model.to(device)
    model.eval()
    correct = 0
    total_loss = 0.0
    by_length = sorted(range(len(dataset)), key=lambda i: (_characters(dataset, i), i))
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            indices = by_length[start : start + batch_size]
            batch = tokenize_batch(tokenizer, dataset, indices, max_length, device)
            output = model(**batch)
            total_loss += float(output.loss) * len(indices)
            correct += int((output.logits.argmax(-1) == batch["labels"]).sum())
    n = max(1, len(dataset))
    return EvalStats(accuracy=correct / n, loss=total_loss / n, num_samples=len(dataset))


def _characters(dataset: TextDataset, index: int) -> int:
    second = dataset.texts_b[index] if dataset.texts_b is not None else ""
    return len(dataset.texts_a[index]) + len(second)
