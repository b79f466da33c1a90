"""Edge training step time vs a bare PEFT loop on the same batches (goal: within 5 %).

Three loops train the same PEFT LoRA MiniLM on the same SST-2 batches (same index lists,
batch 16, ≤ 64 tokens padded to the batch's longest, AdamW lr 1e-3, grad clipping at 1.0):
- `bare`: a minimal hand-written PEFT loop (tokenize, forward, backward, clip, step);
- `train_local`: `jetfed.edge.train.train_local`, the loop every method uses;
- `local_round`: the method's whole `local_round` (set state, profiled train phase, delta).
Repetitions are interleaved (the order rotates each repetition) so machine noise hits all three
alike; each repetition's time is divided by its steps (optimizer creation included); medians
are compared.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Dict, List

from bench.runner import DEFAULT_DATASETS, table
from bench.stats import summary
from bench.tensors import MINILM

GOAL_PCT = 5.0
LEARNING_RATE = 1e-3
MAX_GRAD_NORM = 1.0
BATCH_SIZE = 16


def bare_peft_loop(
    model: Any, tokenizer: Any, dataset: Any, batches: List[List[int]], seed: int
) -> None:
    """What someone would write by hand around a PEFT model."""
    import torch

    torch.manual_seed(seed)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE)
    for indices in batches:
        encoded = tokenizer(
            [dataset.texts_a[i] for i in indices],
            truncation=True,
            max_length=MINILM.max_length,
            padding=True,
            return_tensors="pt",
        )
        labels = torch.tensor([dataset.labels[i] for i in indices])
        loss = model(**encoded, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
    model.eval()


def run(quick: bool, datasets: Path = DEFAULT_DATASETS, threads: int = 1) -> Dict[str, Any]:
    import torch

    from jetfed.edge.data import load_split
    from jetfed.edge.methods.base import LocalRound, get_method, run_local_round
    from jetfed.edge.models import load_tokenizer
    from jetfed.edge.telemetry.phases import Profiler
    from jetfed.edge.train import batch_indices, train_local
    from jetfed.edge.wire import TrainingConfig

    torch.set_num_threads(threads)
    steps, repeats = (8, 5) if quick else (25, 9)
    dataset = load_split(str(datasets / "sst2"), "train").subset(range(4000))
    method = get_method("lora")({}, MINILM)
    model = method.build(None, seed=0)
    tokenizer = load_tokenizer(MINILM)
    training = TrainingConfig(
        local_steps=steps,
        batch_size=BATCH_SIZE,
        learning_rate=LEARNING_RATE,
        max_grad_norm=MAX_GRAD_NORM,
    )
    profiler = Profiler("bench", "bench", method="lora")

    def edge_loop(seed: int) -> None:
        train_local(model, tokenizer, dataset, training, MINILM.max_length, "cpu", seed)

    def bare_loop(seed: int) -> None:
        batches = list(batch_indices(len(dataset), BATCH_SIZE, steps, seed))
        bare_peft_loop(model, tokenizer, dataset, batches, seed)

    def round_loop(seed: int) -> None:
        job = LocalRound(
            model=model,
            tokenizer=tokenizer,
            dataset=dataset,
            training=training,
            model_ref=MINILM,
            round_index=seed,
            seed=seed,
            device="cpu",
            global_state=method.get_state(model),
            profiler=profiler,
        )
        run_local_round(method, job)
        profiler.drain()

    loops: Dict[str, Callable[[int], None]] = {
        "bare": bare_loop,
        "train_local": edge_loop,
        "local_round": round_loop,
    }
    bare_loop(0)  # warm-up: first-call allocations and tokenizer caches
    per_step: Dict[str, List[float]] = {name: [] for name in loops}
    names = list(loops)
    for rep in range(repeats):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            started = time.perf_counter()
            loops[name](rep + 1)
            per_step[name].append((time.perf_counter() - started) / steps)
    stats = {name: summary(values) for name, values in per_step.items()}
    bare = stats["bare"]["median"]
    overhead_pct = {
        name: 100.0 * (stats[name]["median"] / bare - 1.0)
        for name in ("train_local", "local_round")
    }
    return {
        "goal_pct": GOAL_PCT,
        "torch_threads": threads,
        "steps_per_repetition": steps,
        "repetitions": repeats,
        "step_s": stats,
        "overhead_pct": overhead_pct,
        "meets_goal": all(value <= GOAL_PCT for value in overhead_pct.values()),
    }


def markdown(results: Dict[str, Any]) -> str:
    rows = [
        [
            name,
            item["median"] * 1000,
            item["min"] * 1000,
            item["max"] * 1000,
            results["overhead_pct"].get(name, 0.0),
        ]
        for name, item in results["step_s"].items()
    ]
    return "\n".join(
        [
            f"PEFT LoRA MiniLM, SST-2, batch {BATCH_SIZE}, ≤ {MINILM.max_length} tokens, "
            f"{results['torch_threads']} torch thread(s), {results['steps_per_repetition']} steps "
            f"× {results['repetitions']} interleaved repetitions.",
            "",
            table(["loop", "median ms/step", "min", "max", "vs bare %"], rows),
            "",
            f"Goal: within {results['goal_pct']:.0f} % of the bare loop: "
            f"{'met' if results['meets_goal'] else 'NOT met'}.",
        ]
    )
