"""Generate a locked-down Mosquitto deployment: config, password file, ACL, TLS PKI, bundles.

Each device gets its own account (username == device id) that may write only under
`jetfed/+/devices/{id}/` and read only that tree and the task topic; the coordinator has its own
account. Re-running keeps the CA, the certs it signed and the passwords already handed out, so
it can be run again after editing devices.yaml without redeploying every device.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import pwd
import re
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from cryptography import x509

from jetfed.coordinator import pki
from jetfed.coordinator.devices_file import DevicesFile
from jetfed.edge.errors import UserError
from jetfed.edge.logs import log_event

logger = logging.getLogger(__name__)

HOST = re.compile(r"^[A-Za-z0-9.:-]+$")
INSTALL_DIR = re.compile(r"^/[^\s=]*$")
PBKDF2_ITERATIONS = 101  # what mosquitto_passwd 2.0 writes; the broker reads the count per line
PBKDF2_SALT_BYTES = 12
PBKDF2_HASH_BYTES = 64
RENEW_BEFORE_DAYS = 30


@dataclass(frozen=True)
class BrokerConfigOptions:
    """How the broker listens and how long credentials live; see `jetfed broker-config --help`."""

    hosts: List[str] = field(default_factory=list)
    tls_port: int = 8883
    bind_address: Optional[str] = None
    plain_localhost: bool = False
    plain_port: int = 1883
    mutual_tls: bool = False
    key_type: str = "ec"
    cert_days: int = 825
    ca_days: int = 3650
    device_install_dir: Optional[str] = None
    rotate: List[str] = field(default_factory=list)
    force: bool = False
    broker_user: Optional[str] = None

    def server_hosts(self) -> List[str]:
        """Names in the server cert: given hosts first (devices dial the first), then loopback."""
        names = list(self.hosts)
        for local in ("localhost", "127.0.0.1"):
            if local not in names:
                names.append(local)
        return names

    def broker_url(self) -> str:
        host = self.server_hosts()[0]
        return f"mqtts://{f'[{host}]' if ':' in host else host}:{self.tls_port}"

    def validate(self, device_ids: List[str]) -> None:
        for flag, port in (("--tls-port", self.tls_port), ("--plain-port", self.plain_port)):
            if not 0 < port < 65536:
                raise UserError(f"{flag} must be a TCP port 1-65535, got {port}")
        if self.plain_localhost and self.plain_port == self.tls_port:
            raise UserError("--plain-port must differ from --tls-port")
        for flag, host in [("--host", h) for h in self.hosts] + [("--bind", self.bind_address)]:
            if host is not None and (not HOST.fullmatch(host) or host.startswith(("-", "."))):
                raise UserError(f"{flag} {host!r} must be a DNS name or an IP address")
        if self.device_install_dir is not None and not INSTALL_DIR.fullmatch(
            self.device_install_dir
        ):
            raise UserError("--device-install-dir must be an absolute path without spaces")
        if self.key_type not in pki.KEY_TYPES:
            raise UserError(
                f"--key-type must be one of {', '.join(pki.KEY_TYPES)}, got {self.key_type!r}"
            )
        if self.cert_days < 1 or self.ca_days < self.cert_days:
            raise UserError("--days must be >= 1 and --ca-days must be >= --days")
        unknown = sorted(set(self.rotate) - set(device_ids))
        if unknown:
            raise UserError(f"--rotate names devices not in devices.yaml: {', '.join(unknown)}")


@dataclass(frozen=True)
class Account:
    """Credentials of one MQTT account as written into its bundle."""

    username: str
    password: str
    bundle_dir: Path
    env_file: Path


@dataclass(frozen=True)
class BrokerLayout:
    """Where everything was written; paths the operator deploys."""

    out_dir: Path
    mosquitto_conf: Path
    passwd: Path
    acl: Path
    ca_cert: Path
    ca_key: Path
    crl: Path
    server_cert: Path
    server_key: Path
    coordinator: Account
    devices: Dict[str, Account]
    ca_created: bool
    revoked: List[str]


def pbkdf2_password_hash(password: str, salt: Optional[bytes] = None) -> str:
    """Mosquitto 2's `$7$` PBKDF2-SHA512 hash, for hosts without mosquitto_passwd."""
    salt = salt if salt is not None else secrets.token_bytes(PBKDF2_SALT_BYTES)
    digest = hashlib.pbkdf2_hmac(
        "sha512", password.encode(), salt, PBKDF2_ITERATIONS, PBKDF2_HASH_BYTES
    )
    encoded_salt, encoded_hash = base64.b64encode(salt).decode(), base64.b64encode(digest).decode()
    return f"$7${PBKDF2_ITERATIONS}${encoded_salt}${encoded_hash}"


