"""`jetfed broker-config` against a real Mosquitto started with the generated config.

Denials are proven without sleeping: the broker keeps one publisher's messages in order, so once
a subscriber receives an allowed sentinel sent after a forbidden message, the forbidden one was
dropped.
"""

from __future__ import annotations

import base64
import os
import queue
import shutil
import ssl
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import paho.mqtt.client as mqtt
import pytest
import yaml
from cryptography import x509

from jetfed.coordinator.broker_config import (
    BrokerConfigOptions,
    generate_broker_config,
    pbkdf2_password_hash,
    read_env_file,
)
from jetfed.coordinator.devices_file import parse_devices
from jetfed.edge.errors import UserError
from tests.brokers import MosquittoBroker, free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
TIMEOUT_S = 5.0
EXP = "exp"
NOT_AUTHORISED = (134, 135)  # paho's codes for 3.1.1 CONNACK 4 (bad credentials) and 5


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run(
        [sys.executable, "-m", "jetfed", "broker-config", *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=env,
        timeout=60,
    )


def broker_user_args() -> List[str]:
    """As root the broker would drop to `mosquitto`, which cannot enter pytest's 0700 tmp dirs."""
    return ["--broker-user", "root"] if os.geteuid() == 0 else []


@dataclass
class Deployment:
    out: Path
    tls_port: int
    plain_port: int
    broker: MosquittoBroker

    def env(self, account: str) -> Dict[str, str]:
        if account == "coordinator":
            return read_env_file(self.out / "coordinator" / "coordinator.env")
        return read_env_file(self.out / "devices" / account / "edge.env")

    def restart(self) -> None:
        self.broker.stop()
        self.broker.start((self.out / "mosquitto.conf").read_text())


def deploy(workdir: Path, devices: object, *flags: str) -> Deployment:
    """Generate with the real CLI, then start Mosquitto on exactly that config."""
    tls_port, plain_port = free_port(), free_port()
    (workdir / "devices.yaml").write_text(yaml.safe_dump(devices))
    result = run_cli(
        "--devices",
        str(workdir / "devices.yaml"),
        "--out",
        str(workdir / "out"),
        "--tls-port",
        str(tls_port),
        "--bind",
        HOST,
        "--plain-localhost",
        "--plain-port",
        str(plain_port),
        *broker_user_args(),
        *flags,
    )
    assert result.returncode == 0, result.stderr
    broker = MosquittoBroker(workdir / "broker", tls_port)
    broker.start((workdir / "out" / "mosquitto.conf").read_text())
    return Deployment(workdir / "out", tls_port, plain_port, broker)


class Probe:
    """A real paho 2.x client that records its CONNACK and every message it receives."""

    def __init__(self, name: str) -> None:
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv311
        )
        self.client.reconnect_delay_set(30, 60)
        self.outcome: queue.Queue[Optional[mqtt.ReasonCode]] = queue.Queue()
        self.messages: queue.Queue[Tuple[str, bytes]] = queue.Queue()
        self.subacks: queue.Queue[int] = queue.Queue()
        self.client.on_connect = lambda c, u, f, rc, p: self.outcome.put(rc)
        self.client.on_disconnect = lambda c, u, f, rc, p: self.outcome.put(None)
        self.client.on_message = lambda c, u, m: self.messages.put((m.topic, bytes(m.payload)))
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self.subacks.put(mid)

    def connect(
        self,
        port: int,
        env: Optional[Dict[str, str]] = None,
        tls: bool = True,
        with_cert: bool = False,
        password: Optional[str] = None,
    ) -> Optional[mqtt.ReasonCode]:
        """The CONNACK reason code, or None when the connection failed before one came."""
        if env is not None:
            self.client.username_pw_set(env["JETFED_USERNAME"], password or env["JETFED_PASSWORD"])
            if tls:
                cert = env["JETFED_CERT_FILE"] if with_cert else None
                key = env["JETFED_KEY_FILE"] if with_cert else None
                self.client.tls_set(ca_certs=env["JETFED_CA_FILE"], certfile=cert, keyfile=key)
        try:
            self.client.connect(HOST, port, keepalive=30)
        except (ssl.SSLError, OSError):
            return None
        self.client.loop_start()
        try:
            return self.outcome.get(timeout=TIMEOUT_S)
        except queue.Empty:
            return None

    def subscribe(self, *topics: str) -> None:
        for topic in topics:
            _, mid = self.client.subscribe(topic, qos=1)
            assert self.subacks.get(timeout=TIMEOUT_S) == mid

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(TIMEOUT_S)

    def until(self, topic: str) -> List[Tuple[str, bytes]]:
        """Every message up to and including the first on `topic`."""
        seen = []
        while True:
            item = self.messages.get(timeout=TIMEOUT_S)
            seen.append(item)
            if item[0] == topic:
                return seen

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def probes() -> Iterator[List[Probe]]:
    made: List[Probe] = []
    yield made
    for probe in made:
        probe.close()


