"""A loopback TCP forwarder that counts the bytes each way: the real MQTT traffic of a client
(every packet, header and acknowledgement), measured rather than estimated."""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import List, Tuple


class CountingProxy:
    """Listens on a free 127.0.0.1 port and forwards each connection to (host, port)."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self.port = int(self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self.client_to_broker_bytes = 0
        self.broker_to_client_bytes = 0
        self._sockets: List[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def reset(self) -> Tuple[int, int]:
        """Zero the counters; returns what they held (client→broker, broker→client)."""
        with self._lock:
            held = (self.client_to_broker_bytes, self.broker_to_client_bytes)
            self.client_to_broker_bytes = self.broker_to_client_bytes = 0
        return held

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self._target)
            self._sockets += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, upward: bool) -> None:
        try:
            while True:
                data = source.recv(1 << 16)
                if not data:
                    break
                with self._lock:
                    if upward:
                        self.client_to_broker_bytes += len(data)
                    else:
                        self.broker_to_client_bytes += len(data)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        for sock in self._sockets:
            sock.close()
