"""Virtual devices training in worker processes: `LocalTrainer`'s surface over a process pool.

Each worker process holds one `LocalTrainer` (one model, one copy of the data) and trains for
any virtual device; the agents stay in the simulation's process, where the protocol runs. A job
carries the task and the downloaded blobs as bytes, the result comes back as safetensors bytes,
so the update a virtual device uploads is bit-identical to the one an in-process trainer gives.
Methods that exchange messages during their local round (split learning) train in-process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from jetfed.edge.local_trainer import LocalTrainer, TrainingDevice
from jetfed.edge.methods.base import LocalResult
from jetfed.edge.parent_watch import spawned_pool
from jetfed.edge.telemetry.phases import Profiler
from jetfed.edge.tensor_codec import decode_tensors, encode_tensors
from jetfed.edge.tensorfile import Payload, read_payload
from jetfed.edge.wire import Task, encode_message, parse_message

_worker_trainer: Optional[LocalTrainer] = None


def _start_worker() -> None:
    import torch

    global _worker_trainer
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    _worker_trainer = LocalTrainer()


def _train_in_worker(
    task_message: bytes, blobs: Dict[str, bytes], device_id: str, data: Optional[str], split: str
) -> Tuple[bytes, int, float, int, Dict[str, float], Optional[str]]:
    """One virtual device's local round in this worker."""
    assert _worker_trainer is not None
    task = parse_message(Task, task_message)
    profiler = Profiler(task.experiment, device_id, task.method)
    device = TrainingDevice(device_id, data, split, profiler)
    payloads: Dict[str, Payload] = dict(blobs)
    prepared = _worker_trainer.prepare(task, payloads, device)
    result = _worker_trainer.run(prepared)
    return (
        encode_tensors(result.tensors),
        result.num_samples,
        result.train_loss,
        result.local_steps,
        result.metrics,
        result.wire_dtype,
    )


@dataclass
class PoolJob:
    task: Task
    blobs: Dict[str, bytes]
    device: TrainingDevice


class PoolTrainer:
    """`workers` processes, one model each, shared by every virtual device of a simulation."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool = spawned_pool(workers, _start_worker)
        self._init: Dict[str, bytes] = {}

    def close(self) -> None:
        self._pool.shutdown()

    def needs_init(self, task: Task) -> bool:
        return task.init_state is not None and task.init_state.digest not in self._init

    def prepare(self, task: Task, blobs: Dict[str, Payload], device: TrainingDevice) -> PoolJob:
        """Read the blobs (the agent releases its spool files after this); the fixed init is
        kept here and sent with every job, since any worker may build the model."""
        content = {name: read_payload(payload) for name, payload in blobs.items()}
        if "init" in content and task.init_state is not None:
            self._init[task.init_state.digest] = content["init"]
        if task.init_state is not None:
            content["init"] = self._init[task.init_state.digest]
        return PoolJob(task, content, device)

    def run(self, job: PoolJob) -> LocalResult:
        """The job in a free worker, inside this device's "train" phase (which so includes the
        wait for a worker)."""
        device = job.device
        with device.profiler.phase("train", job.task.round_index) as counters:
            tensors, samples, loss, steps, metrics, wire_dtype = self._pool.submit(
                _train_in_worker,
                encode_message(job.task),
                job.blobs,
                device.device_id,
                device.data,
                device.train_split,
            ).result()
            counters.extra["steps"] = float(steps)
        return LocalResult(
            tensors=decode_tensors(tensors),
            num_samples=samples,
            train_loss=loss,
            local_steps=steps,
            metrics=metrics,
            wire_dtype=wire_dtype,
        )
