"""Emulated device links: the spec grammar, the link timing model, and real fleets of network
namespaces carrying real TCP, UDP and MQTT traffic (root only). Nothing here is timed against a
bound: rates and delays are measured by bench/link_rates.py."""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Iterator, List

import pytest

from bench.link_rates import (
    MIB,
    connect_rtts_s,
    download,
    finish,
    mqtt_relay,
    python_in,
    upload,
)
from jetfed.coordinator.links import LinkedFleet, LinkSpec, cleanup_stale
from jetfed.coordinator.links.model import LinkDirection
from jetfed.coordinator.links.netns import ROOT_ERROR, list_namespaces, pid_alive
from jetfed.coordinator.links.spec import EXPECTED_FORM
from jetfed.edge.errors import UserError
from tests.brokers import MosquittoBroker, free_port
from tests.fleet import link_leftovers

PREFIX = "jft"
OUR_TAGS = f"{PREFIX}{os.getpid()}"
REPO_ROOT = str(Path(__file__).resolve().parent.parent)

CAN_LINK = os.geteuid() == 0 and os.path.exists("/dev/net/tun")
ROOT_REASON = "needs root and /dev/net/tun (network namespaces, TUN devices)"
root_only = pytest.mark.skipif(not CAN_LINK, reason=ROOT_REASON)


# --- the spec grammar ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "100mbit,20ms,0.1%",
            LinkSpec(up_rate_bit_s=1e8, down_rate_bit_s=1e8, delay_s=0.02, loss_pct=0.1),
        ),
        (
            "100mbit,20ms±5ms",
            LinkSpec(up_rate_bit_s=1e8, down_rate_bit_s=1e8, delay_s=0.02, jitter_s=0.005),
        ),
        ("delay=20ms,jitter=5ms", LinkSpec(delay_s=0.02, jitter_s=0.005)),
        (
            "up=10mbit,down=100mbit,delay=20ms",
            LinkSpec(up_rate_bit_s=1e7, down_rate_bit_s=1e8, delay_s=0.02),
        ),
        (
            "1.5Mbit/s, 0.5s+-100ms , loss=2%",
            LinkSpec(
                up_rate_bit_s=1.5e6, down_rate_bit_s=1.5e6, delay_s=0.5, jitter_s=0.1, loss_pct=2
            ),
        ),
        ("rate=512kbit", LinkSpec(up_rate_bit_s=512e3, down_rate_bit_s=512e3)),
    ],
)
def test_spec_forms_parse(text: str, expected: LinkSpec) -> None:
    spec = LinkSpec.parse(text)
    assert spec == expected
    assert LinkSpec.parse(str(spec)) == spec


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty item"),
        ("100mbit,,20ms", "empty item"),
        ("100mb", "cannot tell what '100mb' is"),
        ("100mbit,10mbit", "rate given twice"),
        ("rate=10mbit,up=1mbit", "up given twice"),
        ("speed=10mbit", "unknown key 'speed'"),
        ("loss=0.1", "not a percentage"),
        ("100%", "less than 100"),
        ("20ms±30ms", "jitter must not exceed the delay"),
        ("delay=fast", "time 'fast' is not like 20ms"),
    ],
)
def test_malformed_spec_is_one_clear_line(text: str, reason: str) -> None:
    with pytest.raises(UserError) as caught:
        LinkSpec.parse(text)
    message = str(caught.value)
    assert reason in message and EXPECTED_FORM in message and "\n" not in message


def test_to_dict_records_spec_and_numbers() -> None:
    record = LinkSpec.parse("up=10mbit,down=100mbit,delay=20ms±5ms,loss=0.1%").to_dict()
    assert record == {
        "spec": "up=10mbit,down=100mbit,20ms±5ms,0.1%",
        "up_rate_bit_s": 1e7,
        "down_rate_bit_s": 1e8,
        "delay_s": 0.02,
        "jitter_s": 0.005,
        "loss_pct": 0.1,
    }


# --- the timing model ---------------------------------------------------------------------