def probe(made: List[Probe], name: str) -> Probe:
    made.append(Probe(name))
    return made[-1]


@pytest.fixture(scope="module")
def password_deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    devices = {"devices": ["A", {"id": "B", "password": "b-chose-this-password"}]}
    deployment = deploy(tmp_path_factory.mktemp("pw"), devices)
    yield deployment
    deployment.broker.stop()


def connected(
    made: List[Probe], dep: Deployment, account: str, subscribe: Tuple[str, ...] = ()
) -> Probe:
    client = probe(made, f"{account}-{len(made)}")
    rc = client.connect(dep.tls_port, dep.env(account))
    assert rc is not None and not rc.is_failure, rc
    client.subscribe(*subscribe)
    return client


def test_device_update_reaches_coordinator_and_cannot_impersonate(
    password_deployment: Deployment, probes: List[Probe]
) -> None:
    dep = password_deployment
    coord = connected(probes, dep, "coordinator", ("jetfed/+/devices/+/update", "jetfed/+/task"))
    device_a = connected(probes, dep, "A")
    device_a.publish(f"jetfed/{EXP}/devices/B/update", b"forged")
    device_a.publish(f"jetfed/{EXP}/task", b"forged task")
    device_a.publish(f"jetfed/{EXP}/devices/A/update", b"mine")
    assert coord.until(f"jetfed/{EXP}/devices/A/update") == [
        (f"jetfed/{EXP}/devices/A/update", b"mine")
    ]


def test_device_reads_task_and_own_downlink_but_not_other_devices(
    password_deployment: Deployment, probes: List[Probe]
) -> None:
    dep = password_deployment
    coord = connected(probes, dep, "coordinator")
    coord.publish(f"jetfed/{EXP}/task", b"round 1", retain=True)
    device_a = connected(probes, dep, "A", (f"jetfed/{EXP}/devices/B/#", "jetfed/#"))
    assert device_a.until(f"jetfed/{EXP}/task") == [(f"jetfed/{EXP}/task", b"round 1")]
    coord.publish(f"jetfed/{EXP}/devices/B/down/d1/0", b"B's blob")
    coord.publish(f"jetfed/{EXP}/devices/B/ack", b"B's ack")
    coord.publish(f"jetfed/{EXP}/devices/A/down/d1/0", b"A's blob")
    assert device_a.until(f"jetfed/{EXP}/devices/A/down/d1/0") == [
        (f"jetfed/{EXP}/devices/A/down/d1/0", b"A's blob")
    ]


def test_wrong_password_unknown_user_and_anonymous_are_refused(
    password_deployment: Deployment, probes: List[Probe]
) -> None:
    dep = password_deployment
    wrong = probe(probes, "wrong").connect(dep.tls_port, dep.env("A"), password="not-the-password")
    assert wrong is not None and wrong.value in NOT_AUTHORISED
    stranger = dict(dep.env("A"), JETFED_USERNAME="C")
    unknown = probe(probes, "unknown").connect(dep.tls_port, stranger)
    assert unknown is not None and unknown.value in NOT_AUTHORISED
    anonymous = probe(probes, "anon").connect(dep.plain_port)
    assert anonymous is not None and anonymous.value in NOT_AUTHORISED


