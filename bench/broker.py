"""A private Mosquitto on a free loopback port for one bench (never the system one on 1883)."""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from tests.brokers import MosquittoBroker, free_port


@contextmanager
def private_mosquitto() -> Iterator[MosquittoBroker]:
    with tempfile.TemporaryDirectory(prefix="jetfed-bench-") as tmp:
        broker = MosquittoBroker(Path(tmp), free_port())
        broker.start()
        try:
            yield broker
        finally:
            broker.stop()
