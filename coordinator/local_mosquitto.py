"""A private, anonymous Mosquitto subprocess for local fleets and benchmarks.

The embedded amqtt broker costs about 20 ms of the coordinator's CPU per MiB it forwards, which
distorts the time of full-model transfers; Mosquitto forwards at loopback speed in its own
process. It listens on one address only (loopback, or a link fleet's `broker_host`), never on
every interface.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from jetfed.edge.errors import UserError

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0


def free_port(host: str) -> int:
    """A TCP port nothing listens on at `host` right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class LocalMosquitto:
    """`with LocalMosquitto(host, log_path) as broker: broker.url`; stopped on exit."""

    def __init__(self, host: str = "127.0.0.1", log_path: Optional[Path] = None) -> None:
        self.host = host
        self.port = free_port(host)
        self.log_path = log_path
        self._process: Optional[subprocess.Popen[bytes]] = None
        self._workdir: Optional[tempfile.TemporaryDirectory[str]] = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self) -> LocalMosquitto:
        binary = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/sbin")
        if binary is None:
            raise UserError("the mosquitto broker is not installed: apt install mosquitto")
        self._workdir = tempfile.TemporaryDirectory(prefix="jetfed-mosquitto-")
        config = Path(self._workdir.name) / "mosquitto.conf"
        config.write_text(
            f"persistence false\nlistener {self.port} {self.host}\nallow_anonymous true\n"
        )
        log = open(self.log_path or Path(self._workdir.name) / "mosquitto.log", "ab")  # noqa: SIM115
        with log:
            self._process = subprocess.Popen(
                [binary, "-c", str(config)], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not listening(self.host, self.port):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise UserError(f"mosquitto did not start on {self.url} (log: {log.name})")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    def __enter__(self) -> LocalMosquitto:
        return self.start()

    def __exit__(self, *_exc: Any) -> None:
        self.stop()
