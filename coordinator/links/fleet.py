"""A local fleet behind emulated links: each device in its own network namespace, the broker in
the root namespace.

Topology (N = a /24 picked per fleet under 10.213.0.0/16):

    root namespace                       relay process            device namespace i
    broker on 10.213.N.1  ── TUN {tag}h{i} ⇄ up/down model ⇄ TUN {tag}d{i} ── 10.213.N.(i+2)

Every hub-side TUN carries the same address 10.213.N.1 as a point-to-point link to its device,
so all devices reach the broker at one address, and a broker in the root namespace (a Mosquitto
subprocess, or amqtt inside the coordinator process) just listens on `broker_host`. Devices can
reach only that address. Nothing is routed, so no other host is ever involved.
"""

from __future__ import annotations

import atexit
import fcntl
import itertools
import logging
import os
import re
import select
import signal
import string
import subprocess
import sys
import threading
from types import FrameType
from typing import Any, Dict, List, Optional, Sequence

import jetfed
from jetfed.coordinator.links import netns
from jetfed.coordinator.links.relay import RelayConfig, TunPair
from jetfed.coordinator.links.spec import LinkSpec
from jetfed.edge.errors import UserError
from jetfed.edge.logs import log_event

logger = logging.getLogger(__name__)

SUBNET_PREFIX = "10.213"
MAX_DEVICES = 253
IFNAME_MAX = 15
RELAY_START_TIMEOUT_S = 10.0
ALLOCATION_LOCK = "/run/lock/jetfed-links.lock"

_counter = itertools.count()
_live: List[LinkedFleet] = []
_hooks_installed = False


def fleet_tag(prefix: str) -> str:
    """`{prefix}{pid}{letters}`: unique per process and fleet, and names its creator's pid."""
    number, letters = next(_counter), ""
    while True:
        number, digit = divmod(number, 26)
        letters = string.ascii_lowercase[digit] + letters
        if not number:
            return f"{prefix}{os.getpid()}{letters}"
        number -= 1


