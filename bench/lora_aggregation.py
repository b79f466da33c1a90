"""LoRA-aware aggregation: seconds per round and bytes per device for each strategy.

Random factors of the real shapes (query/value adapters of MiniLM: 6 × 384→384 twice;
SmolLM2-135M: 30 × 576→576 and 576→192), rank 8, alpha 16, in-memory updates of 10 and 100
devices. Strategies: `fedavg` (with the per-layer error it now reports), `ffa` (B only),
`exact` in both modes (`fold`, `svd`) and `flexlora` (`svd`, `zero_pad`) with the global adapter
at rank 16 and devices cycling through ranks 4/8/16; the svd modes with each `svd_solver`
(`subspace`, the default, and `dense`, the reference). `svd_s` is the solver alone, the part of
the aggregate it accounts for: the same call on the same P̄ per layer, P̄ formed outside the
timer, median over the same repeats. `median_cpu_s` is the aggregate's process CPU time: on a shared
core the wall time also holds the other processes' turns. Upload bytes are
the safetensors payload one device sends (fp32; a rank-4 device's for flexlora); the fold
blob is what `exact`'s fold adds to every device's download each round.
"""

from __future__ import annotations

import time
from typing import Any, Dict, List, Tuple

from bench.runner import table
from bench.stats import median
from bench.tensors import accepted_update

MODELS = {"minilm": "MiniLM q,v", "smollm2": "SmolLM2 q,v"}
STRATEGIES: Tuple[Tuple[str, str, Dict[str, Any]], ...] = (
    ("fedavg", "fedavg", {}),
    ("ffa", "ffa", {}),
    ("exact-fold", "exact", {"mode": "fold"}),
    ("exact-svd", "exact", {"mode": "svd"}),
    ("exact-svd-dense", "exact", {"mode": "svd", "svd_solver": "dense"}),
    ("flexlora-svd", "flexlora", {"heterogeneous": "svd"}),
    ("flexlora-svd-dense", "flexlora", {"heterogeneous": "svd", "svd_solver": "dense"}),
    ("flexlora-zero_pad", "flexlora", {"heterogeneous": "zero_pad"}),
)
RANK, ALPHA, FLEX_RANKS = 8, 16.0, (4, 8, 16)


def adapted_shapes(model: str) -> Dict[str, Tuple[int, int]]:
    """prefix → (out, in) of every query/value Linear, from the model's config alone."""
    from jetfed.edge.memory_budget import budget_model

    meta = budget_model(model).model
    targets = ("query", "value", "q_proj", "v_proj")
    return {
        name: (module.out_features, module.in_features)
        for name, module in meta.named_modules()
        if name.rsplit(".", 1)[-1] in targets
    }


def lora_state(
    shapes: Dict[str, Tuple[int, int]], rank: int, seed: int, with_a: bool = True
) -> Any:
    import torch

    from jetfed.edge.methods.lora import factor_names

    gen = torch.Generator().manual_seed(seed)
    state = {}
    for prefix, (out, inp) in shapes.items():
        name_a, name_b = factor_names(prefix)
        if with_a:
            state[name_a] = torch.randn(rank, inp, generator=gen) * 0.02
        state[name_b] = torch.randn(out, rank, generator=gen) * 0.02
    return state


def updates_of(shapes: Dict[str, Tuple[int, int]], ranks: List[int], with_a: bool) -> List[Any]:
    return [
        accepted_update(index, lora_state(shapes, rank, seed=index, with_a=with_a))
        for index, rank in enumerate(ranks)
    ]


