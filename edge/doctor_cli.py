"""`jetfed doctor`: check this device before it joins an experiment (exit 1 on any failure)."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from jetfed.edge.errors import UserError, flag_error

STATUS_STYLES = {"ok": "green", "warn": "yellow", "fail": "bold red", "skip": "dim"}


def doctor_command(
    model: str = typer.Option("minilm", "--model", help="Model id or path to budget for."),
    method: str = typer.Option("lora", "--method", help="Any registered method (lora, full...)."),
    batch_size: int = typer.Option(16, "--batch-size", min=1),
    max_length: int = typer.Option(64, "--max-length", min=8),
    num_labels: int = typer.Option(2, "--num-labels", min=1),
    lora_rank: int = typer.Option(8, "--lora-rank", min=1),
    cut_layer: Optional[int] = typer.Option(
        None, "--cut-layer", min=1, help="split: layers on the device (its method default)."
    ),
    broker: Optional[str] = typer.Option(
        None, "--broker", envvar="JETFED_BROKER", help="mqtt://HOST:1883 or mqtts://HOST:8883"
    ),
    username: Optional[str] = typer.Option(None, envvar="JETFED_USERNAME"),
    password: Optional[str] = typer.Option(None, envvar="JETFED_PASSWORD"),
    ca_file: Optional[str] = typer.Option(None, envvar="JETFED_CA_FILE"),
    cert_file: Optional[str] = typer.Option(None, envvar="JETFED_CERT_FILE"),
    key_file: Optional[str] = typer.Option(None, envvar="JETFED_KEY_FILE"),
    broker_timeout_s: float = typer.Option(5.0, "--broker-timeout", min=0.1),
) -> None:
    """Check torch/CUDA, transformers/peft, jtop and rails, power mode, memory budget, broker
    and clock sync; print a table; exit 1 if any check fails (warnings do not fail)."""
    from pydantic import ValidationError
    from rich.console import Console
    from rich.table import Table

    from jetfed.edge.cli import broker_spec
    from jetfed.edge.doctor import DoctorOptions, failed, run_checks
    from jetfed.edge.methods.base import available_methods

    if method not in available_methods():
        raise UserError(f"--method must be one of {', '.join(available_methods())}, got {method!r}")
    spec = None
    if broker is not None:
        spec = broker_spec(
            url=broker,
            username=username,
            password=password,
            ca_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
        )
    try:
        options = DoctorOptions(
            model=model,
            method=method,
            batch_size=batch_size,
            max_length=max_length,
            num_labels=num_labels,
            lora_rank=lora_rank,
            cut_layer=cut_layer,
            broker=spec,
            broker_timeout_s=broker_timeout_s,
        )
    except ValidationError as exc:
        raise flag_error(exc) from None
    results = run_checks(options)
    table = Table(title="jetfed doctor")
    table.add_column("check")
    table.add_column("status")
    table.add_column("detail", overflow="fold")
    for result in results:
        style = STATUS_STYLES.get(result.status, "")
        table.add_row(result.name, f"[{style}]{result.status}[/]", result.detail)
    Console().print(table)
    if failed(results):
        sys.exit(1)


def register(app: typer.Typer) -> None:
    app.command("doctor")(doctor_command)
