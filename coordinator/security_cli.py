"""`jetfed broker-config`: write a Mosquitto deployment with per-device accounts, ACL and TLS."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import List, Optional

import typer


def broker_config(
    devices: Path = typer.Option(
        ..., "--devices", help="YAML: a list of device ids, or {devices, experiments, coordinator}."
    ),
    out: Path = typer.Option(
        ..., "--out", help="Folder to write into (kept and updated on re-runs)."
    ),
    host: List[str] = typer.Option(
        [], "--host", help="Name or IP devices dial (repeatable; the first goes into edge.env)."
    ),
    tls_port: int = typer.Option(8883, "--tls-port", help="TLS listener port."),
    bind: Optional[str] = typer.Option(
        None, "--bind", help="Address the TLS listener binds (default: all)."
    ),
    plain_localhost: bool = typer.Option(
        False,
        "--plain-localhost",
        help="Also listen without TLS on 127.0.0.1 (still password-only).",
    ),
    plain_port: int = typer.Option(
        1883, "--plain-port", help="Port of the --plain-localhost listener."
    ),
    mutual_tls: bool = typer.Option(
        False, "--mutual-tls", help="Require client certs; the cert CN becomes the username."
    ),
    key_type: str = typer.Option("ec", "--key-type", help="ec (P-256) or rsa (2048)."),
    days: int = typer.Option(825, "--days", help="Validity of server and client certs."),
    ca_days: int = typer.Option(3650, "--ca-days", help="Validity of a newly created CA."),
    device_install_dir: Optional[str] = typer.Option(
        None,
        "--device-install-dir",
        help="Where each bundle will live on its device (paths in edge.env); default: here.",
    ),
    rotate: List[str] = typer.Option(
        [], "--rotate", help="Device id: new password, key and cert; the old cert is revoked."
    ),
    broker_user: Optional[str] = typer.Option(
        None,
        "--broker-user",
        help="Account the broker runs as (config `user`); as root, broker files are chowned to it "
        "(default: mosquitto, if that account exists).",
    ),
    force: bool = typer.Option(
        False, "--force", help="Start over: new CA, certs and generated passwords."
    ),
) -> None:
    """Write mosquitto.conf, passwd, acl, a CA, server/client certs and per-device bundles."""
    from jetfed.coordinator.broker_config import BrokerConfigOptions, generate_broker_config
    from jetfed.coordinator.devices_file import load_devices

    options = BrokerConfigOptions(
        hosts=list(host),
        tls_port=tls_port,
        bind_address=bind,
        plain_localhost=plain_localhost,
        plain_port=plain_port,
        mutual_tls=mutual_tls,
        key_type=key_type,
        cert_days=days,
        ca_days=ca_days,
        device_install_dir=device_install_dir,
        rotate=list(rotate),
        force=force,
        broker_user=broker_user,
    )
    layout = generate_broker_config(
        load_devices(devices), out, options, shutil.which("mosquitto_passwd")
    )
    typer.echo(f"{'created' if layout.ca_created else 'kept'} CA {layout.ca_cert}")
    typer.echo(f"broker: mosquitto -c {layout.mosquitto_conf}  ({options.broker_url()})")
    typer.echo(f"coordinator: {layout.coordinator.env_file}")
    for device_id, account in layout.devices.items():
        typer.echo(f"device {device_id}: copy {account.bundle_dir}/ to the device")
    for name in layout.revoked:
        typer.echo(f"revoked the old certificate of {name}")
    typer.echo(f"never deploy {layout.ca_key}: it signs every cert (only ca.crt travels)")


def register(app: typer.Typer) -> None:
    app.command("broker-config")(broker_config)
