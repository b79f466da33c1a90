"""`jetfed simulate`: an experiment with virtual devices instead of a fleet, no broker.

The coordinator and N edge agents run in this process over the in-memory link
(`memory://`, edge/memlink.py) with the code a deployed run uses: the same task, selection,
partition, transfers, validation, aggregation, evaluation and run folder. What differs is only
what nothing in the protocol sees:

- the agents share one `LocalTrainer` (one model, one copy of the data, rounds one at a time),
  or a pool of worker processes with one model each (edge/pool_trainer.py), so 100 virtual
  devices hold one model per worker, not 100;
- no telemetry sampler and no memory readings (records carry time and bytes; no energy);
- one torch thread, as `jetfed edge run --threads 1` in a local fleet, so a simulated run ends on
  the bit-identical global state of the deployed one with the same seed
  (tests/test_reproducibility.py).

Virtual devices get a local fleet's ids (`local_device_id`), so client indices, shards and
per-device seeds are those of `jetfed demo`/`run_local_fleet` with as many devices.
"""

from __future__ import annotations

import itertools
import os
import shutil
import threading
from contextlib import ExitStack
from typing import Callable, List, Optional, Sequence

from jetfed.coordinator.config import ExperimentConfig
from jetfed.coordinator.fleet import local_device_id
from jetfed.coordinator.observer import RunObserver
from jetfed.coordinator.records import RoundMetrics
from jetfed.coordinator.strategies.base import Strategy
from jetfed.edge.agent import NO_TELEMETRY, EdgeAgent, EdgeConfig
from jetfed.edge.errors import UserError
from jetfed.edge.local_trainer import LocalTrainer, Trainer
from jetfed.edge.memlink import MemBroker
from jetfed.edge.mqtt import BrokerSpec
from jetfed.edge.pool_trainer import PoolTrainer

AGENT_STOP_S = 10.0
_broker_names = itertools.count()


def default_clients(config: ExperimentConfig) -> int:
    """One virtual device per client of the partition (else enough for a round)."""
    partition = config.data.partition
    if partition.kind != "none":
        return partition.num_clients
    return max(config.rounds.min_clients, config.rounds.clients_per_round or 0)


def trainer_for(strategy: Strategy, workers: int, stack: ExitStack) -> Trainer:
    """One in-process trainer, or a pool of `workers` processes (closed with `stack`)."""
    if workers <= 0:
        return LocalTrainer()
    if type(strategy).on_exchange is not Strategy.on_exchange:
        raise UserError(
            f"strategy {strategy.name} exchanges messages during local rounds: simulate it "
            "with --workers 0 (virtual devices train in this process)"
        )
    pool = PoolTrainer(workers)
    stack.callback(pool.close)
    return pool


def simulate(
    config: ExperimentConfig,
    clients: Optional[int] = None,
    resume: bool = False,
    on_round: Optional[Callable[[RoundMetrics], None]] = None,
    observers: Sequence[RunObserver] = (),
    workers: int = 0,
    trainer: Optional[Trainer] = None,
) -> List[RoundMetrics]:
    """Run `config` with `clients` virtual devices (default: `default_clients`); returns the
    per-round metrics, also in `config.run_dir` as for a deployed run. The virtual devices
    train in this process, one at a time (`workers=0`), or in `workers` processes with one
    model each; `trainer` replaces both (the benches' no-training trainer)."""
    import torch

    from jetfed.coordinator.server import Coordinator

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)
    count = clients or default_clients(config)
    name = f"simulate-{os.getpid()}-{next(_broker_names)}"
    with MemBroker(name) as broker, ExitStack() as stack:
        spec = BrokerSpec(url=broker.url)
        fresh = not config.run_dir.exists()
        coordinator = Coordinator(config, spec, resume=resume, on_round=on_round)
        coordinator.observers.extend(observers)
        try:
            shared = trainer or trainer_for(coordinator.strategy, workers, stack)
        except UserError:
            if fresh:  # a mistake leaves no run directory that would ask for --resume
                shutil.rmtree(config.run_dir, ignore_errors=True)
            raise
        agents = [
            EdgeAgent(
                EdgeConfig(
                    broker=spec,
                    device_id=device_id,
                    experiment=config.name,
                    data=config.data.path_for(device_id),
                    train_split=config.data.train_split,
                    num_threads=1,
                    telemetry=NO_TELEMETRY,
                    idle_baseline_s=0,
                ),
                trainer=shared,
            )
            for device_id in map(local_device_id, range(count))
        ]
        threads = [
            threading.Thread(target=agent.run, name=f"virtual-{agent.device_id}", daemon=True)
            for agent in agents
        ]
        for thread in threads:
            thread.start()
        try:
            return coordinator.run()
        finally:
            for agent in agents:
                agent.stop()
            for thread in threads:
                thread.join(timeout=AGENT_STOP_S)
            torch.set_num_threads(threads_before)