def test_model_serialises_at_the_rate_then_adds_the_delay() -> None:
    link = LinkDirection(8e6, delay_s=0.01, jitter_s=0.0, loss_fraction=0.0, rng=random.Random(0))
    assert link.admit(1000, now_s=0.0) == pytest.approx(0.011)
    assert link.admit(1000, now_s=0.0) == pytest.approx(0.012)
    assert link.admit(1000, now_s=1.0) == pytest.approx(1.011)


def test_model_jitter_never_reorders_and_loss_matches() -> None:
    rng = random.Random(1)
    link = LinkDirection(None, delay_s=0.01, jitter_s=0.005, loss_fraction=0.2, rng=rng)
    arrivals = [link.admit(100, now_s=i * 1e-3) for i in range(5000)]
    delivered = [at for at in arrivals if at is not None]
    assert delivered == sorted(delivered)
    assert 0.18 < 1 - len(delivered) / len(arrivals) < 0.22
    assert min(at - i * 1e-3 for i, at in enumerate(arrivals) if at is not None) >= 0.005


def test_model_loses_a_burst_when_any_of_its_packets_would_be() -> None:
    link = LinkDirection(None, 0.0, 0.0, loss_fraction=0.01, rng=random.Random(2))
    lost = sum(link.admit(45 * 1500, now_s=0.0, packets=45) is None for _ in range(4000))
    assert 0.31 < lost / 4000 < 0.40  # 1 - 0.99**45 = 0.36


def test_model_tail_drops_a_full_queue() -> None:
    link = LinkDirection(8e6, 0.0, 0.0, 0.0, random.Random(0), queue_s=0.1)
    admitted = [link.admit(65536, now_s=0.0) for _ in range(20)]
    assert None in admitted
    assert admitted.index(None) * 65536 * 8 / 8e6 >= 0.1


def test_without_root_the_error_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(UserError, match="^" + re.escape(ROOT_ERROR) + "$"):
        LinkedFleet(1, LinkSpec.parse("10mbit"), prefix=PREFIX)


# --- real fleets (root) ---------------------------------------------------------------------


@pytest.fixture
def fleet() -> Iterator[LinkedFleet]:
    """Two devices behind 100 Mbit/s links without added delay."""
    if not CAN_LINK:
        pytest.skip(ROOT_REASON)
    with LinkedFleet(2, LinkSpec.parse("100mbit"), prefix=PREFIX) as made:
        yield made


def _hub_bytes(fleet: LinkedFleet, index: int, counter: str) -> int:
    """Bytes through the root-side end of device `index`'s link: `rx` what the relay delivered
    up the link, `tx` what the kernel handed the relay to carry down."""
    return int(Path(f"/sys/class/net/{fleet.tag}h{index}/statistics/{counter}_bytes").read_text())


@pytest.mark.root
@root_only
def test_tcp_crosses_the_link_both_ways(fleet: LinkedFleet) -> None:
    """Rates are timed in bench/link_rates.py; here: every byte arrives, through the relay."""
    n_bytes = 4 * MIB
    up_before, down_before = _hub_bytes(fleet, 0, "rx"), _hub_bytes(fleet, 0, "tx")
    assert upload(fleet, 0, n_bytes)[0] == n_bytes
    assert download(fleet, 0, n_bytes)[0] == n_bytes
    assert _hub_bytes(fleet, 0, "rx") - up_before >= n_bytes
    assert _hub_bytes(fleet, 0, "tx") - down_before >= n_bytes


@pytest.mark.root
@root_only
def test_mqtt_through_mosquitto_crosses_both_devices_links(
    fleet: LinkedFleet, tmp_path: Path
) -> None:
    """Device 0 publishes 4 MiB in 1 MiB QoS 1 chunks to a real Mosquitto in the root
    namespace (up its link); device 1 receives them all (down its link)."""
    broker = MosquittoBroker(tmp_path / "mosquitto", free_port(), host=fleet.broker_host)
    broker.start()
    chunks = 4
    try:
        relayed = mqtt_relay(fleet, fleet.broker_host, broker.port, chunks)
    finally:
        broker.stop()
    assert relayed["chunks"] == chunks
    assert _hub_bytes(fleet, 0, "rx") >= chunks * MIB  # up device 0's link
    assert _hub_bytes(fleet, 1, "tx") >= chunks * MIB  # down device 1's link
    assert _hub_bytes(fleet, 0, "tx") < MIB and _hub_bytes(fleet, 1, "rx") < MIB  # acks only