def write_password_file(path: Path, credentials: Dict[str, str], tool: Optional[str]) -> None:
    """Hash with `mosquitto_passwd -U` when given (passwords never appear on a command line)."""
    if tool is None:
        lines = [f"{user}:{pbkdf2_password_hash(pw)}" for user, pw in credentials.items()]
        pki.write_private(path, ("\n".join(lines) + "\n").encode())
        return
    staging = path.with_name(path.name + ".new")
    pki.write_private(staging, "".join(f"{u}:{p}\n" for u, p in credentials.items()).encode())
    try:
        result = subprocess.run(
            [tool, "-U", str(staging)], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise UserError(f"{tool} -U failed: {(result.stderr or result.stdout).strip()}")
        os.chmod(staging, pki.SECRET_FILE_MODE)
        os.replace(staging, path)
    finally:
        if staging.exists():
            staging.unlink()


def render_acl(coordinator_user: str, experiments: List[str]) -> str:
    """Device rules are patterns on %u (the username, or the cert CN with mutual TLS)."""
    scopes = experiments or ["+"]
    lines = [
        "# Generated by `jetfed broker-config`. Username == device id.",
        "# A device may read and write only its own tree and read the task and the coordinator's",
        "# announcement (an unpinned device joins the experiment that announces itself).",
    ]
    for scope in scopes:
        lines.append(f"pattern readwrite jetfed/{scope}/devices/%u/#")
        lines.append(f"pattern read jetfed/{scope}/task")
        lines.append(f"pattern read jetfed/{scope}/coordinator")
    lines += [
        "",
        "# The coordinator reads every device and writes tasks and blobs.",
        f"user {coordinator_user}",
    ]
    lines.append("topic readwrite jetfed/#")
    return "\n".join(lines) + "\n"


def render_mosquitto_conf(layout: BrokerLayout, options: BrokerConfigOptions) -> str:
    """Global (not per-listener) auth, so every listener needs a password or a client cert."""
    lines = [
        "# Generated by `jetfed broker-config`; rerun it instead of editing this file.",
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {layout.passwd}",
        f"acl_file {layout.acl}",
        "# The coordinator hears every device's retained hello and status at once when it",
        "# subscribes (2 per device) and updates in bursts: the default queue (1000 per client)",
        "# silently drops the rest beyond a few hundred devices (bench/fleet_soak.py).",
        "max_queued_messages 100000",
    ]
    if options.plain_localhost:
        lines += [
            "",
            "# Plaintext, loopback only: for a coordinator on the broker host.",
            f"listener {options.plain_port} 127.0.0.1",
            "use_username_as_clientid true",
        ]
    bind = f" {options.bind_address}" if options.bind_address else ""
    lines += [
        "",
        "# TLS for devices.",
        f"listener {options.tls_port}{bind}",
        f"cafile {layout.ca_cert}",
        f"certfile {layout.server_cert}",
        f"keyfile {layout.server_key}",
        f"crlfile {layout.crl}",
        f"require_certificate {'true' if options.mutual_tls else 'false'}",
        "# The broker names each session after its account, whatever client id it sends: no",
        "# account can take over (disconnect) another's session, the coordinator's included.",
        "use_username_as_clientid true",
    ]
    if options.mutual_tls:
        lines.append("use_identity_as_username true")
    if options.broker_user:
        lines[1:1] = [f"user {options.broker_user}"]
    return "\n".join(lines) + "\n"


def read_env_file(path: Path) -> Dict[str, str]:
    if not path.exists():
        return {}
    pairs = (
        line.split("=", 1)
        for line in path.read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    return {key.strip(): value.strip() for key, value in pairs}


def write_env_file(path: Path, values: Dict[str, str]) -> None:
    """KEY=value lines: fit `set -a; . FILE`, systemd EnvironmentFile= and docker --env-file."""
    header = "# Generated by `jetfed broker-config`; secret: keep mode 0600.\n"
    pki.write_private(path, (header + "".join(f"{k}={v}\n" for k, v in values.items())).encode())


class _Generator:
    """One run: holds the CA and the growing revocation list while accounts are written."""

    def __init__(self, out_dir: Path, options: BrokerConfigOptions) -> None:
        self.out = out_dir.resolve()
        self.options = options
        self.ca_key = self.out / "ca" / "ca.key"
        self.ca_cert = self.out / "ca" / "ca.crt"
        self.crl_path = self.out / "ca" / "crl.pem"
        self.ca_created = False
        existing = None if options.force else pki.load_pair(self.ca_key, self.ca_cert)
        if existing is None:
            existing = pki.new_ca(options.key_type, options.ca_days)
            pki.save_pair(existing, self.ca_key, self.ca_cert)
            self.ca_created = True
        self.ca = existing
        self.revoked = [] if self.ca_created else pki.load_revoked(self.crl_path, self.ca)
        self.revoked_names: List[str] = []

    def revoke(self, cert_path: Path, username: str) -> None:
        if not cert_path.exists():
            return
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        if pki.is_issued_by(cert, self.ca, min_days_left=0):
            self.revoked.append(pki.revocation(cert))
            self.revoked_names.append(username)

    def account(
        self, username: str, bundle: Path, env_name: str, password: Optional[str], rotate: bool
    ) -> Account:
        """Write or refresh one bundle: CA cert, client cert+key, env file with the password."""
        opts = self.options
        key_path, cert_path, env_path = (
            bundle / f"{username}.key",
            bundle / f"{username}.crt",
            bundle / env_name,
        )
        bundle.mkdir(parents=True, exist_ok=True)
        os.chmod(bundle, 0o700)
        fresh = rotate or opts.force
        old_env = {} if fresh else read_env_file(env_path)
        password = password or old_env.get("JETFED_PASSWORD") or secrets.token_urlsafe(24)
        pair = None if fresh else pki.load_pair(key_path, cert_path)
        renew_days = min(RENEW_BEFORE_DAYS, opts.cert_days // 2)
        if pair is None or not pki.is_issued_by(pair.cert, self.ca, renew_days):
            if rotate:
                self.revoke(cert_path, username)
            pair = pki.issue_client_cert(self.ca, username, opts.key_type, opts.cert_days)
            pki.save_pair(pair, key_path, cert_path)
        pki.write_public(bundle / "ca.crt", pki.cert_pem(self.ca.cert))
        files_dir = opts.device_install_dir if opts.device_install_dir else str(bundle)
        values = {"JETFED_BROKER": opts.broker_url()}
        if env_name == "edge.env":
            values["JETFED_DEVICE_ID"] = username
        values.update(
            {
                "JETFED_USERNAME": username,
                "JETFED_PASSWORD": password,
                "JETFED_CA_FILE": f"{files_dir}/ca.crt",
                "JETFED_CERT_FILE": f"{files_dir}/{username}.crt",
                "JETFED_KEY_FILE": f"{files_dir}/{username}.key",
            }
        )
        write_env_file(env_path, values)
        return Account(username, password, bundle, env_path)

    def drop_stale_devices(self, keep: List[str]) -> None:
        """A device removed from devices.yaml loses its cert (revoked) and its bundle."""
        devices_dir = self.out / "devices"
        if not devices_dir.is_dir():
            return
        for bundle in sorted(devices_dir.iterdir()):
            if bundle.is_dir() and bundle.name not in keep:
                self.revoke(bundle / f"{bundle.name}.crt", bundle.name)
                shutil.rmtree(bundle)
                log_event(
                    logger, logging.WARNING, "broker_config.device_removed", device_id=bundle.name
                )


def generate_broker_config(
    spec: DevicesFile,
    out_dir: Path,
    options: BrokerConfigOptions,
    mosquitto_passwd: Optional[str] = None,
) -> BrokerLayout:
    """Write the deployment under `out_dir`; `mosquitto_passwd` is the hashing tool or None."""
    entries = spec.devices
    options.validate([e.id for e in entries])
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} exists and is not a directory")
    gen = _Generator(out_dir, options)
    out = gen.out
    coordinator = gen.account(
        spec.coordinator.username,
        out / "coordinator",
        "coordinator.env",
        spec.coordinator.password,
        False,
    )
    devices = {
        e.id: gen.account(
            e.id, out / "devices" / e.id, "edge.env", e.password, e.id in options.rotate
        )
        for e in entries
    }
    gen.drop_stale_devices(list(devices))
    server = pki.issue_server_cert(
        gen.ca, options.server_hosts(), options.key_type, options.cert_days
    )
    layout = BrokerLayout(
        out_dir=out,
        mosquitto_conf=out / "mosquitto.conf",
        passwd=out / "passwd",
        acl=out / "acl",
        ca_cert=gen.ca_cert,
        ca_key=gen.ca_key,
        crl=gen.crl_path,
        server_cert=out / "server" / "server.crt",
        server_key=out / "server" / "server.key",
        coordinator=coordinator,
        devices=devices,
        ca_created=gen.ca_created,
        revoked=gen.revoked_names,
    )
    pki.save_pair(server, layout.server_key, layout.server_cert)
    pki.write_crl(layout.crl, gen.ca, gen.revoked)
    accounts = {coordinator.username: coordinator.password}
    accounts.update({name: acc.password for name, acc in devices.items()})
    write_password_file(layout.passwd, accounts, mosquitto_passwd)
    pki.write_public(layout.acl, render_acl(coordinator.username, spec.experiments).encode())
    pki.write_public(layout.mosquitto_conf, render_mosquitto_conf(layout, options).encode())
    _hand_to_broker_user(
        [
            layout.passwd,
            layout.acl,
            layout.server_key,
            layout.server_cert,
            layout.ca_cert,
            layout.crl,
        ],
        options.broker_user,
    )
    return layout


def _hand_to_broker_user(paths: List[Path], user: Optional[str]) -> None:
    """Mosquitto started as root drops to `user` (default `mosquitto`) before it reads the
    password file and server key, so those 0600 files must belong to that account."""
    if os.geteuid() != 0:
        return
    name = user or "mosquitto"
    try:
        account = pwd.getpwnam(name)
    except KeyError:
        if user is None:
            return
        raise UserError(f"--broker-user {name!r} is not an account on this host") from None
    for path in paths:
        os.chown(path, account.pw_uid, account.pw_gid)