class LinkedFleet:
    """`n_devices` network namespaces joined to the root namespace by links shaped as `link`.

    Use as a context manager; teardown also runs at exit, on SIGTERM/SIGHUP, and (by the relay
    process) when this process is killed outright."""

    def __init__(self, n_devices: int, link: LinkSpec, prefix: str = "jf") -> None:
        netns.require_root()
        if not 1 <= n_devices <= MAX_DEVICES:
            raise UserError(f"--link: 1 to {MAX_DEVICES} devices per fleet, got {n_devices}")
        if not re.fullmatch(r"[a-z]{1,4}", prefix):
            raise UserError(f"link prefix {prefix!r}: expected 1 to 4 lowercase letters")
        self.n_devices = n_devices
        self.link = link
        self.prefix = prefix
        self.tag = fleet_tag(prefix)
        if len(f"{self.tag}h{n_devices - 1}") > IFNAME_MAX:
            raise UserError(f"link prefix {prefix!r} is too long for interface names")
        self.namespaces = [f"{self.tag}-d{i}" for i in range(n_devices)]
        self.subnet = ""
        self._relay: Optional[subprocess.Popen[str]] = None
        self._torn_down = False
        netns.cleanup_stale(prefix)
        _track(self)
        try:
            self._build()
        except BaseException:
            self.teardown()
            raise

    @property
    def broker_host(self) -> str:
        """The address every device reaches the broker at; listen on it in the root namespace."""
        return f"{self.subnet}.1"

    def device_address(self, index: int) -> str:
        return f"{self.subnet}.{index + 2}"

    def device_command(self, index: int, argv: Sequence[str]) -> List[str]:
        """`argv` run inside device `index`'s namespace (for subprocess.Popen)."""
        return netns.exec_prefix(self.namespaces[index]) + list(argv)

    def to_dict(self) -> Dict[str, Any]:
        """What profiles record about the run's links."""
        return {"link": self.link.to_dict(), "n_devices": self.n_devices, "emulator": "tun-relay"}

    def _build(self) -> None:
        for name in self.namespaces:
            netns.ip(["netns", "add", name])
            netns.ip(["link", "set", "lo", "up"], netns=name)
        with _allocation_lock():
            self.subnet = _free_subnet()
            self._start_relay()
            for i, name in enumerate(self.namespaces):
                _point_to_point(f"{self.tag}h{i}", self.broker_host, self.device_address(i))
                _point_to_point(f"{self.tag}d{i}", self.device_address(i), self.broker_host, name)

    def _start_relay(self) -> None:
        config = RelayConfig(
            owner_pid=os.getpid(),
            link=self.link,
            pairs=[
                TunPair(
                    device_netns=name, device_ifname=f"{self.tag}d{i}", hub_ifname=f"{self.tag}h{i}"
                )
                for i, name in enumerate(self.namespaces)
            ],
        )
        # The relay's stderr is ours: it writes only when it fails, and then the user needs it.
        self._relay = subprocess.Popen(
            [sys.executable, "-m", "jetfed.coordinator.links", config.model_dump_json()],
            stdout=subprocess.PIPE,
            text=True,
            cwd=_repo_root(),
        )
        assert self._relay.stdout is not None
        ready, _, _ = select.select([self._relay.stdout], [], [], RELAY_START_TIMEOUT_S)
        if not ready or self._relay.stdout.readline().strip() != "ready":
            self._relay.kill()
            self._relay.wait()
            raise UserError("--link: the link relay process did not start (its error is above)")

    def teardown(self) -> None:
        """Remove every namespace and link this fleet made; safe to call more than once."""
        if self._torn_down:
            return
        self._torn_down = True
        existing = netns.list_namespaces()
        netns.remove_namespaces(name for name in self.namespaces if name in existing)
        if self._relay is not None:
            assert self._relay.stdout is not None
            self._relay.stdout.close()
            self._relay.terminate()
            try:
                self._relay.wait(timeout=netns.KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                self._relay.kill()
                self._relay.wait()
        if self in _live:
            _live.remove(self)
        log_event(logger, logging.INFO, "link.torn_down", tag=self.tag)

    def __enter__(self) -> LinkedFleet:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.teardown()


def _point_to_point(ifname: str, local: str, peer: str, namespace: Optional[str] = None) -> None:
    netns.ip(["addr", "add", f"{local}/32", "peer", peer, "dev", ifname], netns=namespace)
    netns.ip(["link", "set", ifname, "up"], netns=namespace)


def _repo_root() -> str:
    """Where `jetfed` is importable from, for the relay subprocess."""
    return os.path.dirname(os.path.dirname(os.path.abspath(jetfed.__file__)))


class _allocation_lock:
    """Serialise subnet choice between fleets of concurrent processes (flock on a file)."""

    def __enter__(self) -> None:
        os.makedirs(os.path.dirname(ALLOCATION_LOCK), exist_ok=True)
        self._file = open(ALLOCATION_LOCK, "a")
        fcntl.flock(self._file, fcntl.LOCK_EX)

    def __exit__(self, *_exc: object) -> None:
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()


def _free_subnet() -> str:
    """A 10.213.N /24 no address or route of the root namespace uses yet."""
    used = set(re.findall(re.escape(SUBNET_PREFIX) + r"\.(\d+)\.", netns.ip(["-4", "addr"])))
    used.update(re.findall(re.escape(SUBNET_PREFIX) + r"\.(\d+)\.", netns.ip(["-4", "route"])))
    for third in range(256):
        if str(third) not in used:
            return f"{SUBNET_PREFIX}.{third}"
    raise UserError(f"--link: every {SUBNET_PREFIX}.N.0/24 subnet is in use; end other fleets")


def _teardown_all() -> None:
    for fleet in list(_live):
        fleet.teardown()


def _chain_signal(signum: int) -> None:
    """Tear down on `signum`, then do what was going to happen anyway."""
    previous = signal.getsignal(signum)

    def handler(received: int, frame: Optional[FrameType]) -> None:
        _teardown_all()
        if callable(previous):
            previous(received, frame)
        elif previous != signal.SIG_IGN:
            signal.signal(received, signal.SIG_DFL)
            os.kill(os.getpid(), received)

    signal.signal(signum, handler)


def _track(fleet: LinkedFleet) -> None:
    global _hooks_installed
    _live.append(fleet)
    if _hooks_installed:
        return
    _hooks_installed = True
    atexit.register(_teardown_all)
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGHUP):
            _chain_signal(signum)
