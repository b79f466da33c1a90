"""What update compression costs in accuracy: federated full fine-tuning of MiniLM on SST-2 with
the devices' deltas sent as fp32, fp16, bf16 or int8 (per-row scales).

In-process FedAvg (no broker: the wire bytes are the same either way), but every delta really
goes through the codec (`write_tensor_file` → `TensorFile`) and the coordinator's
FedAvg. Same seeds, data split and training for every dtype: the only difference is the codec.
Reported per dtype: validation accuracy and loss after each round, the update size, and the
relative L2 error of the decoded delta against the fp32 one.

Run: python -m bench compression_accuracy [--quick]  (JSON + Markdown under bench/results/)
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

from jetfed.edge.tensorfile import UPDATE_DTYPES, TensorFile, write_tensor_file

DATASET = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets" / "sst2"


def run(quick: bool = False) -> Dict[str, Any]:
    from jetfed.coordinator.strategies.base import AcceptedUpdate, ServerContext
    from jetfed.coordinator.strategies.fedavg import FedAvg
    from jetfed.edge.data import client_shard, load_split
    from jetfed.edge.methods.base import get_method
    from jetfed.edge.models import load_tokenizer
    from jetfed.edge.train import evaluate, train_local
    from jetfed.edge.wire import ModelRef, PartitionSpec, TrainingConfig, Update, make_manifest

    clients, rounds = 2, (1 if quick else 2)
    steps, eval_samples = (10, 128) if quick else (30, 400)
    ref = ModelRef(name_or_path="minilm", num_labels=2, max_length=64)
    training = TrainingConfig(local_steps=steps, batch_size=16, learning_rate=5e-5, seed=0)
    spec = PartitionSpec(kind="iid", num_clients=clients, seed=0)
    train = load_split(str(DATASET), "train")
    shards = [client_shard(train, spec, i) for i in range(clients)]
    validation = load_split(str(DATASET), "validation").subset(range(eval_samples))
    method = get_method("full")({}, ref)
    tokenizer = load_tokenizer(ref)
    model = method.build(None, seed=0)
    initial = method.get_state(model)
    results: Dict[str, Any] = {
        "clients": clients,
        "local_steps": steps,
        "eval_samples": eval_samples,
    }
    with tempfile.TemporaryDirectory(prefix="jetfed-compress-") as workdir:
        for dtype in UPDATE_DTYPES:
            started = time.perf_counter()
            global_state = {name: t.clone() for name, t in initial.items()}
            per_round: List[Dict[str, float]] = []
            size_bytes, errors = 0, []
            for round_index in range(rounds):
                strategy = FedAvg(ServerContext.aggregation_only())
                accepted: List[AcceptedUpdate] = []
                for client, shard in enumerate(shards):
                    method.set_state(model, global_state)
                    train_local(
                        model,
                        tokenizer,
                        shard,
                        training,
                        64,
                        "cpu",
                        seed=round_index * 101 + client,
                    )
                    delta = {n: t - global_state[n] for n, t in method.get_state(model).items()}
                    path = str(Path(workdir) / f"{dtype}-{round_index}-{client}")
                    size_bytes = write_tensor_file(path, delta, dtype)
                    decoded = TensorFile(path, None, UPDATE_DTYPES)
                    squared = sum(float((decoded[n] - t).pow(2).sum()) for n, t in delta.items())
                    norm = sum(float(t.pow(2).sum()) for t in delta.values())
                    errors.append((squared / norm) ** 0.5)
                    update = Update(
                        experiment="bench",
                        device_id=f"d{client}",
                        round_index=round_index,
                        base_digest="0" * 64,
                        num_samples=len(shard),
                        local_steps=steps,
                        train_loss=0.0,
                        blob=make_manifest(b"x", 1024),
                    )
                    accepted.append(AcceptedUpdate(update, decoded))
                global_state = strategy.aggregate(round_index, global_state, accepted)
                method.set_state(model, global_state)
                stats = evaluate(model, tokenizer, validation, max_length=64, device="cpu")
                per_round.append({"accuracy": stats.accuracy, "eval_loss": stats.loss})
                print(f"{dtype} round {round_index}: {per_round[-1]}", file=sys.stderr, flush=True)
            results[dtype] = {
                "rounds": per_round,
                "update_bytes": size_bytes,
                "relative_l2_error_max": max(errors),
                "seconds": time.perf_counter() - started,
            }
    return results