def test_a_device_account_cannot_take_over_the_coordinators_client_id(
    password_deployment: Deployment, probes: List[Probe]
) -> None:
    """`use_username_as_clientid`: the broker names each session after its account, so a
    device connecting with the coordinator's client id (on either listener) disconnects no
    one; the coordinator still receives what is published after the attempt."""
    dep = password_deployment
    coordinator_id = f"jetfed-coordinator-{EXP}"
    coord = Probe(coordinator_id)
    probes.append(coord)
    rc = coord.connect(dep.plain_port, dep.env("coordinator"), tls=False)
    assert rc is not None and not rc.is_failure
    coord.subscribe("jetfed/+/devices/+/update")
    thief = Probe(coordinator_id)
    probes.append(thief)
    rc = thief.connect(dep.tls_port, dep.env("A"))
    assert rc is not None and not rc.is_failure
    thief_local = Probe(coordinator_id)
    probes.append(thief_local)
    rc = thief_local.connect(dep.plain_port, dep.env("B"), tls=False)
    assert rc is not None and not rc.is_failure
    thief.publish(f"jetfed/{EXP}/devices/A/update", b"after the takeover attempt")
    assert coord.until(f"jetfed/{EXP}/devices/A/update") == [
        (f"jetfed/{EXP}/devices/A/update", b"after the takeover attempt")
    ]
    assert coord.outcome.empty(), "the coordinator was disconnected"
    assert "use_username_as_clientid true" in (dep.out / "mosquitto.conf").read_text()


def test_plaintext_to_tls_listener_fails_and_plain_listener_still_needs_password(
    password_deployment: Deployment, probes: List[Probe]
) -> None:
    dep = password_deployment
    assert probe(probes, "plain").connect(dep.tls_port, dep.env("A"), tls=False) is None
    local = probe(probes, "local").connect(dep.plain_port, dep.env("coordinator"), tls=False)
    assert local is not None and not local.is_failure


