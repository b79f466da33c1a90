"""Real broker processes for tests, each with its own config, free loopback ports and data dir:
Mosquitto (the reference), RabbitMQ with its MQTT plugin, NATS with its MQTT gateway (alone or
as a 3-node JetStream cluster). Never the system's running instances."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
"""Debian's /usr/sbin wrapper switches to the rabbitmq user and drops the node's environment."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def binary(name: str) -> Optional[str]:
    """The path of a broker binary (Debian puts them in /usr/sbin), or None when absent."""
    found = shutil.which(name) or f"/usr/sbin/{name}"
    return found if os.access(found, os.X_OK) else None


def wait_for_port(host: str, port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s} s")


def wait_mqtt_accepts(host: str, port: int, timeout_s: float) -> None:
    """Until a broker answers an MQTT CONNECT with success (a NATS cluster listens before its
    JetStream quorum can serve MQTT sessions)."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    accepted = threading.Event()
    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
    client.on_connect = lambda c, u, f, reason, p: reason.is_failure or accepted.set()
    client.connect_async(host, port)
    client.loop_start()
    try:
        if not accepted.wait(timeout_s):
            raise TimeoutError(f"no MQTT session at {host}:{port} after {timeout_s} s")
    finally:
        client.disconnect()
        client.loop_stop()


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
        mosquitto = binary("mosquitto") or "mosquitto"
        if extra_config is not None:
            self._extra_config = extra_config
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "mosquitto.conf"
        lines = self._extra_config
        if "listener" not in lines:
            lines = f"listener {self.port} {self.host}\nallow_anonymous true\n{lines}"
        config.write_text(f"persistence false\n{lines}\n")
        log = open(self.workdir / "mosquitto.log", "ab")  # noqa: SIM115 - owned by the process
        self.process = subprocess.Popen([mosquitto, "-c", str(config)], stdout=log, stderr=log)
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


class BrokerProcess:
    """One broker process in its own session (so stop/kill reach every child it forks)."""

    def __init__(self, workdir: Path, mqtt_port: int, host: str = "127.0.0.1") -> None:
        self.workdir = workdir
        self.port = mqtt_port
        self.host = host
        self.process: Optional[subprocess.Popen[bytes]] = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def _spawn(self, command: List[str], env: Optional[Dict[str, str]] = None) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.workdir / "broker.log", "ab")  # noqa: SIM115 - owned by the process
        self.process = subprocess.Popen(
            command,
            stdout=log,
            stderr=log,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )

    def wait_ready(self, timeout_s: float = 20.0) -> None:
        wait_for_port(self.host, self.port, timeout_s)

    def _signal(self, signum: int) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signum)

    def kill(self) -> None:
        """Die at once, as a crashed node does."""
        self._signal(signal.SIGKILL)
        if self.process is not None:
            self.process.wait()
        self.process = None

    def stop(self) -> None:
        self._signal(signal.SIGTERM)
        if self.process is not None:
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.process.wait()
        self.process = None

    def log_text(self) -> str:
        path = self.workdir / "broker.log"
        return path.read_text(errors="replace") if path.exists() else ""


class NatsBroker(BrokerProcess):
    """nats-server with JetStream (its MQTT gateway needs it); `routes` make it a cluster node."""

    def __init__(
        self,
        workdir: Path,
        mqtt_port: int,
        name: str = "jetfed-nats",
        cluster_port: Optional[int] = None,
        routes: Optional[List[int]] = None,
        extra_config: str = "",
    ) -> None:
        super().__init__(workdir, mqtt_port)
        self.name = name
        self.cluster_port = cluster_port
        self.routes = routes or []
        self.extra_config = extra_config

    def start(self, wait: bool = True) -> None:
        """Start the process; `wait`: until MQTT listens (a cluster node listens only once
        JetStream has a quorum, so a cluster starts every node first)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        lines = [
            f"server_name: {self.name}",
            f"listen: {self.host}:{free_port()}",
            f'jetstream {{ store_dir: "{self.workdir / "jetstream"}" }}',
            f"mqtt {{ listen: {self.host}:{self.port}"
            + (", stream_replicas: 3 }" if self.cluster_port is not None else " }"),
        ]
        if self.cluster_port is not None:
            routes = ", ".join(f"nats-route://{self.host}:{port}" for port in self.routes)
            lines.append(
                f"cluster {{ name: jetfed, listen: {self.host}:{self.cluster_port}, "
                f"routes: [{routes}] }}"
            )
        config = self.workdir / "nats.conf"
        config.write_text("\n".join([*lines, self.extra_config, ""]))
        self._spawn([binary("nats-server") or "nats-server", "-c", str(config)])
        if wait:
            self.wait_ready()


class NatsCluster:
    """Three NATS nodes routed to each other on loopback: a JetStream cluster whose MQTT state
    (retained messages, sessions) is replicated on every node, so any two keep it."""

    def __init__(self, workdir: Path, size: int = 3) -> None:
        cluster_ports = [free_port() for _ in range(size)]
        self.nodes = [
            NatsBroker(
                workdir / f"node-{index}",
                free_port(),
                name=f"jetfed-nats-{index}",
                cluster_port=cluster_ports[index],
                routes=[port for port in cluster_ports if port != cluster_ports[index]],
            )
            for index in range(size)
        ]

    def start(self) -> None:
        for node in self.nodes:
            node.start(wait=False)
        for node in self.nodes:
            node.wait_ready(60.0)
            wait_mqtt_accepts(node.host, node.port, 60.0)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def url(self, *order: int) -> str:
        """A failover list of node URLs, in the given order."""
        return ",".join(self.nodes[index].url for index in order)


class RabbitMqBroker(BrokerProcess):
    """A private RabbitMQ node (own name, ports, Mnesia dir) with the MQTT plugin enabled."""

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "rabbitmq.conf"
        config.write_text(
            f"listeners.tcp.default = {self.host}:{free_port()}\n"
            f"mqtt.listeners.tcp.default = {self.host}:{self.port}\n"
            "mqtt.allow_anonymous = true\n"
            "loopback_users = none\n"
        )
        plugins = self.workdir / "enabled_plugins"
        plugins.write_text("[rabbitmq_mqtt].\n")
        env = {
            "RABBITMQ_NODENAME": f"jetfed-test-{self.port}@localhost",
            "RABBITMQ_NODE_IP_ADDRESS": self.host,
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_CONFIG_FILE": str(config),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(plugins),
            "RABBITMQ_MNESIA_BASE": str(self.workdir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.workdir / "log"),
            "RABBITMQ_PID_FILE": str(self.workdir / "rabbitmq.pid"),
        }
        self._spawn([RABBITMQ_SERVER], env)
        self.wait_ready(120.0)
