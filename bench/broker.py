"""A private Mosquitto on a free loopback port for one bench (never the system one on 1883)."""

from __future__ import annotations

import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from tests.brokers import MosquittoBroker, free_port


@contextmanager
def private_mosquitto(extra_config: str = "") -> Iterator[MosquittoBroker]:
    """On an error inside the block, the broker's log tail goes to stderr (it is then deleted).
    `extra_config`: mosquitto.conf lines after the listener."""
    with tempfile.TemporaryDirectory(prefix="jetfed-bench-") as tmp:
        broker = MosquittoBroker(Path(tmp), free_port())
        broker.start(extra_config)
        try:
            yield broker
        except BaseException:
            alive = broker.process is not None and broker.process.poll() is None
            print(f"mosquitto alive: {alive}; log tail:", file=sys.stderr)
            print(broker.log_text()[-4000:], file=sys.stderr)
            raise
        finally:
            broker.stop()