def test_mutual_tls_needs_a_cert_and_rotation_revokes_the_old_one(
    tmp_path: Path, probes: List[Probe]
) -> None:
    dep = deploy(tmp_path, ["A", "B"], "--mutual-tls")
    try:
        assert probe(probes, "nocert").connect(dep.tls_port, dep.env("A")) is None
        coord = probe(probes, "coord")
        assert coord.connect(dep.tls_port, dep.env("coordinator"), with_cert=True) is not None
        coord.subscribe("jetfed/+/devices/+/update")
        device_a = probe(probes, "A")
        rc = device_a.connect(dep.tls_port, dep.env("A"), with_cert=True, password="ignored-x")
        assert rc is not None and not rc.is_failure
        device_a.publish(f"jetfed/{EXP}/devices/B/update", b"forged")
        device_a.publish(f"jetfed/{EXP}/devices/A/update", b"mine")
        assert [t for t, _ in coord.until(f"jetfed/{EXP}/devices/A/update")] == [
            f"jetfed/{EXP}/devices/A/update"
        ]

        old_a = tmp_path / "old-A"
        old_a.mkdir()
        old_env = dep.env("A")
        for name in ("JETFED_CERT_FILE", "JETFED_KEY_FILE"):
            target = old_a / Path(old_env[name]).name
            target.write_bytes(Path(old_env[name]).read_bytes())
            old_env[name] = str(target)
        ca_before, b_before = (dep.out / "ca" / "ca.crt").read_bytes(), dep.env("B")
        result = run_cli(
            "--devices", str(tmp_path / "devices.yaml"), "--out", str(dep.out), "--rotate", "A",
            "--tls-port", str(dep.tls_port), "--bind", HOST, "--plain-localhost",
            "--plain-port", str(dep.plain_port), "--mutual-tls", *broker_user_args(),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert "revoked the old certificate of A" in result.stdout
        assert (dep.out / "ca" / "ca.crt").read_bytes() == ca_before
        assert dep.env("B") == b_before
        assert dep.env("A")["JETFED_PASSWORD"] != old_env["JETFED_PASSWORD"]
        for client in probes:
            client.close()
        dep.restart()
        assert probe(probes, "old").connect(dep.tls_port, old_env, with_cert=True) is None
        old_password = probe(probes, "oldpw").connect(dep.plain_port, old_env, tls=False)
        assert old_password is not None and old_password.value in NOT_AUTHORISED
        rc = probe(probes, "new").connect(dep.tls_port, dep.env("A"), with_cert=True)
        assert rc is not None and not rc.is_failure
    finally:
        dep.broker.stop()


def test_python_pbkdf2_hashes_and_experiment_scoped_acl_work_on_real_mosquitto(
    tmp_path: Path, probes: List[Probe]
) -> None:
    """Hosts without mosquitto_passwd hash in Python; listing experiments narrows the ACL."""
    tls_port = free_port()
    spec = parse_devices({"devices": ["A"], "experiments": [EXP]})
    options = BrokerConfigOptions(
        tls_port=tls_port,
        bind_address=HOST,
        broker_user="root" if os.geteuid() == 0 else None,
    )
    layout = generate_broker_config(spec, tmp_path / "out", options, mosquitto_passwd=None)
    assert "pattern readwrite jetfed/exp/devices/%u/#" in layout.acl.read_text()
    dep = Deployment(layout.out_dir, tls_port, 0, MosquittoBroker(tmp_path / "broker", tls_port))
    dep.broker.start(layout.mosquitto_conf.read_text())
    try:
        coord = connected(probes, dep, "coordinator", ("jetfed/+/devices/+/update",))
        device_a = connected(probes, dep, "A")
        device_a.publish("jetfed/other/devices/A/update", b"wrong experiment")
        device_a.publish(f"jetfed/{EXP}/devices/A/update", b"mine")
        assert coord.until(f"jetfed/{EXP}/devices/A/update") == [
            (f"jetfed/{EXP}/devices/A/update", b"mine")
        ]
        # an unpinned device listens on the wildcard: it hears only the experiments it may serve
        coord.publish("jetfed/other/coordinator", b"other run", retain=True)
        coord.publish(f"jetfed/{EXP}/coordinator", b"this run", retain=True)
        listener = connected(probes, dep, "A", ("jetfed/+/coordinator",))
        assert listener.until(f"jetfed/{EXP}/coordinator") == [
            (f"jetfed/{EXP}/coordinator", b"this run")
        ]
        coord.publish(f"jetfed/{EXP}/coordinator", b"", retain=True)  # after anything pending
        assert listener.until(f"jetfed/{EXP}/coordinator") == [(f"jetfed/{EXP}/coordinator", b"")]
    finally:
        dep.broker.stop()


def test_generated_files_modes_names_and_certificates(password_deployment: Deployment) -> None:
    out = password_deployment.out
    secret = [
        "passwd",
        "ca/ca.key",
        "server/server.key",
        "devices/A/A.key",
        "devices/A/edge.env",
        "coordinator/coordinator.key",
        "coordinator/coordinator.env",
    ]
    for name in secret:
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o600, name
    env = password_deployment.env("A")
    assert list(env) == [
        "JETFED_BROKER",
        "JETFED_DEVICE_ID",
        "JETFED_USERNAME",
        "JETFED_PASSWORD",
        "JETFED_CA_FILE",
        "JETFED_CERT_FILE",
        "JETFED_KEY_FILE",
    ]
    assert env["JETFED_BROKER"] == f"mqtts://localhost:{password_deployment.tls_port}"
    assert password_deployment.env("B")["JETFED_PASSWORD"] == "b-chose-this-password"
    assert len(env["JETFED_PASSWORD"]) >= 24
    assert "b-chose-this-password" not in (out / "passwd").read_text()
    server = x509.load_pem_x509_certificate((out / "server/server.crt").read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(n.value) for n in names} == {"localhost", "127.0.0.1"}
    client = x509.load_pem_x509_certificate((out / "devices/A/A.crt").read_bytes())
    assert client.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "A"


def test_hosts_become_sans_and_install_dir_rewrites_bundle_paths(tmp_path: Path) -> None:
    options = BrokerConfigOptions(
        hosts=["broker.lan", "10.0.0.5"], device_install_dir="/etc/jetfed"
    )
    layout = generate_broker_config(parse_devices(["orin-1"]), tmp_path, options)
    server = x509.load_pem_x509_certificate(layout.server_cert.read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(n.value) for n in names} == {"broker.lan", "10.0.0.5", "localhost", "127.0.0.1"}
    env = read_env_file(layout.devices["orin-1"].env_file)
    assert env["JETFED_BROKER"] == "mqtts://broker.lan:8883"
    assert env["JETFED_KEY_FILE"] == "/etc/jetfed/orin-1.key"
    again = generate_broker_config(parse_devices(["orin-2"]), tmp_path, options)
    assert not again.ca_created
    assert not (tmp_path / "devices" / "orin-1").exists()
    assert again.revoked == ["orin-1"]


@pytest.mark.parametrize(
    "devices, fragment",
    [
        (["a/b"], "device id 'a/b'"),
        (["dev+"], "device id 'dev+'"),
        (["#"], "device id '#'"),
        ([".."], "device id '..'"),
        (["a", "a"], "listed twice"),
        (["coordinator"], "coordinator's username"),
        ([{"id": "a", "password": "short"}], "password must be"),
        ({"devices": ["a"], "experiments": ["x/y"]}, "experiment 'x/y'"),
        ({"devices": ["a"], "extra": 1}, "extra"),
        ({"devices": []}, "devices"),
        ("just text", "must be a list"),
    ],
)
def test_devices_file_mistakes_are_one_line_user_errors(devices: object, fragment: str) -> None:
    with pytest.raises(UserError) as caught:
        parse_devices(devices)
    assert fragment in str(caught.value) and "\n" not in str(caught.value)


def test_cli_reports_a_bad_device_id_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "devices.yaml").write_text("- good\n- bad/id\n")
    result = run_cli("--devices", str(tmp_path / "devices.yaml"), "--out", str(tmp_path / "o"))
    assert result.returncode == 2
    assert result.stderr.strip().startswith("jetfed: error:") and "bad/id" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_python_hash_equals_mosquitto_passwd_for_the_same_salt(tmp_path: Path) -> None:
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        pytest.skip("mosquitto_passwd is not installed")
    plain = tmp_path / "passwd"
    plain.write_text("A:secretpass1234\n")
    subprocess.run([tool, "-U", str(plain)], check=True, timeout=30)
    reference = plain.read_text().strip().split(":", 1)[1]
    salt = base64.b64decode(reference.split("$")[3])
    assert pbkdf2_password_hash("secretpass1234", salt) == reference


@pytest.mark.parametrize(
    "options, fragment",
    [
        (BrokerConfigOptions(tls_port=0), "--tls-port"),
        (BrokerConfigOptions(plain_localhost=True, plain_port=8883), "--plain-port"),
        (BrokerConfigOptions(hosts=["bad host"]), "--host"),
        (BrokerConfigOptions(bind_address="-x"), "--bind"),
        (BrokerConfigOptions(device_install_dir="etc/jetfed"), "--device-install-dir"),
        (BrokerConfigOptions(key_type="dsa"), "--key-type"),
        (BrokerConfigOptions(rotate=["ghost"]), "--rotate"),
    ],
)
def test_option_mistakes_are_user_errors(options: BrokerConfigOptions, fragment: str) -> None:
    with pytest.raises(UserError, match=fragment):
        options.validate(["A"])
