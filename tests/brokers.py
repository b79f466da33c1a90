"""A real Mosquitto process for tests: own config, own free port, own data dir."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(host: str, port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s} s")


class MosquittoBroker:
    """Start/stop/restart one Mosquitto; `extra_config` lines go after the default listener."""

    def __init__(self, workdir: Path, port: int, host: str = "127.0.0.1") -> None:
        self.workdir = workdir
        self.port = port
        self.host = host
        self.process: Optional[subprocess.Popen[bytes]] = None
        self._extra_config = ""

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self, extra_config: Optional[str] = None) -> None:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if extra_config is not None:
            self._extra_config = extra_config
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "mosquitto.conf"
        lines = self._extra_config
        if "listener" not in lines:
            lines = f"listener {self.port} {self.host}\nallow_anonymous true\n{lines}"
        config.write_text(f"persistence false\n{lines}\n")
        log = open(self.workdir / "mosquitto.log", "ab")  # noqa: SIM115 - owned by the process
        self.process = subprocess.Popen([binary, "-c", str(config)], stdout=log, stderr=log)
        wait_for_port(self.host, self.port)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def restart(self, down_s: float = 0.5) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()

    def log_text(self) -> str:
        path = self.workdir / "mosquitto.log"
        return path.read_text(errors="replace") if path.exists() else ""
