"""FedAvg throughput: the coordinator's aggregation of N updates, LoRA-size and full-model-size.

Two strategies on real MiniLM shapes: `fedavg`, the default (sums nₖ·Δₖ in fp64, a few MB of rows at
a time, in device-id order), and `median` (coordinate-wise, one tensor of every update at a time),
both given in-memory updates. Separately, the decode + validation every update passes first
(`jetfed.edge.tensor_codec.decode_tensors` with the expected spec). Throughput = update bytes in
(N × fp32 size) / seconds.
"""

from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Tuple

from bench.runner import table
from bench.stats import median
from bench.tensors import (
    Spec,
    accepted_update,
    full_spec,
    lora_spec,
    random_tensors,
    raw_bytes,
)


def _updates(spec: Spec, count: int) -> List[Any]:
    distinct = [random_tensors(spec, seed) for seed in range(min(count, 4))]
    return [accepted_update(index, distinct[index % len(distinct)]) for index in range(count)]


def _time_aggregate(spec: Spec, count: int, repeats: int, path: str) -> Dict[str, Any]:
    """`path` is the strategy's name; aggregation uses none of the server context."""
    from jetfed.coordinator.strategies.base import ServerContext, make_strategy

    updates = _updates(spec, count)
    global_state = random_tensors(spec, seed=99, scale=1.0)
    strategy = make_strategy(path, ServerContext.aggregation_only())
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        strategy.aggregate(0, global_state, updates)
        times.append(time.perf_counter() - started)
    seconds = median(times)
    size = raw_bytes(spec)
    return {
        "path": path,
        "updates": count,
        "update_bytes": size,
        "median_s": seconds,
        "mb_per_s": count * size / seconds / 1e6,
    }


def _time_decode(spec: Spec, repeats: int) -> Dict[str, float]:
    from jetfed.edge.tensor_codec import decode_tensors, encode_tensors

    payload = encode_tensors(random_tensors(spec, seed=1))
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        decode_tensors(payload, spec)
        times.append(time.perf_counter() - started)
    seconds = median(times)
    return {"median_s": seconds, "mb_per_s": len(payload) / seconds / 1e6}


def run(
    quick: bool, kinds: Tuple[str, ...] = ("lora", "full"), counts: Optional[Tuple[int, ...]] = None
) -> Dict[str, Any]:
    """`kinds` and `counts` shrink the run (tests); by default LoRA 10-300 and full 2-20."""
    import torch

    default_counts = {
        "lora": (10, 100) if quick else (10, 100, 300),
        "full": (2, 10) if quick else (2, 10, 20),
    }
    specs = {"lora": lambda: lora_spec("lora"), "full": full_spec}
    repeats = 3 if quick else 7
    results: Dict[str, Any] = {
        "torch_threads": torch.get_num_threads(),
        "aggregate": {},
        "decode_validate": {},
    }
    for kind in kinds:
        spec = specs[kind]()
        results["aggregate"][kind] = {
            f"{path}-{count}": _time_aggregate(spec, count, repeats, path)
            for path in ("fedavg", "median")
            for count in counts or default_counts[kind]
        }
        results["decode_validate"][kind] = _time_decode(spec, repeats)
    return results


def markdown(results: Dict[str, Any]) -> str:
    rows = [
        [
            kind,
            item["path"],
            item["updates"],
            item["update_bytes"] / 1e6,
            item["median_s"] * 1000,
            item["mb_per_s"],
        ]
        for kind, by_count in results["aggregate"].items()
        for item in by_count.values()
    ]
    decode_rows = [
        [kind, item["median_s"] * 1000, item["mb_per_s"]]
        for kind, item in results["decode_validate"].items()
    ]
    return "\n".join(
        [
            "`fedavg` = the default strategy (fp64 sums of row blocks in device-id order); "
            "`median` = coordinate-wise median (one tensor of every update at a time). "
            f"Torch threads {results['torch_threads']}.",
            "",
            table(["state", "path", "updates", "MB per update", "median ms", "MB/s"], rows),
            "",
            "Per-update decode + validation (names, shapes, dtypes, finiteness):",
            "",
            table(["state", "median ms", "MB/s"], decode_rows),
        ]
    )
