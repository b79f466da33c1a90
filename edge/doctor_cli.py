"""`jetfed doctor`: check this device before it joins an experiment (exit 1 on any failure)."""

from __future__ import annotations

import sys
from typing import Any, List, Optional

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
    gradient_checkpointing: bool = typer.Option(
        False, "--gradient-checkpointing", help="Budget with model.gradient_checkpointing."
    ),
    response_tokens: Optional[int] = typer.Option(
        None,
        "--response-tokens",
        min=1,
        help="Causal LMs: response tokens per row, where the logits are (default --max-length).",
    ),
    orin: List[int] = typer.Option(
        [],
        "--orin",
        help="Answer for a Jetson Orin module instead of this machine: 8 (Orin Nano), 16 (Orin "
        "NX), 32 or 64 (AGX Orin); repeatable.",
    ),
    device_memory_gb: List[float] = typer.Option(
        [],
        "--device-memory-gb",
        help="Answer for a device with this much memory for training (GB, `free -b` available "
        "on the idle device); repeatable.",
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
    and clock sync; print a table; exit 1 if any check fails (warnings do not fail). With
    --orin/--device-memory-gb: only the memory budget, for those devices (exit 1 if one does
    not fit)."""
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
            gradient_checkpointing=gradient_checkpointing,
            response_tokens=response_tokens,
            broker=spec,
            broker_timeout_s=broker_timeout_s,
        )
    except ValidationError as exc:
        raise flag_error(exc) from None
    if orin or device_memory_gb:
        sys.exit(0 if report_targets(options, target_devices(orin, device_memory_gb)) else 1)
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


def report_targets(options: Any, devices: List[Any]) -> bool:
    """Print the estimate and one row per device; True when every device fits."""
    from rich.console import Console
    from rich.table import Table

    from jetfed.edge.memory_budget import TrainingBudget, describe
    from jetfed.edge.target_devices import GB, MAX_BATCH, plan_targets

    budget = TrainingBudget(
        options.model,
        options.method,
        options.max_length,
        options.num_labels,
        options.method_config(),
    )
    plan = plan_targets(
        budget,
        devices,
        options.batch_size,
        options.response_tokens,
        options.gradient_checkpointing,
    )
    estimate = plan.estimate
    response = min(options.response_tokens or options.max_length, options.max_length)
    console = Console()
    console.print(
        f"{options.model} ({estimate.total_params:,} parameters), {options.method}"
        f"{f' r{options.lora_rank}' if 'rank' in options.method_config() else ''}, "
        f"batch {options.batch_size} × {options.max_length} tokens"
        + (f", {response} response tokens" if budget.causal else "")
        + f", gradient checkpointing {'on' if options.gradient_checkpointing else 'off'}, "
        "CUDA runtime counted"
    )
    console.print(
        f"An estimate from the architecture in {estimate.source}; no weights loaded.",
        highlight=False,
    )
    console.print(f"At batch {options.batch_size}: " + "; ".join(describe(estimate)))
    table = Table(title="jetfed doctor: will it fit")
    for column in ("device", "for training", "estimated peak", "headroom", "fits"):
        table.add_column(column)
    table.add_column(f"largest batch × {options.max_length}")
    for row in plan.rows:
        largest = row.largest_batch
        most = f"≥ {MAX_BATCH}" if largest >= MAX_BATCH else str(largest) if largest else "none"
        table.add_row(
            row.device.label(),
            f"{row.device.usable_bytes / GB:.1f} GB",
            f"{row.peak_bytes / GB:.1f} GB",
            f"{row.headroom_bytes / GB:+.1f} GB",
            "[green]fits[/]" if row.fits else "[bold red]does not fit[/]",
            most,
        )
    console.print(table)
    fits = all(row.fits for row in plan.rows)
    if not fits:
        checkpointing = "" if options.gradient_checkpointing else " or add --gradient-checkpointing"
        console.print(f"Does not fit: lower --batch-size/--max-length{checkpointing}")
    return fits


def target_devices(orin: List[int], device_memory_gb: List[float]) -> List[Any]:
    """The devices asked for, Orin modules first, in the order given."""
    from jetfed.edge.target_devices import ORIN_MODULES, memory_device

    unknown = [size for size in orin if size not in ORIN_MODULES]
    if unknown:
        sizes = ", ".join(str(size) for size in ORIN_MODULES)
        raise UserError(f"--orin must be one of {sizes} (GB), got {unknown[0]}")
    if any(gb <= 0 for gb in device_memory_gb):
        raise UserError("--device-memory-gb must be above 0")
    return [ORIN_MODULES[size] for size in orin] + [memory_device(gb) for gb in device_memory_gb]


def register(app: typer.Typer) -> None:
    app.command("doctor")(doctor_command)
