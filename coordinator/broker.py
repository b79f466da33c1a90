"""The embedded broker (amqtt, MQTT 3.1.1) for zero-setup runs, bound to loopback only.

amqtt must be created inside a running asyncio loop, so it lives in its own thread with its
own loop. Real deployments point at Mosquitto instead (`jetfed broker-config` writes its config).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from typing import Any, Optional

from jetfed.edge.errors import UserError

logger = logging.getLogger(__name__)


def free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_taken(host: str, port: int) -> bool:
    """Whether another socket holds `host:port` (listening or merely bound)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


class EmbeddedBroker:
    """`with EmbeddedBroker() as broker: broker.url` — an amqtt broker on 127.0.0.1."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port or free_loopback_port()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._broker: Any = None
        self._thread: Optional[threading.Thread] = None
        self._ready = threading.Event()
        self._error: Optional[BaseException] = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self, timeout_s: float = 15.0) -> EmbeddedBroker:
        try:
            import amqtt.broker  # noqa: F401
        except ImportError:
            raise UserError(
                "the embedded broker needs amqtt: pip install 'jetfed[demo]', or pass --broker"
            ) from None
        self._thread = threading.Thread(target=self._serve, name="embedded-broker", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s) or self._error is not None:
            raise UserError(f"the embedded broker did not start on {self.url}: {self._error}")
        return self

    def _serve(self) -> None:
        from amqtt.broker import Broker

        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }

        async def start() -> None:
            self._broker = Broker(config)
            await self._broker.start()

        try:
            loop.run_until_complete(start())
        except Exception as exc:  # reported to the starting thread as a UserError
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        loop.run_forever()
        loop.close()

    def stop(self) -> None:
        loop, broker = self._loop, self._broker
        if loop is None or broker is None or not loop.is_running():
            return
        future = asyncio.run_coroutine_threadsafe(broker.shutdown(), loop)
        try:
            future.result(timeout=10)
        except Exception as exc:  # shutting down: nothing left to protect
            logger.debug("embedded broker shutdown: %s", exc)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()