def time_strategy(
    shapes: Dict[str, Tuple[int, int]], label: str, count: int, repeats: int
) -> Dict[str, Any]:
    from jetfed.coordinator.strategies.base import ServerContext, make_strategy
    from jetfed.edge.methods.lora import LoraMethod
    from jetfed.edge.tensor_codec import encode_tensors
    from jetfed.edge.wire import ModelRef

    _, name, settings = next(item for item in STRATEGIES if item[0] == label)
    flex = name == "flexlora"
    svd = "svd" in (settings.get("mode"), settings.get("heterogeneous"))
    run_rank = 16 if flex else RANK
    freeze = name == "ffa"
    config = {"rank": run_rank, "alpha": ALPHA, "freeze_a": freeze}
    method = LoraMethod(config, ModelRef(name_or_path="x", num_labels=2))
    ranks = [FLEX_RANKS[k % 3] if flex else RANK for k in range(count)]
    global_state = lora_state(shapes, run_rank, seed=10_000, with_a=not freeze)
    init = lora_state(shapes, run_rank, seed=10_001) if freeze else None
    updates = updates_of(shapes, ranks, with_a=not freeze)
    times, cpu_times = [], []
    for _ in range(repeats):  # a fresh strategy each time: exact's fold starts empty
        strategy = make_strategy(name, ServerContext.aggregation_only(settings, method, init))
        started, cpu_started = time.perf_counter(), time.process_time()
        strategy.aggregate(0, global_state, updates)
        times.append(time.perf_counter() - started)
        cpu_times.append(time.process_time() - cpu_started)
    svd_s = median(svd_seconds(method, settings, global_state, updates, repeats)) if svd else None
    smallest = min(range(count), key=lambda k: ranks[k])
    errors = strategy.layer_errors
    return {
        "strategy": label,
        "devices": count,
        "median_s": median(times),
        "median_cpu_s": median(cpu_times),
        "svd_s": svd_s,
        "upload_bytes": len(encode_tensors(updates[smallest].tensors)),
        "upload_rank": ranks[smallest],
        "fold_bytes": len(strategy.fold_blob()) if label == "exact-fold" else 0,  # type: ignore[attr-defined]
        "error_mean": sum(errors.values()) / len(errors),
        "error_worst": max(errors.values()),
    }


def svd_seconds(
    method: Any, settings: Dict[str, Any], global_state: Any, updates: List[Any], repeats: int
) -> List[float]:
    """Seconds of the strategy's solver (`top_singular`) over every layer, per repeat."""
    from jetfed.coordinator.strategies.lowrank import (
        adapted_layers,
        at_rank,
        layer_factors,
        method_scaling,
        rank_of,
    )
    from jetfed.coordinator.strategies.truncated_svd import top_singular

    scaling = method_scaling(method)
    full = rank_of(global_state, adapted_layers(global_state)[0])
    starts = {rank: at_rank(global_state, rank, scaling) for rank in FLEX_RANKS if rank < full}
    layers = layer_factors(global_state, updates, scaling, starts=starts)
    inputs = [(factors.mean_product(), *factors.stacked()) for _, factors in layers]
    solver = settings.get("svd_solver", "subspace")
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        for product, b, a in inputs:
            top_singular(product, b, a, full, solver)
        seconds.append(time.perf_counter() - started)
    return seconds


def run(
    quick: bool,
    models: Tuple[str, ...] = ("minilm", "smollm2"),
    counts: Tuple[int, ...] = (10, 100),
) -> Dict[str, Any]:
    """`models` and `counts` shrink the run (tests)."""
    import torch

    torch.set_num_threads(1)
    repeats = 2 if quick else 5
    results: Dict[str, Any] = {"torch_threads": torch.get_num_threads(), "models": {}}
    for model in models:
        shapes = adapted_shapes(model)
        results["models"][model] = [
            time_strategy(shapes, label, count, repeats)
            for count in counts
            for label, _, _ in STRATEGIES
        ]
    return results


def markdown(results: Dict[str, Any]) -> str:
    rows = [
        [
            MODELS.get(model, model),
            item["strategy"],
            item["devices"],
            item["median_s"] * 1000,
            item["median_cpu_s"] * 1000,
            "" if item["svd_s"] is None else item["svd_s"] * 1000,
            f"{item['upload_bytes'] / 1e3:.1f} (r={item['upload_rank']})",
            item["fold_bytes"] / 1e6,
            f"{item['error_mean']:.2e} / {item['error_worst']:.2e}",
        ]
        for model, items in results["models"].items()
        for item in items
    ]
    return "\n".join(
        [
            f"Random factors of the real shapes, rank 8 (flexlora: global 16, devices 4/8/16), "
            f"torch threads {results['torch_threads']}; errors are of random factors (an upper "
            "bound on what trained ones show).",
            "",
            table(
                [
                    "adapters",
                    "strategy",
                    "devices",
                    "aggregate ms",
                    "CPU ms",
                    "of which SVD ms",
                    "upload kB per device",
                    "fold MB per device",
                    "error mean / worst",
                ],
                rows,
            ),
        ]
    )