@pytest.mark.root
@root_only
def test_20ms_delay_shows_in_the_round_trip() -> None:
    """The link never answers sooner than its delay (how much later: bench/link_rates.py)."""
    with LinkedFleet(1, LinkSpec.parse("100mbit,20ms"), prefix=PREFIX) as delayed:
        rtts = connect_rtts_s(delayed, 5)
    assert min(rtts) >= 0.020, rtts


@pytest.mark.root
@root_only
def test_jitter_spreads_the_round_trip() -> None:
    with LinkedFleet(1, LinkSpec.parse("40ms±20ms"), prefix=PREFIX) as jittery:
        rtts = connect_rtts_s(jittery, 20)
    assert min(rtts) >= 0.020, rtts
    assert max(rtts) - min(rtts) > 0.005, rtts


UDP_SENDER = """
    import socket, sys, time
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for _ in range(int(sys.argv[3])):
        sock.sendto(bytes(100), (sys.argv[1], int(sys.argv[2])))
        time.sleep(0.0002)
"""


def _count_datagrams(receiver: socket.socket, counted: List[int]) -> None:
    """Count datagrams until none arrives for a second (read while they come: a full socket
    buffer would drop them too)."""
    receiver.settimeout(1.0)
    try:
        while True:
            receiver.recv(1000)
            counted.append(1)
    except socket.timeout:
        pass


@pytest.mark.root
@root_only
def test_loss_drops_that_share_of_packets() -> None:
    sent = 2000
    counted: List[int] = []
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with LinkedFleet(1, LinkSpec.parse("loss=20%"), prefix=PREFIX) as lossy, receiver:
        receiver.bind((lossy.broker_host, 0))
        counter = threading.Thread(target=_count_datagrams, args=(receiver, counted))
        counter.start()
        port = receiver.getsockname()[1]
        finish(python_in(lossy, 0, UDP_SENDER, lossy.broker_host, port, sent))
        counter.join(timeout=30)
    assert 0.15 < 1 - len(counted) / sent < 0.25, len(counted)


OWNER = """
    import subprocess, sys, time
    from jetfed.coordinator.links import LinkedFleet, LinkSpec
    fleet = LinkedFleet(2, LinkSpec.parse("10mbit,10ms"), prefix=sys.argv[1])
    sleeper = subprocess.Popen(fleet.device_command(0, ["sleep", "120"]))
    print(fleet.tag, sleeper.pid, flush=True)
    time.sleep(120)
"""


def _wait_gone(tag: str, pid: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and (link_leftovers(tag) or pid_alive(pid)):
        time.sleep(0.1)
    assert link_leftovers(tag) == [] and not pid_alive(pid)


@pytest.mark.root
@root_only
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_a_killed_owner_leaves_no_namespace_link_or_process(signum: int) -> None:
    """SIGTERM runs the owner's teardown; after SIGKILL the relay notices and cleans up."""
    with subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(OWNER), PREFIX],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
    ) as owner:
        assert owner.stdout is not None
        tag, sleeper = owner.stdout.readline().split()
        assert len(link_leftovers(tag)) == 4  # two namespaces, two hub-side links
        owner.send_signal(signum)
        owner.wait(timeout=10)
    _wait_gone(tag, int(sleeper))


@pytest.mark.root
@root_only
def test_cleanup_stale_removes_namespaces_of_dead_runs() -> None:
    dead_pid = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1
    stale = f"{PREFIX}{dead_pid}a-d0"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    assert stale in cleanup_stale(PREFIX)
    assert stale not in list_namespaces()


@pytest.mark.root
@root_only
def test_nothing_left_behind() -> None:
    """Runs last in this file: no namespace or link from this test process remains."""
    assert link_leftovers(OUR_TAGS) == []
