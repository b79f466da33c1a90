"""A whole federated run on this machine: a broker, the coordinator and N edge processes, each
device optionally behind an emulated link (`--link`, docs/LINKS.md).

`jetfed demo` and the benchmarks both run through `run_local_fleet`, so a benchmark can compare
methods at, say, 100 Mbit/s and 10 Mbit/s with exactly the fleet the demo uses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, ContextManager, List, Optional, Sequence, Union
from urllib.parse import urlsplit, urlunsplit

from jetfed.coordinator.config import ExperimentConfig
from jetfed.coordinator.links import LinkedFleet, LinkSpec
from jetfed.coordinator.local_mosquitto import LocalMosquitto, listening
from jetfed.coordinator.observer import RunObserver
from jetfed.coordinator.progress import RoundTable
from jetfed.coordinator.records import RoundMetrics
from jetfed.edge.errors import UserError

LOOPBACK = "127.0.0.1"
OWN_BROKERS = ("amqtt", "mosquitto")
LINK_FILE = "link.json"


def local_device_id(index: int) -> str:
    """The id of a local fleet's device `index` (0-based), simulated or not: client indices go
    to ids in sorted order, so both kinds of fleet give device i the same shard and seeds."""
    return f"demo-{index + 1:02d}"


def edge_command(
    broker_url: str, device_id: str, experiment: str, data: str, link_info: Optional[str] = None
) -> List[str]:
    command = [sys.executable, "-m", "jetfed", "edge", "run", "--broker", broker_url]
    command += ["--device-id", device_id, "--experiment", experiment, "--data", data]
    command += ["--threads", "1"]
    if link_info is not None:
        command += ["--link-info", link_info]
    return command


def start_edges(
    broker_url: str,
    config: ExperimentConfig,
    clients: int,
    log_dir: Path,
    fleet: Optional[LinkedFleet] = None,
) -> List[subprocess.Popen[bytes]]:
    """`clients` edge agents `demo-01`...; behind `fleet`, agent i runs in device i's namespace."""
    log_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    link_info = str(fleet.link) if fleet is not None else None
    processes = []
    for index in range(clients):
        device_id = local_device_id(index)
        log = open(log_dir / f"{device_id}.log", "wb")  # noqa: SIM115 - owned by the process
        data = config.data.path_for(device_id)
        command = edge_command(broker_url, device_id, config.name, data, link_info)
        if fleet is not None:
            command = fleet.device_command(index, command)
        with log:
            processes.append(
                subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
            )
    return processes


def stop_processes(processes: List[subprocess.Popen[bytes]], timeout_s: float = 10.0) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + timeout_s
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def own_broker_context(kind: str, host: str, log_dir: Path) -> ContextManager[Any]:
    """A fresh broker listening on `host` only; the context's value has `.url`."""
    if kind == "amqtt":
        from jetfed.coordinator.broker import EmbeddedBroker

        return EmbeddedBroker(host=host)
    if kind == "mosquitto":
        log_dir.mkdir(parents=True, exist_ok=True)
        return LocalMosquitto(host=host, log_path=log_dir / "mosquitto.log")
    raise UserError(f"own_broker {kind!r}: expected one of {', '.join(OWN_BROKERS)}")


def device_broker_url(broker_url: str, fleet: LinkedFleet) -> str:
    """An existing broker as devices behind `fleet` reach it: same port, at `broker_host`.

    It must listen there too (on every address, e.g. Mosquitto's `listener 1883 0.0.0.0`);
    checked now, since otherwise the devices would silently never join."""
    parts = urlsplit(broker_url)
    port = parts.port or (8883 if parts.scheme == "mqtts" else 1883)
    if not listening(fleet.broker_host, port):
        raise UserError(
            f"--broker {broker_url} with --link: devices reach the broker at "
            f"{fleet.broker_host}:{port}, where it does not listen; make it listen on every "
            "address (Mosquitto: listener PORT 0.0.0.0) or drop --broker to use the embedded one"
        )
    credentials = parts.netloc.rpartition("@")[0]
    netloc = f"{credentials}@" if credentials else ""
    return urlunsplit(parts._replace(netloc=f"{netloc}{fleet.broker_host}:{port}"))


def write_link_record(run_dir: Path, fleet: LinkedFleet, broker: str) -> None:
    """`link.json`: the links every device of this run sat behind, and which broker it used."""
    record = dict(fleet.to_dict(), broker=broker, broker_host=fleet.broker_host)
    (run_dir / LINK_FILE).write_text(json.dumps(record, indent=2) + "\n")


def run_local_fleet(
    config: ExperimentConfig,
    clients: int,
    link: Union[str, LinkSpec, None] = None,
    broker_url: Optional[str] = None,
    own_broker: str = "amqtt",
    on_round: Optional[Callable[[RoundMetrics], None]] = None,
    resume: bool = False,
    table: Optional[RoundTable] = None,
    observers: Sequence[RunObserver] = (),
) -> List[RoundMetrics]:
    """Run `config` with `clients` local edge processes; returns the per-round metrics (also in
    `config.run_dir`/metrics.jsonl, next to profiles.jsonl, devices.jsonl and, with a link,
    link.json).

    link: a `--link` spec (`"100mbit,20ms,0.1%"`) or LinkSpec; each device then runs in its own
        network namespace behind that link (root only; UserError otherwise). None: loopback.
    broker_url: an existing broker; with a link it must listen on every address. None: start
        `own_broker` ("amqtt" in this process, or "mosquitto" as a private subprocess) on the
        address devices reach. Everything started is stopped, and every namespace removed, on
        return, error or Ctrl-C.
    resume: continue the run in `config.run_dir` from its checkpoint (`--resume`).
    table: shown (rounds and device progress) once the coordinator is built, so a config, data
        or model error is its one line, never under an empty table.
    observers: told what happens in the run (the live page, coordinator/observer.py).
    """
    import torch

    from jetfed.coordinator.server import Coordinator
    from jetfed.edge.mqtt import BrokerSpec

    spec = LinkSpec.parse(link) if isinstance(link, str) else link
    if broker_url is None and own_broker not in OWN_BROKERS:
        raise UserError(f"own_broker {own_broker!r}: expected one of {', '.join(OWN_BROKERS)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # the devices run one torch thread each: leave them their cores (oversubscribed, 2 threads
    # made a SmolLM2 evaluation 2.5× slower than 1 on a loaded 2-core machine)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) - clients))
    log_dir = config.run_dir / "logs"
    with ExitStack() as stack:
        fleet = stack.enter_context(LinkedFleet(clients, spec)) if spec is not None else None
        if broker_url is None:
            host = fleet.broker_host if fleet is not None else LOOPBACK
            broker_url = stack.enter_context(own_broker_context(own_broker, host, log_dir)).url
            broker_kind = own_broker
            devices_url = broker_url
        else:
            broker_kind = "external"
            devices_url = device_broker_url(broker_url, fleet) if fleet is not None else broker_url
        coordinator = Coordinator(
            config, BrokerSpec(url=broker_url), resume=resume, on_round=on_round
        )
        coordinator.observers.extend(observers)
        if table is not None:
            stack.enter_context(table)
            coordinator.on_round, coordinator.on_progress = table.add, table.progress
        if fleet is not None:
            write_link_record(config.run_dir, fleet, broker_kind)
        edges = start_edges(devices_url, config, clients, log_dir, fleet)
        stack.callback(stop_processes, edges)
        return coordinator.run()
    return []
